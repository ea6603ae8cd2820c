"""Data sources: one decoder per kind, each turning its files into a uint8 array.

Fashion-MNIST/MNIST IDX files, a folder of image files, CIFAR-10 python batches, emoji
rendered from a colour font, random "fake" images, and the containers big data sets
come in: a ZIP of images (stylegan2-ada's dataset_tool), an LMDB database of encoded
images (LSUN) and Parquet files of image bytes (the Hugging Face Hub).
`resolve(name_or_path)` finds the kind (a name; else a file's suffix, `FILE_KINDS`;
else the folder's content, `FOLDER_KINDS`) and returns a `Source` whose `slug` names
its content (a digest of the files' bytes, `dcgan.content`), so the store
(`dcgan.data`) can cache the array under a name that changes when the files do.

Two ways to decode. The small fixed sources (IDX, CIFAR-10, emoji, fake: at most
70,000 images) have `build(R, progress)`, which returns the whole array. An image
folder may hold millions of files: it lists its `files`, and `decode_chunks` decodes
them in order, a chunk at a time, over a pool of processes, so the store writes each
chunk to disk and never holds the array. A container does the same with its members
(`files` holds ZIP member names, LMDB keys or Parquet row numbers) and a `container`
that each worker opens once per chunk to read their bytes.

Resizing is antialiased Lanczos everywhere (Pillow's LANCZOS), image by image.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import pathlib
import pickle
import re
import signal
import struct
import sys
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps
from tqdm import tqdm

from dcgan import content
from dcgan.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
SOURCES = ("fashion-mnist", "mnist", "emoji", "fake")
SPLITS = ("train", "test")
LABELLED = ("fashion-mnist", "mnist")  # the sources with class labels and a test split

FASHION_MNIST_SYSTEM_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")  # Debian package
EMOJI_FONT = pathlib.Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_FONT_SIZE = 109  # the one bitmap strike of Noto Color Emoji; other sizes fail to load
FAKE_COUNT = 1024
FAKE_SEED = 0

_LANCZOS = Image.Resampling.LANCZOS


# --------------------------------------------------------------------------------------
# Sources. Each resolves to a Source that gives the source's own channels already at
# R x R: `build(R, progress)` -> (uint8 (N, C0, R, R), int64 (N,) labels or None,
# skipped), or for an image folder or a container its `files`, for `decode_chunks`.

Build = Callable[[int, bool], tuple[np.ndarray, np.ndarray | None, int]]


class Container(Protocol):
    """A file (or LMDB folder) holding encoded images, read by member. Instances are
    pickled into the pool's workers, so they hold paths and names, never open files."""

    def reader(self) -> contextlib.AbstractContextManager[Callable[[Any], bytes]]:
        """Open the container once: inside, member -> its bytes (raises for a bad one)."""
        ...

    def describe(self, member: Any) -> str:
        """A member as a message names it."""
        ...


@dataclass
class Source:
    key: str  # ImageSet.source
    slug: str  # identifies the source (and, for folders, its content) in cache file names
    channels: int  # the source's own channel count C0
    build: Build | None  # the whole array in memory; None for an image folder
    stale_glob: str = ""  # for folders: cache names of earlier versions of the same folder
    # an image folder's files, or a container's members, in the array's order
    files: tuple[Any, ...] = ()
    folder: pathlib.Path | None = None  # an image folder or a container: its path
    container: Container | None = None  # None for a folder: `files` are paths
    labels: np.ndarray | None = None  # int64, one per member of `files`; None: unlabelled


def describe(source: Source, index: int) -> str:
    """files[index] of a chunked source, as a message names it."""
    item = source.files[index]
    return str(item) if source.container is None else source.container.describe(item)


def _no_test_split(what: str) -> UserError:
    return UserError(f"{what} has no test split: use split 'train'")


def resolve(dataset: str, split: str, cache: pathlib.Path) -> Source:
    """A source name or path -> its Source. `cache` is the cache root: it keeps the
    content manifests and, for fashion-mnist/mnist, a folder where their IDX files may lie."""
    name = dataset.strip()
    if name in NAMED:
        return NAMED[name](split, cache)
    path = pathlib.Path(name).expanduser()
    if not name or not path.exists():
        raise UserError(
            f"unknown dataset {dataset!r}: expected one of {', '.join(NAMED)} "
            "or the path of an existing folder"
        )
    path = path.resolve()
    if not path.is_dir():
        for _kind, claims, build in FILE_KINDS:
            if claims(path):
                return build(path, split, cache)
        raise UserError(
            f"dataset {path} is a file of no known kind: expected "
            f"{' or '.join(kind for kind, _, _ in FILE_KINDS)}, or a folder of "
            f"{', '.join(kind for kind, _, _ in FOLDER_KINDS)}"
        )
    for _kind, claims, build in FOLDER_KINDS:
        if claims(path):
            return build(path, split, cache)
    raise AssertionError("the last folder kind claims every folder")


def _path_slug(folder: pathlib.Path, files: list[pathlib.Path], cache: pathlib.Path) -> str:
    """`<name>-<hash of the path>-<hash of the files' bytes>`: a changed folder gets a new
    cache, also when a file is replaced by one of the same size and time."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", folder.name)[:40] or "root"
    where = hashlib.sha1(str(folder).encode()).hexdigest()[:8]
    return f"{name}-{where}-{content.digest_files(folder, files, cache)[:8]}"


# ---- IDX (Fashion-MNIST, MNIST) ---------------------------------------------------------

_IDX_PREFIX = {"train": "train", "test": "t10k"}


def _idx_names(split: str) -> str:
    p = _IDX_PREFIX[split]
    return f"{p}-images-idx3-ubyte[.gz] and {p}-labels-idx1-ubyte[.gz]"


def _first_existing(folder: pathlib.Path, stems: list[str]) -> pathlib.Path | None:
    for stem in stems:
        for name in (stem + ".gz", stem):
            if (folder / name).is_file():
                return folder / name
    return None


def _find_idx(folder: pathlib.Path, split: str) -> list[pathlib.Path] | None:
    """[images] or [images, labels] for `split` in `folder`; None without an images file."""
    p = _IDX_PREFIX[split]
    # Both spellings are in circulation: "train-images-idx3-ubyte" and "train-images.idx3-ubyte".
    images = _first_existing(folder, [f"{p}-images-idx3-ubyte", f"{p}-images.idx3-ubyte"])
    if images is None:
        return None
    labels = _first_existing(folder, [f"{p}-labels-idx1-ubyte", f"{p}-labels.idx1-ubyte"])
    return [images] if labels is None else [images, labels]


def _has_idx(folder: pathlib.Path) -> bool:
    return any(_find_idx(folder, s) is not None for s in SPLITS)


def _named_idx_source(name: str, split: str, cache: pathlib.Path) -> Source:
    folders = [FASHION_MNIST_SYSTEM_DIR] if name == "fashion-mnist" else []
    folders.append(cache / name)
    for folder in folders:
        found = _find_idx(folder, split)
        if found is not None:
            digest = content.digest_files(folder, found, cache)
            return _idx_source(name, f"{name}-{digest[:8]}", found)
    where = " or ".join(str(f) for f in folders)
    install = (
        "install them with `apt-get install dataset-fashion-mnist`, "
        if name == "fashion-mnist"
        else ""
    )
    raise UserError(
        f"{name} {split} files ({_idx_names(split)}) not found in {where}: {install}"
        f"put the IDX files in {folders[-1]}, or pass --dataset PATH to a folder holding them"
    )


def _read_idx(path: pathlib.Path, ndim: int) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) of unsigned bytes with `ndim` dimensions.

    Header: two zero bytes, a type code (0x08 = uint8), the number of dimensions, then each
    dimension as a big-endian uint32; the data follows in C order.
    """
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise UserError(f"IDX file {path} is not a valid gzip file ({e})") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08 or raw[3] != ndim:
        raise UserError(
            f"IDX file {path} has a malformed header: expected 00 00 08 {ndim:02x} "
            f"(unsigned bytes, {ndim} dimensions), got {raw[:4].hex(' ') or 'nothing'}"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"IDX file {path} is truncated inside its header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != int(np.prod(dims)):
        raise UserError(
            f"IDX file {path} holds {len(raw) - header} data bytes but its header "
            f"{'x'.join(map(str, dims))} needs {int(np.prod(dims))}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _idx_source(key: str, slug: str, files: list[pathlib.Path]) -> Source:
    def build(resolution: int, progress: bool) -> tuple[np.ndarray, np.ndarray | None, int]:
        images = _read_idx(files[0], 3)  # (N, H, W)
        labels = None
        if len(files) > 1:
            labels = _read_idx(files[1], 1).astype(np.int64)  # (N,)
            if len(labels) != len(images):
                raise UserError(
                    f"IDX labels {files[1]} has {len(labels)} entries for "
                    f"{len(images)} images in {files[0]}"
                )
        if images.shape[0] == 0:
            raise UserError(f"IDX file {files[0]} holds no images")
        if images.shape[1] != images.shape[2]:
            raise UserError(f"IDX images in {files[0]} are not square: {images.shape[1:]}")
        return _resize_square_stack(images, resolution)[:, None], labels, 0  # (N, 1, R, R)

    stale = ""
    if pathlib.Path(key).is_absolute():
        stale = slug.rsplit("-", 1)[0] + "-*"
    return Source(key, slug, 1, build, stale)


# ---- CIFAR-10 python batches -------------------------------------------------------------

# What a CIFAR-10 batch pickle may name: numpy's array reconstruction (and how Python 3
# spells bytes in protocol 2), nothing else.
# A pickle names any importable callable and calls it on load, so everything else is refused.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"): ("numpy._core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
    # Python 3 writing protocol 2 stores bytes as _codecs.encode(str, "latin1").
    ("_codecs", "encode"): ("_codecs", "encode"),
}


class _CifarUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, path: pathlib.Path) -> None:
        # encoding="bytes": the official batches were pickled by Python 2 (keys are bytes).
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str) -> object:
        target = _PICKLE_ALLOWED.get((module, name))
        if target is None:
            raise UserError(
                f"CIFAR batch {self.path} refers to {module}.{name}, which a CIFAR-10 batch "
                "never needs: refusing to load it (pickles can run code)"
            )
        # numpy 2 keeps numpy.core only as a deprecated alias: load from numpy._core.
        return super().find_class(*target)


def _cifar_folder(path: pathlib.Path) -> pathlib.Path | None:
    """The folder holding data_batch_* / test_batch: `path` or its cifar-10-batches-py."""
    for folder in (path, path / "cifar-10-batches-py"):
        if (folder / "data_batch_1").is_file() or (folder / "test_batch").is_file():
            return folder
    return None


def _read_cifar_batch(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch -> (uint8 (n, 3, 32, 32), int64 (n,))."""
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, path).load()
    except UserError:
        raise
    except Exception as e:  # any unpickling failure means a damaged file
        raise UserError(f"CIFAR batch {path} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(batch, dict):
        raise UserError(f"CIFAR batch {path} is not a dict of data and labels")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or (data.shape[1] != 3 * 32 * 32)
    ):
        raise UserError(f"CIFAR batch {path}: expected 'data' as a uint8 array of shape (N, 3072)")
    if labels is None or len(labels) != len(data):
        raise UserError(f"CIFAR batch {path}: expected 'labels' with one entry per image")
    # Each row is the R plane, then G, then B, each 32x32 in row-major order.
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def _cifar_source(
    path: pathlib.Path, folder: pathlib.Path, split: str, cache: pathlib.Path
) -> Source:
    if split == "train":
        numbered = [f for f in folder.glob("data_batch_*") if f.name[11:].isdigit()]
        files = sorted(numbered, key=lambda f: int(f.name[11:]))  # data_batch_1, _2, ... _10
    else:
        files = [folder / "test_batch"] if (folder / "test_batch").is_file() else []
    if not files:
        want = "data_batch_1..5" if split == "train" else "test_batch"
        raise UserError(f"CIFAR-10 folder {folder} has no {want} for split {split!r}")

    def build(resolution: int, progress: bool) -> tuple[np.ndarray, np.ndarray | None, int]:
        parts = [_read_cifar_batch(f) for f in files]
        images = np.concatenate([p[0] for p in parts])  # (N, 3, 32, 32)
        labels = np.concatenate([p[1] for p in parts])  # (N,)
        n = len(images)
        # Channels are independent under resampling: resize the N*3 planes as one stack.
        planes = _resize_square_stack(images.reshape(n * 3, 32, 32), resolution)
        return planes.reshape(n, 3, resolution, resolution), labels, 0

    slug = _path_slug(path, files, cache)
    return Source(str(path), slug, 3, build, slug.rsplit("-", 1)[0] + "-*")


# ---- a folder of image files ------------------------------------------------------------


def _list_images(folder: pathlib.Path) -> list[pathlib.Path]:
    """Image files under `folder`, recursively, sorted by relative path.

    Hidden files and folders are skipped (macOS "._x.jpg" resource forks look like images
    and are not). Symlinked folders are followed once each.
    """
    found = []
    seen_dirs = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen_dirs:  # a symlink loop, or the same folder linked twice
            dirs[:] = []
            continue
        seen_dirs.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                found.append(pathlib.Path(root, f))
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; transparency is composited on white."""
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        # 16-bit or float greyscale: Pillow's convert would clip, not scale.
        a = np.asarray(im, dtype=np.float64)
        if im.mode != "F" and a.max() > 255:
            a = a / 257.0
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _load_image_file(path: pathlib.Path | BinaryIO, resolution: int) -> np.ndarray:
    """One image file (or its bytes, as a file object) -> uint8 (3, R, R). Raises
    whatever Pillow raises for a bad file."""
    with Image.open(path) as im:
        # JPEG only: let the decoder scale by 1/2..1/8 while both sides stay >= 2R, which
        # makes big photos several times cheaper to decode and leaves the final resize the
        # job of antialiasing. Other formats ignore it.
        im.draft("RGB", (2 * resolution, 2 * resolution))
        im.load()  # decode now (first frame of a GIF), so a truncated file fails here
        im = ImageOps.exif_transpose(im)  # photos from phones store their rotation in EXIF
        rgb = _to_rgb(im)
    w, h = rgb.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    # Centre square, then Lanczos (antialiased). reducing_gap=3 first shrinks big images by
    # an integer box filter to >= 3x the target, then Lanczos: Pillow documents the result
    # as indistinguishable from a full Lanczos, at a fraction of the cost for photos.
    out = rgb.resize(
        (resolution, resolution),
        _LANCZOS,
        box=(left, top, left + side, top + side),
        reducing_gap=3.0,
    )
    return np.asarray(out).transpose(2, 0, 1)  # (H, W, 3) -> (3, R, R)


def _folder_source(folder: pathlib.Path, split: str, cache: pathlib.Path) -> Source:
    if split != "train":
        raise _no_test_split(f"image folder {folder}")
    files = _list_images(folder)
    if not files:
        raise UserError(
            f"no images found under {folder}: expected files ending in "
            f"{', '.join(IMAGE_EXTENSIONS)} (any case, in any sub-folder)"
        )
    slug = _path_slug(folder, files, cache)
    stale = slug.rsplit("-", 1)[0] + "-*"
    return Source(str(folder), slug, 3, None, stale, tuple(files), folder)


# ---- containers: a ZIP of images, an LMDB database, Parquet files ----------------------

SNIFF = 8  # a container whose first SNIFF values are all no image holds no images


def _check_images(values: list[Any], what: str, hint: str) -> None:
    """Refuse a container whose first values are none of them an image Pillow knows:
    one line now, rather than every member skipped after a whole pass."""
    why = "no values"
    for v in values:
        try:
            with Image.open(io.BytesIO(v)):  # reads the header only
                return
        except Exception as e:  # noqa: BLE001 - anything unreadable counts as "no image"
            why = f"{type(e).__name__}: {e}"
    raise UserError(f"{what} holds no images: its first {len(values)} {hint} are not ({why})")


def _is_image_member(name: str) -> bool:
    parts = name.split("/")
    # hidden files and macOS's "__MACOSX/._x.png" resource forks look like images and are not
    return (
        name.lower().endswith(IMAGE_EXTENSIONS)
        and parts[0] != "__MACOSX"
        and not any(p.startswith(".") for p in parts)
    )


@dataclass(frozen=True)
class ZipImages:
    """A ZIP of image files, read by member name."""

    path: pathlib.Path

    @contextlib.contextmanager
    def reader(self) -> Iterator[Callable[[Any], bytes]]:
        with zipfile.ZipFile(self.path) as z:  # parses the central directory once
            yield z.read  # checks the member's CRC: a damaged member raises

    def describe(self, member: Any) -> str:
        return f"{self.path}:{member}"


def _zip_labels(z: zipfile.ZipFile, path: pathlib.Path, names: list[str]) -> np.ndarray | None:
    """dataset_tool's dataset.json -> int64 labels in `names`' order, or None."""
    if "dataset.json" not in z.namelist():
        return None
    try:
        meta = json.loads(z.read("dataset.json"))
    except ValueError as e:  # not JSON, or not UTF-8
        raise UserError(f"{path}:dataset.json is not JSON ({e})") from None
    pairs = meta.get("labels") if isinstance(meta, dict) else None
    if pairs is None:
        return None
    by_name = {}
    for pair in pairs if isinstance(pairs, list) else [pairs]:
        ok = isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)
        if not (ok and isinstance(pair[1], int) and not isinstance(pair[1], bool)):
            raise UserError(
                f"{path}:dataset.json has a label {json.dumps(pair)[:60]}: expected "
                '"labels": [["NAME.png", INT], ...] or null'
            )
        by_name[pair[0]] = pair[1]
    missing = [n for n in names if n not in by_name]
    if missing:
        raise UserError(
            f"{path}:dataset.json has no label for {len(missing)} image(s) (first: {missing[0]})"
        )
    return np.array([by_name[n] for n in names], dtype=np.int64)


def _zip_source(path: pathlib.Path, split: str, cache: pathlib.Path) -> Source:
    if split != "train":
        raise _no_test_split(f"ZIP {path}")
    try:
        with zipfile.ZipFile(path) as z:
            names = sorted(
                i.filename for i in z.infolist() if not i.is_dir() and _is_image_member(i.filename)
            )
            labels = _zip_labels(z, path, names)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise UserError(f"{path} is not a readable ZIP file ({e})") from None
    if not names:
        raise UserError(
            f"no images found in {path}: expected members ending in {', '.join(IMAGE_EXTENSIONS)}"
        )
    slug = _path_slug(path, [path], cache)
    stale = slug.rsplit("-", 1)[0] + "-*"
    return Source(str(path), slug, 3, None, stale, tuple(names), path, ZipImages(path), labels)


def _open_lmdb(path: pathlib.Path) -> Any:
    import lmdb  # imported here as only this source needs it

    # read-only and without the lock file: the database may lie on a read-only disk
    return lmdb.open(str(path), readonly=True, lock=False, readahead=False, max_readers=1)


@dataclass(frozen=True)
class LmdbImages:
    """An LMDB database (a folder holding data.mdb) of encoded images, read by key."""

    path: pathlib.Path

    @contextlib.contextmanager
    def reader(self) -> Iterator[Callable[[Any], bytes]]:
        env = _open_lmdb(self.path)
        try:
            with env.begin(buffers=False) as txn:

                def get(key: bytes) -> bytes:
                    value = txn.get(key)
                    if value is None:
                        raise KeyError(f"key {key!r} is gone from the database")
                    return value

                yield get
        finally:
            env.close()

    def describe(self, member: Any) -> str:
        return f"{self.path} key {member!r}"


def _has_lmdb(folder: pathlib.Path) -> bool:
    return (folder / "data.mdb").is_file()


def _lmdb_source(path: pathlib.Path, split: str, cache: pathlib.Path) -> Source:
    if split != "train":
        raise _no_test_split(f"LMDB {path}")
    import lmdb

    try:
        env = _open_lmdb(path)
        try:
            with env.begin(buffers=False) as txn:
                keys = tuple(txn.cursor().iternext(keys=True, values=False))  # key order
                first = [txn.get(k) for k in keys[:SNIFF]]
        finally:
            env.close()
    except lmdb.Error as e:
        raise UserError(f"LMDB {path} cannot be read ({type(e).__name__}: {e})") from None
    if not keys:
        raise UserError(f"LMDB {path} holds no entries")
    _check_images(first, f"LMDB {path}", "values")
    # lock.mdb changes when a reader opens it: the content is data.mdb's
    slug = _path_slug(path, [path / "data.mdb"], cache)
    stale = slug.rsplit("-", 1)[0] + "-*"
    return Source(str(path), slug, 3, None, stale, keys, path, LmdbImages(path))


def _is_image_type(t: Any) -> bool:
    """The Hub's Image feature (a struct of `bytes` and `path`), or plain binary."""
    import pyarrow as pa

    if pa.types.is_struct(t):
        i = t.get_field_index("bytes")
        t = t.field(i).type if i >= 0 else pa.null()
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _column_bytes(column: Any) -> list[bytes | None]:
    """An image column (struct or binary) -> its bytes, row by row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_struct(column.type):
        column = pc.struct_field(column, "bytes")
    return column.to_pylist()


@dataclass(frozen=True)
class ParquetImages:
    """Parquet files read as one table: member i is row i counted over the files."""

    files: tuple[pathlib.Path, ...]
    starts: tuple[int, ...]  # the first row of each file
    column: str  # the image column

    def _where(self, row: int) -> tuple[int, int]:
        i = bisect.bisect_right(self.starts, row) - 1
        return i, row - self.starts[i]

    @contextlib.contextmanager
    def reader(self) -> Iterator[Callable[[Any], bytes]]:
        import pyarrow.parquet as pq

        opened: dict[int, Any] = {}  # file index -> (ParquetFile, first row of each group)
        group: list[Any] = [None, None, []]  # (file, row group, its bytes): the last read

        def get(row: int) -> bytes:
            i, local = self._where(row)
            if i not in opened:
                pf = pq.ParquetFile(self.files[i])
                sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
                opened[i] = (pf, np.cumsum([0, *sizes]).tolist())
            pf, firsts = opened[i]
            g = bisect.bisect_right(firsts, local) - 1
            if group[:2] != [i, g]:  # a chunk's rows are consecutive: one group read per group
                table = pf.read_row_group(g, columns=[self.column])
                group[:] = [i, g, _column_bytes(table.column(0))]
            value = group[2][local - firsts[g]]
            if value is None:
                raise ValueError("the row has no image bytes")
            return value

        try:
            yield get
        finally:
            for pf, _ in opened.values():
                pf.close()

    def describe(self, member: Any) -> str:
        i, local = self._where(member)
        return f"{self.files[i]} row {local}"


def _parquet_files(path: pathlib.Path) -> list[pathlib.Path]:
    if path.is_file():
        return [path]
    return sorted(
        p
        for p in path.iterdir()
        if p.suffix.lower() == ".parquet" and not p.name.startswith(".") and p.is_file()
    )


def _has_parquet(folder: pathlib.Path) -> bool:
    return bool(_parquet_files(folder))


def _parquet_source(path: pathlib.Path, split: str, cache: pathlib.Path) -> Source:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = _parquet_files(path)
    # The Hub names a data set's files by split (train-00000-of-00002.parquet): a folder
    # of such files gives both splits; others hold one training split.
    named = [f for f in files if f.name.startswith(SPLITS)]
    if path.is_dir() and named:
        files = [f for f in named if f.name.startswith(split)]
        if not files:
            raise UserError(f"Parquet folder {path} has no {split} files ({split}-*.parquet)")
    elif split != "train":
        raise _no_test_split(f"Parquet {path}")
    column, starts, labels, total = "", [], [], 0
    first: list[Any] = []
    for f in files:
        try:
            pf = pq.ParquetFile(f)
            schema = pf.schema_arrow
            found = [c.name for c in schema if _is_image_type(c.type)]
            if not found:
                raise UserError(
                    f"Parquet file {f} has no image column (a struct of bytes and path, or "
                    f"binary); its columns: {', '.join(schema.names)}"
                )
            name = "image" if "image" in found else found[0]
            if column and name != column:
                raise UserError(f"Parquet file {f} holds its images in {name!r}, not {column!r}")
            column = name
            if len(first) < SNIFF and pf.metadata.num_rows:
                table = pf.read_row_group(0, columns=[column])
                first += [v for v in _column_bytes(table.column(0))[:SNIFF] if v is not None]
            i = schema.get_field_index("label")
            if i >= 0 and pa.types.is_integer(schema.field(i).type):
                label = pf.read(columns=["label"]).column(0)
                if label.null_count:
                    raise UserError(f"Parquet file {f} has rows without a label")
                labels.append(label.to_numpy().astype(np.int64))
            starts.append(total)
            total += pf.metadata.num_rows
            pf.close()
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"Parquet file {f} cannot be read ({type(e).__name__}: {e})") from None
    if total == 0:
        raise UserError(f"Parquet {path} holds no rows")
    _check_images(first[:SNIFF], f"Parquet column {column!r} of {path}", "values")
    if labels and len(labels) != len(files):
        raise UserError(f"some Parquet files of {path} have a label column and some not")
    container = ParquetImages(tuple(files), tuple(starts), column)
    slug = _path_slug(path, files, cache)
    stale = slug.rsplit("-", 1)[0] + "-*"
    rows = tuple(range(total))
    all_labels = np.concatenate(labels) if labels else None
    return Source(str(path), slug, 3, None, stale, rows, path, container, all_labels)


# ---- decoding a folder in chunks, over processes -----------------------------------------

CHUNK_MAX = 64  # images per chunk at most: resume and the progress bar move this finely
CHUNK_BYTES = 4 << 20  # decoded pixels per chunk at most: 64 images up to 128px, 21 at 256px
AHEAD = 2  # chunks in flight per worker: each has its next one queued, and memory is bounded


@dataclass
class Chunk:
    """Files [start, stop) of a folder, decoded."""

    start: int
    stop: int
    images: np.ndarray  # uint8 (readable files, 3, R, R), in file order
    bad: list[tuple[int, str]] = field(default_factory=list)  # (file index, why) of the others


def chunk_images(resolution: int) -> int:
    """Images per chunk at this resolution."""
    return max(1, min(CHUNK_MAX, CHUNK_BYTES // (3 * resolution * resolution)))


def _decode_chunk(
    files: list[Any], start: int, resolution: int, container: Container | None = None
) -> Chunk:
    """Decode files[i] as image start + i; runs in a pool worker or in the caller.
    With a container, files are its members, read through one reader per chunk."""
    out = np.empty((len(files), 3, resolution, resolution), dtype=np.uint8)
    good = 0
    bad = []
    opened = contextlib.nullcontext(None) if container is None else container.reader()
    with opened as read:
        for i, f in enumerate(files):
            try:
                what = f if read is None else io.BytesIO(read(f))
                out[good] = _load_image_file(what, resolution)
                good += 1
            except Exception as e:  # decoders (and a ZIP's CRC check) raise many types
                bad.append((start + i, f"{type(e).__name__}: {e}"))
    return Chunk(start, start + len(files), out[:good], bad)


def _ignore_sigint() -> None:
    # Ctrl-C is the parent's to handle: it stops the pool and keeps what is written
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def decode_chunks(
    files: tuple[Any, ...],
    resolution: int,
    start: int = 0,
    workers: int = 1,
    container: Container | None = None,
) -> Iterator[Chunk]:
    """Decode files[start:] in order, one Chunk after another.

    With workers > 1 the chunks are decoded by a pool of that many processes (spawned:
    the caller may hold threads, torch's among them, which fork does not copy safely)
    and still come back in file order, so the result is the same for any worker count.
    Close the iterator (`contextlib.closing`) to stop the pool early.
    """
    size = chunk_images(resolution)
    bounds = [(a, min(a + size, len(files))) for a in range(start, len(files), size)]
    workers = max(1, min(workers, len(bounds)))
    if workers == 1:  # in this process: no start-up cost for small folders
        for a, b in bounds:
            yield _decode_chunk(list(files[a:b]), a, resolution, container)
        return
    pool = ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=_ignore_sigint
    )
    todo = iter(bounds)
    pending: collections.deque[Future[Chunk]] = collections.deque()
    finished = False
    try:

        def submit() -> None:
            nxt = next(todo, None)
            if nxt is not None:
                a, b = nxt
                pending.append(
                    pool.submit(_decode_chunk, list(files[a:b]), a, resolution, container)
                )

        for _ in range(AHEAD * workers):
            submit()
        while pending:
            try:
                chunk = pending.popleft().result()
            except BrokenProcessPool:
                raise UserError(
                    "a process decoding image files died (out of memory, or a decoder "
                    "crashed on a file): rerun with --workers 1 to find the file"
                ) from None
            submit()
            yield chunk
        finished = True
    finally:
        # done: wait for the idle workers to exit; stopped early (Ctrl-C, an error): drop
        # the queued chunks and leave at once (a worker ends its current chunk, then exits)
        pool.shutdown(wait=finished, cancel_futures=not finished)


def check_skipped(
    folder: pathlib.Path, total: int, skipped: int, first: tuple[str, str] | None
) -> None:
    """After decoding `total` files: raise when none was readable, warn when some were not."""
    if skipped == total:
        raise UserError(
            f"none of the {total} image files under {folder} could be read "
            f"(first: {first[0]}: {first[1]})"
        )
    if skipped:
        print(
            f"warning: skipped {skipped} unreadable image file(s) under {folder} "
            f"(first: {first[0]}: {first[1]})",
            file=sys.stderr,
        )


# ---- emoji ------------------------------------------------------------------------------


def _emoji_source(split: str, cache: pathlib.Path) -> Source:
    if split != "train":
        raise _no_test_split("emoji")
    if not EMOJI_FONT.is_file():
        raise UserError(
            f"emoji font {EMOJI_FONT} not found: install it with "
            "`apt-get install fonts-noto-color-emoji`"
        )
    import emoji as emoji_lib  # a dependency of dcgan; imported here as only this source needs it

    # The emoji list and the font both decide the images: a new version of either rebuilds.
    font = content.digest_files(EMOJI_FONT.parent, [EMOJI_FONT], cache)
    version = f"{emoji_lib.__version__}|{font}"
    slug = "emoji-" + hashlib.sha1(version.encode()).hexdigest()[:8]

    def build(resolution: int, progress: bool) -> tuple[np.ndarray, np.ndarray | None, int]:
        return _render_emoji(emoji_lib.EMOJI_DATA, emoji_lib.STATUS, resolution, progress), None, 0

    return Source("emoji", slug, 3, build)


def _render_emoji(table: dict, status: dict, resolution: int, progress: bool) -> np.ndarray:
    """Render each distinct emoji glyph -> uint8 (N, 3, R, R), glyph centred on white.

    Each sequence is drawn on a transparent canvas, cropped to its visible pixels (alpha),
    composited on white, padded to a square and resized.
    """
    font = ImageFont.truetype(str(EMOJI_FONT), EMOJI_FONT_SIZE)
    _, _, one_wide, one_high = font.getbbox("\U0001f600", mode="RGBA")  # one glyph: 136 x 128
    # Minimally-qualified and unqualified variants (no U+FE0F) draw the same glyph as the
    # fully-qualified one (checked: no distinct render lost), so only those are drawn.
    wanted = status["fully_qualified"]
    sequences = sorted(s for s, d in table.items() if d.get("status", wanted) <= wanted)
    # One transparent canvas, cleared per glyph, wide enough to see a sequence that the
    # font lacks fall apart into several glyphs side by side.
    canvas = Image.new("RGBA", (3 * one_wide, 2 * one_high), (0, 0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    seen: set[bytes] = set()
    out = []
    for seq in tqdm(sequences, desc="emoji", unit="glyph", file=sys.stderr, disable=not progress):
        canvas.paste((0, 0, 0, 0), (0, 0, *canvas.size))
        draw.text((0, 0), seq, font=font, embedded_color=True)
        box = canvas.getbbox()  # of the alpha band: the visible glyph
        if box is None:
            continue  # no glyph, or a blank one
        if box[2] - box[0] > 1.5 * one_wide:
            continue  # fell apart into several glyphs: the font has no such sequence
        glyph = canvas.crop(box)
        digest = hashlib.sha1(glyph.tobytes() + repr(glyph.size).encode()).digest()
        if digest in seen:
            continue  # e.g. skin-tone variants the font draws like the base emoji
        seen.add(digest)
        # Composite on white. ImageDraw pastes a colour glyph through its own alpha, so
        # the canvas holds colour * alpha (premultiplied) beside alpha: over white that is
        # rgb + (255 - alpha), the same bytes as drawing straight onto white. (Treating
        # it as straight alpha would darken every antialiased edge.)
        rgba = np.asarray(glyph, dtype=np.int16)  # (h, w, 4)
        rgb = np.clip(rgba[..., :3] + (255 - rgba[..., 3:]), 0, 255).astype(np.uint8)
        # Pad to a centred white square, then Lanczos down to R.
        h, w = rgb.shape[:2]
        side = max(w, h)
        square = np.full((side, side, 3), 255, dtype=np.uint8)
        top, left = (side - h) // 2, (side - w) // 2
        square[top : top + h, left : left + w] = rgb
        small = Image.fromarray(square).resize((resolution, resolution), _LANCZOS)
        out.append(np.asarray(small).transpose(2, 0, 1))  # (3, R, R)
    if not out:
        raise UserError(f"emoji font {EMOJI_FONT} drew no glyphs")
    return np.stack(out)


# ---- fake -------------------------------------------------------------------------------


def _fake_source(split: str) -> Source:
    if split != "train":
        raise _no_test_split("fake")

    def build(resolution: int, progress: bool) -> tuple[np.ndarray, np.ndarray | None, int]:
        rng = np.random.default_rng(FAKE_SEED)
        shape = (FAKE_COUNT, 3, resolution, resolution)
        return rng.integers(0, 256, size=shape, dtype=np.uint8), None, 0

    return Source("fake", "fake", 3, build)


# --------------------------------------------------------------------------------------
# Pixels.


def _resize_square_stack(images: np.ndarray, resolution: int) -> np.ndarray:
    """uint8 (N, S, S) -> uint8 (N, R, R): Pillow's LANCZOS (antialiased when shrinking),
    image by image, the same call as for folders and emoji."""
    n, h, w = images.shape
    if h == resolution and w == resolution:
        return np.ascontiguousarray(images)
    out = np.empty((n, resolution, resolution), dtype=np.uint8)
    for i in range(n):
        out[i] = np.asarray(
            Image.fromarray(images[i]).resize((resolution, resolution), Image.Resampling.LANCZOS)
        )
    return out


# ---- the registry: what resolve() consults ----------------------------------------------


def _idx_folder_source(path: pathlib.Path, split: str, cache: pathlib.Path) -> Source:
    found = _find_idx(path, split)
    if found is None:
        raise UserError(f"IDX folder {path} has no {_idx_names(split)}")
    return _idx_source(str(path), _path_slug(path, found, cache), found)


def _cifar_folder_source(path: pathlib.Path, split: str, cache: pathlib.Path) -> Source:
    return _cifar_source(path, _cifar_folder(path), split, cache)


# A source by name: name -> Source(split, cache root).
NAMED: dict[str, Callable[[str, pathlib.Path], Source]] = {
    "fashion-mnist": lambda split, cache: _named_idx_source("fashion-mnist", split, cache),
    "mnist": lambda split, cache: _named_idx_source("mnist", split, cache),
    "emoji": _emoji_source,
    "fake": lambda split, cache: _fake_source(split),
}
# A folder's kind, decided by its content, first match wins: (what it holds, claims, build).
FOLDER_KINDS: tuple[
    tuple[str, Callable[[pathlib.Path], bool], Callable[[pathlib.Path, str, pathlib.Path], Source]],
    ...,
] = (
    ("IDX files", _has_idx, _idx_folder_source),
    ("CIFAR-10 python batches", lambda path: _cifar_folder(path) is not None, _cifar_folder_source),
    ("an LMDB database (data.mdb)", _has_lmdb, _lmdb_source),
    ("Parquet files (*.parquet)", _has_parquet, _parquet_source),
    ("image files", lambda path: True, _folder_source),
)
# A file's kind, decided by its suffix, first match wins: (what it is, claims, build).
FILE_KINDS: tuple[
    tuple[str, Callable[[pathlib.Path], bool], Callable[[pathlib.Path, str, pathlib.Path], Source]],
    ...,
] = (
    ("a ZIP of images (.zip)", lambda path: path.suffix.lower() == ".zip", _zip_source),
    ("a Parquet file (.parquet)", lambda path: path.suffix.lower() == ".parquet", _parquet_source),
)
assert tuple(NAMED) == SOURCES  # the names the CLI and the config check against
