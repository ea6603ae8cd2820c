"""Timing of one DCGAN training step (D update + G update): engine vs torch autograd.

`time_dcgan_step` builds G and D at nz=100, ngf=ndf=64 (the canonical widths), float32,
default contiguous (NCHW) memory format, runs `warmup` steps, then `steps` timed steps
grouped into windows, and returns the median of the windows' seconds per step.
Run `python -m dcgan.engine.bench` for a small table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dcgan.engine.gan import ScratchGAN
from dcgan.engine.reference import TorchGAN

IMPLS = ("engine-native", "engine-unfold", "torch")


def make_gan(impl: str, resolution: int, nc: int, device: str, seed: int = 0,
             dtype: torch.dtype = torch.float32) -> ScratchGAN | TorchGAN:
    """Both implementations start from the same (engine-drawn) weights."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    torch.manual_seed(seed)
    kw = dict(nz=100, ngf=64, ndf=64, nc=nc, resolution=resolution, device=device, dtype=dtype)
    kernel = "unfold" if impl == "engine-unfold" else "native"
    engine_gan = ScratchGAN(**kw, kernel=kernel)
    if impl == "torch":
        return TorchGAN(**kw).load_from(engine_gan)
    return engine_gan


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_dcgan_step(impl: str, batch: int = 64, resolution: int = 32, nc: int = 3,
                    device: str = "cpu", steps: int = 10, warmup: int = 2,
                    windows: int = 5) -> float:
    """Median seconds per full GAN step (d_step + g_step) for impl in IMPLS."""
    gan = make_gan(impl, resolution, nc, device)
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(batch, nc, resolution, resolution, generator=g) * 2 - 1).to(device)
    z = torch.randn(batch, 100, generator=g).to(device)
    for _ in range(warmup):
        gan.step(x, z)
    _sync(device)
    windows = max(1, min(windows, steps))
    per_window = max(1, steps // windows)
    times = []
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(per_window):
            gan.step(x, z)
        _sync(device)
        times.append((time.perf_counter() - t0) / per_window)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--resolutions", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--nc", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the three implementations round-robin, keep each one's best")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    for r in args.resolutions:
        best = dict.fromkeys(IMPLS, float("inf"))
        for _ in range(args.rounds):
            for impl in IMPLS:
                t = time_dcgan_step(impl, args.batch, r, args.nc, args.device, args.steps)
                best[impl] = min(best[impl], t)
        base = best["torch"]
        for impl in IMPLS:
            print(f"{r:4d}x{r:<4d} {impl:14s} {best[impl] * 1e3:9.1f} ms/step "
                  f"{best[impl] / base:6.2f}x torch", flush=True)


if __name__ == "__main__":
    main()
