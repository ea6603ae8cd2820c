"""DCGAN generator and discriminator (Radford, Metz & Chintala 2015).

At 64x64 both networks are exactly the canonical PyTorch example (same layers,
same `main.N` state-dict keys, G 3,576,704 and D 2,765,568 parameters at
nz=100, ngf=ndf=64, nc=3), except that D ends in a logit: the sigmoid lives in
the loss (`binary_cross_entropy_with_logits`), which is what makes mixed
precision safe. Other resolutions add or remove one block per doubling; the
channel multiplier is capped at 8 so 128x128 adds a block of the same width.
"""

from __future__ import annotations

import math
from itertools import pairwise

import torch
from torch import nn

from dcgan.config import RESOLUTIONS, ModelConfig


def block_widths(base: int, resolution: int) -> list[int]:
    """Hidden widths from the 4x4 end of the network outwards.

    64x64 with base 64 gives [512, 256, 128, 64]: one block per doubling from
    4x4 up to resolution/2, each half as wide as the one before, capped at 8*base.
    """
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {resolution}")
    n_blocks = int(math.log2(resolution)) - 2  # 32 -> 3, 64 -> 4, 128 -> 5
    return [base * min(8, 2 ** (n_blocks - 1 - i)) for i in range(n_blocks)]


class Generator(nn.Module):
    """z (N, nz) or (N, nz, 1, 1) -> image (N, nc, R, R) in [-1, 1]."""

    def __init__(
        self, nz: int = 100, ngf: int = 64, nc: int = 3, resolution: int = 64, dropout: float = 0.0
    ):
        super().__init__()
        self.nz, self.nc, self.resolution = nz, nc, resolution
        widths = block_widths(ngf, resolution)
        # input is Z, going into a convolution: (nz) x 1 x 1 -> (widths[0]) x 4 x 4
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(nz, widths[0], 4, 1, 0, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(True),
        ]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        # each block doubles the side: (w_in) x s x s -> (w_out) x 2s x 2s
        for w_in, w_out in pairwise(widths):
            layers += [
                nn.ConvTranspose2d(w_in, w_out, 4, 2, 1, bias=False),
                nn.BatchNorm2d(w_out),
                nn.ReLU(True),
            ]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        # (ngf) x R/2 x R/2 -> (nc) x R x R
        layers += [nn.ConvTranspose2d(widths[-1], nc, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z.view(z.shape[0], self.nz, 1, 1))


class Discriminator(nn.Module):
    """image (N, nc, R, R) -> logits (N,); apply a sigmoid for D(x)."""

    def __init__(self, ndf: int = 64, nc: int = 3, resolution: int = 64):
        super().__init__()
        self.nc, self.resolution = nc, resolution
        widths = block_widths(ndf, resolution)[::-1]  # 64x64: [64, 128, 256, 512]
        # (nc) x R x R -> (ndf) x R/2 x R/2; no BatchNorm on D's input layer (paper)
        layers: list[nn.Module] = [
            nn.Conv2d(nc, widths[0], 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        # each block halves the side: (w_in) x s x s -> (w_out) x s/2 x s/2
        for w_in, w_out in pairwise(widths):
            layers += [
                nn.Conv2d(w_in, w_out, 4, 2, 1, bias=False),
                nn.BatchNorm2d(w_out),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        # (widths[-1]) x 4 x 4 -> 1 x 1 x 1: one logit per image
        layers.append(nn.Conv2d(widths[-1], 1, 4, 1, 0, bias=False))
        self.main = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x).view(-1)


def init_weights(m: nn.Module) -> None:
    """DCGAN init: conv weights N(0, 0.02), BatchNorm weight N(1, 0.02), biases 0."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def build_generator(model: ModelConfig, nc: int, resolution: int) -> Generator:
    g = Generator(model.nz, model.ngf, nc, resolution, model.g_dropout)
    g.apply(init_weights)
    return g


def build_discriminator(model: ModelConfig, nc: int, resolution: int) -> Discriminator:
    d = Discriminator(model.ndf, nc, resolution)
    d.apply(init_weights)
    if model.d_spectral_norm:
        spectral_norm_convs(d)
    return d


def spectral_norm_convs(d: nn.Module) -> nn.Module:
    """Divide every conv weight of d by its largest singular value (Miyato et al. 2018),
    estimated by one power iteration per training forward. The weight then lives at
    `...parametrizations.weight.original`; `plain_weights` turns it back."""
    for m in d.modules():
        if isinstance(m, nn.Conv2d):
            nn.utils.parametrizations.spectral_norm(m)
    return d


def plain_weights(d: nn.Module) -> nn.Module:
    """Bake spectrally normalised weights into plain ones (eval-mode use: transfer, export)."""
    from torch.nn.utils import parametrize

    for m in d.modules():
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return d


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
