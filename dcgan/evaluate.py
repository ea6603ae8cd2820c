"""`dcgan eval A B`: compare two image sets (generator samples or data) with sample metrics.

A is the side being judged (usually a generator), B the reference (usually real
data): precision is "how much of A lies on B's manifold", recall the reverse,
the classifier / Inception Score is A's, and the Parzen window is fitted on A's
images and scores B's. FID and KID are symmetric.

Each side is one of
- a run folder (its generator.safetensors) or a snapshot file: n samples drawn
  with a fixed seed (0 for A, 1 for B, so a run compared with itself gives two
  independent sample sets);
- a data source, optionally with a split: `fashion-mnist:test`, `mnist:train`,
  `emoji`, `fake`, or a folder of images. A random subset of n images (seed 0)
  is used, or all of them when the source has fewer.

Features of data sides are cached (`dcgan.feature_cache`, the one cache) under a key of
source, split, resolution, channels, n and extractor.

The metrics themselves, what each reads and how it prints, are the registry's
(`dcgan.metric_registry`); this module makes their inputs. The table is
`dcgan.eval_table`'s.

`FidTracker` is the training-time helper: reference statistics of the training
set are computed once, and each call samples the generator and returns FID/KID
(any registered metrics of features).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dcgan import __version__, atomic
from dcgan import metric_registry as registry
from dcgan.config import FEATURES
from dcgan.errors import UserError
from dcgan.feature_cache import StatsKey, cached_reference
from dcgan.features import (
    DomainExtractor,
    Extractor,
    batches,
    extract_all,
    get_extractor,
)
from dcgan.metric_registry import Features, Logits, Pair
from dcgan.pixels import to_uint8
from dcgan.rundir import SNAPSHOT, RunDir
from dcgan.sources import LABELLED, SOURCES, SPLITS

# generator forward passes (memory: batch * nc * R * R floats); latent.decode's, so the
# samples are the very forward passes of `dcgan sample` and G.sample
SAMPLE_BATCH = 256
FEATURE_BATCH = 32  # images per extractor forward (Inception: fastest on 2 CPU cores)


@dataclass
class Side:
    """One argument of `dcgan eval`, resolved."""

    spec: str  # as the user wrote it
    kind: str  # "generator" or "data"
    source: str = ""  # data source (name or absolute folder); for generators, its training set
    split: str = ""  # "train" / "test" for data sides
    snapshot: Path | None = None
    generator: torch.nn.Module | None = None  # loaded on the CPU by load_side
    meta: dict[str, Any] = field(default_factory=dict)
    images: np.ndarray | None = None  # uint8 (n, C, R, R) once loaded or sampled
    content: str = ""  # data sides: the loaded source's content digest (keys its statistics)

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"spec": self.spec, "kind": self.kind, "source": self.source}
        if self.kind == "data":
            d["split"] = self.split
        else:
            d["snapshot"] = str(self.snapshot)
            d["kimg"] = self.meta.get("kimg")
        return d


def load_side(spec: str) -> Side:
    """Load one side of a comparison: a run folder, a generator file or folder (its weights
    read here; what dcgan.load takes), `name[:split]` or
    an image folder -> Side."""
    from dcgan.generator import HF_SCHEME, is_generator_path, read

    path = Path(spec).expanduser()
    if spec.startswith(HF_SCHEME) or is_generator_path(path):
        g, meta, file = read(spec)
        return Side(
            spec, "generator", str(meta.get("dataset", "")), snapshot=file, generator=g, meta=meta
        )
    if path.is_file():
        raise UserError(
            f"{spec} is a file but not a {SNAPSHOT} snapshot (or a .pth of the "
            f"canonical example); data must be a folder or a source name "
            f"({', '.join(SOURCES)})"
        )
    if path.is_dir():
        if RunDir(path).is_run():
            raise UserError(
                f"run folder {spec} has no {SNAPSHOT} yet (it is written at the "
                f"first tick); wait for one or pass another run"
            )
        return Side(spec, "data", str(path.resolve()), split="train")
    name, _, split = spec.partition(":")
    if name not in SOURCES:
        raise UserError(
            f"unknown source {spec!r}: expected a run folder, a {SNAPSHOT} file, "
            f"an image folder or one of {', '.join(SOURCES)} "
            f"(with :train or :test for fashion-mnist and mnist)"
        )
    if split and split not in SPLITS:
        raise UserError(f"unknown split {split!r} in {spec!r}: expected train or test")
    if split == "test" and name not in LABELLED:
        raise UserError(f"{name} has no test split: use {name} or {name}:train")
    return Side(spec, "data", name, split=split or "train")


def _labelled_source(sides: list[Side]) -> str:
    """The labelled source (for the domain classifier) among the sides; B first, "" if none."""
    for side in reversed(sides):
        if side.source in LABELLED:
            return side.source
    return ""


def sample_generator(
    g: torch.nn.Module, n: int, seed: int, batch: int = SAMPLE_BATCH, progress: bool = False
) -> np.ndarray:
    """n images from G as uint8 (n, nc, R, R), latents from a seeded CPU generator.

    The latents are drawn on the CPU so the same seed gives the same z on every
    device. Outputs in [-1, 1] map back to bytes exactly as the data were mapped
    to [-1, 1] (x / 127.5 - 1), with rounding: what a saved PNG would hold.
    """
    device = next(g.parameters()).device
    # All n latents in one draw: torch.randn fills blocks of 16 values vectorised,
    # so drawing 3 + 3 + 4 rows does not give the same numbers as drawing 10.
    z_all = torch.randn(n, g.nz, generator=torch.Generator().manual_seed(seed))  # (n, nz)
    out = []
    with torch.no_grad():
        from tqdm import tqdm

        for i in tqdm(range(0, n, batch), desc="sampling", disable=not progress, leave=False):
            z = z_all[i : i + batch].to(device)
            x = g(z).float()  # (b, nc, R, R) in [-1, 1]
            out.append(to_uint8(x).cpu().numpy())
    return np.concatenate(out)


def _load_data(
    side: Side, resolution: int, channels: int, n: int, cache_dir: str, progress: bool
) -> np.ndarray:
    """A random subset (seed 0) of up to n images of a data side: uint8 (m, C, R, R)."""
    from dcgan.data import load_images

    data = load_images(
        side.source, resolution, channels, split=side.split, cache_dir=cache_dir, progress=progress
    )
    side.content = data.content
    images = data.images
    if images.shape[0] > n:
        pick = np.random.default_rng(0).permutation(images.shape[0])[:n]
        images = images[np.sort(pick)]  # sorted: read the cached array front to back
    return images


def _side_features(
    side: Side, extractor: Extractor, key: StatsKey | None, cache_dir: str, progress: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """(features (m, dim), logits (m, K) or None), cached for data sides."""

    def compute() -> tuple[np.ndarray, np.ndarray | None]:
        assert side.images is not None
        return extract_all(
            extractor,
            batches(side.images, FEATURE_BATCH),
            side.images.shape[0],
            FEATURE_BATCH,
            progress,
            desc=f"features {side.spec}",
        )

    if key is None:
        return compute()
    from dcgan.data import cache_root

    ref = cached_reference(key, compute, cache_root(cache_dir))
    return ref.features, ref.logits


@dataclass(frozen=True)
class _Extraction:
    """How this comparison's images become features: the size both sides were loaded
    at, n (part of a data side's cache key) and where the cache is."""

    resolution: int
    channels: int
    n: int
    device: str
    cache_dir: str
    progress: bool

    def extractor(self, features: str, label_source: str) -> Extractor:
        return get_extractor(
            features,
            label_source,
            self.resolution,
            self.channels,
            self.device,
            self.cache_dir,
            self.progress,
        )

    def run(
        self, sides: list[Side], extractor: Extractor
    ) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
        """Per side: features (m, dim) and logits (m, K) or None; cached for data sides."""
        feats, logits = [], []
        for side in sides:
            key = None
            if side.kind == "data":
                key = StatsKey(
                    side.source,
                    side.split,
                    self.resolution,
                    self.channels,
                    self.n,
                    extractor.name,
                    side.content,
                )
            f, z = _side_features(side, extractor, key, self.cache_dir, self.progress)
            feats.append(f)
            logits.append(z)
        return feats, logits


def _logits(
    ex: _Extraction,
    sides: list[Side],
    extractor: Extractor,
    logits: list[np.ndarray | None],
    label_source: str,
) -> Logits:
    """A's and B's class logits: the extractor's when it has a classification head, else
    the domain classifier's (the bundled FID Inception has none)."""
    if extractor.logits_kind is None:
        extractor = ex.extractor("domain", label_source)
        _, logits = ex.run(sides, extractor)
    assert logits[0] is not None and logits[1] is not None
    return Logits(logits[0], logits[1], extractor.logits_kind or "", extractor.name)


def _check_request(metrics: list[str], features: str, n: int) -> list[str]:
    metrics = registry.check_names(metrics)
    if features not in FEATURES:
        raise UserError(f"unknown features {features!r}: choose one of {', '.join(FEATURES)}")
    if n < 10:
        raise UserError(f"--n must be at least 10, got {n}")
    return metrics


def evaluate(
    a: str,
    b: str,
    metrics: list[str],
    features: str,
    n: int,
    device: str = "cpu",
    json_path: str | None = None,
    progress: bool = True,
    cache_dir: str = "",
) -> dict[str, Any]:
    """Compare A with B; returns (and optionally writes as JSON) the metrics' fields +
    metadata.

    Metric keys are the registry's (`dcgan.metric_registry`): "fid"; "kid" [mean,
    std]; "precision", "recall"; "is" or "classifier_score" [mean, std] (of A;
    "..._b" holds B's for reference); "parzen" [mean, stderr] in nats with
    "parzen_sigma"; and any registered since. Metadata: "a", "b" (the sides), "n"
    (images actually used per side), "n_requested", "features" (extractor name),
    "resolution", "channels", "time" (seconds), "timings".
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    metrics = _check_request(metrics, features, n)
    sides = [load_side(a), load_side(b)]
    gens = [s for s in sides if s.kind == "generator"]

    # Resolution and channels: a generator's own; else 32 for the 28x28 IDX sources, 64
    # otherwise. Pure noise ("fake") takes the other side's size and channels.
    shaped = [s for s in sides if s.source != "fake"] or sides
    if gens:
        shapes = {(int(s.meta["resolution"]), int(s.meta["nc"])) for s in gens}
        if len(shapes) > 1:
            raise UserError(
                f"the two generators make different images (resolution, channels): {sorted(shapes)}"
            )
        resolution, channels = shapes.pop()
    else:
        resolution = 32 if all(s.source in LABELLED for s in shaped) else 64
        channels = 0
    label_source = _labelled_source(sides)
    # class logits come from the domain classifier unless the extractor is it
    wants_logits = [m for m in metrics if "logits" in registry.REGISTRY[m].needs]
    if (features == "domain" or wants_logits) and not label_source:
        what = (
            "--features domain"
            if features == "domain"
            else (f"{','.join(wants_logits)} (class logits, from the domain classifier)")
        )
        leave_out = f" and leave out {','.join(wants_logits)}" if wants_logits else ""
        raise UserError(
            f"{what} needs a labelled source ({', '.join(LABELLED)}) on one side; "
            f"use --features inception{leave_out}"
        )

    # Images: sample generators, load data (channels resolved when both are data).
    t0 = time.perf_counter()
    for i, side in enumerate(sides):
        if side.generator is not None:
            side.generator.to(device)
            side.images = sample_generator(side.generator, n, seed=i, progress=progress)
        else:
            side.images = _load_data(side, resolution, channels, n, cache_dir, progress)
    if channels == 0:
        own = {s.images.shape[1] for s in shaped}
        channels = own.pop() if len(own) == 1 else 3
        for side in sides:  # grey beside colour: load the grey one as 3 identical channels
            if side.images.shape[1] != channels:
                side.images = _load_data(side, resolution, channels, n, cache_dir, progress)
    timings["images"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ex = _Extraction(resolution, channels, n, str(device), cache_dir, progress)
    extractor = ex.extractor(features, label_source)
    feats, logits = ex.run(sides, extractor)
    timings["features"] = time.perf_counter() - t0

    result: dict[str, Any] = {
        "a": sides[0].describe(),
        "b": sides[1].describe(),
        "n": {"a": int(feats[0].shape[0]), "b": int(feats[1].shape[0])},
        "n_requested": n,
        "features": extractor.name,
        "resolution": resolution,
        "channels": channels,
        "device": str(device),
    }
    if isinstance(extractor, DomainExtractor):
        result["classifier_test_accuracy"] = extractor.test_accuracy

    t0 = time.perf_counter()  # the domain classifier's logits, when made here, count here
    inputs: dict[str, Any] = {
        "features": Pair(Features(feats[0]), Features(feats[1])),
        "images": Pair(sides[0].images, sides[1].images),
        "n": n,
    }
    if "logits" in registry.needed(metrics):
        inputs["logits"] = _logits(ex, sides, extractor, logits, label_source)
    result.update(registry.run(metrics, inputs))
    timings["metrics"] = time.perf_counter() - t0

    result["time"] = round(time.perf_counter() - t_start, 2)
    result["timings"] = {k: round(v, 2) for k, v in timings.items()}
    result["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result["dcgan_version"] = __version__
    if json_path:
        write_json(result, json_path)
    return result


def write_json(result: dict[str, Any], path: str | Path) -> None:
    """Write the result as indented JSON, through a temporary file and a rename."""
    atomic.write_text(path, json.dumps(result, indent=2) + "\n")


class FidTracker:
    """FID/KID of a generator against the training set, for use during training.

    The reference features (n random training images, seed 0) are computed once
    and cached on disk, their statistics once per tracker; each call draws n
    samples with a fixed seed, so values at different kimg differ only through the
    weights. `metrics`: any registered metrics that read features (and n) only.
    """

    def __init__(
        self,
        dataset: str,
        resolution: int,
        channels: int,
        features: str = "domain",
        n: int = 5000,
        device: str | torch.device = "cpu",
        cache_dir: str = "",
        seed: int = 0,
        progress: bool = False,
        metrics: tuple[str, ...] = ("fid", "kid"),
    ):
        if features not in FEATURES:
            raise UserError(f"unknown features {features!r}: choose one of {', '.join(FEATURES)}")
        if n < 10:
            raise UserError(f"the FID tracker needs n >= 10, got {n}")
        self.metrics = registry.check_names(metrics)
        beyond = registry.needed(self.metrics) - {"features", "n"}
        if beyond:
            raise UserError(
                f"the FID tracker gives metrics features and n only; "
                f"{','.join(self.metrics)} need {', '.join(sorted(beyond))} too"
            )
        self.n, self.seed, self.progress = n, seed, progress
        # the training set as `dcgan eval` reads a data side: same subset, same cache entry
        folder = Path(dataset).expanduser()
        source = str(folder.resolve()) if folder.is_dir() else dataset
        train = Side(f"{dataset}:train", "data", source, split="train")
        train.images = _load_data(train, resolution, channels, n, cache_dir, progress)
        self.channels = int(train.images.shape[1])
        self.extractor = get_extractor(
            features, source, resolution, self.channels, device, cache_dir, progress
        )
        key = StatsKey(
            source, "train", resolution, self.channels, n, self.extractor.name, train.content
        )
        reference, _ = _side_features(train, self.extractor, key, cache_dir, progress)
        self.reference = Features(reference)  # (n, dim); its statistics made once, kept

    @property
    def features(self) -> str:
        return self.extractor.name

    def __call__(self, generator: torch.nn.Module) -> dict[str, Any]:
        """Sample n images from the (eval-mode) generator -> {"fid", "kid", "features"}
        (the fields of each of its metrics, and the extractor's name)."""
        fakes = Side("G_ema", "generator", images=sample_generator(generator, self.n, self.seed))
        f, _ = _side_features(fakes, self.extractor, None, "", self.progress)
        inputs = {"features": Pair(Features(f), self.reference), "n": self.n}
        return {**registry.run(self.metrics, inputs), "features": self.extractor.name}
