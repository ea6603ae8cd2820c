"""The metrics of `dcgan eval`, one registered function each.

A metric is a function from the inputs it needs to a dict of JSON fields, registered
once with `@metric`:

    @metric("fid", needs=("features",), rows=lambda r: [("FID", f"{r['fid']:.3f}")])
    def fid(features: Pair) -> dict[str, Any]:
        '''Frechet distance between Gaussians fitted to A's and B's features.'''
        return {"fid": frechet_distance(*features.a.stats, *features.b.stats)}

From then on `dcgan eval --metrics fid` runs it, its fields go into the result (and
the --json file), its rows into the table, its name and help (the docstring's first
paragraph) into `dcgan eval --help`, and the training-time `FidTracker` can run it when it needs no
more than features and n. Nothing else is edited to add a metric.

The inputs, each passed to the function under its name when listed in `needs`:
- features: `Pair` of `Features` of A and B, from one extractor;
- logits: `Logits` of A and B: the extractor's own, else the domain classifier's
  (made only when a requested metric needs them);
- images: `Pair` of uint8 images (n, C, R, R) of A and B;
- n: the images per side that were asked for.

A is the side being judged, B the reference. The arithmetic is `dcgan.metrics`'s;
this module names it, says what feeds it and how it prints. numpy and
`dcgan.metrics` are imported inside the functions, so that `dcgan --help` (which
lists the metrics) starts without them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from dcgan.errors import UserError

if TYPE_CHECKING:
    import numpy as np

NEEDS = ("features", "logits", "images", "n")
# the keys of a result that belong to the comparison, not to a metric (dcgan.evaluate
# writes them); no metric may declare one
METADATA = (
    "a",
    "b",
    "n",
    "n_requested",
    "features",
    "resolution",
    "channels",
    "device",
    "classifier_test_accuracy",
    "time",
    "timings",
    "date",
    "dcgan_version",
)
IS_SPLITS = 10

Rows = Callable[[dict[str, Any]], list[tuple[str, str]]]


class Features:
    """One side's features (n, D) float32, and their float64 mean (D,) and covariance
    (D, D), made on first use and then kept: the FID tracker's reference is one
    `Features` for the whole run, so its statistics are computed once."""

    def __init__(self, array: np.ndarray):
        self.array = array

    @cached_property
    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        from dcgan.metrics import feature_stats

        return feature_stats(self.array)


@dataclass(frozen=True)
class Pair:
    """One input of both sides: A (judged), B (reference)."""

    a: Any
    b: Any


@dataclass(frozen=True)
class Logits(Pair):
    """Class logits (n, K) of A and B, and the network that made them."""

    kind: str  # the extractor's logits_kind: "inception" or "classifier"
    network: str  # its name, as results report features


@dataclass(frozen=True)
class Metric:
    """A registered metric: its function and what it declared."""

    name: str  # what --metrics takes
    fn: Callable[..., dict[str, Any]]
    needs: tuple[str, ...]  # keywords fn is called with, from NEEDS
    fields: tuple[str, ...]  # every key fn may return
    rows: Rows  # its table rows, read from a whole result
    help: str  # one line for `dcgan eval --help`

    def __call__(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        values = self.fn(**{k: inputs[k] for k in self.needs})
        stray = sorted(set(values) - set(self.fields))
        if stray:  # a programming error: the table and the clash checks read `fields`
            raise RuntimeError(f"metric {self.name} returned undeclared fields {stray}")
        return values

    def ran_in(self, result: Mapping[str, Any]) -> bool:
        """Whether a result holds any of its fields."""
        return any(f in result for f in self.fields)


REGISTRY: dict[str, Metric] = {}  # in registration order: the order of the table and JSON


def metric(
    name: str,
    *,
    needs: Iterable[str],
    fields: Iterable[str] | None = None,
    rows: Rows | None = None,
) -> Callable[[Callable], Callable]:
    """Register the decorated function as the metric `name`.

    fields: the result keys it writes (default: just `name`); rows: the table rows
    from a result (default: one per field, "value" or "mean ± std"). The first
    paragraph of its docstring is its help.
    """

    def register(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        keys = tuple(fields) if fields is not None else (name,)
        wants = tuple(needs)
        if name in REGISTRY:
            raise ValueError(f"metric {name!r} is registered already")
        if "," in name or name != name.strip().lower() or not name:
            raise ValueError(f"metric name {name!r}: lower case, no commas (--metrics a,b)")
        if set(wants) - set(NEEDS):
            raise ValueError(
                f"metric {name!r} needs {sorted(set(wants) - set(NEEDS))}: "
                f"inputs are {', '.join(NEEDS)}"
            )
        taken = set(METADATA).union(*(m.fields for m in REGISTRY.values()))
        if taken & set(keys):
            raise ValueError(f"metric {name!r} would overwrite {sorted(taken & set(keys))}")
        help_ = " ".join((fn.__doc__ or "").strip().split("\n\n")[0].split())
        REGISTRY[name] = Metric(name, fn, wants, keys, rows or _default_rows(keys), help_)
        return fn

    return register


# ----------------------------------------------------------------------------------------------
# What the pipeline, the table and the command line read


def check_names(names: Iterable[str]) -> list[str]:
    """--metrics as given -> known names, repeats dropped, in the order given."""
    names = [m.strip().lower() for m in names if m.strip()]
    known = ",".join(REGISTRY)
    if not names:
        raise UserError(f"no metrics given: choose from {known}")
    unknown = [m for m in names if m not in REGISTRY]
    if unknown:
        raise UserError(f"unknown metric(s) {','.join(unknown)}: choose from {known}")
    return list(dict.fromkeys(names))


def needed(names: Iterable[str]) -> set[str]:
    """The inputs the metrics `names` read between them."""
    return set().union(*(REGISTRY[m].needs for m in names))


def run(names: Iterable[str], inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of the metrics `names`, in registration order (whatever the order
    asked), so that a result's keys always come in one order."""
    chosen = set(names)
    result: dict[str, Any] = {}
    for m in REGISTRY.values():
        if m.name in chosen:
            result.update(m(inputs))
    return result


def table_rows(result: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows of every metric present in a result (also one read from JSON)."""
    return [row for m in REGISTRY.values() if m.ran_in(result) for row in m.rows(dict(result))]


def help_text() -> str:
    """--metrics' help: each name with its help."""
    listed = "; ".join(
        f"{m.name}: {m.help.rstrip('.')}" if m.help else m.name for m in REGISTRY.values()
    )
    return f"comma-separated, any of {','.join(REGISTRY)} ({listed})".replace("%", "%%")


def _value(v: Any) -> str:
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return _pm(v, 4)
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _default_rows(fields: tuple[str, ...]) -> Rows:
    return lambda r: [(f, _value(r[f])) for f in fields if f in r]


def _pm(v: list[float], digits: int) -> str:
    return f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}"


# ----------------------------------------------------------------------------------------------
# The metrics


@metric("fid", needs=("features",), rows=lambda r: [("FID", f"{r['fid']:.3f}")])
def fid(features: Pair) -> dict[str, Any]:
    """Frechet distance between Gaussians fitted to A's and B's features."""
    from dcgan.metrics import frechet_distance

    return {"fid": frechet_distance(*features.a.stats, *features.b.stats)}


@metric("kid", needs=("features",), rows=lambda r: [("KID", _pm(r["kid"], 5))])
def kid(features: Pair) -> dict[str, Any]:
    """kernel inception distance: unbiased MMD^2 of the features, [mean, std] over 100
    subsets."""
    from dcgan.metrics import kid_from_features

    return {"kid": list(kid_from_features(features.a.array, features.b.array))}


@metric(
    "pr",
    needs=("features",),
    fields=("precision", "recall"),
    rows=lambda r: [
        ("precision (k=3)", f"{r['precision']:.4f}"),
        ("recall (k=3)", f"{r['recall']:.4f}"),
    ],
)
def precision_recall(features: Pair) -> dict[str, Any]:
    """precision (how much of A lies on B's manifold) and recall (the reverse), k=3."""
    from dcgan.metrics import precision_recall as pr

    precision, recall = pr(real=features.b.array, fake=features.a.array)
    return {"precision": precision, "recall": recall}


def _score_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for name, label in (("is", "Inception Score"), ("classifier_score", "classifier score")):
        if name in r:
            rows.append((f"{label} A", _pm(r[name], 3)))
            rows.append((f"{label} B", _pm(r[name + "_b"], 3)))
            if name == "classifier_score" and r[name + "_features"] != r["features"]:
                rows.append(("  (scored with", r[name + "_features"] + ")"))
    return rows


@metric(
    "is",
    needs=("logits",),
    rows=_score_rows,
    fields=(
        "is",
        "is_b",
        "is_features",
        "classifier_score",
        "classifier_score_b",
        "classifier_score_features",
    ),
)
def inception_score(logits: Logits) -> dict[str, Any]:
    """Inception Score of A, [mean, std] (B's as is_b), or the classifier score over the
    domain classifier's logits.

    Named classifier_score when the logits are the domain classifier's, as always with
    --features inception: the FID Inception has no classification head.
    """
    from dcgan.metrics import inception_score as score

    name = "is" if logits.kind == "inception" else "classifier_score"
    out = {
        name + suffix: list(score(z, splits=min(IS_SPLITS, z.shape[0])))
        for suffix, z in (("", logits.a), ("_b", logits.b))
    }
    return {**out, name + "_features": logits.network}


@metric(
    "parzen",
    needs=("images",),
    fields=("parzen", "parzen_sigma", "parzen_n"),
    rows=lambda r: [
        (f"Parzen log-lik. (sigma {r['parzen_sigma']:.3f})", _pm(r["parzen"], 1) + " nats")
    ],
)
def parzen(images: Pair) -> dict[str, Any]:
    """Parzen-window log-likelihood of B under kernels on A's pixels, nats [mean, stderr].

    Goodfellow et al.'s estimate: kernels on A, sigma chosen on B's first half,
    tested on the second half; pixels scaled to [0, 1].
    """
    import numpy as np

    from dcgan.metrics import parzen_log_likelihood, parzen_select_sigma

    if images.b.shape[0] < 2:
        raise UserError("parzen needs at least 2 images on side B (validation and test)")
    centres = images.a.reshape(images.a.shape[0], -1).astype(np.float32) / 255.0  # (n_a, CRR)
    held = images.b.reshape(images.b.shape[0], -1).astype(np.float32) / 255.0  # (n_b, CRR)
    half = held.shape[0] // 2
    sigma = parzen_select_sigma(centres, held[:half])
    mean, stderr = parzen_log_likelihood(centres, held[half:], sigma)
    return {
        "parzen": [mean, stderr],
        "parzen_sigma": sigma,
        "parzen_n": {
            "kernels": int(centres.shape[0]),
            "validation": half,
            "test": int(held.shape[0] - half),
        },
    }
