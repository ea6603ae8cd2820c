"""Atomic file writes: a reader sees the old file or the new one, never half of one.

The bytes go to a temporary file in the same folder, which is flushed to disk,
renamed over the target, and then the folder itself is flushed so that the
rename survives a power cut. A failed write (disk full, file-size limit,
read-only folder) leaves the old file byte-identical, removes the temporary,
and becomes one UserError naming the file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from dcgan.errors import UserError

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: the process's file-creation mask


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write(path: str | Path, writer: Callable[[str], None]) -> None:
    """Call writer(tmp_path) to fill a temporary file, then put it in place at path."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a killed write
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would make every output private
        writer(tmp)
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
