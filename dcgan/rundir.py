"""A run folder's one-writer rule: a lock file holding the owner's pid.

Two `dcgan train` processes on one folder would interleave their stats lines
and overwrite each other's checkpoints. The first one to start holds
`RUN/.lock` (created with O_EXCL, so two starting at once cannot both win);
the second is refused in one line. A lock left by a process that died
(SIGKILL, a crashed machine) names a pid that no longer runs, and is taken over.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from dcgan.errors import UserError

LOCK = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _owner(path: Path) -> tuple[int, str] | None:
    try:
        pid, host = path.read_text().split()[:2]
        return int(pid), host
    except (OSError, ValueError):
        return None  # vanished or half-written: treat as free


def live_owner(folder: str | Path) -> tuple[int, str] | None:
    """(pid, host) of the process holding folder/.lock, or None when the folder is free
    (no lock, or a stale one left by a process of this host that died). A lock of
    another host cannot be checked from here and counts as held."""
    owner = _owner(Path(folder) / LOCK)
    if owner is None or (owner[1] == socket.gethostname() and not _alive(owner[0])):
        return None
    return owner


@contextlib.contextmanager
def locked(folder: str | Path) -> Iterator[None]:
    """Hold folder/.lock while the block runs; refuse if a live process holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    me = f"{os.getpid()} {socket.gethostname()}\n"
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = live_owner(folder)
            if owner is not None and owner[1] != socket.gethostname():
                raise UserError(f"{folder} is in use by a dcgan process on {owner[1]} "
                                f"(pid {owner[0]}); if it is gone, remove {path}") from None
            if owner is not None and owner[0] != os.getpid():
                raise UserError(f"{folder} is in use by another dcgan process (pid {owner[0]}); "
                                "wait for it to finish or stop it first") from None
            path.unlink(missing_ok=True)  # stale: its owner died
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        break
    else:
        raise UserError(f"cannot take the lock {path}")
    try:
        yield
    finally:
        if _owner(path) == (os.getpid(), socket.gethostname()):
            path.unlink(missing_ok=True)
