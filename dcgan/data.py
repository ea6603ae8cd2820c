"""Training images as one cached uint8 array per (source, resolution, channels, split).

The store. `load_images` turns a source (`dcgan.sources`) into a uint8 array of shape
(N, C, R, R) once and keeps it in `cache_root()` as two files named by an `ImagesKey`
(the source's content digest among its fields):

    images-NAME-DIGEST-64px-3ch-train.npy    the array, a plain .npy file
    images-NAME-DIGEST-64px-3ch-train.json   its key, count, skipped files and labels

Later calls map the .npy (`_map`): opening it reads its header only, and the pages a
consumer touches come from the OS's page cache, shared by every process that maps the
file (the ranks of a machine). The map is copy-on-write, so consumers that hand it to
torch (which warns on read-only arrays) or write into it work as with an array in
memory, and nothing they do reaches the file.

Converting never holds the array in memory. An image folder is decoded in chunks, in
file order, over a pool of processes (`sources.decode_chunks`), and each chunk goes
straight into a memory map of `NAME.npy.partial`. About once a second, and on Ctrl-C,
the map is flushed and `NAME.progress.json` records how many files are done, so a
conversion stopped at 90% resumes there on the next call. The partial file becomes `NAME.npy` by a
rename only when it is whole, after the .json is written: a reader never sees a partial
array, and whoever finds the .npy finds its key beside it. The small fixed sources
(IDX, CIFAR-10, emoji) are built in memory and written atomically (`dcgan.atomic`).

One conversion per file at a time: the converter holds `NAME.lock` (created with
O_EXCL; it names the pid, host and start time). Others, such as the other ranks of a
torchrun job, print that they wait, wait for the lock to go, then map the finished file.
A lock whose process died on this host, or one of another host not refreshed for
`REMOTE_STALE_S`, is taken over, and its conversion resumes.

A file that is damaged, holds another key, or has the format before this one (one
.npz) is rebuilt. A flipped bit inside the pixels is not detected: checking a checksum
would read the whole array on every open. Serving batches is `dcgan.sampler`'s job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import pathlib
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from PIL import Image
from tqdm import tqdm

from dcgan import atomic, sources
from dcgan.cache_key import CacheKey
from dcgan.config import RESOLUTIONS
from dcgan.errors import UserError

IMAGES_VERSION = 1  # bump when decoding or resizing changes the pixels of a source
COMMIT_EVERY_S = 1.0  # how often a conversion records its progress (flush + fsync)
POLL_S = 0.2  # how often a process waiting for another's conversion looks again
REMOTE_STALE_S = 600.0  # a lock of another host not refreshed this long is abandoned
RANK0_GRACE_S = 10.0  # under torchrun, how long other local ranks leave local rank 0 to start


@dataclass
class ImageSet:
    # uint8 (N, C, R, R), C in {1, 3}: a copy-on-write memory map of the cache file
    # (writes stay in this process), read-only for arrays larger than the OS will
    # promise memory for; a plain array for "fake"
    images: np.ndarray
    labels: np.ndarray | None  # int64 (N,) for labelled sources, else None
    source: str  # "fashion-mnist", "mnist", "emoji", "fake" or an absolute path
    split: str  # "train" or "test"
    skipped: int = 0  # unreadable files left out while building
    content: str = ""  # the digest that names the image cache: changes when the files do
    path: str = ""  # the cached .npy file ("" for fake, which is not cached)
    converted: bool = False  # whether this call converted the source (else it read the cache)


def cache_root(cache_dir: str = "") -> pathlib.Path:
    """Where built arrays live: `cache_dir`, else $DCGAN_CACHE, else ~/.cache/dcgan."""
    chosen = cache_dir or os.environ.get("DCGAN_CACHE", "") or "~/.cache/dcgan"
    return pathlib.Path(chosen).expanduser().absolute()


def all_cores() -> int:
    """The cores this process may run on (its affinity: taskset, cgroup cpusets)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _check_args(
    resolution: int, channels: int, split: str, workers: int, max_images: int = 0
) -> None:
    if resolution not in RESOLUTIONS:
        raise UserError(
            f"resolution {resolution} is not supported: expected one of "
            f"{', '.join(map(str, RESOLUTIONS))}"
        )
    if channels not in (0, 1, 3):
        raise UserError(f"channels {channels} is not supported: expected 1, 3 or 0 (the source's)")
    if split not in sources.SPLITS:
        raise UserError(f"split {split!r} is not supported: expected 'train' or 'test'")
    if workers < 0:
        raise UserError(f"workers must be >= 1 (or 0: every core), got {workers}")
    if max_images < 0:
        raise UserError(f"max-images must be >= 1 (or 0: all), got {max_images}")


def _first(source: sources.Source, count: int) -> sources.Source:
    """The source cut to its first `count` images (0: all of it), under its own cache
    name: `-firstN` after the content digest. Its stale glob is that name alone, so
    converting a cut never removes the whole array (converting the whole removes the
    cuts, which are cheap to cut again)."""
    if count == 0:
        return source
    slug = f"{source.slug}-first{count}"
    if source.build is None:
        labels = None if source.labels is None else source.labels[:count]
        return dataclasses.replace(
            source, slug=slug, stale_glob=slug, files=source.files[:count], labels=labels
        )
    build = source.build

    def first(resolution: int, progress: bool) -> tuple[np.ndarray, np.ndarray | None, int]:
        images, labels, skipped = build(resolution, progress)
        return images[:count], None if labels is None else labels[:count], skipped

    return dataclasses.replace(source, slug=slug, stale_glob=slug, build=first)


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
# The files of one cached array.


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
        # prefix and a suffix: the glob that finds them is `images-{stale_glob}{suffix}*`
        return f"images-{self.content}", _suffix(self.resolution, self.channels, self.split)


def _suffix(resolution: int, channels: int, split: str) -> str:
    return f"-{resolution}px-{channels}ch-{split}"


# What follows the key's name, per file. ".npz" is the format before this one.
EXTENSIONS = {
    "array": ".npy",
    "meta": ".json",
    "partial": ".npy.partial",
    "progress": ".progress.json",
    "lock": ".lock",
}
OLD_FORMAT = ".npz"


@dataclass(frozen=True)
class StoreFiles:
    """The files of one cached array, all named after its key."""

    array: pathlib.Path  # the finished uint8 (N, C, R, R) .npy
    meta: pathlib.Path  # {"key", "count", "skipped", "labels"}
    partial: pathlib.Path  # the .npy being converted: (files, C, R, R), filled in order
    progress: pathlib.Path  # how far the partial file is: see _Progress
    lock: pathlib.Path  # held by the one process converting

    @classmethod
    def of(cls, root: pathlib.Path, key: ImagesKey) -> StoreFiles:
        base = key.filename()
        return cls(**{name: root / (base + ext) for name, ext in EXTENSIONS.items()})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_json(path: pathlib.Path) -> Any:
    """The JSON at path, or None when missing or not JSON."""
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None


def _open_array(
    files: StoreFiles, key: ImagesKey
) -> tuple[np.ndarray, np.ndarray | None, int] | None:
    """(read-only map, labels, skipped) of a finished file holding `key`, else None.

    Reads the .json and the .npy's header only; checks the key, the shape against the
    count and the key, and the file's length against the shape (a cut file)."""
    meta = _read_json(files.meta)
    if not isinstance(meta, dict) or not key.matches(meta.get("key")):
        return None
    count, skipped, labels = meta.get("count"), meta.get("skipped"), meta.get("labels")
    if not (_is_int(count) and count > 0 and _is_int(skipped) and skipped >= 0):
        return None
    if labels is not None:
        if not (isinstance(labels, list) and len(labels) == count):
            return None
        if not all(_is_int(x) and -(2**63) <= x < 2**63 for x in labels):
            return None
        labels = np.array(labels, dtype=np.int64)
    try:
        images = _map(files.array)
        size = files.array.stat().st_size
    # a damaged header raises what numpy's parser meets: ValueError mostly, also
    # SyntaxError, TypeError or EOFError; a file shorter than its header, OSError
    except Exception:  # noqa: BLE001 - every way a header can be damaged means "rebuild"
        return None
    shape = (count, key.channels, key.resolution, key.resolution)
    if not (
        isinstance(images, np.memmap)
        and images.dtype == np.uint8
        and images.shape == shape
        and images.flags.c_contiguous
        and images.offset + images.nbytes == size
    ):
        return None
    return images, labels, skipped


def _map(path: pathlib.Path) -> np.memmap:
    """The .npy at path mapped copy-on-write: no byte is read until used, pages read are
    the page cache's (shared by every process mapping the file), and the array is
    writable, as torch.from_numpy wants, while a write copies its page into this process
    and never reaches the file. The OS may refuse to promise that much memory for
    copies (a private writable map is counted against the commit limit): then a
    read-only map, which costs no promise."""
    try:
        return np.load(path, mmap_mode="c", allow_pickle=False)
    except OSError as e:
        if e.errno != errno.ENOMEM:
            raise
        return np.load(path, mmap_mode="r", allow_pickle=False)


def _write_meta(
    files: StoreFiles, key: ImagesKey, count: int, skipped: int, labels: np.ndarray | None
) -> None:
    meta = {
        "key": key.as_dict(),
        "count": count,
        "skipped": skipped,
        "labels": None if labels is None else labels.tolist(),
    }
    atomic.write_text(files.meta, json.dumps(meta))


def _save_whole(
    files: StoreFiles, key: ImagesKey, images: np.ndarray, labels: np.ndarray | None, skipped: int
) -> None:
    """A source built in memory -> its files: the .json, then the .npy, both atomic."""
    _write_meta(files, key, len(images), skipped, labels)

    def writer(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append .npy to a name
            np.save(f, np.ascontiguousarray(images), allow_pickle=False)

    atomic.write(files.array, writer)


# --------------------------------------------------------------------------------------
# Converting a folder: chunks into a memory map, progress recorded, resumable.


@dataclass
class _Progress:
    """How far a folder's conversion is, as NAME.progress.json records it."""

    done: int = 0  # files decoded (readable or not): the next chunk starts here
    written: int = 0  # images in the partial file: rows [0, written) are final
    skipped: int = 0  # unreadable files among the done ones
    first_bad: tuple[str, str] | None = None  # (file, why) of the first unreadable one
    # a labelled source's unreadable files (indices), whose labels the array leaves out;
    # empty for an unlabelled one, which needs no list however many files are bad
    bad: tuple[int, ...] = ()

    def as_dict(self, key: ImagesKey, files: int) -> dict[str, Any]:
        return {
            "key": key.as_dict(),
            "files": files,
            "done": self.done,
            "written": self.written,
            "skipped": self.skipped,
            "first_bad": self.first_bad,
            "bad": list(self.bad),
        }


def _resume_point(
    files: StoreFiles, key: ImagesKey, n: int, labelled: bool = False
) -> _Progress | None:
    """What an earlier, interrupted conversion of `key` recorded, if its partial file
    agrees (it holds n rows, or `written` rows once finishing shrank it); else None."""
    p = _read_json(files.progress)
    if not isinstance(p, dict) or not key.matches(p.get("key")) or p.get("files") != n:
        return None
    done, written, skipped, first_bad = (
        p.get(k) for k in ("done", "written", "skipped", "first_bad")
    )
    if not all(_is_int(v) for v in (done, written, skipped)):
        return None
    if not (0 <= written <= done <= n and written + skipped == done):
        return None
    if first_bad is not None and not (
        isinstance(first_bad, list)
        and len(first_bad) == 2
        and all(isinstance(x, str) for x in first_bad)
    ):
        return None
    if (first_bad is None) != (skipped == 0):
        return None
    bad = p.get("bad", [])
    if not (isinstance(bad, list) and all(_is_int(i) and 0 <= i < done for i in bad)):
        return None
    if len(bad) != (skipped if labelled else 0):
        return None
    try:
        with open(files.partial, "rb") as f:
            np.lib.format.read_magic(f)
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            short = os.fstat(f.fileno()).st_size < f.tell() + int(np.prod(shape))
    except Exception:  # noqa: BLE001 - missing or damaged: start again
        return None
    if short or fortran or dtype != np.uint8:
        return None
    if shape[1:] != (key.channels, key.resolution, key.resolution):
        return None
    if not (shape[0] == n or (done == n and shape[0] == written)):  # finishing shrank it
        return None
    first = None if first_bad is None else tuple(first_bad)
    return _Progress(done, written, skipped, first, tuple(bad))


def _commit(mm: np.memmap, files: StoreFiles, key: ImagesKey, n: int, state: _Progress) -> None:
    """Make rows [0, state.written) durable, then say so: a crash after this resumes here."""
    mm.flush()  # msync: the pixels reach the disk before the record that names them
    atomic.write_text(files.progress, json.dumps(state.as_dict(key, n)))
    with contextlib.suppress(OSError):
        os.utime(files.lock)  # the lock's heartbeat, for waiters on other hosts


def _shrink(path: pathlib.Path, rows: int) -> None:
    """Cut a .npy of (n, ...) rows down to its first `rows`: a new header of the same
    length (numpy pads every header so that its first dimension can grow in place) and
    a shorter file."""
    with open(path, "r+b") as f:
        np.lib.format.read_magic(f)
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        offset = f.tell()
        f.seek(0)
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False}
        np.lib.format.write_array_header_1_0(f, {**header, "shape": (rows, *shape[1:])})
        if f.tell() != offset:  # numpy changed how it pads: never write a wrong file
            raise RuntimeError(f"the header of {path} changed length; remove the file")
        f.truncate(offset + rows * int(np.prod(shape[1:])) * dtype.itemsize)
        f.flush()
        os.fsync(f.fileno())


def _allocate(path: pathlib.Path, shape: tuple[int, ...]) -> np.memmap:
    """A new .npy of zeros mapped for writing, its blocks reserved up front: writing a
    map of a sparse file on a full disk kills the process (SIGBUS) instead of raising."""
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape, version=(1, 0))
    if hasattr(os, "posix_fallocate"):
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, mm.offset + mm.nbytes)
        except OSError as e:
            if e.errno not in (getattr(os, "EOPNOTSUPP", -1), getattr(os, "ENOTSUP", -1)):
                raise
        finally:
            os.close(fd)
    return mm


def _convert_folder(
    source: sources.Source,
    key: ImagesKey,
    files: StoreFiles,
    workers: int,
    progress: bool,
) -> None:
    """Decode the folder's files (a container's members) into files.partial, then
    rename it to files.array."""
    paths, folder, labelled = source.files, source.folder, source.labels is not None
    assert folder is not None
    n, r, c = len(paths), key.resolution, key.channels
    state = _resume_point(files, key, n, labelled)
    left = n - (state.done if state else 0)
    workers = max(1, min(workers, -(-left // sources.chunk_images(r))))  # no idle processes
    if state is None:
        files.progress.unlink(missing_ok=True)
        files.partial.unlink(missing_ok=True)
        state = _Progress()
        mm = _allocate(files.partial, (n, c, r, r))
        resumed = ""
    else:
        mm = np.load(files.partial, mmap_mode="r+")
        resumed = f", resuming after {state.done}"
    plural = "es" if workers > 1 else ""
    print(
        f"converting {n} images of {folder} at {r}px ({workers} process{plural}{resumed})",
        file=sys.stderr,
    )
    bar = tqdm(
        total=n,
        initial=state.done,
        desc=f"images {folder.name}",
        unit="img",
        file=sys.stderr,
        disable=not progress,
        smoothing=0.1,
    )
    last = time.monotonic()
    try:
        chunks = sources.decode_chunks(paths, r, state.done, workers, source.container)
        with contextlib.closing(chunks):
            for chunk in chunks:
                good = _convert_channels(chunk.images, c)  # (readable, C, R, R)
                mm[state.written : state.written + len(good)] = good
                first_bad = state.first_bad
                if chunk.bad and first_bad is None:
                    index, why = chunk.bad[0]
                    first_bad = (sources.describe(source, index), why)
                bad = state.bad + tuple(i for i, _ in chunk.bad) if labelled else ()
                # one assignment, after the rows are in the map: a Ctrl-C never sees a
                # state that names rows not written, or half of a new state
                state = _Progress(
                    chunk.stop,
                    state.written + len(good),
                    state.skipped + len(chunk.bad),
                    first_bad,
                    bad,
                )
                if time.monotonic() - last >= COMMIT_EVERY_S:
                    _commit(mm, files, key, n, state)
                    last = time.monotonic()
                bar.update(chunk.stop - chunk.start)
        if state.done == n:  # shrinking below changes the header: record the end first
            _commit(mm, files, key, n, state)
    except KeyboardInterrupt:
        _commit(mm, files, key, n, state)  # Ctrl-C: resume exactly here, not at the last record
        raise
    finally:
        bar.close()
        del mm  # unmap: the file is renamed or shrunk next
    try:
        sources.check_skipped(folder, n, state.skipped, state.first_bad)
    except UserError:
        files.partial.unlink(missing_ok=True)  # nothing to resume: no image is readable
        files.progress.unlink(missing_ok=True)
        raise
    if state.written < n:
        _shrink(files.partial, state.written)
    labels = None
    if source.labels is not None:  # the labels of the images written, in their order
        labels = np.delete(source.labels, np.array(state.bad, dtype=np.int64))
    _write_meta(files, key, state.written, state.skipped, labels)
    os.replace(files.partial, files.array)
    atomic.fsync_dir(files.array.parent)
    files.progress.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------
# The lock: one converter per cached array.


def _lock_is_stale(lock: pathlib.Path) -> tuple[bool, str, int]:
    """(stale, who holds it, its inode). Stale: its process is gone from this host (or
    the pid now names a process started later), or another host's lock was not
    refreshed for REMOTE_STALE_S, or it was left empty by a creator that died at once."""
    with open(lock, "rb") as f:  # FileNotFoundError: released meanwhile
        st = os.fstat(f.fileno())
        text = f.read(200).decode(errors="replace")
    age = time.time() - st.st_mtime
    fields = text.split()
    try:
        pid, host, started = int(fields[0]), fields[1], float(fields[2])
    except (IndexError, ValueError):
        return age > 10.0, "a process that is starting", st.st_ino
    if host != socket.gethostname():
        return age > REMOTE_STALE_S, f"pid {pid} on {host}", st.st_ino
    return not atomic.still_runs(pid, started), f"pid {pid}", st.st_ino


def _take(lock: pathlib.Path) -> bool:
    """Create the lock, naming this process; False if it exists."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()} {socket.gethostname()} {atomic.start_time(os.getpid())}\n")
    return True


def _defer_to_local_rank_0(files: StoreFiles) -> None:
    """Under torchrun, local rank 0 converts: the other ranks of the machine give it
    RANK0_GRACE_S to take the lock (or finish) before they compete for it."""
    if os.environ.get("LOCAL_RANK", "0") in ("", "0"):
        return
    t0 = time.monotonic()
    while time.monotonic() - t0 < RANK0_GRACE_S:
        if files.lock.exists() or files.array.exists():
            return
        time.sleep(0.05)


def _show_progress(bar: tqdm | None, files: StoreFiles, what: str, progress: bool) -> tqdm | None:
    """While waiting: the converter's progress, from its progress file."""
    p = _read_json(files.progress)
    if not progress or not isinstance(p, dict):
        return bar
    total, done = p.get("files"), p.get("done")
    if not (_is_int(total) and _is_int(done) and 0 <= done <= total):
        return bar
    if bar is None:  # from where the converter is: the rate is what it does now
        bar = tqdm(total=total, initial=done, desc=f"waiting: {what}", unit="img", file=sys.stderr)
    bar.update(done - bar.n)
    return bar


@contextlib.contextmanager
def _converting(files: StoreFiles, what: str, progress: bool) -> Iterator[None]:
    """Hold files.lock while the block runs. While another live process holds it, say
    so once and wait; take over the lock of a process that died."""
    try:
        files.lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot create the cache folder {files.lock.parent}: {e.strerror or e} "
            "(pass a writable --cache-dir or set DCGAN_CACHE)"
        ) from None
    _defer_to_local_rank_0(files)
    said = False
    bar = None
    try:
        while True:
            try:
                if _take(files.lock):
                    break
                stale, who, inode = _lock_is_stale(files.lock)
            except FileNotFoundError:
                continue  # released between our attempt and our look: try again
            except OSError as e:
                raise UserError(
                    f"cannot take the lock {files.lock}: {e.strerror or e} "
                    "(pass a writable --cache-dir or set DCGAN_CACHE)"
                ) from None
            if stale:
                if bar is not None:  # the converter we watched is gone
                    bar.close()
                    bar = None
                # remove it only if it is still the file judged: another waiter may have
                # taken it over and created a live one meanwhile
                try:
                    if os.stat(files.lock).st_ino == inode:
                        files.lock.unlink()
                        print(f"taking over {files.lock} from {who} (gone)", file=sys.stderr)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    raise UserError(
                        f"cannot remove the stale lock {files.lock}: {e.strerror or e}"
                    ) from None
                continue
            if not said:
                print(f"waiting for {who} to convert {what} ({files.lock})", file=sys.stderr)
                said = True
            bar = _show_progress(bar, files, what, progress)
            time.sleep(POLL_S)
    finally:
        if bar is not None:
            bar.close()
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            mine = files.lock.read_text().split()[:2]
            if mine == [str(os.getpid()), socket.gethostname()]:
                files.lock.unlink()


def _lock_is_live(lock: pathlib.Path) -> bool:
    try:
        return not _lock_is_stale(lock)[0]
    except OSError:
        return False


def _remove_stale(root: pathlib.Path, source: sources.Source, key: ImagesKey) -> None:
    """Remove what will never be read again: the same source's files of other keys (the
    folder before it changed, older versions) unless a live process converts them,
    and this key's file of the old .npz format."""
    suffix = _suffix(key.resolution, key.channels, key.split)
    mine = key.filename()
    for old in root.glob(f"images-{source.stale_glob or source.slug + '*'}{suffix}*"):
        base = old.name[: old.name.rfind(suffix) + len(suffix)]
        ext = old.name[len(base) :]
        if ext not in (*EXTENSIONS.values(), OLD_FORMAT):
            continue
        if base == mine and ext != OLD_FORMAT:
            continue
        if ext != OLD_FORMAT and _lock_is_live(root / (base + EXTENSIONS["lock"])):
            continue
        old.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------
# The entry point.


def load_images(
    dataset: str,
    resolution: int,
    channels: int = 0,
    split: str = "train",
    cache_dir: str = "",
    progress: bool = True,
    workers: int = 0,
    max_images: int = 0,
) -> ImageSet:
    """A source name or folder -> uint8 (N, C, R, R), converted once then mapped from
    the cache.

    `channels` 0 keeps the source's own (1 for IDX, 3 for the rest). `workers` is the
    number of processes that decode an image folder (0: every core). `max_images`
    keeps the source's first N images (0: all), cached apart from the whole.
    """
    _check_args(resolution, channels, split, workers, max_images)
    source = _first(sources.resolve(dataset, split, cache_root(cache_dir)), max_images)
    channels = channels or source.channels
    if source.key == "fake":  # cheaper to make than to read back
        assert source.build is not None
        images, labels, skipped = source.build(resolution, progress)
        return ImageSet(_convert_channels(images, channels), labels, "fake", split, skipped, "fake")

    root = cache_root(cache_dir)
    key = ImagesKey(source.key, source.slug, resolution, channels, split)
    files = StoreFiles.of(root, key)
    found = _open_array(files, key)  # the common case: no lock, no write
    converted = False
    if found is None:
        with _converting(files, source.key, progress):
            found = _open_array(files, key)  # another process may have finished it
            if found is None:
                if files.array.exists():
                    print(
                        f"warning: cache file {files.array} is damaged; rebuilding it",
                        file=sys.stderr,
                    )
                    files.array.unlink(missing_ok=True)
                _build(source, key, files, workers or all_cores(), progress)
                _remove_stale(root, source, key)
                found = _open_array(files, key)
                converted = True
        if found is None:
            raise UserError(f"cache file {files.array} cannot be read back after writing it")
    images, labels, skipped = found
    return ImageSet(
        images, labels, source.key, split, skipped, source.slug, str(files.array), converted
    )


def _build(
    source: sources.Source, key: ImagesKey, files: StoreFiles, workers: int, progress: bool
) -> None:
    """Convert the source into its files (under the lock)."""
    hint = "pass a writable --cache-dir or set DCGAN_CACHE"
    try:
        if source.build is not None:
            images, labels, skipped = source.build(key.resolution, progress)
            _save_whole(files, key, _convert_channels(images, key.channels), labels, skipped)
        else:
            try:
                _convert_folder(source, key, files, workers, progress)
            except OSError as e:  # the memory map's file: no space, no permission
                where = e.filename or files.partial
                raise UserError(f"cannot write {where}: {e.strerror or e}") from None
    except UserError as e:
        if str(e).startswith("cannot write"):  # dcgan.atomic's message, or the map's
            raise UserError(f"{e} ({hint})") from None
        raise
