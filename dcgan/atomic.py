"""Atomic file writes: a reader sees the old file or the new one, never half of one.

The bytes go to a temporary file in the same folder, which is flushed to disk,
renamed over the target, and then the folder itself is flushed so that the
rename survives a power cut. A failed write (disk full, file-size limit,
read-only folder) leaves the old file byte-identical, removes the temporary,
and becomes one UserError naming the file.

Several processes may write one file at once (two torchrun ranks or two tune
workers building the same cache): each writes its own temporary, named
`.NAME.HOST.PID.RANDOM.tmp`, and the last rename wins with a whole file. A
temporary left by a killed write is removed by the next write, but only when
the pid it names no longer runs on this host: a live writer's is never touched.
A rename replaces a symbolic link at the target path; it never writes through it.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from dcgan.errors import UserError

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: the process's file-creation mask
_ORPHAN_AGE_S = 24 * 3600  # a temporary with no readable owner is stale after a day
# this host in temporary names (dots would split the name's fields)
HOST = socket.gethostname().replace(".", "_")


def start_time(pid: int) -> float | None:
    """When process pid started (seconds since the epoch), None if no such process runs,
    -1.0 if it runs but may not be inspected (another user's)."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return None
    except psutil.Error:
        return -1.0


def still_runs(pid: int, started: float | None = None) -> bool:
    """Whether the writer pid (of this host) still runs: its pid is live and, when its
    start time was recorded, that process started then. After a reboot or a long time
    a pid may name a newer, unrelated process, which is not the writer."""
    now = start_time(pid)
    if now is None:
        return False
    return started is None or now < 0 or abs(now - started) < 1.0


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename) to disk. Windows cannot open a folder as a
    file, and NTFS journals its metadata, so there is nothing to do there."""
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_dead_temporaries(path: Path) -> None:
    """Remove `.NAME.HOST.PID.*.tmp` files of writers that died on this host."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        fields = tmp.name[len(path.name) + 2 :].split(".")  # HOST, PID, RANDOM, "tmp"
        try:
            if len(fields) == 4 and fields[0] == HOST:
                dead = not still_runs(int(fields[1]))
            else:  # another host's (cannot be checked) or an older naming: by age only
                dead = time.time() - tmp.stat().st_mtime > _ORPHAN_AGE_S
        except (OSError, ValueError):
            continue  # vanished meanwhile, or not ours to judge
        if dead:
            tmp.unlink(missing_ok=True)


def write(path: str | Path, writer: Callable[[str], None]) -> None:
    """Call writer(tmp_path) to fill a temporary file, then put it in place at path."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_temporaries(path)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{path.name}.{HOST}.{os.getpid()}.", suffix=".tmp", dir=path.parent
        )
        os.close(fd)
        writer(tmp)
        # after the writer: some writers (safetensors) recreate the file, and mkstemp's
        # 0600 would make every output private to its owner
        os.chmod(tmp, 0o666 & ~_UMASK)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        fsync_dir(path.parent)
    # torch.save reports a failed write (e.g. EFBIG) as RuntimeError, safetensors as
    # its own error type (a subclass of Exception): all mean "the file is not written"
    except (OSError, RuntimeError, UnicodeError) as e:
        raise _failed(path, e) from e
    except Exception as e:
        if type(e).__name__ != "SafetensorError":
            raise
        raise _failed(path, e) from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _failed(path: Path, e: Exception) -> UserError:
    kept = "the previous file is unchanged" if path.exists() else "nothing was written"
    reason = getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0]
    return UserError(f"cannot write {path}: {reason}; {kept}")


def write_bytes(path: str | Path, data: bytes) -> None:
    def writer(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    write(path, writer)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_folder(path: str | Path, filler: Callable[[Path], None]) -> None:
    """Call filler(tmp_folder) to fill a new folder, then put it in place at path.

    For sets of many files (50,000 sample PNGs), where a flush per file would cost
    minutes: the files go to a temporary sibling folder `.NAME.HOST.PID.RANDOM.tmp`,
    everything is flushed once (os.sync), and the folder is renamed to path, which
    must not exist or be an empty folder. A reader sees no folder or the whole one;
    a failure removes the temporary, and one left by a writer that died is removed by
    the next write of the same folder.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.{HOST}.*.tmp"):
            fields = stale.name[len(path.name) + 2 :].split(".")  # HOST, PID, RANDOM, "tmp"
            if (
                stale.is_dir()
                and len(fields) == 4
                and fields[1].isdigit()
                and not still_runs(int(fields[1]))
            ):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(
            tempfile.mkdtemp(
                prefix=f".{path.name}.{HOST}.{os.getpid()}.", suffix=".tmp", dir=path.parent
            )
        )
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp's 0700 would make the folder private
        filler(tmp)
        os.sync()
        os.replace(tmp, path)  # rename(2) may replace an empty folder, never a full one
        tmp = None
        fsync_dir(path.parent)
    except OSError as e:
        raise _failed(path, e) from e
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
