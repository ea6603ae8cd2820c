"""One step of Goodfellow et al.'s Algorithm 1 (k = 1) on engine networks.

Order of operations (the same as dcgan.engine.reference.TorchGAN, the autograd step it
is tested against):

  d_step: zero D's grads; D(real) -> BCE(target_real); G(z) under engine.no_grad()
          (nothing recorded for G); D(fake) -> BCE(target_fake); one backward of the
          sum walks both D passes (each its own nodes; the gradients add up); Adam on D.
  g_step: zero G's grads; fake = G(z); D(fake) -> BCE(1) -> one backward walks D's
          nodes, then G's; Adam step on G. D's weight gradients from this pass are left
          behind and are wiped by the next d_step's zero_grad, as in the usual torch loop.

Which tensors each backward uses is fixed by the nodes the forwards recorded, not by
the order of the calls (dcgan.engine.graph).
"""

from __future__ import annotations

from typing import Any

import torch

from dcgan.engine.functions import add
from dcgan.engine.graph import backward, no_grad
from dcgan.engine.losses import BCEWithLogitsLoss
from dcgan.engine.models import build_discriminator, build_generator
from dcgan.engine.optim import SGD, Adam, Optimizer


class ScratchGAN:
    """Engine G and D plus their optimisers (Adam, or AdamW with decoupled=True)."""

    def __init__(
        self,
        nz: int = 100,
        ngf: int = 64,
        ndf: int = 64,
        nc: int = 3,
        resolution: int = 64,
        *,
        g_lr: float = 2e-4,
        d_lr: float = 2e-4,
        betas: tuple[float, float] = (0.5, 0.999),
        weight_decay: float = 0.0,
        decoupled: bool = False,
        g_dropout: float = 0.0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        kernel: str | None = None,
        d_optimizer: Optimizer | None = None,
    ):
        self.nz = nz
        self.generator = build_generator(nz, ngf, nc, resolution, g_dropout, kernel)
        self.discriminator = build_discriminator(ndf, nc, resolution, kernel)
        self.generator.to(device, dtype)
        self.discriminator.to(device, dtype)
        self.g_opt: Optimizer = Adam(
            self.generator.parameters(), g_lr, betas, weight_decay=weight_decay, decoupled=decoupled
        )
        self.d_opt: Optimizer = d_optimizer or Adam(
            self.discriminator.parameters(),
            d_lr,
            betas,
            weight_decay=weight_decay,
            decoupled=decoupled,
        )
        self.loss = BCEWithLogitsLoss()

    @classmethod
    def from_config(
        cls,
        cfg: Any,
        nc: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        kernel: str | None = None,
    ) -> ScratchGAN:
        """Build from a dcgan.config.Config (model and train sections). g_opt/d_opt
        "adam" and "adamw" map to Adam(decoupled=...); d_opt "sgd" uses engine SGD."""
        m, t = cfg.model, cfg.train
        gan = cls(
            m.nz,
            m.ngf,
            m.ndf,
            nc,
            cfg.data.resolution,
            g_lr=t.g_lr,
            d_lr=t.d_lr,
            betas=(t.beta1, t.beta2),
            weight_decay=t.weight_decay,
            decoupled=t.g_opt == "adamw",
            g_dropout=m.g_dropout,
            device=device,
            dtype=dtype,
            kernel=kernel,
        )
        d_params = gan.discriminator.parameters()
        if t.d_opt == "sgd":
            gan.d_opt = SGD(d_params, t.d_lr, t.d_momentum, t.weight_decay)
        else:
            gan.d_opt = Adam(
                d_params,
                t.d_lr,
                (t.beta1, t.beta2),
                weight_decay=t.weight_decay,
                decoupled=t.d_opt == "adamw",
            )
        return gan

    def train(self, mode: bool = True) -> ScratchGAN:
        self.generator.train(mode)
        self.discriminator.train(mode)
        return self

    def d_step(
        self,
        x_real: torch.Tensor,
        z: torch.Tensor,
        target_real: torch.Tensor | float,
        target_fake: torch.Tensor | float,
    ) -> dict[str, torch.Tensor]:
        """One discriminator update; returns 0-d tensors loss_d, d_real, d_fake."""
        D, G = self.discriminator, self.generator
        self.d_opt.zero_grad()
        logits_real = D(x_real)  # (N,)
        loss_real = self.loss(logits_real, target_real)
        with no_grad():
            fake = G(z)  # (N, nc, R, R); nothing recorded, G gets no gradient
        logits_fake = D(fake)
        loss_fake = self.loss(logits_fake, target_fake)
        loss_d = add(loss_real, loss_fake)
        backward(loss_d)  # both D passes; neither input needs a gradient
        self.d_opt.step()
        # detach(): the reported numbers carry no (spent) tape node
        return {
            "loss_d": loss_d.detach(),
            "d_real": torch.sigmoid(logits_real).mean(),
            "d_fake": torch.sigmoid(logits_fake).mean(),
        }

    def g_step(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """One generator update with the non-saturating loss BCE(D(G(z)), 1)."""
        D, G = self.discriminator, self.generator
        self.g_opt.zero_grad()
        fake = G(z)
        logits = D(fake)
        loss_g = self.loss(logits, 1.0)
        backward(loss_g)  # through D (its grads are discarded) into G
        self.g_opt.step()
        return {"loss_g": loss_g.detach()}

    def step(
        self,
        x_real: torch.Tensor,
        z: torch.Tensor,
        target_real: torch.Tensor | float = 1.0,
        target_fake: torch.Tensor | float = 0.0,
    ) -> dict[str, torch.Tensor]:
        """d_step then g_step on the same z."""
        out = self.d_step(x_real, z, target_real, target_fake)
        out.update(self.g_step(z))
        return out
