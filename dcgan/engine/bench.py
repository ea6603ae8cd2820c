"""Timing of one DCGAN training step (D update + G update): engine vs torch autograd.

`compare_dcgan_steps` builds G and D for each implementation at nz=100,
ngf=ndf=64 (the canonical widths, or `width`), float32, default contiguous (NCHW)
memory format, from the same weights; it warms each up, then times them
round-robin, one step each in turn (`dcgan.timing.in_turns`), so that a busy
shared machine slows them all alike. `dcgan bench --engine` and
`python -m dcgan.engine.bench` print that comparison. clock="cpu" counts this
process's CPU time instead of wall time (meaningful with one intra-op thread),
which is far steadier when other jobs compete for the cores.
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial

import torch

from dcgan import timing
from dcgan.engine.gan import ScratchGAN
from dcgan.engine.reference import TorchGAN

IMPLS = ("engine-native", "engine-unfold", "torch")


def make_gan(impl: str, resolution: int, nc: int, device: str, seed: int = 0,
             dtype: torch.dtype = torch.float32, width: int = 64,
             nz: int = 100) -> ScratchGAN | TorchGAN:
    """Both implementations start from the same (engine-drawn) weights."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    torch.manual_seed(seed)
    kw = dict(nz=nz, ngf=width, ndf=width, nc=nc, resolution=resolution, device=device,
              dtype=dtype)
    kernel = "unfold" if impl == "engine-unfold" else "native"
    engine_gan = ScratchGAN(**kw, kernel=kernel)
    if impl == "torch":
        return TorchGAN(**kw).load_from(engine_gan)
    return engine_gan


def _inputs(batch: int, resolution: int, nc: int, nz: int, device: str):
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(batch, nc, resolution, resolution, generator=g) * 2 - 1).to(device)
    z = torch.randn(batch, nz, generator=g).to(device)
    return x, z


def compare_dcgan_steps(impls: tuple[str, ...] = IMPLS, batch: int = 64, resolution: int = 32,
                        nc: int = 3, device: str = "cpu", steps: int = 10, warmup: int = 1,
                        clock: str = "wall", width: int = 64) -> dict[str, list[float]]:
    """Seconds of every timed step of each implementation, one step each in turn."""
    gans = {impl: make_gan(impl, resolution, nc, device, width=width) for impl in impls}
    x, z = _inputs(batch, resolution, nc, 100, device)
    for gan in gans.values():
        for _ in range(warmup):
            gan.step(x, z)
    timed = {impl: timing.counted(partial(gan.step, x, z), batch) for impl, gan in gans.items()}
    # one step per window, so every step's own time is kept (median and minimum)
    windows = timing.in_turns(timed, steps, 1, timing.clock(clock, device))
    return {impl: [sec for _, sec in w] for impl, w in windows.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="DCGAN train step: engine vs torch autograd")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--resolutions", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--nc", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"float32, {args.clock} clock, median of {args.steps} interleaved steps", flush=True)
    for r in args.resolutions:
        res = compare_dcgan_steps(IMPLS, args.batch, r, args.nc, args.device, args.steps,
                                  clock=args.clock)
        med = {impl: statistics.median(t) for impl, t in res.items()}
        low = {impl: min(t) for impl, t in res.items()}
        for impl in res:
            print(f"{r:4d}x{r:<4d} {impl:14s} median {med[impl] * 1e3:9.1f} ms/step "
                  f"({med[impl] / med['torch']:5.2f}x torch)   min {low[impl] * 1e3:9.1f} "
                  f"ms/step ({low[impl] / low['torch']:5.2f}x torch)", flush=True)


if __name__ == "__main__":
    main()
