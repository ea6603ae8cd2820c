"""TensorBoard logging (`--tensorboard`): what stats.jsonl and metrics.jsonl hold, as scalars,
the fixed-noise grid per tick as an image, and the resolved config as text.

Written with `torch.utils.tensorboard.SummaryWriter` into RUN/tensorboard; open it with
`tensorboard --logdir RUN/tensorboard`. The `tensorboard` package is an optional extra
(`pip install 'dcgan[tensorboard]'`); asking for the log without it is a one-line error.
The step of every entry is the image count (nimg), so curves of runs with different
batch sizes line up.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from dcgan.errors import UserError
from dcgan.rundir import RunDir


class TensorBoardLog:
    def __init__(self, run_dir: Path, config: dict[str, Any]):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's module imports the tensorboard package
            raise UserError(
                "--tensorboard needs the tensorboard package: pip install 'dcgan[tensorboard]'"
            ) from None
        self.writer = SummaryWriter(log_dir=str(RunDir(run_dir).tensorboard))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)

    def tick(self, nimg: int, row: dict[str, Any], grid: np.ndarray | None = None) -> None:
        """Every number of a stats.jsonl row (tick, kimg and time left out), and the grid
        (H, W, C) uint8."""
        for key, value in row.items():
            if key in ("tick", "kimg", "time") or not isinstance(value, (int, float)):
                continue
            self.writer.add_scalar(f"train/{key}", value, nimg)
        if grid is not None:
            self.writer.add_image("samples/fixed_noise", grid, nimg, dataformats="HWC")
        self.writer.flush()

    def metrics(self, nimg: int, scores: dict[str, Any]) -> None:
        for key, value in scores.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"metrics/{key}", value, nimg)
            elif isinstance(value, list) and value and isinstance(value[0], (int, float)):
                self.writer.add_scalar(f"metrics/{key}", value[0], nimg)  # KID's mean
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
