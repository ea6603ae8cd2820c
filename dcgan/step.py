"""One training step: Goodfellow et al.'s Algorithm 1 for one iteration, and what it needs.

`build_gan` makes the networks, their optimisers and the `Step` that trains them:
`AutogradStep` (torch autograd, compiled and DDP-wrapped views) or `EngineStep`
(dcgan.engine's hand-written backward passes), one call signature for both. A
step reports its statistics by name (`dcgan.training_stats`) and returns nothing,
so it never synchronises with the host. The loop in `dcgan.train`, the `auto`
calibration and `dcgan bench` all call this same step.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from dcgan import training_stats
from dcgan.augment import diff_augment
from dcgan.config import Config, parse_policy
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


def make_optimizer(
    kind: str, params, lr: float, cfg: Config, device: torch.device
) -> torch.optim.Optimizer:
    t = cfg.train
    # foreach kernels update all tensors of a network in a few launches; fused
    # Adam(W) does it in one kernel on CUDA.
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if kind == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=t.d_momentum, weight_decay=t.weight_decay, foreach=True
        )
    if kind == "adamw":
        return torch.optim.AdamW(
            params, lr=lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay, **fast
        )
    return torch.optim.Adam(params, lr=lr, betas=(t.beta1, t.beta2), **fast)


def ema_beta(cfg: Config, batch_total: int) -> float:
    """Per-step EMA decay with a half-life of ema_kimg thousand images."""
    if cfg.train.ema_kimg <= 0:
        return 0.0
    return 0.5 ** (batch_total / (cfg.train.ema_kimg * 1000.0))


class EMA:
    """G_ema <- beta * G_ema + (1 - beta) * G after every step; BatchNorm buffers copied.

    The pairs of tensors are found once, by name: G's state_dict tensors share
    storage with its live weights (the optimisers and load_state_dict write in
    place), so an engine G (same key names) works as well as a torch one."""

    def __init__(self, g_ema: nn.Module, g) -> None:
        src = g.state_dict()
        names, ema_params = zip(*g_ema.named_parameters(), strict=True)
        self.ema_params, self.params = list(ema_params), [src[n] for n in names]
        self.buffers = [(b, src[n]) for n, b in g_ema.named_buffers()]

    @torch.no_grad()
    def update(self, beta: float) -> None:
        """beta 0 (no EMA) copies G."""
        torch._foreach_lerp_(self.ema_params, self.params, 1.0 - beta)
        for b, src in self.buffers:
            b.copy_(src)


def instance_noise_std(cfg: Config, nimg: int, total_nimg: int) -> float:
    """Std of the Gaussian added to every input of D, decaying linearly to 0 at the end."""
    return cfg.train.instance_noise * max(0.0, 1.0 - nimg / total_nimg)


def with_noise(x: torch.Tensor, std: float) -> torch.Tensor:
    return x + std * torch.randn_like(x) if std > 0 else x


class Step(Protocol):
    """One iteration of Algorithm 1 on the networks it was built over: k D-updates,
    then one G-update. Statistics go to `training_stats.record`; nothing returns,
    so nothing is read back to the host. The autograd step and the engine's share
    this interface: the loop, the bench and the calibration call either alike."""

    def __call__(self, batches: Iterator[torch.Tensor], noise_std: float) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class GAN:
    """The raw modules (what checkpoints hold: no `_orig_mod.` or `module.` prefixes),
    their optimisers, the step that trains them and G's moving average."""

    G: nn.Module
    D: nn.Module
    G_ema: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    step: Step
    ema: EMA

    def state_dict(self) -> dict[str, Any]:
        return {
            "G": self.G.state_dict(),
            "D": self.D.state_dict(),
            "G_ema": self.G_ema.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            **self.step.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        self.G_ema.load_state_dict(state["G_ema"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.step.load_state_dict(state)


class AutogradStep:
    """Algorithm 1 with torch autograd, under mixed precision, compile and DDP.

    Three views of the networks: G and D as trained (compiled, DDP-wrapped: D's
    gradients are all-reduced in its own update), D for G's update (compiled, no
    DDP: its gradients are unused) and the raw D for the gradient penalties.
    """

    def __init__(
        self,
        cfg: Config,
        G_train,
        D_train,
        D_frozen,
        D: nn.Module,
        opt_g: torch.optim.Optimizer,
        opt_d: torch.optim.Optimizer,
        precision: str,
        device: torch.device,
    ):
        self.cfg, self.t = cfg, cfg.train
        self.G_train, self.D_train, self.D_frozen, self.D = G_train, D_train, D_frozen, D
        self.opt_g, self.opt_d = opt_g, opt_d
        self.ctx = autocast(precision, device)
        self.fmt = memory_format(cfg)
        self.policy = parse_policy(self.t.diffaug)
        # fp16 only: one loss scaler per optimiser, so that an overflow in D's step does
        # not skip G's step and each network finds its own scale; disabled, a scaler is
        # a no-op (scale returns the loss, step calls opt.step), so no branch on it.
        on = precision == "fp16"
        self.scaler_g = torch.amp.GradScaler(device.type, enabled=on)
        self.scaler_d = torch.amp.GradScaler(device.type, enabled=on)
        self.d_updates = 0  # D-steps so far: the lazy R1 schedule (saved in checkpoints)

    def state_dict(self) -> dict[str, Any]:
        # a disabled scaler's state is {}: kept out, as older checkpoints have it
        s: dict[str, Any] = {"d_updates": self.d_updates}
        if self.scaler_g.is_enabled():
            s["scaler_g"], s["scaler_d"] = self.scaler_g.state_dict(), self.scaler_d.state_dict()
        return s

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.d_updates = state.get("d_updates", 0)
        if "scaler_g" in state:
            self.scaler_g.load_state_dict(state["scaler_g"])
            self.scaler_d.load_state_dict(state["scaler_d"])

    def d_penalty(self, x_real: torch.Tensor, x_fake: torch.Tensor) -> torch.Tensor | None:
        """The gradient penalties of this D-step (WGAN-GP's, lazy R1's), or None.

        They need a double backward, which neither torch.compile nor a DDP forward
        supports, so they run through the raw D (same parameters): its gradients join
        loss_d's in the one backward, whose DDP hooks all-reduce the sum."""
        t = self.t
        total = None
        if t.loss == "wgan-gp" and t.gp_weight > 0:
            total = t.gp_weight * gradient_penalty(self.D, x_real, x_fake)
        if t.r1_gamma > 0 and self.d_updates % t.r1_every == 0:
            # lazy: every r1_every-th D-step, weighted by r1_every to keep the same strength
            r1 = t.r1_gamma * t.r1_every * r1_penalty(self.D, x_real)
            total = r1 if total is None else total + r1
        return total

    def __call__(self, batches: Iterator[torch.Tensor], noise_std: float) -> None:
        """The fake batch of the last D-step is made with G's graph kept, and the
        G-step reuses it (as the canonical PyTorch example does) instead of sampling
        new noise: one G forward saved, still an unbiased gradient."""
        t, ctx, fmt, policy = self.t, self.ctx, self.fmt, self.policy
        for k in range(t.d_steps):
            # (1) Update D: k times, each on a fresh real batch and fresh fakes
            x_real = next(batches).contiguous(memory_format=fmt)  # (N, nc, R, R)
            b = x_real.shape[0]
            z = torch.randn(b, self.cfg.model.nz, 1, 1, device=x_real.device)
            with ctx, torch.set_grad_enabled(k == t.d_steps - 1):
                fake = self.G_train(z)
            t_real, t_fake = d_targets(b, t.label_smoothing, t.label_flip, x_real.device)
            self.opt_d.zero_grad(set_to_none=True)
            seen_real = d_inputs(x_real, noise_std, policy, fmt)
            seen_fake = d_inputs(fake.detach(), noise_std, policy, fmt)
            with ctx:
                logits_real = self.D_train(seen_real)  # (N,)
                logits_fake = self.D_train(seen_fake)
            loss_d = discriminator_loss(t.loss, logits_real, logits_fake, t_real, t_fake)
            penalty = self.d_penalty(seen_real, seen_fake)
            loss = loss_d if penalty is None else loss_d + penalty
            self.scaler_d.scale(loss).backward()
            self.scaler_d.step(self.opt_d)
            self.scaler_d.update()
            self.d_updates += 1
            training_stats.record("loss_d", loss_d)
            training_stats.record("d_real", torch.sigmoid(logits_real.detach().float()).mean())
            training_stats.record("d_fake", torch.sigmoid(logits_fake.detach().float()).mean())
        # (2) Update G: D's weights need no gradient here; freezing them skips their dW.
        self.D.requires_grad_(False)
        self.opt_g.zero_grad(set_to_none=True)
        with ctx:
            logits_g = self.D_frozen(d_inputs(fake, noise_std, policy, fmt))
        loss_g = generator_loss(t.loss, t.g_loss, logits_g)
        self.scaler_g.scale(loss_g).backward()
        self.scaler_g.step(self.opt_g)
        self.scaler_g.update()
        self.D.requires_grad_(True)
        training_stats.record("loss_g", loss_g)


class EngineStep:
    """Algorithm 1 (k = 1) with dcgan.engine: hand-written backward passes, no autograd.
    Same targets and statistics as AutogradStep."""

    def __init__(self, cfg: Config, sgan) -> None:
        self.cfg, self.sgan = cfg, sgan
        self.d_updates = 0

    def state_dict(self) -> dict[str, Any]:
        return {"d_updates": self.d_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.d_updates = state.get("d_updates", 0)

    def __call__(self, batches: Iterator[torch.Tensor], noise_std: float) -> None:
        t = self.cfg.train
        x_real = next(batches)  # (N, nc, R, R)
        b = x_real.shape[0]
        z = torch.randn(b, self.cfg.model.nz, 1, 1, device=x_real.device)
        t_real, t_fake = d_targets(b, t.label_smoothing, t.label_flip, x_real.device)
        out = self.sgan.d_step(x_real, z, t_real, t_fake)  # (1) Update D
        out.update(self.sgan.g_step(z))  # (2) Update G
        self.d_updates += 1
        for name, value in out.items():
            training_stats.record(name, value)


def build_engine_gan(cfg: Config, nc: int, device: torch.device) -> GAN:
    """The same GAN on dcgan.engine. Checkpoints stay interchangeable: engine
    state_dicts use the torch key names, and G_ema is a torch Generator."""
    from dcgan.engine.gan import ScratchGAN

    sgan = ScratchGAN.from_config(cfg, nc, device)
    G_ema = build_generator(cfg.model, nc, cfg.data.resolution).to(device)
    G_ema.load_state_dict(sgan.generator.state_dict())
    G_ema.eval().requires_grad_(False)
    return GAN(
        sgan.generator,
        sgan.discriminator,
        G_ema,
        sgan.g_opt,
        sgan.d_opt,
        EngineStep(cfg, sgan),
        EMA(G_ema, sgan.generator),
    )


def build_gan(
    cfg: Config, nc: int, device: torch.device, env: DistEnv | None = None, precision: str = "fp32"
) -> GAN:
    """The networks, their optimisers and the step over their compiled/DDP views."""
    env = env or DistEnv()
    if cfg.train.engine == "scratch":
        if env.enabled:
            raise UserError("engine scratch runs in one process (no torchrun)")
        return build_engine_gan(cfg, nc, device)
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
        # dynamo go dynamic there recompiled and crashed in inductor (seen on torch 2.13, CPU)
        G_c = torch.compile(G, dynamic=False, mode=cfg.train.compile_mode)
        D_c = torch.compile(D, dynamic=False, mode=cfg.train.compile_mode)
    step = AutogradStep(
        cfg, wrap(G_c, env, device), wrap(D_c, env, device), D_c, D, opt_g, opt_d, precision, device
    )
    return GAN(G, D, G_ema, opt_g, opt_d, step, EMA(G_ema, G))


def d_inputs(
    x: torch.Tensor, noise_std: float, policy: tuple[str, ...], fmt: torch.memory_format
) -> torch.Tensor:
    """What D sees of an image batch: instance noise, then DiffAugment (both optional)."""
    x = with_noise(x, noise_std)
    if policy:
        x = diff_augment(x, policy).contiguous(memory_format=fmt)
    return x
