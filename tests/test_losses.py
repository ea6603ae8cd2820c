import math

import torch

from dcgan.losses import d_loss, d_targets, g_loss_minimax, g_loss_nonsat


def test_losses_match_the_probability_formulas():
    torch.manual_seed(0)
    lr, lf = torch.randn(16), torch.randn(16)
    dr, df = torch.sigmoid(lr).double(), torch.sigmoid(lf).double()
    expected_d = -(dr.log().mean() + (1 - df).log().mean())
    assert math.isclose(
        d_loss(lr, lf, torch.ones(16), torch.zeros(16)).item(), expected_d.item(), rel_tol=1e-5
    )
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


# -- hinge, least squares, Wasserstein: value and gradient against hand computations ---------


def _value_and_grads(fn, *logits):
    xs = [x.clone().requires_grad_(True) for x in logits]
    v = fn(*xs)
    v.backward()
    return v.item(), [x.grad for x in xs]


def test_hinge_losses_value_and_gradient():
    from dcgan.losses import discriminator_loss, generator_loss

    lr = torch.tensor([2.0, 0.5, -1.0, 0.9])
    lf = torch.tensor([-2.0, -0.5, 1.0, 0.0])
    v, (gr, gf) = _value_and_grads(
        lambda a, b: discriminator_loss("hinge", a, b, None, None), lr, lf
    )
    # mean(max(0, 1 - lr)) + mean(max(0, 1 + lf)) = (0 + .5 + 2 + .1)/4 + (0 + .5 + 2 + 1)/4
    assert math.isclose(v, 2.6 / 4 + 3.5 / 4, rel_tol=1e-6)
    # d/dlr = -1/4 where lr < 1, else 0; d/dlf = 1/4 where lf > -1, else 0
    assert torch.equal(gr, torch.tensor([0.0, -0.25, -0.25, -0.25]))
    assert torch.equal(gf, torch.tensor([0.0, 0.25, 0.25, 0.25]))
    v, (g,) = _value_and_grads(lambda b: generator_loss("hinge", "nonsat", b), lf)
    assert math.isclose(v, 1.5 / 4, rel_tol=1e-6) and torch.equal(g, torch.full((4,), -0.25))


def test_least_squares_losses_value_and_gradient():
    from dcgan.losses import discriminator_loss, generator_loss

    lr, lf = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, -1.0])
    tr, tf = torch.full((3,), 0.9), torch.zeros(3)  # smoothing moves LSGAN's target too
    v, (gr, gf) = _value_and_grads(lambda a, b: discriminator_loss("lsgan", a, b, tr, tf), lr, lf)
    expected = 0.5 * ((0.1**2 + 0.9**2 + 1.1**2) / 3) + 0.5 * ((0 + 1 + 1) / 3)
    assert math.isclose(v, expected, rel_tol=1e-6)
    assert torch.allclose(gr, (lr - tr) / 3) and torch.allclose(gf, (lf - tf) / 3)
    v, (g,) = _value_and_grads(lambda b: generator_loss("lsgan", "nonsat", b), lf)
    assert math.isclose(v, 0.5 * (1 + 0 + 4) / 3, rel_tol=1e-6)
    assert torch.allclose(g, (lf - 1) / 3)


def test_wasserstein_losses_value_and_gradient():
    from dcgan.losses import discriminator_loss, generator_loss

    lr, lf = torch.tensor([3.0, 1.0]), torch.tensor([-1.0, 0.0])
    v, (gr, gf) = _value_and_grads(
        lambda a, b: discriminator_loss("wgan-gp", a, b, None, None), lr, lf
    )
    assert math.isclose(v, -0.5 - 2.0) and torch.equal(gr, torch.full((2,), -0.5))
    assert torch.equal(gf, torch.full((2,), 0.5))
    v, (g,) = _value_and_grads(lambda b: generator_loss("wgan-gp", "nonsat", b), lf)
    assert math.isclose(v, 0.5) and torch.equal(g, torch.full((2,), -0.5))


class LinearD(torch.nn.Module):
    """D(x) = <w, x> + c: its input gradient is w for every image, so both penalties and
    their gradients with respect to w have closed forms."""

    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(w.clone())

    def forward(self, x):
        return (x.flatten(1) * self.w).sum(1) + 0.3


def test_gradient_penalty_and_r1_against_closed_forms():
    from dcgan.losses import gradient_penalty, r1_penalty

    torch.manual_seed(0)
    w = torch.randn(1 * 4 * 4) * 0.5
    real, fake = torch.randn(6, 1, 4, 4), torch.randn(6, 1, 4, 4)
    d = LinearD(w)
    gp = gradient_penalty(d, real, fake)
    norm = w.norm()
    assert math.isclose(gp.item(), (norm.item() - 1) ** 2, rel_tol=1e-5)
    gp.backward()  # the double backward: d/dw (||w|| - 1)^2 = 2 (||w|| - 1) w / ||w||
    assert torch.allclose(d.w.grad, 2 * (norm - 1) * w / norm, atol=1e-6)
    d = LinearD(w)
    r1 = r1_penalty(d, real)
    assert math.isclose(r1.item(), 0.5 * norm.item() ** 2, rel_tol=1e-5)
    r1.backward()  # d/dw ||w||^2 / 2 = w
    assert torch.allclose(d.w.grad, w, atol=1e-6)


def test_penalties_run_in_float32_under_autocast():
    from dcgan.losses import gradient_penalty

    torch.manual_seed(0)
    d = LinearD(torch.randn(16))
    x = torch.randn(4, 1, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gp = gradient_penalty(d, x.bfloat16(), x.bfloat16() + 1)
    assert gp.dtype == torch.float32
    assert math.isclose(gp.item(), (d.w.norm().item() - 1) ** 2, rel_tol=1e-5)
