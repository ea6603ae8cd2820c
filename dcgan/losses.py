"""GAN losses on D's logits, as pure functions.

D outputs logits; the sigmoid lives here, inside
`binary_cross_entropy_with_logits`, which is numerically stable and allowed
under autocast (`BCELoss` on probabilities is not). Losses are computed in
float32 whatever precision the networks ran in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor,
           target_real: torch.Tensor, target_fake: torch.Tensor) -> torch.Tensor:
    """-[log D(x) + log(1 - D(G(z)))] averaged over the batch, with soft/flipped targets.

    With targets 1 and 0 this is the negated objective D ascends in Goodfellow et
    al.'s Algorithm 1; `target_real` < 1 is one-sided label smoothing.
    """
    return (F.binary_cross_entropy_with_logits(logits_real.float(), target_real)
            + F.binary_cross_entropy_with_logits(logits_fake.float(), target_fake))


def g_loss_nonsat(logits_fake: torch.Tensor) -> torch.Tensor:
    """-log D(G(z)): the non-saturating loss Goodfellow et al. recommend in practice."""
    return F.binary_cross_entropy_with_logits(logits_fake.float(), torch.ones_like(
        logits_fake, dtype=torch.float32))


def g_loss_minimax(logits_fake: torch.Tensor) -> torch.Tensor:
    """log(1 - D(G(z))), the loss of Algorithm 1 as written; it saturates early in training.

    log(1 - sigmoid(l)) = -softplus(l) = -BCE(l, target 0).
    """
    return -F.binary_cross_entropy_with_logits(logits_fake.float(), torch.zeros_like(
        logits_fake, dtype=torch.float32))


G_LOSSES = {"nonsat": g_loss_nonsat, "minimax": g_loss_minimax}


def d_targets(batch: int, label_smoothing: float, label_flip: float,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets (batch,) for D's real and fake terms.

    Real targets are 1 - label_smoothing (one-sided smoothing, Salimans et al.
    2016); with probability label_flip a target is swapped (real -> 0,
    fake -> 1 - label_smoothing), a ganhacks trick that keeps D from being sure.
    """
    real = torch.full((batch,), 1.0 - label_smoothing, device=device)
    fake = torch.zeros(batch, device=device)
    if label_flip > 0:
        flip_real = torch.rand(batch, device=device) < label_flip
        flip_fake = torch.rand(batch, device=device) < label_flip
        real = torch.where(flip_real, torch.zeros_like(real), real)
        fake = torch.where(flip_fake, torch.full_like(fake, 1.0 - label_smoothing), fake)
    return real, fake
