"""The one cache of reference features: data features and statistics stored on disk.

Evaluation runs in three layers: inputs (data sources and generators: `dcgan.data`,
`dcgan.rundir`), features (`dcgan.features` extractors, and this cache of their
output on data), metrics (`dcgan.metrics`, pure functions over arrays). A cache
entry is keyed by everything that determines it: the source and its content
digest, the split, the resolution, the channels, the number of images and the
extractor (with its weights' fingerprint).
"""

from __future__ import annotations

import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from dcgan import atomic
from dcgan.cache_key import CacheKey, safe_name
from dcgan.metrics import feature_stats


@dataclass(frozen=True)
class StatsKey(CacheKey):
    """Everything that determines a reference feature set.

    Leaving any of these out of the key is the classic stale-cache bug: the same
    file would be returned for another split, size or feature network.
    """

    kind: ClassVar[str] = "reference-features"
    source: str  # data source as given (name or resolved folder path)
    split: str  # "train", "test" or "" for unsplit sources
    resolution: int
    channels: int
    n: int  # number of images requested (the file records how many were used)
    extractor: str  # extractor name including its weight fingerprint
    content: str = ""  # the image cache's digest of the source: new files, new key

    def readable(self) -> tuple[str, str]:
        split = f"-{self.split}" if self.split else ""
        name = safe_name(Path(self.source).name or "source")
        return f"ref-{name}{split}-{self.resolution}px-{self.n}", ".npz"


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


def cached_reference(
    key: StatsKey,
    compute: Callable[[], tuple[np.ndarray, np.ndarray | None]],
    cache_dir: str | Path,
) -> Reference:
    """Load the reference for `key` from `cache_dir`, or compute and store it.

    compute() returns (features (N, D), logits (N, K) or None). Files are
    .npz without object arrays (loaded with allow_pickle=False) and written to
    a temporary name then renamed, so readers never see half a file. The key
    is stored inside and compared on load (`dcgan.cache_key`): a file of another
    key is rebuilt like a damaged one, with the same warning.
    """
    path = Path(cache_dir) / "stats" / key.filename()
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                if "key" in z.files and key.matches(str(z["key"])):
                    logits = z["logits"] if "logits" in z.files else None
                    return Reference(z["features"], z["mu"], z["sigma"], logits)
            # a file of another key, or written before keys were stored
            reason = "stored key differs"
        # what np.load raises for a truncated, empty or foreign file
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            reason = type(e).__name__
        # recompute and overwrite it, so a damaged cache heals on the next run
        # instead of failing each
        print(
            f"warning: statistics cache {path} is damaged ({reason}); rebuilding it",
            file=sys.stderr,
        )
    features, logits = compute()
    # Statistics from the float32 copy that is stored, so a reload agrees exactly.
    features = np.asarray(features, dtype=np.float32)
    mu, sigma = feature_stats(features)
    arrays = {"key": np.array(key.to_json()), "features": features, "mu": mu, "sigma": sigma}
    if logits is not None:
        arrays["logits"] = np.asarray(logits, dtype=np.float32)
    _write_npz_atomic(path, arrays)
    return Reference(arrays["features"], mu, sigma, arrays.get("logits"))
