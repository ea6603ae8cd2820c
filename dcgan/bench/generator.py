"""`dcgan bench generator`: inference images/s of G, eager and as exported.

The variants are the eager G, `torch.compile`, and the two files `dcgan export`
writes (TorchScript, ONNX Runtime), timed in turns by the bench's one loop.
"""

from __future__ import annotations

import importlib.util
import math
import statistics
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from dcgan.bench.timing import clock, counted, in_turns
from dcgan.checkpoint import load_generator
from dcgan.errors import UserError
from dcgan.export import fold_batchnorm, load_exported, save_graph
from dcgan.models import Generator, init_weights

VARIANTS = ("eager", "compiled", "torchscript", "onnx")


def canonical_generator() -> tuple[Generator, dict[str, Any]]:
    """The 64x64 DCGAN G of the paper / PyTorch example (nz 100, ngf 64, nc 3), DCGAN
    init from seed 0, eval mode: speed does not depend on the weights' values."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        g = Generator(100, 64, 3, 64)
        g.apply(init_weights)
    meta = {
        "nz": 100,
        "ngf": 64,
        "nc": 3,
        "resolution": 64,
        "g_dropout": 0.0,
        "dataset": "none (canonical G, untrained)",
        "kimg": 0.0,
    }
    return g.eval(), meta


def time_generator(
    run_or_none: str | None = None,
    variants: tuple[str, ...] = VARIANTS,
    batches: tuple[int, ...] = (1, 256),
    device: str = "cpu",
    warmup: int = 3,
    windows: int = 5,
    min_window_s: float = 0.25,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Inference images/s of G per (variant, batch): eager, torch.compile, TorchScript
    and ONNX Runtime (the last two are the files `export_generator` writes, BN folded).

    Without a run it times the canonical 64x64 G. For each batch size, the
    variants' first calls (compilation, for `compiled`) are timed on their own
    and reported as first_call_s; after `warmup` more calls each, the variants
    are timed in turns (`dcgan.bench.timing.in_turns`) over `windows` windows of about
    min_window_s each, and images/s is the median window. ONNX Runtime takes and
    returns numpy arrays, so on CUDA its rows include the host copies a numpy
    user pays too.
    """
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise UserError(
            f"unknown generator variant(s) {sorted(unknown)}: choose from {', '.join(VARIANTS)}"
        )
    if any(b < 1 for b in batches):
        raise UserError(f"batch sizes must be >= 1, got {list(batches)}")
    dev = torch.device(device)
    g, meta = load_generator(run_or_none, "cpu") if run_or_none else canonical_generator()
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="dcgan-export-") as tmp:
        built = {v: _variant(v, g, meta, dev, Path(tmp)) for v in variants}  # (fn, note)
        for b in batches:
            z = torch.randn(b, meta["nz"], 1, 1, generator=torch.Generator().manual_seed(b))
            timed = _time_in_turns(
                {v: fn for v, (fn, _) in built.items() if fn is not None},
                z.to(dev),
                warmup,
                windows,
                min_window_s,
                dev,
            )
            for variant, (_, note) in built.items():
                first, rate = timed.get(variant, (None, None))
                rows[variant, b] = {
                    "variant": variant,
                    "batch": b,
                    "images_per_s": rate,
                    "ms_per_batch": None if rate is None else 1000 * b / rate,
                    "first_call_s": first,
                    "device": str(dev),
                    "resolution": meta["resolution"],
                    "nz": meta["nz"],
                    "ngf": meta["ngf"],
                    "nc": meta["nc"],
                    "threads": torch.get_num_threads(),
                    "note": note,
                }
                if progress:
                    shown = "-" if rate is None else f"{rate:.1f} img/s"
                    print(
                        f"generator {variant:11s} batch {b:4d}: {shown}",
                        file=sys.stderr,
                        flush=True,
                    )
    return [rows[v, b] for v in variants for b in batches]


@torch.inference_mode()
def _time_in_turns(
    fns: dict[str, Callable],
    z: torch.Tensor,
    warmup: int,
    windows: int,
    min_window_s: float,
    dev: torch.device,
) -> dict[str, tuple[float, float]]:
    """variant -> (first call s, median images/s) for one batch of latents z."""
    now, batch = clock("wall", dev), z.shape[0]
    first, steps, calls = {}, {}, {}
    for variant, fn in fns.items():
        t0 = now()
        fn(z)
        first[variant] = now() - t0
        t0 = now()
        for _ in range(warmup):
            fn(z)
        per_call = (now() - t0) / warmup if warmup else first[variant]
        steps[variant] = counted(partial(fn, z), batch)
        # enough calls per window that it lasts about min_window_s
        calls[variant] = max(1, math.ceil(min_window_s / max(per_call, 1e-6)))
    return {
        variant: (first[variant], statistics.median(n / sec for n, sec in w))
        for variant, w in in_turns(steps, windows, calls, now).items()
    }


def _variant(name: str, g: Generator, meta: dict[str, Any], dev: torch.device, tmp: Path):
    """(callable or None, note) for one variant; None with the reason when unavailable."""
    if name == "eager":
        return g.to(dev), ""
    if name == "compiled":
        # dynamic=False: one graph per batch size, compiled in the first (untimed) call
        return torch.compile(g.to(dev), dynamic=False), "torch.compile, dynamic=False"
    if name == "torchscript":
        path = tmp / "g.pt"
        save_graph(fold_batchnorm(g.cpu()), meta["nz"], "torchscript", path, True, meta)
        g.to(dev)
        return load_exported(path, str(dev)), "BatchNorm folded, torch.jit.script"
    if any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxruntime")):
        return None, "skipped: pip install 'dcgan[export]' (onnx, onnxruntime)"
    path = tmp / "g.onnx"
    save_graph(fold_batchnorm(g.cpu()), meta["nz"], "onnx", path, True, meta)
    g.to(dev)
    fn = load_exported(path, str(dev))
    return fn, f"BatchNorm folded, onnxruntime {'/'.join(fn.providers)}, numpy in/out"


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'variant':<12} {'batch':>5} {'img/s':>10} {'first call s':>13}  note"]
    for row in rows:
        rate = "-" if row["images_per_s"] is None else f"{row['images_per_s']:.1f}"
        first = "-" if row["first_call_s"] is None else f"{row['first_call_s']:.2f}"
        lines.append(
            f"{row['variant']:<12} {row['batch']:>5} {rate:>10} {first:>13}  {row['note']}"
        )
    return "\n".join(lines)
