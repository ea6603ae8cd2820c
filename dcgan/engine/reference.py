"""torch-autograd counterparts of the engine's GAN step and denoiser, used as the
reference in tests, the denoiser comparison and the benchmark. (This module uses
torch.nn on purpose; the engine itself does not.)"""

from __future__ import annotations

import torch
from torch import nn

from dcgan.models import Discriminator, Generator


class TorchGAN:
    """The same step as dcgan.engine.gan.ScratchGAN, written the usual torch way."""

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
    ):
        self.generator = Generator(nz, ngf, nc, resolution, g_dropout).to(device, dtype)
        self.discriminator = Discriminator(ndf, nc, resolution).to(device, dtype)
        opt = torch.optim.AdamW if decoupled else torch.optim.Adam
        self.g_opt = opt(self.generator.parameters(), g_lr, betas, weight_decay=weight_decay)
        self.d_opt = opt(self.discriminator.parameters(), d_lr, betas, weight_decay=weight_decay)
        self.loss = nn.BCEWithLogitsLoss()

    def load_from(self, gan) -> TorchGAN:
        """Copy an engine GAN's weights and running statistics (not optimiser state)."""
        self.generator.load_state_dict(gan.generator.state_dict())
        self.discriminator.load_state_dict(gan.discriminator.state_dict())
        return self

    def d_step(self, x_real, z, target_real, target_fake) -> dict[str, torch.Tensor]:
        D, G = self.discriminator, self.generator
        self.d_opt.zero_grad()
        logits_real = D(x_real)
        loss_real = self.loss(logits_real, _target(target_real, logits_real))
        loss_real.backward()
        with torch.no_grad():
            fake = G(z)
        logits_fake = D(fake)
        loss_fake = self.loss(logits_fake, _target(target_fake, logits_fake))
        loss_fake.backward()
        self.d_opt.step()
        with torch.no_grad():
            return {
                "loss_d": loss_real + loss_fake,
                "d_real": logits_real.sigmoid().mean(),
                "d_fake": logits_fake.sigmoid().mean(),
            }

    def g_step(self, z) -> dict[str, torch.Tensor]:
        D, G = self.discriminator, self.generator
        self.g_opt.zero_grad()
        logits = D(G(z))
        loss_g = self.loss(logits, torch.ones_like(logits))
        loss_g.backward()
        self.g_opt.step()
        return {"loss_g": loss_g.detach()}

    def step(self, x_real, z, target_real=1.0, target_fake=0.0) -> dict[str, torch.Tensor]:
        out = self.d_step(x_real, z, target_real, target_fake)
        out.update(self.g_step(z))
        return out


def _target(t, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        return torch.full_like(like, float(t))
    return t.to(like).expand_as(like)


def torch_denoiser() -> nn.Sequential:
    """Seed 003's denoiser in torch.nn, same layer indices as the engine version."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2),
        nn.ReLU(),
        nn.ConvTranspose2d(32, 16, 4, stride=2),
        nn.ReLU(),
        nn.ConvTranspose2d(16, 3, 4, stride=2, padding=1),
        nn.Sigmoid(),
    )
