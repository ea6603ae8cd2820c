"""GAN losses on D's raw outputs, and D's gradient penalties, as pure functions.

D outputs logits; for the BCE losses the sigmoid lives here, inside
`binary_cross_entropy_with_logits`, which is numerically stable and allowed
under autocast (`BCELoss` on probabilities is not). Losses are computed in
float32 whatever precision the networks ran in.

`--loss` picks one pair (D's loss, G's loss):
- bce: Goodfellow et al.'s, with G non-saturating or minimax (`--g-loss`);
- hinge: max(0, 1 - D(x)) + max(0, 1 + D(G(z))) for D, -D(G(z)) for G
  (Lim & Ye 2017; the loss of SNGAN and BigGAN);
- lsgan: least squares to targets 1 (real) and 0 (fake) for D, to 1 for G
  (Mao et al. 2017, the a=0, b=c=1 variant), each term halved;
- wgan-gp: the critic's D(G(z)) - D(x) and G's -D(G(z)) (Arjovsky et al. 2017),
  with the gradient penalty of Gulrajani et al. 2017 (`gradient_penalty`).
Label smoothing and flips change the targets of bce and lsgan only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def d_loss(
    logits_real: torch.Tensor,
    logits_fake: torch.Tensor,
    target_real: torch.Tensor,
    target_fake: torch.Tensor,
) -> torch.Tensor:
    """-[log D(x) + log(1 - D(G(z)))] averaged over the batch, with soft/flipped targets.

    With targets 1 and 0 this is the negated objective D ascends in Goodfellow et
    al.'s Algorithm 1; `target_real` < 1 is one-sided label smoothing.
    """
    return F.binary_cross_entropy_with_logits(
        logits_real.float(), target_real
    ) + F.binary_cross_entropy_with_logits(logits_fake.float(), target_fake)


def g_loss_nonsat(logits_fake: torch.Tensor) -> torch.Tensor:
    """-log D(G(z)): the non-saturating loss Goodfellow et al. recommend in practice."""
    return F.binary_cross_entropy_with_logits(
        logits_fake.float(), torch.ones_like(logits_fake, dtype=torch.float32)
    )


def g_loss_minimax(logits_fake: torch.Tensor) -> torch.Tensor:
    """log(1 - D(G(z))), the loss of Algorithm 1 as written; it saturates early in training.

    log(1 - sigmoid(l)) = -softplus(l) = -BCE(l, target 0).
    """
    return -F.binary_cross_entropy_with_logits(
        logits_fake.float(), torch.zeros_like(logits_fake, dtype=torch.float32)
    )


G_LOSSES = {"nonsat": g_loss_nonsat, "minimax": g_loss_minimax}


def d_loss_hinge(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean()


def d_loss_lsgan(
    logits_real: torch.Tensor,
    logits_fake: torch.Tensor,
    target_real: torch.Tensor,
    target_fake: torch.Tensor,
) -> torch.Tensor:
    return (
        0.5 * ((logits_real.float() - target_real) ** 2).mean()
        + 0.5 * ((logits_fake.float() - target_fake) ** 2).mean()
    )


def g_loss_lsgan(logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((logits_fake.float() - 1.0) ** 2).mean()


def d_loss_wgan(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The critic's loss: it raises D on real images and lowers it on fakes."""
    return logits_fake.float().mean() - logits_real.float().mean()


def g_loss_critic(logits_fake: torch.Tensor) -> torch.Tensor:
    """-D(G(z)): G's loss under hinge and WGAN alike."""
    return -logits_fake.float().mean()


def discriminator_loss(
    kind: str,
    logits_real: torch.Tensor,
    logits_fake: torch.Tensor,
    target_real: torch.Tensor,
    target_fake: torch.Tensor,
) -> torch.Tensor:
    if kind == "bce":
        return d_loss(logits_real, logits_fake, target_real, target_fake)
    if kind == "lsgan":
        return d_loss_lsgan(logits_real, logits_fake, target_real, target_fake)
    if kind == "hinge":
        return d_loss_hinge(logits_real, logits_fake)
    return d_loss_wgan(logits_real, logits_fake)


def generator_loss(kind: str, g_kind: str, logits_fake: torch.Tensor) -> torch.Tensor:
    if kind == "bce":
        return G_LOSSES[g_kind](logits_fake)
    if kind == "lsgan":
        return g_loss_lsgan(logits_fake)
    return g_loss_critic(logits_fake)


def _input_grad(d, x: torch.Tensor) -> torch.Tensor:
    """dD(x)/dx per image, (B, C*R*R), with its graph kept (for the double backward).

    Run in float32 outside autocast: a squared gradient norm in bf16 or fp16
    loses most of its digits (and under fp16 the loss scaler applies to the sum
    this penalty joins, not to this inner gradient)."""
    with torch.autocast(x.device.type, enabled=False):
        x = x.detach().float().requires_grad_(True)
        out = d(x)
        (g,) = torch.autograd.grad(out.float().sum(), x, create_graph=True)
    return g.flatten(1)


def gradient_penalty(d, x_real: torch.Tensor, x_fake: torch.Tensor) -> torch.Tensor:
    """E[(||dD(x_hat)/dx_hat|| - 1)^2] at x_hat = e x + (1 - e) G(z), e ~ U(0, 1) per image
    (Gulrajani et al. 2017); the caller multiplies by lambda (10 in the paper)."""
    e = torch.rand(x_real.shape[0], 1, 1, 1, device=x_real.device)
    x_hat = e * x_real.detach().float() + (1 - e) * x_fake.detach().float()
    return ((_input_grad(d, x_hat).norm(dim=1) - 1.0) ** 2).mean()


def r1_penalty(d, x_real: torch.Tensor) -> torch.Tensor:
    """E[||dD(x)/dx||^2] / 2 on real images (Mescheder et al. 2018); the caller multiplies
    by gamma (and by the interval, when applied lazily every few D-steps)."""
    return 0.5 * (_input_grad(d, x_real) ** 2).sum(dim=1).mean()


def d_targets(
    batch: int, label_smoothing: float, label_flip: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
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
