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

`FidTracker` is the training-time helper: reference statistics of the training
set are computed once, and each call samples the generator and returns FID/KID.
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
from dcgan.config import FEATURES
from dcgan.data import LABELLED, SOURCES, SPLITS
from dcgan.errors import UserError
from dcgan.feature_cache import StatsKey, cached_reference
from dcgan.features import (
    DomainExtractor,
    Extractor,
    batches,
    extract_all,
    get_extractor,
)
from dcgan.metrics import (
    feature_stats,
    fid_from_features,
    frechet_distance,
    inception_score,
    kid_from_features,
    parzen_log_likelihood,
    parzen_select_sigma,
    precision_recall,
)
from dcgan.pixels import to_uint8
from dcgan.rundir import SNAPSHOT, RunDir

METRICS = ("fid", "kid", "pr", "is", "parzen")
# generator forward passes (memory: batch * nc * R * R floats); latent.decode's, so the
# samples are the very forward passes of `dcgan sample` and G.sample
SAMPLE_BATCH = 256
FEATURE_BATCH = 32  # images per extractor forward (Inception: fastest on 2 CPU cores)
IS_SPLITS = 10


@dataclass
class Side:
    """One argument of `dcgan eval`, resolved."""

    spec: str  # as the user wrote it
    kind: str  # "generator" or "data"
    source: str = ""  # data source (name or absolute folder); for generators, its training set
    split: str = ""  # "train" / "test" for data sides
    snapshot: Path | None = None
    generator: torch.nn.Module | None = None  # loaded on the CPU by parse_side
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


def parse_side(spec: str) -> Side:
    """A run folder, a generator file or folder (what dcgan.load takes), `name[:split]` or
    an image folder -> Side."""
    from dcgan.generator import HF_SCHEME, is_generator_path, read

    path = Path(spec).expanduser()
    if spec.startswith(HF_SCHEME) or is_generator_path(path):
        g, meta, file = read(spec)
        return Side(spec, "generator", str(meta.get("dataset", "")), snapshot=file,
                    generator=g, meta=meta)
    if path.is_file():
        raise UserError(f"{spec} is a file but not a {SNAPSHOT} snapshot (or a .pth of the "
                        f"canonical example); data must be a folder or a source name "
                        f"({', '.join(SOURCES)})")
    if path.is_dir():
        if RunDir(path).is_run():
            raise UserError(f"run folder {spec} has no {SNAPSHOT} yet (it is written at the "
                            f"first tick); wait for one or pass another run")
        return Side(spec, "data", str(path.resolve()), split="train")
    name, _, split = spec.partition(":")
    if name not in SOURCES:
        raise UserError(f"unknown source {spec!r}: expected a run folder, a {SNAPSHOT} file, "
                        f"an image folder or one of {', '.join(SOURCES)} "
                        f"(with :train or :test for fashion-mnist and mnist)")
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


def sample_generator(g: torch.nn.Module, n: int, seed: int, batch: int = SAMPLE_BATCH,
                     progress: bool = False) -> np.ndarray:
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
            z = z_all[i:i + batch].to(device)
            x = g(z).float()  # (b, nc, R, R) in [-1, 1]
            out.append(to_uint8(x).cpu().numpy())
    return np.concatenate(out)


def _load_data(side: Side, resolution: int, channels: int, n: int, cache_dir: str,
               progress: bool) -> np.ndarray:
    """A random subset (seed 0) of up to n images of a data side: uint8 (m, C, R, R)."""
    from dcgan.data import load_images

    data = load_images(side.source, resolution, channels, split=side.split,
                       cache_dir=cache_dir, progress=progress)
    side.content = data.content
    images = data.images
    if images.shape[0] > n:
        pick = np.random.default_rng(0).permutation(images.shape[0])[:n]
        images = images[np.sort(pick)]  # sorted: read the cached array front to back
    return images


def _side_features(side: Side, extractor: Extractor, key: StatsKey | None, cache_dir: str,
                   progress: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(features (m, dim), logits (m, K) or None), cached for data sides."""
    def compute() -> tuple[np.ndarray, np.ndarray | None]:
        assert side.images is not None
        return extract_all(extractor, batches(side.images, FEATURE_BATCH), side.images.shape[0],
                           FEATURE_BATCH, progress, desc=f"features {side.spec}")

    if key is None:
        return compute()
    from dcgan.data import cache_root

    ref = cached_reference(key, compute, cache_root(cache_dir))
    return ref.features, ref.logits


def _check_request(metrics: list[str], features: str, n: int) -> list[str]:
    metrics = [m.strip().lower() for m in metrics if m.strip()]
    if not metrics:
        raise UserError(f"no metrics given: choose from {','.join(METRICS)}")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise UserError(f"unknown metric(s) {','.join(unknown)}: choose from {','.join(METRICS)}")
    if features not in FEATURES:
        raise UserError(f"unknown features {features!r}: choose one of {', '.join(FEATURES)}")
    if n < 10:
        raise UserError(f"--n must be at least 10, got {n}")
    return list(dict.fromkeys(metrics))  # drop repeats, keep order


def evaluate(a: str, b: str, metrics: list[str], features: str, n: int, device: str = "cpu",
             json_path: str | None = None, progress: bool = True,
             cache_dir: str = "") -> dict[str, Any]:
    """Compare A with B; returns (and optionally writes as JSON) one key per metric + metadata.

    Keys: "fid"; "kid" [mean, std]; "precision", "recall"; "is" or
    "classifier_score" [mean, std] (of A; "..._b" holds B's for reference);
    "parzen" [mean, stderr] in nats with "parzen_sigma"; and "a", "b" (the
    sides), "n" (images actually used per side), "n_requested", "features"
    (extractor name), "resolution", "channels", "time" (seconds), "timings".
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    metrics = _check_request(metrics, features, n)
    sides = [parse_side(a), parse_side(b)]
    gens = [s for s in sides if s.kind == "generator"]

    # Resolution and channels: a generator's own; else 32 for the 28x28 IDX sources, 64
    # otherwise. Pure noise ("fake") takes the other side's size and channels.
    shaped = [s for s in sides if s.source != "fake"] or sides
    if gens:
        shapes = {(int(s.meta["resolution"]), int(s.meta["nc"])) for s in gens}
        if len(shapes) > 1:
            raise UserError(f"the two generators make different images "
                            f"(resolution, channels): {sorted(shapes)}")
        resolution, channels = shapes.pop()
    else:
        resolution = 32 if all(s.source in LABELLED for s in shaped) else 64
        channels = 0
    label_source = _labelled_source(sides)
    need_domain = features == "domain" or "is" in metrics  # IS falls back to the classifier
    if need_domain and not label_source:
        what = "--features domain" if features == "domain" else "the classifier score (is)"
        raise UserError(f"{what} needs a labelled source ({', '.join(LABELLED)}) on one side; "
                        f"use --features inception and leave out is")

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
    extractor = get_extractor(features, label_source, resolution, channels, device, cache_dir,
                              progress)
    feats, logits = [], []
    for side in sides:
        key = None
        if side.kind == "data":
            key = StatsKey(side.source, side.split, resolution, channels, n, extractor.name,
                           side.content)
        f, z = _side_features(side, extractor, key, cache_dir, progress)
        feats.append(f)
        logits.append(z)
    timings["features"] = time.perf_counter() - t0

    result: dict[str, Any] = {
        "a": sides[0].describe(), "b": sides[1].describe(),
        "n": {"a": int(feats[0].shape[0]), "b": int(feats[1].shape[0])}, "n_requested": n,
        "features": extractor.name, "resolution": resolution, "channels": channels,
        "device": str(device),
    }
    if isinstance(extractor, DomainExtractor):
        result["classifier_test_accuracy"] = extractor.test_accuracy

    t0 = time.perf_counter()
    if "fid" in metrics:
        result["fid"] = fid_from_features(feats[0], feats[1])
    if "kid" in metrics:
        result["kid"] = list(kid_from_features(feats[0], feats[1]))
    if "pr" in metrics:
        result["precision"], result["recall"] = precision_recall(real=feats[1], fake=feats[0])
    if "is" in metrics:
        _score(result, sides, extractor, logits, label_source, resolution, channels, device,
               cache_dir, progress, n)
    if "parzen" in metrics:
        _parzen(result, sides)
    timings["metrics"] = time.perf_counter() - t0

    result["time"] = round(time.perf_counter() - t_start, 2)
    result["timings"] = {k: round(v, 2) for k, v in timings.items()}
    result["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result["dcgan_version"] = __version__
    if json_path:
        write_json(result, json_path)
    return result


def _score(result: dict[str, Any], sides: list[Side], extractor: Extractor,
           logits: list[np.ndarray | None], label_source: str, resolution: int, channels: int,
           device: str, cache_dir: str, progress: bool, n: int) -> None:
    """Inception Score when the extractor has Inception logits, else the classifier score.

    The bundled FID Inception has no classification head, so with --features
    inception the score comes from the domain classifier and is named so.
    """
    if extractor.logits_kind is None:
        clf = get_extractor("domain", label_source, resolution, channels, device, cache_dir,
                            progress)
        logits = []
        for side in sides:
            key = None
            if side.kind == "data":
                key = StatsKey(side.source, side.split, resolution, channels, n, clf.name,
                               side.content)
            logits.append(_side_features(side, clf, key, cache_dir, progress)[1])
        extractor = clf
    name = "is" if extractor.logits_kind == "inception" else "classifier_score"
    for suffix, z in (("", logits[0]), ("_b", logits[1])):
        assert z is not None
        result[name + suffix] = list(inception_score(z, splits=min(IS_SPLITS, z.shape[0])))
    result[name + "_features"] = extractor.name


def _parzen(result: dict[str, Any], sides: list[Side]) -> None:
    """Goodfellow et al.'s Parzen estimate: kernels on A, sigma on B's first half, test on
    the second half; pixels scaled to [0, 1]."""
    a_img, b_img = sides[0].images, sides[1].images
    assert a_img is not None and b_img is not None
    if b_img.shape[0] < 2:
        raise UserError("parzen needs at least 2 images on side B (validation and test)")
    centres = a_img.reshape(a_img.shape[0], -1).astype(np.float32) / 255.0
    held = b_img.reshape(b_img.shape[0], -1).astype(np.float32) / 255.0
    half = held.shape[0] // 2
    sigma = parzen_select_sigma(centres, held[:half])
    mean, stderr = parzen_log_likelihood(centres, held[half:], sigma)
    result["parzen"] = [mean, stderr]
    result["parzen_sigma"] = sigma
    result["parzen_n"] = {"kernels": int(centres.shape[0]), "validation": half,
                          "test": int(held.shape[0] - half)}


def write_json(result: dict[str, Any], path: str | Path) -> None:
    """Write the result as indented JSON, through a temporary file and a rename."""
    atomic.write_text(path, json.dumps(result, indent=2) + "\n")


def _pm(v: list[float], digits: int = 4) -> str:
    return f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}"


def format_table(result: dict[str, Any]) -> str:
    """A few human-readable lines: what was compared, with which features, then the metrics."""
    a, b = result["a"], result["b"]

    def side(s: dict[str, Any], n: int) -> str:
        if s["kind"] == "generator":
            return f"{s['spec']} (generator, {s.get('kimg') or 0:g} kimg, {n} samples)"
        return f"{s['spec']} ({s['split']}, {n} images)"

    lines = [
        f"A: {side(a, result['n']['a'])}",
        f"B: {side(b, result['n']['b'])}",
        f"features: {result['features']}  at {result['resolution']}px, "
        f"{result['channels']} channel(s)",
    ]
    if "classifier_test_accuracy" in result:
        lines[-1] += f"  (classifier test accuracy {100 * result['classifier_test_accuracy']:.1f}%)"
    rows: list[tuple[str, str]] = []
    if "fid" in result:
        rows.append(("FID", f"{result['fid']:.3f}"))
    if "kid" in result:
        rows.append(("KID", _pm(result["kid"], 5)))
    if "precision" in result:
        rows.append(("precision (k=3)", f"{result['precision']:.4f}"))
        rows.append(("recall (k=3)", f"{result['recall']:.4f}"))
    for name, label in (("is", "Inception Score"), ("classifier_score", "classifier score")):
        if name in result:
            rows.append((f"{label} A", _pm(result[name], 3)))
            rows.append((f"{label} B", _pm(result[name + "_b"], 3)))
            if name == "classifier_score" and result[name + "_features"] != result["features"]:
                rows.append(("  (scored with", result[name + "_features"] + ")"))
    if "parzen" in result:
        rows.append((f"Parzen log-lik. (sigma {result['parzen_sigma']:.3f})",
                     _pm(result["parzen"], 1) + " nats"))
    width = max((len(r[0]) for r in rows), default=0)
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    lines.append(f"time: {result['time']:.1f} s")
    return "\n".join(lines)


class FidTracker:
    """FID/KID of a generator against the training set, for use during training.

    The reference features (n random training images, seed 0) are computed once
    and cached on disk; each call draws n samples with a fixed seed, so values
    at different kimg differ only through the weights.
    """

    def __init__(self, dataset: str, resolution: int, channels: int, features: str = "domain",
                 n: int = 5000, device: str | torch.device = "cpu", cache_dir: str = "",
                 seed: int = 0, progress: bool = False):
        if features not in FEATURES:
            raise UserError(f"unknown features {features!r}: choose one of {', '.join(FEATURES)}")
        if n < 10:
            raise UserError(f"the FID tracker needs n >= 10, got {n}")
        self.n, self.seed, self.progress = n, seed, progress
        # the training set as `dcgan eval` reads a data side: same subset, same cache entry
        folder = Path(dataset).expanduser()
        source = str(folder.resolve()) if folder.is_dir() else dataset
        train = Side(f"{dataset}:train", "data", source, split="train")
        train.images = _load_data(train, resolution, channels, n, cache_dir, progress)
        self.channels = int(train.images.shape[1])
        self.extractor = get_extractor(features, source, resolution, self.channels, device,
                                       cache_dir, progress)
        key = StatsKey(source, "train", resolution, self.channels, n, self.extractor.name,
                       train.content)
        self.reference, _ = _side_features(train, self.extractor, key, cache_dir, progress)
        self.mu, self.sigma = feature_stats(self.reference)

    @property
    def features(self) -> str:
        return self.extractor.name

    def __call__(self, generator: torch.nn.Module) -> dict[str, Any]:
        """Sample n images from the (eval-mode) generator -> {"fid", "kid", "features"}."""
        fakes = Side("G_ema", "generator", images=sample_generator(generator, self.n, self.seed))
        f, _ = _side_features(fakes, self.extractor, None, "", self.progress)
        mu, sigma = feature_stats(f)
        return {"fid": frechet_distance(mu, sigma, self.mu, self.sigma),
                "kid": list(kid_from_features(f, self.reference)), "features": self.extractor.name}

