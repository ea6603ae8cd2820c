"""The DCGAN generator and discriminator of dcgan.models, built from engine layers.

Layer order, hyper-parameters and state-dict keys (`main.N.weight`, ...) follow
dcgan.models.Generator/Discriminator; the widths come from dcgan.models.block_widths.
"""

from __future__ import annotations

import torch

from dcgan.engine.conv import Conv2d, ConvTranspose2d
from dcgan.engine.functions import reshape
from dcgan.engine.layers import BatchNorm2d, Dropout, LeakyReLU, ReLU, Tanh
from dcgan.engine.module import Module, Sequential
from dcgan.models import block_widths


class EngineGenerator(Module):
    """z (N, nz) or (N, nz, 1, 1) -> image (N, nc, R, R) in [-1, 1]."""

    def __init__(
        self,
        nz: int,
        ngf: int,
        nc: int,
        resolution: int,
        dropout: float = 0.0,
        kernel: str | None = None,
    ):
        super().__init__()
        self.nz, self.nc, self.resolution = nz, nc, resolution
        widths = block_widths(ngf, resolution)
        # (nz) x 1 x 1 -> (widths[0]) x 4 x 4
        layers: list[Module] = [
            ConvTranspose2d(nz, widths[0], 4, 1, 0, bias=False, kernel=kernel),
            BatchNorm2d(widths[0]),
            ReLU(),
        ]
        if dropout > 0:
            layers.append(Dropout(dropout))
        # each block doubles the side: (w_in) x s x s -> (w_out) x 2s x 2s
        for w_in, w_out in zip(widths[:-1], widths[1:], strict=False):
            layers += [
                ConvTranspose2d(w_in, w_out, 4, 2, 1, bias=False, kernel=kernel),
                BatchNorm2d(w_out),
                ReLU(),
            ]
            if dropout > 0:
                layers.append(Dropout(dropout))
        # (ngf) x R/2 x R/2 -> (nc) x R x R
        layers += [ConvTranspose2d(widths[-1], nc, 4, 2, 1, bias=False, kernel=kernel), Tanh()]
        self.main = Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # a recorded reshape, so dL/dz comes back in z's own layout
        return self.main.forward(reshape(z, (z.shape[0], self.nz, 1, 1)))


class EngineDiscriminator(Module):
    """image (N, nc, R, R) -> logits (N,)."""

    def __init__(self, ndf: int, nc: int, resolution: int, kernel: str | None = None):
        super().__init__()
        self.nc, self.resolution = nc, resolution
        widths = block_widths(ndf, resolution)[::-1]
        # (nc) x R x R -> (ndf) x R/2 x R/2, no BatchNorm on the input layer
        layers: list[Module] = [
            Conv2d(nc, widths[0], 4, 2, 1, bias=False, kernel=kernel),
            LeakyReLU(0.2),
        ]
        # each block halves the side
        for w_in, w_out in zip(widths[:-1], widths[1:], strict=False):
            layers += [
                Conv2d(w_in, w_out, 4, 2, 1, bias=False, kernel=kernel),
                BatchNorm2d(w_out),
                LeakyReLU(0.2),
            ]
        # (widths[-1]) x 4 x 4 -> 1 x 1 x 1
        layers.append(Conv2d(widths[-1], 1, 4, 1, 0, bias=False, kernel=kernel))
        self.main = Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reshape(self.main.forward(x), (-1,))  # (N, 1, 1, 1) -> (N,)


def dcgan_init(module: Module) -> None:
    """DCGAN init in layer order: conv weights N(0, 0.02), BatchNorm weight N(1, 0.02),
    biases 0 (the same draws as dcgan.models.init_weights under the same seed)."""
    for m in module.modules():
        if isinstance(m, (Conv2d, ConvTranspose2d)):
            m.weight.data.normal_(0.0, 0.02)
            if m.bias is not None:
                m.bias.data.zero_()
        elif isinstance(m, BatchNorm2d):
            m.weight.data.normal_(1.0, 0.02)
            m.bias.data.zero_()


def build_generator(
    nz: int, ngf: int, nc: int, resolution: int, dropout: float = 0.0, kernel: str | None = None
) -> EngineGenerator:
    g = EngineGenerator(nz, ngf, nc, resolution, dropout, kernel)
    dcgan_init(g)
    return g


def build_discriminator(
    ndf: int, nc: int, resolution: int, kernel: str | None = None
) -> EngineDiscriminator:
    d = EngineDiscriminator(ndf, nc, resolution, kernel)
    dcgan_init(d)
    return d
