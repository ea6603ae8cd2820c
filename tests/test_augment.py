"""DiffAugment: what each transform does to pixels, that gradients pass, and the policy."""

import pytest
import torch

from dcgan.augment import color, cutout, diff_augment, translation
from dcgan.config import from_preset, parse_policy
from dcgan.errors import UserError


def test_translation_moves_pixels_by_at_most_an_eighth_and_fills_zeros():
    torch.manual_seed(0)
    x = torch.arange(1, 1 + 2 * 32 * 32, dtype=torch.float32).view(2, 1, 32, 32)
    y = translation(x)
    for i in range(2):
        # the shift: where the first original pixel value landed (or the image is all
        # shifted out of it); every non-zero output is an input pixel moved by (dy, dx)
        nz = y[i, 0].nonzero()
        v = y[i, 0][tuple(nz[0])]
        src = (x[i, 0] == v).nonzero()[0]
        dy, dx = (nz[0] - src).tolist()
        assert abs(dy) <= 4 and abs(dx) <= 4
        shifted = torch.zeros(32, 32)
        ys, xs = slice(max(dy, 0), 32 + min(dy, 0)), slice(max(dx, 0), 32 + min(dx, 0))
        ys0, xs0 = slice(max(-dy, 0), 32 + min(-dy, 0)), slice(max(-dx, 0), 32 + min(-dx, 0))
        shifted[ys, xs] = x[i, 0][ys0, xs0]
        assert torch.equal(y[i, 0], shifted)


def test_cutout_zeroes_one_square_of_half_the_side():
    torch.manual_seed(1)
    x = torch.ones(64, 3, 16, 16)
    y = cutout(x)
    zeros = (y == 0).all(dim=1)  # (B, 16, 16): all channels cut together
    assert torch.equal((y == 0).any(dim=1), zeros)
    counts = zeros.flatten(1).sum(1)
    assert counts.max() == 64 and counts.min() > 0  # 8 x 8 inside, clipped at the edges
    for i in range(64):
        rows, cols = zeros[i].nonzero().unbind(1)
        assert (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1) == counts[i]


def test_color_keeps_shape_and_changes_each_image_differently():
    torch.manual_seed(2)
    x = torch.rand(8, 3, 8, 8) * 2 - 1
    y = color(x)
    assert y.shape == x.shape
    shifts = (y - x).mean(dim=(1, 2, 3))
    assert shifts.unique().numel() == 8


def test_gradients_pass_through_every_transform():
    x = (torch.rand(4, 3, 16, 16) * 2 - 1).requires_grad_(True)
    diff_augment(x, ("color", "translation", "cutout")).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_policy_parsing_and_config_validation():
    assert parse_policy("translation, cutout") == ("translation", "cutout")
    assert parse_policy("") == ()
    with pytest.raises(UserError, match="unknown diffaug policy zoom"):
        from_preset("fmnist32", {"diffaug": "translation,zoom"})
