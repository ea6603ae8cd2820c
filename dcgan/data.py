"""Training images as one cached uint8 array per (source, resolution, channels, split).

`load_images` turns a source (`dcgan.sources`) into a uint8 array of shape (N, C, R, R)
once and keeps it in `cache_root()` as one `.npz` file, named by an `ImagesKey` (the
source's content digest among its fields) and holding that key; later calls read the
file. A damaged file, or one holding another key, is rebuilt; files are written
atomically, so two processes building the same array both succeed. Serving batches
from the array is `dcgan.sampler`'s job.
"""

from __future__ import annotations

import os
import pathlib
import sys
import zipfile
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from PIL import Image

from dcgan import atomic, sources
from dcgan.cache_key import CacheKey
from dcgan.config import RESOLUTIONS
from dcgan.errors import UserError

IMAGES_VERSION = 1  # bump when decoding or resizing changes the pixels of a source


@dataclass
class ImageSet:
    images: np.ndarray  # uint8 (N, C, R, R), C in {1, 3}
    labels: np.ndarray | None  # int64 (N,) for labelled sources, else None
    source: str  # "fashion-mnist", "mnist", "emoji", "fake" or an absolute path
    split: str  # "train" or "test"
    skipped: int = 0  # unreadable files left out while building
    content: str = ""  # the digest that names the image cache: changes when the files do


def cache_root(cache_dir: str = "") -> pathlib.Path:
    """Where built arrays live: `cache_dir`, else $DCGAN_CACHE, else ~/.cache/dcgan."""
    chosen = cache_dir or os.environ.get("DCGAN_CACHE", "") or "~/.cache/dcgan"
    return pathlib.Path(chosen).expanduser().absolute()


def _check_args(resolution: int, channels: int, split: str) -> None:
    if resolution not in RESOLUTIONS:
        raise UserError(
            f"resolution {resolution} is not supported: expected one of "
            f"{', '.join(map(str, RESOLUTIONS))}"
        )
    if channels not in (0, 1, 3):
        raise UserError(f"channels {channels} is not supported: expected 1, 3 or 0 (the source's)")
    if split not in sources.SPLITS:
        raise UserError(f"split {split!r} is not supported: expected 'train' or 'test'")


def _convert_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 (N, C0, R, R) -> (N, channels, R, R).

    1 -> 3 replicates; 3 -> 1 is Pillow's `Image.convert("L")` (ITU-R 601 luma) per image.
    """
    c0 = images.shape[1]
    if c0 == channels:
        return images
    if c0 == 1 and channels == 3:
        return np.repeat(images, 3, axis=1)
    if c0 == 3 and channels == 1:
        out = np.empty((images.shape[0], 1, *images.shape[2:]), dtype=np.uint8)
        for i, im in enumerate(images):
            out[i, 0] = np.asarray(Image.fromarray(im.transpose(1, 2, 0)).convert("L"))
        return out
    raise ValueError(f"cannot convert {c0} channels to {channels}")


# --------------------------------------------------------------------------------------
# The cache.


@dataclass(frozen=True)
class ImagesKey(CacheKey):
    """Everything that determines a cached image array."""

    kind: ClassVar[str] = "images"
    source: str  # ImageSet.source: the name, or the folder's absolute path
    content: str  # the source's slug: its name and a digest of its files' bytes
    resolution: int
    channels: int
    split: str
    version: int = IMAGES_VERSION

    def readable(self) -> tuple[str, str]:
        # the digest before the size, so the names of one folder's versions share a
        # prefix and a suffix: the glob that finds them is `images-{stale_glob}{suffix}`
        return f"images-{self.content}", _suffix(self.resolution, self.channels, self.split)


def _suffix(resolution: int, channels: int, split: str) -> str:
    return f"-{resolution}px-{channels}ch-{split}.npz"


def _read_cache(
    path: pathlib.Path, key: ImagesKey
) -> tuple[np.ndarray, np.ndarray | None, int] | None:
    """The arrays stored at `path`, or None (deleting the file) when missing, damaged or
    holding another key (or none: a file written before keys were stored)."""
    if not path.is_file():
        return None
    shape = (key.channels, key.resolution, key.resolution)
    try:
        with np.load(path, allow_pickle=False) as z:
            images = z["images"]
            labels = z["labels"] if "labels" in z.files else None
            skipped = int(z["skipped"])
            ok = key.matches(str(z["key"]))
        ok = (
            ok
            and images.dtype == np.uint8
            and images.ndim == 4
            and images.shape[0] > 0
            and images.shape[1:] == shape
            and (labels is None or (labels.dtype == np.int64 and labels.shape == images.shape[:1]))
        )
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        ok = False
    if ok:
        return images, labels, skipped
    print(f"warning: cache file {path} is damaged; rebuilding it", file=sys.stderr)
    path.unlink(missing_ok=True)
    return None


def _write_cache(
    path: pathlib.Path, key: ImagesKey, images: np.ndarray, labels: np.ndarray | None, skipped: int
) -> None:
    """Write atomically (`dcgan.atomic`): readers, or other ranks building the same file
    at once, never see a partial file."""
    arrays = {"key": np.array(key.to_json()), "images": images, "skipped": np.int64(skipped)}
    if labels is not None:
        arrays["labels"] = labels

    def writer(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, **arrays)

    try:
        atomic.write(path, writer)
    except UserError as e:
        raise UserError(f"{e} (pass a writable --cache-dir or set DCGAN_CACHE)") from None


def load_images(
    dataset: str,
    resolution: int,
    channels: int = 0,
    split: str = "train",
    cache_dir: str = "",
    progress: bool = True,
) -> ImageSet:
    """A source name or folder -> uint8 (N, C, R, R), built once then read from the cache.

    `channels` 0 keeps the source's own (1 for IDX, 3 for the rest).
    """
    _check_args(resolution, channels, split)
    source = sources.resolve(dataset, split, cache_root(cache_dir))
    channels = channels or source.channels
    if source.key == "fake":  # cheaper to make than to read back
        images, labels, skipped = source.build(resolution, progress)
        return ImageSet(_convert_channels(images, channels), labels, "fake", split, skipped, "fake")

    root = cache_root(cache_dir)
    key = ImagesKey(source.key, source.slug, resolution, channels, split)
    path = root / key.filename()
    cached = _read_cache(path, key)
    if cached is None:
        images, labels, skipped = source.build(resolution, progress)
        images = _convert_channels(images, channels)
        _write_cache(path, key, images, labels, skipped)
        # Never read again: the same folder before it changed, and this source's files
        # of an older key (names without a digest were written before keys were stored).
        suffix = _suffix(resolution, channels, split)
        for old in root.glob(f"images-{source.stale_glob or source.slug + '*'}{suffix}"):
            if old != path:
                old.unlink(missing_ok=True)
        cached = images, labels, skipped
    images, labels, skipped = cached
    return ImageSet(images, labels, source.key, split, skipped, source.slug)
