"""A run's log files: `stats.jsonl` and its row formats, the sample grids, `losses.png`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dcgan import atomic, pixels


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, R, R) floats in [-1, 1] -> (N, C, R, R) uint8 on the host (a grid, a PNG)."""
    return pixels.to_uint8(images).cpu().numpy()


def grid(images: np.ndarray, nrow: int = 0, pad: int = 2) -> np.ndarray:
    """(N, C, R, R) uint8 -> one (H, W, C) uint8 image, nrow per row, white padding."""
    n, c, r, _ = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol_rows = math.ceil(n / nrow)
    side = r + pad
    canvas = np.full((ncol_rows * side + pad, nrow * side + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        y, x = divmod(i, nrow)
        canvas[pad + y * side : pad + y * side + r, pad + x * side : pad + x * side + r] = images[
            i
        ].transpose(1, 2, 0)
    return canvas


def save_grid(images: torch.Tensor | np.ndarray, path: str | Path, nrow: int = 0) -> Path:
    """Write images (float in [-1, 1] or uint8, (N, C, R, R)) as one PNG grid."""
    if isinstance(images, torch.Tensor):
        images = to_uint8(images)
    canvas = grid(images, nrow)
    if canvas.shape[2] == 1:
        canvas = canvas[:, :, 0]
    path = Path(path)
    # the format from the final name (the temporary's suffix is .tmp); written through
    # dcgan.atomic, so a crash leaves no half PNG and a symlink at path is replaced,
    # never followed
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    atomic.write(path, lambda tmp: Image.fromarray(canvas).save(tmp, format=fmt))
    return path


def append_stats(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


# The numbers every row of a file holds (training writes them all; readers index them).
STATS_FIELDS = ("kimg", "loss_d", "loss_g", "d_real", "d_fake", "img_per_s")  # stats.jsonl
METRICS_FIELDS = ("kimg", "fid")  # metrics.jsonl: --eval-every's rows
EVENTS_FIELDS: tuple[str, ...] = ()  # events.jsonl: an "event" name, then its own fields


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool): what every numeric field of a row must be."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_stats(path: Path, need: tuple[str, ...] = ("kimg",)) -> list[dict[str, Any]]:
    """The JSON objects of a .jsonl file, one per line. Lines cut short by a crash, and
    rows whose `need` fields are not all finite numbers (a line edited by hand, or of
    another program), are left out: every reader can then index those fields."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
        # every reader orders and plots rows by kimg: a row without a number there (an
        # edited or foreign line) is skipped like a cut one, not a traceback later
        if isinstance(row, dict) and all(is_number(row.get(k)) for k in need):
            rows.append(row)
    return rows


def plot_losses(rows: list[dict[str, Any]], path: Path) -> None:
    """losses.png: D and G losses (left) and mean D(x), D(G(z)) (right) against kimg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kimg = [r["kimg"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.plot(kimg, [r["loss_d"] for r in rows], label="D loss")
    ax1.plot(kimg, [r["loss_g"] for r in rows], label="G loss")
    ax1.set_xlabel("kimg")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax2.plot(kimg, [r["d_real"] for r in rows], label="D(x)")
    ax2.plot(kimg, [r["d_fake"] for r in rows], label="D(G(z))")
    ax2.set_xlabel("kimg")
    ax2.set_ylim(0, 1)
    ax2.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
