import math

import torch

from dcgan.losses import d_loss, d_targets, g_loss_minimax, g_loss_nonsat


def test_losses_match_the_probability_formulas():
    torch.manual_seed(0)
    lr, lf = torch.randn(16), torch.randn(16)
    dr, df = torch.sigmoid(lr).double(), torch.sigmoid(lf).double()
    expected_d = -(dr.log().mean() + (1 - df).log().mean())
    assert math.isclose(d_loss(lr, lf, torch.ones(16), torch.zeros(16)).item(),
                        expected_d.item(), rel_tol=1e-5)
    assert math.isclose(g_loss_nonsat(lf).item(), -df.log().mean().item(), rel_tol=1e-5)
    assert math.isclose(g_loss_minimax(lf).item(), (1 - df).log().mean().item(), rel_tol=1e-5)


def test_losses_stay_float32_under_bf16_logits():
    logits = torch.randn(8).bfloat16()
    assert g_loss_nonsat(logits).dtype == torch.float32
    assert d_loss(logits, logits, torch.ones(8), torch.zeros(8)).dtype == torch.float32


def test_targets_smoothing_and_flipping():
    real, fake = d_targets(1000, 0.1, 0.0, torch.device("cpu"))
    assert torch.all(real == 0.9) and torch.all(fake == 0)
    torch.manual_seed(0)
    real, fake = d_targets(10000, 0.0, 0.2, torch.device("cpu"))
    assert abs((real == 0).float().mean().item() - 0.2) < 0.02
    assert abs((fake == 1).float().mean().item() - 0.2) < 0.02
