"""Differentiable augmentation of D's inputs (Zhao et al. 2020, "DiffAugment").

The same random transforms are applied to real and to generated images before
D sees them, and they are differentiable, so G's gradient passes through them:
D cannot memorise the training set, yet G is still pushed towards un-augmented
images (the transforms are not part of what G must produce). Policies, as in
the paper, on images in [-1, 1], each drawn independently per image:

- color: brightness + U(-0.5, 0.5); saturation (x - mean_c) * U(0, 2) + mean_c;
  contrast (x - mean) * U(0.5, 1.5) + mean;
- translation: an integer shift of up to 1/8 of the side in x and y, zero fill;
- cutout: one square of half the side, at a random centre, set to 0.

All on the device, from torch's global generator (so `--resume` replays them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dcgan.config import DIFFAUG_POLICIES as POLICIES


def color(x: torch.Tensor) -> torch.Tensor:
    b = x.shape[0]
    x = x + (torch.rand(b, 1, 1, 1, device=x.device, dtype=x.dtype) - 0.5)
    mean_c = x.mean(dim=1, keepdim=True)
    x = (x - mean_c) * (torch.rand(b, 1, 1, 1, device=x.device, dtype=x.dtype) * 2) + mean_c
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (torch.rand(b, 1, 1, 1, device=x.device, dtype=x.dtype) + 0.5) + mean


def translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by (dy, dx) in [-s, s], s = ratio * side, filling with zeros."""
    b, _, h, w = x.shape
    sy, sx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-sy, sy + 1, (b, 1, 1), device=x.device)
    dx = torch.randint(-sx, sx + 1, (b, 1, 1), device=x.device)
    # output pixel (i, j) reads input (i - dy, j - dx) of the zero-padded image
    rows = (torch.arange(h, device=x.device).view(1, h, 1) - dy + sy).expand(b, h, w)
    cols = (torch.arange(w, device=x.device).view(1, 1, w) - dx + sx).expand(b, h, w)
    padded = F.pad(x, (sx, sx, sy, sy))  # (B, C, h + 2 sy, w + 2 sx)
    batch = torch.arange(b, device=x.device).view(b, 1, 1).expand(b, h, w)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def cutout(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """Zero one (ratio*h) x (ratio*w) square per image, its centre anywhere in the image."""
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h + (1 - ch % 2), (b, 1, 1), device=x.device)
    cx = torch.randint(0, w + (1 - cw % 2), (b, 1, 1), device=x.device)
    top, left = cy - ch // 2, cx - cw // 2  # the square may stick out of the image
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (ys >= top) & (ys < top + ch) & (xs >= left) & (xs < left + cw)  # (B, h, w)
    return x * (~inside).unsqueeze(1).to(x.dtype)


TRANSFORMS = {"color": color, "translation": translation, "cutout": cutout}


def diff_augment(x: torch.Tensor, policy: tuple[str, ...]) -> torch.Tensor:
    """(B, C, R, R) -> (B, C, R, R), the policy's transforms in the paper's order."""
    for name in POLICIES:
        if name in policy:
            x = TRANSFORMS[name](x)
    return x
