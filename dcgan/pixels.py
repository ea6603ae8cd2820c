"""The one pair of conversions between stored pixels and what the networks see.

Images are stored as uint8 [0, 255] (data caches, PNG grids, sampled sets); G
produces and D reads float32 in [-1, 1]. 0 maps to -1 and 255 to 1 exactly, and
the way back rounds to the nearest byte, so a sampled image survives a PNG.
"""

from __future__ import annotations

import numpy as np
import torch


def from_uint8(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (..., C, R, R) -> float32 in [-1, 1], on the input tensor's device."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        raise TypeError(f"from_uint8 takes uint8 images, got {x.dtype}")
    return x.float().div_(127.5).sub_(1.0)  # a new float tensor: in place is safe


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float (..., C, R, R) in [-1, 1] -> uint8, rounded to nearest, on the same device."""
    return ((images.detach().float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
