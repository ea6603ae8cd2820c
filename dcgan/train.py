"""Training: Goodfellow et al.'s Algorithm 1 for the DCGAN, counted in kimg and ticks.

One iteration = `d_steps` discriminator updates, then one generator update.
Progress is the number of real images shown to D (`nimg`); every `tick_kimg`
the loop reads its accumulated statistics back from the device (the only host
synchronisation), appends a line to `stats.jsonl`, draws the fixed-noise grid
and redraws `losses.png`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import resource
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from dcgan import checkpoint, report
from dcgan.config import Config
from dcgan.data import Batches, load_images
from dcgan.errors import UserError
from dcgan.losses import G_LOSSES, d_loss, d_targets
from dcgan.models import build_discriminator, build_generator

N_FIXED = 64  # latents in the per-tick sample grid


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available here")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto -> bf16 where the hardware has it (CPU; CUDA with bf16 support), else fp32."""
    if precision == "fp16" and device.type != "cuda":
        raise UserError("precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def make_optimizer(kind: str, params, lr: float, cfg: Config,
                   device: torch.device) -> torch.optim.Optimizer:
    t = cfg.train
    # foreach kernels update all tensors of a network in a few launches; fused
    # Adam(W) does it in one kernel on CUDA.
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=t.d_momentum,
                               weight_decay=t.weight_decay, foreach=True)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(t.beta1, t.beta2),
                                 weight_decay=t.weight_decay, **fast)
    return torch.optim.Adam(params, lr=lr, betas=(t.beta1, t.beta2), **fast)


def ema_beta(cfg: Config, batch_total: int) -> float:
    """Per-step EMA decay with a half-life of ema_kimg thousand images."""
    if cfg.train.ema_kimg <= 0:
        return 0.0
    return 0.5 ** (batch_total / (cfg.train.ema_kimg * 1000.0))


@torch.no_grad()
def ema_update(g_ema: nn.Module, g: nn.Module, beta: float) -> None:
    """g_ema <- beta * g_ema + (1 - beta) * g; BatchNorm running stats are copied."""
    ema_p = list(g_ema.parameters())
    torch._foreach_lerp_(ema_p, [p.detach() for p in g.parameters()], 1.0 - beta)
    for b_ema, b in zip(g_ema.buffers(), g.buffers(), strict=True):
        b_ema.copy_(b)


def instance_noise_std(cfg: Config, nimg: int, total_nimg: int) -> float:
    """Std of the Gaussian added to every input of D, decaying linearly to 0 at the end."""
    return cfg.train.instance_noise * max(0.0, 1.0 - nimg / total_nimg)


def with_noise(x: torch.Tensor, std: float) -> torch.Tensor:
    return x + std * torch.randn_like(x) if std > 0 else x


@dataclass
class GAN:
    """The trained objects: raw modules (what checkpoints hold) and what is called."""

    G: nn.Module
    D: nn.Module
    G_ema: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    G_run: nn.Module  # G, possibly compiled
    D_run: nn.Module  # D, possibly compiled


def build_gan(cfg: Config, nc: int, device: torch.device) -> GAN:
    r = cfg.data.resolution
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    G = build_generator(cfg.model, nc, r).to(device, memory_format=fmt)
    D = build_discriminator(cfg.model, nc, r).to(device, memory_format=fmt)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    opt_g = make_optimizer(cfg.train.g_opt, G.parameters(), cfg.train.g_lr, cfg, device)
    opt_d = make_optimizer(cfg.train.d_opt, D.parameters(), cfg.train.d_lr, cfg, device)
    G_run, D_run = G, D
    if cfg.train.compile:
        G_run = torch.compile(G, dynamic=False)
        D_run = torch.compile(D, dynamic=False)
    return GAN(G, D, G_ema, opt_g, opt_d, G_run, D_run)


def train_step(gan: GAN, batches: Batches, cfg: Config, noise_std: float, ctx,
               fmt: torch.memory_format) -> dict[str, torch.Tensor]:
    """One iteration of Algorithm 1: k D-steps, then one G-step. Returns device scalars.

    The fake batch of the last D-step is made with G's graph kept, and the
    G-step reuses it (as the canonical PyTorch example does) instead of
    sampling new noise: one G forward saved, still an unbiased gradient.
    """
    t = cfg.train
    D, G = gan.D_run, gan.G_run
    for k in range(t.d_steps):
        x_real = next(batches).contiguous(memory_format=fmt)
        b = x_real.shape[0]
        z = torch.randn(b, cfg.model.nz, 1, 1, device=x_real.device)
        last = k == t.d_steps - 1
        with ctx, torch.set_grad_enabled(last):
            fake = G(z)
        t_real, t_fake = d_targets(b, t.label_smoothing, t.label_flip, x_real.device)
        gan.opt_d.zero_grad(set_to_none=True)
        with ctx:
            logits_real = D(with_noise(x_real, noise_std))
            logits_fake = D(with_noise(fake.detach(), noise_std))
        loss_d = d_loss(logits_real, logits_fake, t_real, t_fake)
        loss_d.backward()
        gan.opt_d.step()
    # G-step: D's weights need no gradient here; freezing them skips their dW.
    gan.D.requires_grad_(False)
    gan.opt_g.zero_grad(set_to_none=True)
    with ctx:
        logits_g = D(with_noise(fake, noise_std))
    loss_g = G_LOSSES[t.g_loss](logits_g)
    loss_g.backward()
    gan.opt_g.step()
    gan.D.requires_grad_(True)
    return {"loss_d": loss_d.detach(), "loss_g": loss_g.detach(),
            "d_real": torch.sigmoid(logits_real.detach().float()).mean(),
            "d_fake": torch.sigmoid(logits_fake.detach().float()).mean()}


def peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in KiB on Linux: the process's peak resident set
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def snapshot_meta(cfg: Config, nc: int, nimg: int) -> dict[str, Any]:
    return {"nz": cfg.model.nz, "ngf": cfg.model.ngf, "nc": nc,
            "resolution": cfg.data.resolution, "g_dropout": cfg.model.g_dropout,
            "dataset": cfg.data.dataset, "kimg": nimg / 1000.0}


def fixed_latents(cfg: Config, device: torch.device) -> torch.Tensor:
    """The same N_FIXED latents for every tick, from their own generator (the
    global RNG stream, which resume restores, is left untouched)."""
    gen = torch.Generator().manual_seed(cfg.train.seed)
    return torch.randn(N_FIXED, cfg.model.nz, 1, 1, generator=gen).to(device)


class StopFlag:
    """SIGINT/SIGTERM set a flag that the loop checks between steps, so the state
    is saved whole; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.set = False
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if self.set and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.set = True
        print(f"\n{signal.Signals(signum).name}: saving the training state at the end of "
              "this step (Ctrl-C again to abort without saving)", file=sys.stderr)

    def __enter__(self) -> StopFlag:
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def prepare_run_dir(out: Path, cfg: Config, force: bool) -> None:
    """A fresh run folder; refuse to mix two runs unless --force."""
    if (out / "config.json").exists() or (out / checkpoint.CHECKPOINT).exists():
        if not force:
            raise UserError(f"{out} already holds a run; use --resume {out} to continue it "
                            "or --force to start over")
        for name in ("stats.jsonl", "losses.png", checkpoint.CHECKPOINT, checkpoint.SNAPSHOT,
                     "config.json"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "samples", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(cfg.to_json() + "\n")


def training_loop(cfg: Config, out: Path, resume: dict[str, Any] | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Train until cfg.train.kimg; return the last tick's stats. `resume` is a loaded
    checkpoint whose state replaces the fresh one."""
    t = cfg.train
    device = resolve_device(t.device)
    precision = resolve_precision(t.precision, device)
    torch.manual_seed(t.seed)

    data = load_images(cfg.data.dataset, cfg.data.resolution, cfg.data.channels,
                       cache_dir=cfg.data.cache_dir, progress=progress)
    nc = data.images.shape[1]
    batches = Batches(data.images, t.batch, device, flip=cfg.data.flip, seed=t.seed)
    gan = build_gan(cfg, nc, device)
    ctx = autocast(precision, device)
    fmt = torch.channels_last if t.channels_last else torch.contiguous_format

    nimg, tick = 0, 0
    if resume is not None:
        gan.G.load_state_dict(resume["G"])
        gan.D.load_state_dict(resume["D"])
        gan.G_ema.load_state_dict(resume["G_ema"])
        gan.opt_g.load_state_dict(resume["opt_g"])
        gan.opt_d.load_state_dict(resume["opt_d"])
        batches.load_state_dict(resume["batches"])
        nimg, tick = resume["nimg"], resume["tick"]
        torch.set_rng_state(resume["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in resume:
            torch.cuda.set_rng_state(resume["rng_cuda"], device)
        # drop stats lines written after the checkpoint (a crash between the two)
        rows = [r for r in report.read_stats(out / "stats.jsonl") if r["kimg"] * 1000 <= nimg]
        (out / "stats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def state() -> dict[str, Any]:
        s = {"G": gan.G.state_dict(), "D": gan.D.state_dict(), "G_ema": gan.G_ema.state_dict(),
             "opt_g": gan.opt_g.state_dict(), "opt_d": gan.opt_d.state_dict(),
             "batches": batches.state_dict(), "nimg": nimg, "tick": tick,
             "rng_cpu": torch.get_rng_state(), "config": cfg.to_dict()}
        if device.type == "cuda":
            s["rng_cuda"] = torch.cuda.get_rng_state(device)
        return s

    def save_snapshot() -> None:
        checkpoint.save_generator(gan.G_ema, snapshot_meta(cfg, nc, nimg),
                                  out / checkpoint.SNAPSHOT)

    total = int(round(t.kimg * 1000))
    per_step = t.batch * t.d_steps
    beta = ema_beta(cfg, t.batch)
    z_fixed = fixed_latents(cfg, device)
    rows = report.read_stats(out / "stats.jsonl")
    bar = tqdm(total=total, initial=nimg, unit="img", unit_scale=True, disable=not progress,
               dynamic_ncols=True, desc="train")
    last: dict[str, Any] = {}

    def end_tick() -> dict[str, Any]:
        nonlocal tick_start, tick_nimg0, sums, steps
        dt = time.perf_counter() - tick_start
        means = {k: (v / max(steps, 1)).item() for k, v in sums.items()}
        row = {"tick": tick, "kimg": round(nimg / 1000, 3), **means,
               "img_per_s": (nimg - tick_nimg0) / dt, "sec_per_kimg": dt / max(
                   (nimg - tick_nimg0) / 1000, 1e-9),
               "peak_mem_mb": round(peak_mem_mb(device), 1),
               "noise_std": instance_noise_std(cfg, nimg, total), "time": time.time()}
        report.append_stats(out / "stats.jsonl", row)
        rows.append(row)
        with torch.no_grad():
            report.save_grid(gan.G_ema(z_fixed), out / "samples" / f"fakes{nimg // 1000:06d}.png")
        report.plot_losses(rows, out / "losses.png")
        save_snapshot()
        bar.set_postfix(loss_d=f"{means['loss_d']:.3f}", loss_g=f"{means['loss_g']:.3f}",
                        refresh=False)
        tick_start, tick_nimg0 = time.perf_counter(), nimg
        sums, steps = {}, 0
        return row

    tick_start, tick_nimg0 = time.perf_counter(), nimg
    sums: dict[str, torch.Tensor] = {}
    steps = 0
    next_tick = (math.floor(nimg / (t.tick_kimg * 1000)) + 1) * t.tick_kimg * 1000
    stopped = False
    with StopFlag() as stop:
        while nimg < total:
            out_ = train_step(gan, batches, cfg, instance_noise_std(cfg, nimg, total), ctx, fmt)
            ema_update(gan.G_ema, gan.G, beta)  # beta 0 (no EMA) copies G
            for k, v in out_.items():
                sums[k] = sums[k] + v if k in sums else v.clone()
            steps += 1
            nimg += per_step
            bar.update(per_step)
            if nimg >= next_tick or nimg >= total or stop.set:
                tick += 1
                last = end_tick()
                next_tick += t.tick_kimg * 1000
                if tick % t.checkpoint_ticks == 0 or nimg >= total or stop.set:
                    checkpoint.save_state(state(), out / checkpoint.CHECKPOINT)
            if stop.set:
                stopped = True
                break
    bar.close()
    last["stopped"] = stopped
    return last
