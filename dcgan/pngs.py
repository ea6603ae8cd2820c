"""Samples as files: one lossless PNG per image, numbered, for other tools to score.

`dcgan sample RUN --n 50000 --out-dir DIR` writes DIR/00000.png ... DIR/49999.png.
Image i is image i of `G.sample(n, seed)`: the same latents, forward batches and
rounding as `dcgan eval`'s samples of that generator, so clean-fid, torch-fidelity and
pytorch-fid score the very bytes our evaluator scores (and `dcgan eval DIR ...` reads
them back unchanged). Grey images are written as 8-bit grey PNGs, colour as RGB.

The latents are drawn at once (n x nz floats: 20 MB for 50,000 at nz = 100; drawing
them in pieces would give other numbers), the images one generator batch at a time.
Each batch is encoded and written by a pool of threads while the generator computes the
next one (torch releases the GIL while it computes, Pillow's zlib while it compresses).
Threads, not processes: a process pool would fork a process holding torch's thread
pools, and on the one machine measured the kind and number of workers made no
measurable difference (docs/benchmarks.md, "Samples as files").

The folder appears whole or not at all (`atomic.write_folder`).
"""

from __future__ import annotations

import io
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dcgan import atomic, latent, runlog
from dcgan.errors import UserError

MAX_PENDING = 4  # batches encoded or waiting at once, per worker: bounds the memory held


def encode(image: np.ndarray) -> bytes:
    """One uint8 image (C, H, W) with C = 1 or 3 -> the bytes of a lossless PNG."""
    pixels = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)  # (H, W[, 3])
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG")
    return buf.getvalue()


def grid_png(images: np.ndarray, nrow: int = 0) -> bytes:
    """uint8 images (N, C, R, R) -> the PNG bytes of `dcgan sample`'s grid of them."""
    canvas = runlog.grid(images, nrow)  # (H, W, C)
    return encode(canvas.transpose(2, 0, 1))


def _write(images: np.ndarray, paths: list[Path]) -> int:
    for image, path in zip(images, paths, strict=True):
        path.write_bytes(encode(image))
    return len(paths)


def write_samples(
    g: torch.nn.Module,
    n: int,
    out_dir: str | Path,
    seed: int = 0,
    truncation: float | None = None,
    progress: bool = True,
    workers: int | None = None,
) -> Path:
    """Write n samples of the eval-mode generator g as out_dir/00000.png, 00001.png, ...

    The names have at least five digits (more when n > 100,000), so their sorted order
    is the sample order. out_dir must not exist yet or be empty: a leftover image from
    an earlier, larger set would silently join the new one in any tool's count.

    >>> write_samples(dcgan.load("runs/fm"), 50_000, "fakes/")  # doctest: +SKIP
    PosixPath('fakes')
    """
    from dcgan.generator import uint8_batches

    out = Path(out_dir)
    if n < 1:
        raise UserError(f"--n must be >= 1, got {n}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(
            f"--out-dir {out} is not empty: give a new (or empty) folder, so that "
            "no earlier image is mixed into this set"
        )
    z = latent.latent_bank(n, g.nz, seed, truncation)  # (n, nz), the bank of dcgan sample
    width = max(5, len(str(n - 1)))
    workers = workers or os.cpu_count() or 1

    def fill(folder: Path) -> None:
        pending: deque[Future] = deque()
        start = 0
        with (
            ThreadPoolExecutor(workers) as pool,
            tqdm(total=n, unit="img", desc="png", disable=not progress, dynamic_ncols=True) as bar,
        ):
            for batch in uint8_batches(g, z):  # (b, C, R, R) uint8, one batch in memory
                images = batch.numpy()
                names = [folder / f"{i:0{width}d}.png" for i in range(start, start + len(images))]
                start += len(images)
                for part in np.array_split(np.arange(len(images)), workers):
                    if len(part):
                        job = pool.submit(_write, images[part], [names[i] for i in part])
                        job.add_done_callback(
                            lambda f: bar.update(f.result()) if not f.exception() else None
                        )
                        pending.append(job)
                while len(pending) > MAX_PENDING * workers:
                    pending.popleft().result()  # raises a worker's error here
            for job in pending:
                job.result()

    atomic.write_folder(out, fill)
    return out
