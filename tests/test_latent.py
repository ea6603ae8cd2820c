"""Latent tools: slerp, truncation, interpolation grids, vector arithmetic and its parser."""

import math

import pytest
import torch
from torch import nn

from dcgan.errors import UserError
from dcgan.latent import (
    arithmetic_latents,
    interpolation_grid,
    interpolation_latents,
    latent_bank,
    parse_arithmetic,
    slerp,
    truncated_normal,
    vector_arithmetic,
)
from dcgan.models import Generator, init_weights

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def g():
    """A small 32x32 G with non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(0)
    g = Generator(nz=16, ngf=8, nc=3, resolution=32)
    g.apply(init_weights)
    for m in g.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return g.eval()


def test_slerp_endpoints_exact_and_norm_kept():
    gen = torch.Generator().manual_seed(1)
    z0, z1 = torch.randn(5, 100, generator=gen), torch.randn(5, 100, generator=gen)
    assert torch.equal(slerp(z0, z1, 0.0), z0)
    assert torch.equal(slerp(z0, z1, 1.0), z1)
    # equal norms: every point of the arc has that norm
    u0, u1 = z0 / z0.norm(dim=1, keepdim=True), z1 / z1.norm(dim=1, keepdim=True)
    t = torch.linspace(0, 1, 7).view(7, 1, 1)  # (7, 1, 1) against (5, 100)
    arc = slerp(u0, u1, t)  # (7, 5, 100)
    assert arc.shape == (7, 5, 100)
    torch.testing.assert_close(arc.norm(dim=-1), torch.ones(7, 5), atol=1e-6, rtol=0)
    # the angle advances linearly: at t = 0.5 the point is equidistant from both ends
    mid = slerp(u0, u1, 0.5)
    torch.testing.assert_close((mid * u0).sum(1), (mid * u1).sum(1), atol=1e-6, rtol=0)


def test_slerp_parallel_and_antiparallel_fall_back_to_lerp():
    z = torch.randn(3, 10)
    out = slerp(z, 2 * z, 0.25)  # parallel: no angle to divide by
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, 1.25 * z, atol=1e-6, rtol=1e-6)
    assert torch.isfinite(slerp(z, -z, 0.3)).all()
    assert torch.equal(slerp(z, z, 0.7), z)


@pytest.mark.parametrize("truncation", [0.5, 1.5])
def test_truncated_normal_respects_the_bound(truncation):
    z = truncated_normal(200, 64, truncation, torch.Generator().manual_seed(3))
    assert z.shape == (200, 64)
    assert z.abs().max().item() <= truncation
    # still spread over the interval, not collapsed (uniform-ish for small bounds)
    assert z.std().item() > 0.4 * truncation


def test_no_truncation_is_the_plain_bank_of_dcgan_sample():
    plain = torch.randn(8, 16, generator=torch.Generator().manual_seed(7))
    for t in (None, 0, 0.0):
        assert torch.equal(latent_bank(8, 16, 7, t), plain)
    # truncation only redraws the entries beyond the bound
    bank = latent_bank(8, 16, 7, 1.0)
    keep = plain.abs() <= 1.0
    assert torch.equal(bank[keep], plain[keep])
    with pytest.raises(UserError):
        latent_bank(8, 16, 7, -1.0)


def test_interpolation_endpoints_are_the_endpoint_latents_images(g):
    pairs, steps, seed = 3, 5, 11
    images = interpolation_grid(g, 16, pairs, steps, seed)
    assert images.shape == (pairs * steps, 3, 32, 32)
    ends = latent_bank(2 * pairs, 16, seed)  # endpoint 2p -> 2p + 1 on row p
    with torch.no_grad():
        want = g(ends)
    rows = images.view(pairs, steps, 3, 32, 32)
    torch.testing.assert_close(rows[:, 0], want[0::2], atol=1e-6, rtol=0)
    torch.testing.assert_close(rows[:, -1], want[1::2], atol=1e-6, rtol=0)
    # interior latents stay in the plane of their two ends and turn steadily from one
    # towards the other
    z = interpolation_latents(16, pairs, steps, seed).view(pairs, steps, 16).double()
    for p in range(pairs):
        basis, _ = torch.linalg.qr(torch.stack([z[p, 0], z[p, -1]], 1))  # (16, 2)
        off_plane = z[p] - (z[p] @ basis) @ basis.T  # (steps, 16)
        assert off_plane.norm(dim=1).max().item() < 1e-5
        u = z[p] / z[p].norm(dim=1, keepdim=True)
        angle = torch.arccos((u @ u[0]).clamp(-1, 1))  # (steps,) from the start
        assert (angle.diff() > 0).all()


def test_interpolation_rejects_bad_sizes(g):
    with pytest.raises(UserError):
        interpolation_grid(g, 16, 0, 5)
    with pytest.raises(UserError):
        interpolation_grid(g, 16, 2, 1)


def test_decoding_refuses_a_train_mode_generator(g):
    g.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            interpolation_grid(g, 16, 1, 3)
    finally:
        g.eval()


@pytest.mark.parametrize(
    "spec, want",
    [
        ("3,10,22:5,9,40:1,2,8", ([3, 10, 22], [5, 9, 40], [1, 2, 8])),
        (" 0 :63: 7,7 ", ([0], [63], [7, 7])),
    ],
)
def test_parse_arithmetic(spec, want):
    assert parse_arithmetic(spec, 64) == want


@pytest.mark.parametrize(
    "spec, message",
    [
        ("1,2:3,4", "three index lists"),
        ("1:2:3:4", "three index lists"),
        ("1,2::3", "set B is empty"),
        ("1,x:2:3", "'x'"),
        ("1,-2:2:3", "'-2'"),
        ("1,,2:3:4", "''"),
        ("1:2:64", "index 64 in set C is outside the grid of 64"),
    ],
)
def test_parse_arithmetic_errors(spec, message):
    with pytest.raises(UserError, match=message):
        parse_arithmetic(spec, 64)


class Linear(nn.Module):
    """A linear 'generator' (N, nz) -> (N, 1, 2, 2): decoding commutes with averaging."""

    def __init__(self, nz: int):
        super().__init__()
        self.fc = nn.Linear(nz, 4, bias=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc(z.view(z.shape[0], -1)).view(-1, 1, 2, 2)


def test_arithmetic_on_a_linear_generator_is_exact():
    torch.manual_seed(0)
    lin = Linear(6).eval().double()
    bank = torch.randn(10, 6, dtype=torch.float64)
    a, b, c = [1, 2, 3], [4, 5], [9]
    images = vector_arithmetic(lin, bank, a, b, c, n_noisy=0)
    assert images.shape == (4, 1, 2, 2)
    with torch.no_grad():
        img = lin(bank)  # each bank latent's own image
    mean_a, mean_b, mean_c = img[a].mean(0), img[b].mean(0), img[c].mean(0)
    torch.testing.assert_close(images[0], mean_a, atol=1e-12, rtol=0)
    torch.testing.assert_close(images[1], mean_b, atol=1e-12, rtol=0)
    torch.testing.assert_close(images[2], mean_c, atol=1e-12, rtol=0)
    torch.testing.assert_close(images[3], mean_a - mean_b + mean_c, atol=1e-12, rtol=0)


def test_arithmetic_noisy_copies_stay_near_the_result(g):
    bank = latent_bank(64, 16, 7)
    z = arithmetic_latents(bank, [3, 10, 22], [5, 9, 40], [1, 2, 8], n_noisy=8, noise=0.25)
    assert z.shape == (12, 16)
    y = bank[[3, 10, 22]].mean(0) - bank[[5, 9, 40]].mean(0) + bank[[1, 2, 8]].mean(0)
    torch.testing.assert_close(z[3], y)
    jitter = z[4:] - y
    assert jitter.abs().max().item() <= 0.25 and jitter.abs().max().item() > 0.1
    # four images on the first grid row: A, B, C, result; the noisy ones below
    assert vector_arithmetic(g, bank, [3], [5], [1]).shape == (12, 3, 32, 32)
    assert math.isclose(z[4:].mean().item(), y.mean().item(), abs_tol=0.1)
