"""Memory a request needs, estimated before anything is allocated.

`--batch 100000000` or `--ngf 100000` would otherwise end in an allocator's
traceback, or worse, in the kernel's out-of-memory killer after minutes of
swapping. The networks are built on PyTorch's "meta" device (shapes only, no
storage) and run once on one meta image to count their parameters and the
activations that autograd keeps per image; the estimate is compared with the
memory free on the device. It is a lower bound of the real use (no allocator
slack, no workspace), so a request it refuses cannot have fitted.
"""

from __future__ import annotations

import psutil
import torch
from torch import nn

from dcgan.config import Config
from dcgan.errors import UserError
from dcgan.models import Discriminator, Generator

_FLOAT = 4  # bytes: parameters, gradients, optimiser moments and activations are fp32


def _activations_per_image(net: nn.Module, x: torch.Tensor) -> int:
    """Sum of the outputs of net's leaf modules for one input: what backward keeps."""
    total = 0

    def count(_m: nn.Module, _i: object, out: torch.Tensor) -> None:
        nonlocal total
        total += out.numel()

    leaves = [m for m in net.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        net(x)
    finally:
        for h in hooks:
            h.remove()
    return total


def training_bytes(cfg: Config, nc: int) -> tuple[int, int, int]:
    """(bytes, G parameters, D parameters) of one training step of cfg's model."""
    m, r, batch = cfg.model, cfg.data.resolution, cfg.train.batch
    with torch.device("meta"):
        g = Generator(m.nz, m.ngf, nc, r, m.g_dropout)
        d = Discriminator(m.ndf, nc, r)
        g_act = _activations_per_image(g, torch.empty(1, m.nz))
        d_act = _activations_per_image(d, torch.empty(1, nc, r, r))
    g_params = sum(p.numel() for p in g.parameters())
    d_params = sum(p.numel() for p in d.parameters())
    # G: weights, gradients, two Adam moments, the EMA copy; D: all but the EMA.
    # Per image: G's activations, D's on a real and on a fake batch.
    floats = 5 * g_params + 4 * d_params + batch * (g_act + 2 * d_act)
    return floats * _FLOAT, g_params, d_params


def sample_bytes(n: int, nz: int, nc: int, resolution: int) -> int:
    """n latents (float32) and n images, as floats and as uint8 (the returned tensor)."""
    return n * (nz * _FLOAT + nc * resolution * resolution * (_FLOAT + 1))


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def check_fits(need: int, device: torch.device, what: str, fix: str) -> None:
    """One line when `need` bytes exceed what `device` has free."""
    have = available_bytes(device)
    if need > have:
        raise UserError(
            f"{what} needs at least {need / 1e9:,.1f} GB of memory; "
            f"{have / 1e9:,.1f} GB are free on {device}: {fix}"
        )


def check_training(cfg: Config, device: torch.device) -> None:
    nc = cfg.data.channels or 3  # before the data is read: the larger of the two
    need, g_params, d_params = training_bytes(cfg, nc)
    check_fits(
        need,
        device,
        f"training at batch {cfg.train.batch} and {cfg.data.resolution}px (G "
        f"{g_params:,} and D {d_params:,} parameters)",
        "lower --batch, --ngf or --ndf",
    )
