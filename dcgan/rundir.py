"""A run folder: the one place that names its files, and its one-writer rule.

`RunDir(path)` names every file a run holds (training writes them; sample, eval,
export, transfer, report and tune read them through the same names) and reads
the resolved config back. Nothing else in the package spells a run's file name.

The one-writer rule: a lock file holding the owner's pid.

Two `dcgan train` processes on one folder would interleave their stats lines
and overwrite each other's checkpoints. The first one to start holds
`RUN/.lock` (created with O_EXCL, so two starting at once cannot both win);
the second is refused in one line. A lock left by a process that died
(SIGKILL, a crashed machine) names a pid that no longer runs, and is taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dcgan import atomic, runlog
from dcgan.config import Config, load_json
from dcgan.errors import UserError

LOCK = ".lock"
CHECKPOINT = "checkpoint.pt"  # the whole training state (resume)
SNAPSHOT = "generator.safetensors"  # G_ema and its shape: what sample/eval/export read
BEST = "best.safetensors"  # the snapshot with the lowest FID so far (--eval-every)
D_INIT = "d_init.safetensors"  # D's weights before its first step (transfer's baseline)
CONFIG = "config.json"  # the resolved config: auto choices and channels filled in


class RunDir:
    """The files of one training run."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    config = property(lambda self: self.path / CONFIG)
    checkpoint = property(lambda self: self.path / CHECKPOINT)
    snapshot = property(lambda self: self.path / SNAPSHOT)
    best = property(lambda self: self.path / BEST)
    d_init = property(lambda self: self.path / D_INIT)
    stats = property(lambda self: self.path / "stats.jsonl")  # one line per tick
    events = property(lambda self: self.path / "events.jsonl")  # settings, rollbacks, warnings
    metrics = property(lambda self: self.path / "metrics.jsonl")  # --eval-every's FIDs
    losses = property(lambda self: self.path / "losses.png")
    samples = property(lambda self: self.path / "samples")  # the fixed-noise grid per tick
    report = property(lambda self: self.path / "report.html")
    machine = property(lambda self: self.path / "machine.json")  # dcgan info's facts
    tensorboard = property(lambda self: self.path / "tensorboard")
    lock = property(lambda self: self.path / LOCK)
    # a run started by `dcgan tune`: its trial's config, its log, and why it was pruned
    trial_config = property(lambda self: self.path / "trial-config.json")
    log = property(lambda self: self.path / "train.log")
    pruned = property(lambda self: self.path / "pruned.json")

    def grid(self, nimg: int) -> Path:
        """The grid after nimg images (named by image count: ticks may be < 1 kimg)."""
        return self.samples / f"fakes{nimg:09d}.png"

    def grids(self) -> list[tuple[int, Path]]:
        """(nimg, file) of every grid, in training order."""
        found = []
        for f in self.samples.glob("fakes*.png"):
            digits = f.stem[len("fakes") :]
            if digits.isdigit():
                found.append((int(digits), f))
        return sorted(found)

    def is_run(self) -> bool:
        return any(p.exists() for p in (self.config, self.stats, self.checkpoint))

    def read_config(self) -> Config:
        if not self.config.is_file():
            raise UserError(f"{self.path} is not a run folder (no {CONFIG})")
        return load_json(str(self.config))

    def begin(self, force: bool) -> None:
        """Make this a fresh run folder; refuse to mix two runs unless force.

        A folder whose earlier attempt stopped before its first checkpoint holds nothing
        that could be continued, so it is cleared and started again without force
        (under torchrun --max-restarts the relaunch of such a run lands here)."""
        if self.stats.exists() or self.checkpoint.exists():
            if not force and self.checkpoint.exists():
                raise UserError(
                    f"{self.path} already holds a run; use --resume {self.path} to "
                    "continue it or --force to start over"
                )
            self.clear()
        self.path.mkdir(parents=True, exist_ok=True)

    def write_config(self, cfg: Config) -> None:
        """config.json: the resolved config (auto choices and channels filled in), written
        by the loop once it knows them, on a fresh start and on a resume alike."""
        atomic.write_text(self.config, cfg.to_json() + "\n")

    def save_machine(self) -> None:
        """machine.json: what `dcgan info` says of this machine (the report shows it)."""
        from dcgan.machine import facts

        atomic.write_text(self.machine, json.dumps(facts(), indent=1) + "\n")

    def trim(self, nimg: int) -> list[dict[str, Any]]:
        """Keep the stats and metrics lines up to nimg (a checkpoint's): the lines written
        after it (before a crash or a rollback) will be written again. Returns the stats
        rows kept."""

        def keep(path: Path, fields: tuple[str, ...]) -> list[dict[str, Any]]:
            rows = [r for r in runlog.read_stats(path, fields) if r["kimg"] * 1000 <= nimg]
            atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
            return rows

        if self.metrics.exists():
            keep(self.metrics, runlog.METRICS_FIELDS)
        return keep(self.stats, runlog.STATS_FIELDS)

    def clear(self) -> None:
        """Remove what a run wrote (--force, or an attempt without a checkpoint)."""
        for f in (
            self.stats,
            self.events,
            self.metrics,
            self.losses,
            self.checkpoint,
            self.snapshot,
            self.best,
            self.config,
            self.d_init,
            self.report,
            self.machine,
        ):
            f.unlink(missing_ok=True)
        shutil.rmtree(self.samples, ignore_errors=True)
        shutil.rmtree(self.tensorboard, ignore_errors=True)


def _owner(path: Path) -> tuple[int, str, float | None] | None:
    try:
        fields = path.read_text().split()
        started = float(fields[2]) if len(fields) > 2 else None  # older locks: pid host
        return int(fields[0]), fields[1], started
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        return None  # vanished or half-written: treat as free


def live_owner(folder: str | Path) -> tuple[int, str] | None:
    """(pid, host) of the process holding folder/.lock, or None when the folder is free
    (no lock, or a stale one left by a process of this host that died). A lock of
    another host cannot be checked from here and counts as held."""
    owner = _owner(Path(folder) / LOCK)
    if owner is None or (
        owner[1] == socket.gethostname() and not atomic.still_runs(owner[0], owner[2])
    ):
        return None
    return owner[0], owner[1]


@contextlib.contextmanager
def locked(folder: str | Path) -> Iterator[None]:
    """Hold folder/.lock while the block runs; refuse if a live process holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    me = f"{os.getpid()} {socket.gethostname()} {atomic.start_time(os.getpid())}\n"
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = live_owner(folder)
            if owner is not None and owner[1] != socket.gethostname():
                raise UserError(
                    f"{folder} is in use by a dcgan process on {owner[1]} "
                    f"(pid {owner[0]}); if it is gone, remove {path}"
                ) from None
            if owner is not None and owner[0] != os.getpid():
                raise UserError(
                    f"{folder} is in use by another dcgan process (pid {owner[0]}); "
                    "wait for it to finish or stop it first (if no dcgan process "
                    f"has that pid, remove {path})"
                ) from None
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
        owner = _owner(path)
        if owner is not None and owner[:2] == (os.getpid(), socket.gethostname()):
            path.unlink(missing_ok=True)
