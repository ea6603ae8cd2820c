"""The Python API: `dcgan.load`, `dcgan.train`, `dcgan.Run`, `dcgan.evaluate`,
`dcgan.save_grid` (and `dcgan.Generator`, what `load` returns).

Each is the function the command line calls (`dcgan train` -> dcgan.launch,
`dcgan sample` -> Generator.sample, `dcgan eval` -> dcgan.evaluate), so a run
trained from a notebook is an ordinary run folder, and a number computed here is the
number the command prints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dcgan.config import Config
from dcgan.errors import UserError
from dcgan.generator import Generator, load
from dcgan.rundir import RunDir

__all__ = ["Generator", "Run", "evaluate", "load", "save_grid", "train"]


class Run:
    """A run folder, read from its files (a live run's too: each property reads anew).

    >>> import dcgan
    >>> run = dcgan.Run("runs/fm")                     # doctest: +SKIP
    >>> run.status, run.kimg, run.best_fid            # doctest: +SKIP
    ('finished', 150.0, 48.7)
    >>> G = run.generator(best=True)                   # the lowest-FID snapshot  # doctest: +SKIP
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.files = RunDir(self.path)
        if not self.files.config.is_file():
            raise UserError(f"{self.path} is not a run folder (no {self.files.config.name})")

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}: {self.status}, {self.kimg:g} kimg)"

    @property
    def config(self) -> Config:
        """The resolved config (`config.json`) as a dcgan.config.Config."""
        return self.files.read_config()

    @property
    def stats(self) -> list[dict[str, Any]]:
        """One dict per tick (`stats.jsonl`): kimg, losses, D outputs, img/s, ..."""
        from dcgan.runlog import read_stats

        return read_stats(self.files.stats)

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """One dict per evaluation (`metrics.jsonl`, with --eval-every): kimg, fid, kid."""
        from dcgan.runlog import read_stats

        return read_stats(self.files.metrics)

    @property
    def best(self) -> dict[str, Any] | None:
        """The metrics row with the lowest FID (its snapshot is best.safetensors), or None."""
        rows = [
            r
            for r in self.metrics
            if isinstance(r.get("fid"), (int, float)) and math.isfinite(r["fid"])
        ]
        return min(rows, key=lambda r: r["fid"]) if rows else None

    @property
    def best_fid(self) -> float | None:
        """The lowest FID measured during training, or None without --eval-every."""
        best = self.best
        return None if best is None else float(best["fid"])

    @property
    def kimg(self) -> float:
        """Thousands of real images shown to D so far (the last tick's)."""
        stats = self.stats
        return float(stats[-1]["kimg"]) if stats else 0.0

    @property
    def status(self) -> str:
        """ "running", "finished", "stopped" (resume it) or "not started"."""
        from dcgan.report import read_run

        return read_run(self.path).status

    def generator(self, device: str = "auto", best: bool = False) -> Generator:
        """The run's G-EMA snapshot (or, with best=True, the lowest-FID one)."""
        if best and not self.files.best.is_file():
            raise UserError(
                f"{self.path} has no {self.files.best.name} (train with "
                "--eval-every to keep the best snapshot)"
            )
        return load(self.files.best if best else self.path, device)

    def report(self, refresh: bool = False) -> Path:
        """The path of the run's `report.html`, (re)written when missing or refresh=True."""
        from dcgan.report import build_report

        if refresh or not self.files.report.is_file():
            build_report(self.path)
        return self.files.report


def train(
    preset: str | None = None,
    out: str | Path | None = None,
    *,
    resume: str | Path | None = None,
    config: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    **overrides: Any,
) -> Run:
    """Train (or continue) a run, exactly as `dcgan train` does; returns its Run.

    preset: fmnist32 (default), dcgan64, color64 or safe128; config: a config file
    instead; every config field is a keyword (`kimg=300, d_lr=1e-4, dataset="emoji"`),
    `lr` sets both learning rates. resume: a run folder to continue (only kimg and
    device may change). progress=False turns the progress bar off.

    Ctrl-C (a notebook's interrupt) finishes the current step, saves the whole state
    and returns the run with status "stopped"; `dcgan.train(resume=run.path)` goes on.

    >>> import dcgan
    >>> run = dcgan.train("fmnist32", out="runs/fm", kimg=20)   # doctest: +SKIP
    >>> run = dcgan.train(resume="runs/fm", kimg=40)            # doctest: +SKIP
    """
    from dcgan import launch

    if resume and (preset or config):
        raise UserError("resume continues the run with its own config: leave preset and config out")
    if "lr" in overrides:  # as the command line's --lr: both rates, unless given
        lr = overrides.pop("lr")
        overrides.setdefault("g_lr", lr)
        overrides.setdefault("d_lr", lr)
    p = launch.plan(
        preset or "fmnist32", overrides, config=config, out=out, resume=resume, force=force
    )
    launch.execute(p, progress=progress)
    return Run(p.out)


def evaluate(
    a: str | Path,
    b: str | Path,
    metrics: Sequence[str] = ("fid", "kid"),
    features: str = "inception",
    n: int = 10000,
    *,
    device: str = "auto",
    json: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Compare image set A (judged) with B (the reference): `dcgan eval A B`'s values.

    A and B are each a run folder, a generator file or folder (anything `load` takes),
    a data source (`fashion-mnist:test`, `mnist:train`, `emoji`, `fake`) or a folder of
    images. metrics: any of fid, kid, pr, is, parzen; features: inception or domain;
    n images per side. json: also write the result there, as `--json` does.

    >>> import dcgan
    >>> r = dcgan.evaluate("runs/fm", "fashion-mnist:test", features="domain")  # doctest: +SKIP
    >>> r["fid"], r["kid"]                             # doctest: +SKIP
    (3.1, [0.0021, 0.0003])
    """
    from dcgan.evaluate import evaluate as compare  # the module of that name
    from dcgan.machine import resolve_device

    if isinstance(metrics, str):
        metrics = metrics.split(",")
    return compare(
        str(a),
        str(b),
        list(metrics),
        features,
        n,
        device=str(resolve_device(device)),
        json_path=str(json) if json else None,
        progress=progress,
    )


def save_grid(images: torch.Tensor | np.ndarray, path: str | Path, nrow: int = 0) -> Path:
    """Write images (N, C, R, R), uint8 or floats in [-1, 1], as one PNG grid (the layout
    of `dcgan sample`: nrow per row, square by default, white padding); returns the path.

    >>> import dcgan
    >>> dcgan.save_grid(G.sample(64), "grid.png")      # doctest: +SKIP
    PosixPath('grid.png')
    """
    from dcgan import atomic, pixels, pngs

    if isinstance(images, torch.Tensor):
        images = images if images.dtype == torch.uint8 else pixels.to_uint8(images)
        images = images.cpu().numpy()
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise UserError(
            f"save_grid takes images (N, 1 or 3, R, R) as uint8 or floats, got "
            f"{images.dtype} {tuple(images.shape)}"
        )
    path = Path(path)
    atomic.write_bytes(path, pngs.grid_png(images, nrow))
    return path
