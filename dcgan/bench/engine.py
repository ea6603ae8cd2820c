"""Timing of one DCGAN training step (D update + G update): engine vs torch autograd.

`compare_dcgan_steps` builds G and D for each implementation at nz=100,
ngf=ndf=64 (the canonical widths, or `width`), float32, default contiguous (NCHW)
memory format, from the same weights; it warms each up, then times them
round-robin, one step each in turn (`dcgan.bench.timing.in_turns`), so that a busy
shared machine slows them all alike. `dcgan bench --engine` and
`python -m dcgan.bench.engine` print that comparison. clock="cpu" counts this
process's CPU time instead of wall time (meaningful with one intra-op thread),
which is far steadier when other jobs compete for the cores.
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial
from typing import Any

import torch

from dcgan.bench import timing
from dcgan.engine.gan import ScratchGAN
from dcgan.engine.reference import TorchGAN

IMPLS = ("engine-native", "engine-unfold", "torch")


def make_gan(
    impl: str,
    resolution: int,
    nc: int,
    device: str,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    width: int = 64,
    nz: int = 100,
) -> ScratchGAN | TorchGAN:
    """Both implementations start from the same (engine-drawn) weights."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    torch.manual_seed(seed)
    kw = dict(nz=nz, ngf=width, ndf=width, nc=nc, resolution=resolution, device=device, dtype=dtype)
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


def compare_dcgan_steps(
    impls: tuple[str, ...] = IMPLS,
    batch: int = 64,
    resolution: int = 32,
    nc: int = 3,
    device: str = "cpu",
    steps: int = 10,
    warmup: int = 1,
    clock: str = "wall",
    width: int = 64,
) -> dict[str, list[float]]:
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


def step_rows(
    resolutions: list[int], batches: list[int], steps: int, warmup: int, device: str
) -> list[dict[str, Any]]:
    """One row per (implementation, resolution, batch): median seconds per step."""
    rows = []
    for r in resolutions:
        for b in batches:
            times = compare_dcgan_steps(IMPLS, b, r, 3, device, steps, warmup)
            secs = {impl: statistics.median(t) for impl, t in times.items()}
            rows += [
                {
                    "name": impl,
                    "device": device,
                    "batch": b,
                    "resolution": r,
                    "sec_per_step": sec,
                    "img_per_s": b / sec,
                    "x_torch": sec / secs["torch"],
                }
                for impl, sec in secs.items()
            ]
    return rows


def denoiser_rows(epochs: int, device: str) -> list[dict[str, Any]]:
    """Seed 003's denoiser: seconds per epoch, engine (each kernel) vs torch autograd.

    Each run_denoise trains both from the same weights on the same batches, the
    engine's epoch and torch's epoch alternating; the median epoch is reported."""
    from dcgan.engine.denoise import run_denoise

    rows = []
    for kernel in ("native", "unfold"):
        res = run_denoise(epochs, device, kernel, log=None)
        torch_sec = statistics.median(res["torch"]["sec_per_epoch"])
        for impl in ("engine", "torch"):
            sec = statistics.median(res[impl]["sec_per_epoch"])
            name = f"engine-{kernel}" if impl == "engine" else "torch"
            rows.append(
                {
                    "name": f"denoiser/{name}",
                    "device": device,
                    "kernel_run": kernel,
                    "epochs": epochs,
                    "sec_per_epoch": sec,
                    "x_torch": sec / torch_sec,
                    "val_psnr": res[impl]["psnr"][-1],
                }
            )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    steps = [r for r in rows if "sec_per_step" in r]
    lines = [f"{'impl':<14} {'batch':>5} {'res':>4} {'s/step':>8} {'img/s':>8} {'x torch':>8}"]
    lines += [
        f"{r['name']:<14} {r['batch']:>5} {r['resolution']:>4} {r['sec_per_step']:>8.4f} "
        f"{r['img_per_s']:>8.1f} {r['x_torch']:>8.2f}"
        for r in steps
    ]
    denoise = [r for r in rows if "sec_per_epoch" in r]
    if denoise:
        lines += [
            "",
            f"{'denoiser':<14} {'kernel':>7} {'s/epoch':>8} {'x torch':>8} {'val PSNR':>9}",
        ]
        lines += [
            f"{r['name'].split('/')[1]:<14} {r['kernel_run']:>7} {r['sec_per_epoch']:>8.2f} "
            f"{r['x_torch']:>8.2f} {r['val_psnr']:>9.2f}"
            for r in denoise
        ]
    return "\n".join(lines)


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
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
        f"float32, {args.clock} clock, median of {args.steps} interleaved steps",
        flush=True,
    )
    for r in args.resolutions:
        res = compare_dcgan_steps(
            IMPLS, args.batch, r, args.nc, args.device, args.steps, clock=args.clock
        )
        med = {impl: statistics.median(t) for impl, t in res.items()}
        low = {impl: min(t) for impl, t in res.items()}
        for impl in res:
            print(
                f"{r:4d}x{r:<4d} {impl:14s} median {med[impl] * 1e3:9.1f} ms/step "
                f"({med[impl] / med['torch']:5.2f}x torch)   min {low[impl] * 1e3:9.1f} "
                f"ms/step ({low[impl] / low['torch']:5.2f}x torch)",
                flush=True,
            )


if __name__ == "__main__":
    main()
