"""One training step: Goodfellow et al.'s Algorithm 1 for one iteration, and what it needs.

`build_gan` makes the networks, their optimisers and the views the step calls
(compiled, DDP-wrapped); `train_step` runs k D-updates then one G-update and
returns device scalars (no host synchronisation). The loop in `dcgan.train`, the
`auto` calibration and `dcgan bench` all call this same step.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn

from dcgan.augment import diff_augment
from dcgan.config import Config, parse_policy
from dcgan.data import Batches
from dcgan.dist import DistEnv, wrap
from dcgan.errors import UserError
from dcgan.losses import (
    d_targets,
    discriminator_loss,
    generator_loss,
    gradient_penalty,
    r1_penalty,
)
from dcgan.models import build_discriminator, build_generator


def memory_format(cfg: Config) -> torch.memory_format:
    """The layout of images and weights; cfg must be resolved (see dcgan.calibrate)."""
    assert cfg.train.channels_last != "auto", "resolve the config first (dcgan.calibrate)"
    return torch.channels_last if cfg.train.channels_last == "on" else torch.contiguous_format


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
def ema_update(g_ema: nn.Module, g, beta: float) -> None:
    """g_ema <- beta * g_ema + (1 - beta) * g; BatchNorm running stats are copied.

    g is read through its state_dict, so an engine generator (same keys) works too."""
    src = g.state_dict()
    names, ema_p = zip(*g_ema.named_parameters(), strict=True)
    torch._foreach_lerp_(list(ema_p), [src[n].detach() for n in names], 1.0 - beta)
    for name, b in g_ema.named_buffers():
        b.copy_(src[name])


def instance_noise_std(cfg: Config, nimg: int, total_nimg: int) -> float:
    """Std of the Gaussian added to every input of D, decaying linearly to 0 at the end."""
    return cfg.train.instance_noise * max(0.0, 1.0 - nimg / total_nimg)


def with_noise(x: torch.Tensor, std: float) -> torch.Tensor:
    return x + std * torch.randn_like(x) if std > 0 else x


@dataclass
class GAN:
    """The raw modules (what checkpoints hold: no `_orig_mod.` or `module.` prefixes)
    and the callables the step uses (compiled and/or DDP-wrapped views of them)."""

    G: nn.Module
    D: nn.Module
    G_ema: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    G_train: nn.Module  # G as called in training (compiled, DDP)
    D_train: nn.Module  # D for its own update (compiled, DDP: gradients all-reduced)
    D_frozen: nn.Module  # D for G's update (compiled, no DDP: its gradients are unused)
    # fp16 only: one loss scaler per optimiser, so that an overflow in D's step
    # does not skip G's step and each network finds its own scale
    scaler_g: torch.amp.GradScaler | None = None
    scaler_d: torch.amp.GradScaler | None = None
    d_updates: int = 0  # D-steps so far: the lazy R1 schedule (saved in checkpoints)


def build_scratch_gan(cfg: Config, nc: int, device: torch.device) -> GAN:
    """The same GAN on dcgan.engine: hand-written backward passes, no autograd.

    Checkpoints stay interchangeable: engine state_dicts use the torch key names."""
    from dcgan.engine.gan import ScratchGAN

    sgan = ScratchGAN.from_config(cfg, nc, device)
    G_ema = build_generator(cfg.model, nc, cfg.data.resolution).to(device)
    G_ema.load_state_dict(sgan.generator.state_dict())
    G_ema.eval().requires_grad_(False)
    return GAN(sgan.generator, sgan.discriminator, G_ema, sgan.g_opt, sgan.d_opt,
               sgan, sgan, sgan)


def scratch_step(gan: GAN, batches: Batches, cfg: Config) -> dict[str, torch.Tensor]:
    """Algorithm 1 (k = 1) with the engine; same targets and statistics as train_step."""
    t, sgan = cfg.train, gan.G_train
    x_real = next(batches)
    b = x_real.shape[0]
    z = torch.randn(b, cfg.model.nz, 1, 1, device=x_real.device)
    t_real, t_fake = d_targets(b, t.label_smoothing, t.label_flip, x_real.device)
    out = sgan.d_step(x_real, z, t_real, t_fake)
    out.update(sgan.g_step(z))
    return {k: v.detach() for k, v in out.items()}


def build_gan(cfg: Config, nc: int, device: torch.device, env: DistEnv | None = None,
              precision: str = "fp32") -> GAN:
    env = env or DistEnv()
    if cfg.train.engine == "scratch":
        if env.enabled:
            raise UserError("engine scratch runs in one process (no torchrun)")
        return build_scratch_gan(cfg, nc, device)
    r = cfg.data.resolution
    fmt = memory_format(cfg)
    G = build_generator(cfg.model, nc, r)
    D = build_discriminator(cfg.model, nc, r)  # spectral norm inside when asked
    if env.enabled and cfg.train.sync_bn:
        G = nn.SyncBatchNorm.convert_sync_batchnorm(G)
        D = nn.SyncBatchNorm.convert_sync_batchnorm(D)
    G = G.to(device, memory_format=fmt)
    D = D.to(device, memory_format=fmt)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    opt_g = make_optimizer(cfg.train.g_opt, G.parameters(), cfg.train.g_lr, cfg, device)
    opt_d = make_optimizer(cfg.train.d_opt, D.parameters(), cfg.train.d_lr, cfg, device)
    G_c, D_c = G, D
    if cfg.train.compile:
        # dynamic=False: D is called on leaf and on grad-requiring batches; letting
        # dynamo go dynamic there recompiled and crashed in inductor (DESIGN.md)
        G_c = torch.compile(G, dynamic=False, mode=cfg.train.compile_mode)
        D_c = torch.compile(D, dynamic=False, mode=cfg.train.compile_mode)
    gan = GAN(G, D, G_ema, opt_g, opt_d, wrap(G_c, env, device), wrap(D_c, env, device), D_c)
    if precision == "fp16":
        gan.scaler_g = torch.amp.GradScaler(device.type)
        gan.scaler_d = torch.amp.GradScaler(device.type)
    return gan


def update(loss: torch.Tensor, opt: torch.optim.Optimizer,
           scaler: torch.amp.GradScaler | None) -> None:
    """backward + step; with a scaler the loss is scaled, the step skipped on inf/NaN
    gradients and the scale adapted (all on the device: no host synchronisation)."""
    if scaler is None:
        loss.backward()
        opt.step()
        return
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


def d_inputs(x: torch.Tensor, noise_std: float, policy: tuple[str, ...],
             fmt: torch.memory_format) -> torch.Tensor:
    """What D sees of an image batch: instance noise, then DiffAugment (both optional)."""
    x = with_noise(x, noise_std)
    if policy:
        x = diff_augment(x, policy).contiguous(memory_format=fmt)
    return x


def d_penalty(gan: GAN, cfg: Config, x_real: torch.Tensor, x_fake: torch.Tensor
              ) -> torch.Tensor | None:
    """The gradient penalties of this D-step (WGAN-GP's, lazy R1's), or None.

    They need a double backward, which neither torch.compile nor a DDP forward
    supports, so they run through the raw D (same parameters): its gradients join
    loss_d's in the one backward, whose DDP hooks all-reduce the sum."""
    t = cfg.train
    total = None
    if t.loss == "wgan-gp" and t.gp_weight > 0:
        total = t.gp_weight * gradient_penalty(gan.D, x_real, x_fake)
    if t.r1_gamma > 0 and gan.d_updates % t.r1_every == 0:
        # lazy: every r1_every-th D-step, weighted by r1_every to keep the same strength
        r1 = t.r1_gamma * t.r1_every * r1_penalty(gan.D, x_real)
        total = r1 if total is None else total + r1
    return total


def train_step(gan: GAN, batches: Batches, cfg: Config, noise_std: float, ctx,
               fmt: torch.memory_format) -> dict[str, torch.Tensor]:
    """One iteration of Algorithm 1: k D-steps, then one G-step. Returns device scalars.

    The fake batch of the last D-step is made with G's graph kept, and the
    G-step reuses it (as the canonical PyTorch example does) instead of
    sampling new noise: one G forward saved, still an unbiased gradient.
    """
    t = cfg.train
    D, G = gan.D_train, gan.G_train
    policy = parse_policy(t.diffaug)
    for k in range(t.d_steps):
        # (1) Update D: k times, each on a fresh real batch and fresh fakes
        x_real = next(batches).contiguous(memory_format=fmt)
        b = x_real.shape[0]
        z = torch.randn(b, cfg.model.nz, 1, 1, device=x_real.device)
        last = k == t.d_steps - 1
        with ctx, torch.set_grad_enabled(last):
            fake = G(z)
        t_real, t_fake = d_targets(b, t.label_smoothing, t.label_flip, x_real.device)
        gan.opt_d.zero_grad(set_to_none=True)
        seen_real = d_inputs(x_real, noise_std, policy, fmt)
        seen_fake = d_inputs(fake.detach(), noise_std, policy, fmt)
        with ctx:
            logits_real = D(seen_real)
            logits_fake = D(seen_fake)
        loss_d = discriminator_loss(t.loss, logits_real, logits_fake, t_real, t_fake)
        penalty = d_penalty(gan, cfg, seen_real, seen_fake)
        update(loss_d if penalty is None else loss_d + penalty, gan.opt_d, gan.scaler_d)
        gan.d_updates += 1
    # (2) Update G: D's weights need no gradient here; freezing them skips their dW.
    gan.D.requires_grad_(False)
    gan.opt_g.zero_grad(set_to_none=True)
    with ctx:
        logits_g = gan.D_frozen(d_inputs(fake, noise_std, policy, fmt))
    loss_g = generator_loss(t.loss, t.g_loss, logits_g)
    update(loss_g, gan.opt_g, gan.scaler_g)
    gan.D.requires_grad_(True)
    return {"loss_d": loss_d.detach(), "loss_g": loss_g.detach(),
            "d_real": torch.sigmoid(logits_real.detach().float()).mean(),
            "d_fake": torch.sigmoid(logits_fake.detach().float()).mean()}
