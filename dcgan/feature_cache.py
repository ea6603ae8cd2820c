"""The one cache of reference features: data features and statistics stored on disk.

Evaluation runs in three layers: inputs (data sources and generators: `dcgan.data`,
`dcgan.rundir`), features (`dcgan.features` extractors, and this cache of their
output on data), metrics (`dcgan.metrics`, pure functions over arrays). A cache
entry is keyed by everything that determines it: the source and its content
digest, the split, the resolution, the channels, the number of images and the
extractor (with its weights' fingerprint).
"""

from __future__ import annotations

import hashlib
import json
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dcgan import atomic
from dcgan.metrics import feature_stats


@dataclass(frozen=True)
class StatsKey:
    """Everything that determines a reference feature set.

    Leaving any of these out of the key is the classic stale-cache bug: the same
    file would be returned for another split, size or feature network.
    """

    source: str  # data source as given (name or resolved folder path)
    split: str  # "train", "test" or "" for unsplit sources
    resolution: int
    channels: int
    n: int  # number of images requested (the file records how many were used)
    extractor: str  # extractor name including its weight fingerprint
    content: str = ""  # the image cache's digest of the source: new files, new key

    def digest(self) -> str:
        text = json.dumps(self.__dict__, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def filename(self) -> str:
        # A readable prefix for people browsing the cache; the digest makes it unique.
        name = Path(self.source).name or "source"
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:40]
        split = f"-{self.split}" if self.split else ""
        return f"ref-{safe}{split}-{self.resolution}px-{self.n}-{self.digest()}.npz"


@dataclass
class Reference:
    """Reference features (N, D) float32, their float64 mean/cov and optional logits."""

    features: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    logits: np.ndarray | None = None


def _write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    def writer(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, **arrays)

    atomic.write(path, writer)


def cached_reference(key: StatsKey, compute: Callable[[], tuple[np.ndarray, np.ndarray | None]],
                     cache_dir: str | Path) -> Reference:
    """Load the reference for `key` from `cache_dir`, or compute and store it.

    compute() returns (features (N, D), logits (N, K) or None). Files are
    .npz without object arrays (loaded with allow_pickle=False) and written to
    a temporary name then renamed, so readers never see half a file. The key
    is stored inside and compared on load, so a digest collision or a renamed
    file is recomputed rather than trusted.
    """
    path = Path(cache_dir) / "stats" / key.filename()
    want = json.dumps(key.__dict__, sort_keys=True)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["key"]) == want:
                    logits = z["logits"] if "logits" in z.files else None
                    return Reference(z["features"], z["mu"], z["sigma"], logits)
        # what np.load raises for a truncated, empty or foreign file: recompute and
        # overwrite it, so a damaged cache heals on the next run instead of failing each
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            print(f"warning: statistics cache {path} is damaged ({type(e).__name__}); "
                  "rebuilding it", file=sys.stderr)
    features, logits = compute()
    # Statistics from the float32 copy that is stored, so a reload agrees exactly.
    features = np.asarray(features, dtype=np.float32)
    mu, sigma = feature_stats(features)
    arrays = {"key": np.array(want), "features": features, "mu": mu, "sigma": sigma}
    if logits is not None:
        arrays["logits"] = np.asarray(logits, dtype=np.float32)
    _write_npz_atomic(path, arrays)
    return Reference(arrays["features"], mu, sigma, arrays.get("logits"))
