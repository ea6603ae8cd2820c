"""Walking the latent space of a trained generator (DCGAN paper, sections 6.1 and 6.3).

- `slerp`: spherical interpolation between two latents. Gaussian latents live
  near a sphere of radius sqrt(nz); a straight line between two of them passes
  through the low-norm interior that G rarely saw, slerp stays on the shell.
- `truncated_normal`: the "truncation trick" — latents whose entries are
  redrawn until every |z_i| <= truncation, trading variety for fidelity.
- `interpolation_grid`: one row of images per pair of random latents.
- `vector_arithmetic`: mean z of set A - mean z of set B + mean z of set C,
  decoded, with the means' own images and a few noisy copies of the result
  (the paper's Fig. 7).

The latent bank of `dcgan sample --n N --seed S` is `latent_bank(N, nz, S, truncation)`,
so a user can pick indices in one grid and reuse them in the next command. G must
be in eval mode (BatchNorm running statistics): then an image depends only on its
own latent, never on the rest of the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from dcgan.errors import UserError

# A decoder: latents (N, nz) -> images (N, C, R, R). A Generator or any callable.
Decoder = Callable[[torch.Tensor], torch.Tensor]

# vector_arithmetic returns [mean A, mean B, mean C, result, noisy results...]:
# with this many images per grid row the first row reads "A - B + C = result".
ARITHMETIC_NROW = 4


def slerp(z0: torch.Tensor, z1: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """Spherical interpolation along the last dimension.

    z0, z1: (..., nz), broadcastable against each other; t: a float or a tensor
    broadcastable against z0[..., :1] (e.g. (T, 1) for T steps of one pair).
    The angle comes from the directions; the norms are interpolated along with
    them, so two latents of equal norm give latents of that same norm.
    Returns z0 exactly at t = 0 and z1 exactly at t = 1: the weights are then
    sin(omega)/sin(omega) = 1 and sin(0) = 0, computed without rounding.
    (Anti-)parallel latents have no unique great circle; they fall back to lerp.
    """
    dtype = torch.promote_types(z0.dtype, z1.dtype)
    a, b = z0.to(torch.float64), z1.to(torch.float64)
    t = torch.as_tensor(t, dtype=torch.float64, device=a.device)
    cos = (a * b).sum(-1, keepdim=True) / (
        a.norm(dim=-1, keepdim=True) * b.norm(dim=-1, keepdim=True)
    ).clamp_min(1e-300)
    omega = torch.arccos(cos.clamp(-1.0, 1.0))  # (..., 1), in [0, pi]
    sin = torch.sin(omega)
    # below this sin(omega) the ratios lose their digits; lerp is then within
    # O(omega^2) of the true arc anyway (and there is no arc at omega = pi)
    degenerate = sin < 1e-6
    safe = torch.where(degenerate, torch.ones_like(sin), sin)
    w0 = torch.where(degenerate, 1.0 - t, torch.sin((1.0 - t) * omega) / safe)
    w1 = torch.where(degenerate, t, torch.sin(t * omega) / safe)
    return (w0 * a + w1 * b).to(dtype)


def truncated_normal(
    n: int, nz: int, truncation: float | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(n, nz) standard-normal latents with every |z_i| <= truncation.

    The first draw is exactly `torch.randn(n, nz, generator=generator)`, so with
    truncation None or 0 the bank equals the plain one; entries beyond the bound
    are then redrawn (in row-major order) until none is left.
    """
    if truncation is not None and not (truncation >= 0 and math.isfinite(truncation)):
        raise UserError(f"--truncation must be > 0 (or 0 for none), got {truncation}")
    z = torch.randn(n, nz, generator=generator)
    if not truncation:
        return z
    # P(|z| <= 0.05) is 4 %: the loop below would still end, after ~25x the draws
    if truncation < 0.05:
        raise UserError(
            f"--truncation {truncation} is too small to mean anything; use >= 0.05 "
            "(1 to 2 is the usual range)"
        )
    bad = z.abs() > truncation
    while bad.any():
        z[bad] = torch.randn(int(bad.sum()), generator=generator)
        bad = z.abs() > truncation
    return z


def latent_bank(n: int, nz: int, seed: int, truncation: float | None = None) -> torch.Tensor:
    """The (n, nz) latents that `dcgan sample --n n --seed seed` draws, in grid order."""
    return truncated_normal(n, nz, truncation, torch.Generator().manual_seed(seed))


@torch.no_grad()
def decode(g: Decoder, z: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Latents (N, nz) -> images (N, C, R, R) on the CPU, in batches, without autograd."""
    if isinstance(g, nn.Module) and g.training:
        # train-mode BatchNorm mixes the batch: images would depend on their neighbours
        raise ValueError("put the generator in eval mode before decoding latents")
    device = next(g.parameters()).device if isinstance(g, nn.Module) else z.device
    chunks = [g(z[i : i + batch].to(device)).cpu() for i in range(0, z.shape[0], batch)]
    return torch.cat(chunks)


def interpolation_latents(
    nz: int, pairs: int, steps: int, seed: int = 0, truncation: float | None = None
) -> torch.Tensor:
    """(pairs * steps, nz): row p goes by slerp from endpoint 2p to endpoint 2p + 1 of
    `latent_bank(2 * pairs, nz, seed, truncation)`, both endpoints included."""
    if pairs < 1 or steps < 2:
        raise UserError(f"interpolation needs >= 1 pair and >= 2 steps, got {pairs} and {steps}")
    ends = latent_bank(2 * pairs, nz, seed, truncation).view(pairs, 2, 1, nz)
    t = torch.linspace(0.0, 1.0, steps).view(1, steps, 1)  # (1, steps, 1)
    # linspace's last entry is computed, not copied: pin both ends to be exact
    t[0, 0, 0], t[0, -1, 0] = 0.0, 1.0
    z = slerp(ends[:, 0], ends[:, 1], t)  # (pairs, steps, nz)
    return z.reshape(pairs * steps, nz)


def interpolation_grid(
    g: Decoder, nz: int, pairs: int, steps: int, seed: int = 0, truncation: float | None = None
) -> torch.Tensor:
    """Images (pairs * steps, C, R, R): a row of `steps` images per pair; save with nrow=steps."""
    return decode(g, interpolation_latents(nz, pairs, steps, seed, truncation))


def parse_arithmetic(spec: str, n: int) -> tuple[list[int], list[int], list[int]]:
    """ "3,10,22:5,9,40:1,2,8" -> ([3, 10, 22], [5, 9, 40], [1, 2, 8]) for A - B + C.

    Indices count row-major from 0 in the grid of `dcgan sample --n n`, so each
    must be in [0, n).
    """
    groups = spec.split(":")
    if len(groups) != 3:
        raise UserError(
            f"--arithmetic expects three index lists A:B:C (as in 3,10,22:5,9:1), got {spec!r}"
        )
    sets: list[list[int]] = []
    for name, group in zip("ABC", groups, strict=True):
        items = [s.strip() for s in group.split(",")]
        if items == [""]:
            raise UserError(f"--arithmetic: set {name} is empty in {spec!r}")
        indices = []
        for s in items:
            if not s.isdigit():  # also refuses "" (a doubled comma) and negatives
                raise UserError(
                    f"--arithmetic: set {name} holds {s!r}, not an image index "
                    f"(a whole number from 0 to {n - 1})"
                )
            i = int(s)
            if i >= n:
                raise UserError(
                    f"--arithmetic: index {i} in set {name} is outside the grid of "
                    f"{n} samples (0 to {n - 1}); raise --n or pick another image"
                )
            indices.append(i)
        sets.append(indices)
    return sets[0], sets[1], sets[2]


def arithmetic_latents(
    z_bank: torch.Tensor,
    a_idx: list[int],
    b_idx: list[int],
    c_idx: list[int],
    n_noisy: int = 8,
    noise: float = 0.25,
    seed: int = 0,
) -> torch.Tensor:
    """(4 + n_noisy, nz): [mean A, mean B, mean C, Y = A - B + C, Y + U(-noise, noise)...].

    z_bank: (n, nz). The noisy copies show the neighbourhood of Y, as the paper's
    Fig. 7 does with uniform noise of scale 0.25.
    """
    z = z_bank.reshape(z_bank.shape[0], -1)
    means = [z[idx].mean(0) for idx in (a_idx, b_idx, c_idx)]  # 3 x (nz,)
    y = means[0] - means[1] + means[2]
    gen = torch.Generator().manual_seed(seed)
    jitter = (torch.rand(n_noisy, z.shape[1], generator=gen) * 2 - 1) * noise  # (n_noisy, nz)
    return torch.cat([torch.stack([*means, y]), y + jitter.to(z.dtype)])


def vector_arithmetic(
    g: Decoder,
    z_bank: torch.Tensor,
    a_idx: list[int],
    b_idx: list[int],
    c_idx: list[int],
    n_noisy: int = 8,
    noise: float = 0.25,
    seed: int = 0,
) -> torch.Tensor:
    """Images (4 + n_noisy, C, R, R) of `arithmetic_latents`: the three set means, the
    result, then its noisy neighbours. Save with nrow=ARITHMETIC_NROW."""
    return decode(g, arithmetic_latents(z_bank, a_idx, b_idx, c_idx, n_noisy, noise, seed))
