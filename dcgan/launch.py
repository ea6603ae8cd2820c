"""Starting or continuing a training run in its folder: what `dcgan train` and
`dcgan.train()` share, so both make the same checks and the same run folder.

`plan` turns a request (a preset or a config file, overrides, the folder, or a run to
resume) into the resolved config, the folder and the state to continue from, with
every check that can fail before any work: a resume may change only kimg and device,
the device must exist. `execute` takes the folder's lock, prepares the folder (a fresh
run) or rewrites its config (a resume), and runs the training loop.

Ctrl-C and SIGTERM never lose the state: inside the loop they only set a flag
(`dcgan.train.StopFlag`), the loop finishes its step, saves the full training state
and returns normally with `stopped` set. A notebook's "interrupt kernel" is the same
SIGINT, so `dcgan.train()` returns a stopped run that `dcgan.train(resume=...)`
continues exactly; a second Ctrl-C aborts without saving.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcgan import memory
from dcgan.config import Config, apply_overrides, from_preset, load_json
from dcgan.errors import UserError

RESUMABLE = ("kimg", "device")  # the fields a resumed run may change


@dataclass
class Plan:
    """A resolved request: what `execute` trains, where, and from which state."""

    cfg: Config
    out: Path
    state: dict[str, Any] | None  # the loaded checkpoint to continue, or None: a fresh run
    force: bool  # clear a folder that already holds a run


def plan(
    preset: str = "fmnist32",
    overrides: Mapping[str, Any] | None = None,
    *,
    config: str | Path | None = None,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    force: bool = False,
) -> Plan:
    """Resolve a training request; nothing is written. Raises UserError for mistakes.

    overrides: flat config fields (`{"kimg": 300, "d_lr": 1e-4}`), strictly checked.
    config: a config file used instead of the preset (the overrides still apply).
    out: the run folder (default runs/PRESET-DATE). resume: a run folder to continue.

    >>> p = plan("fmnist32", {"kimg": 2}, out="runs/quick")
    >>> p.cfg.train.kimg, p.out, p.state
    (2.0, PosixPath('runs/quick'), None)
    """
    from dcgan import checkpoint
    from dcgan.dist import restarted_by_torchrun
    from dcgan.machine import resolve_device
    from dcgan.rundir import RunDir

    overrides = dict(overrides or {})
    state = None
    if not resume and out and restarted_by_torchrun() and RunDir(out).checkpoint.is_file():
        # torchrun --max-restarts relaunches the same command after a rank died:
        # continue from the run's last complete checkpoint instead of refusing the folder
        resume = out
        overrides = {k: v for k, v in overrides.items() if k in RESUMABLE}
        print(
            f"restart {os.environ['TORCHELASTIC_RESTART_COUNT']}: resuming {out}", file=sys.stderr
        )
    if resume:
        run = RunDir(resume)
        extra = set(overrides) - set(RESUMABLE)
        if extra:
            raise UserError(
                "--resume continues the run with its own config; only --kimg and "
                f"--device may change (got --{', --'.join(sorted(extra))})"
            )
        if run.checkpoint.is_file():
            state = checkpoint.load_state(run.checkpoint)
            cfg = apply_overrides(Config.from_dict(state["config"]), overrides)
        elif run.config.is_file():
            # stopped before its first checkpoint: nothing to continue, so the run starts
            # again from its own config (what it had written is of a run that is gone)
            cfg = apply_overrides(run.read_config(), overrides)
            print(
                f"{run.path} has no {run.checkpoint.name} yet: starting it again from its "
                f"{run.config.name}",
                file=sys.stderr,
            )
        else:
            raise UserError(
                f"--resume {run.path}: not a run folder (no {run.checkpoint.name} "
                f"or {run.config.name})"
            )
        folder = run.path
    else:
        # a config file (e.g. dcgan tune's best.json) replaces the preset; overrides apply
        cfg = (
            apply_overrides(load_json(str(config)), overrides)
            if config
            else from_preset(preset, overrides)
        )
        stamp = time.strftime("%Y%m%d-%H%M%S")
        folder = Path(out) if out else Path("runs") / f"{preset}-{stamp}"
    device = resolve_device(cfg.train.device)  # cuda without CUDA: one line, before any work
    memory.check_training(cfg, device)  # --batch 10**8: one line, not an allocator traceback
    return Plan(cfg, folder, state, force or bool(resume))


def execute(p: Plan, progress: bool = True) -> dict[str, Any]:
    """Train the plan in its folder; returns the last tick's stats (`stopped`: Ctrl-C)."""
    from dcgan.rundir import RunDir, locked
    from dcgan.train import training_loop

    # one writer per run folder (under torchrun, rank 0 writes and holds the lock)
    lock = locked(p.out) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext()
    with lock:
        run = RunDir(p.out)
        if p.state is None and os.environ.get("RANK", "0") == "0":
            run.begin(p.force)  # the loop writes the resolved config.json into it
        print(f"run folder: {p.out}", file=sys.stderr)
        return training_loop(p.cfg, run, resume=p.state, progress=progress)
