"""Linear, BatchNorm2d, activations and Dropout, each with a hand-written backward."""

from __future__ import annotations

import math

import torch

from dcgan.engine.module import Module, Parameter


class Linear(Module):
    """y = x W^T + b over the last dim; x (..., in_f) -> (..., out_f)."""

    def __init__(self, in_f: int, out_f: int, bias: bool = True):
        super().__init__()
        self.in_f, self.out_f = in_f, out_f
        bound = 1.0 / math.sqrt(in_f)  # torch's default init, as for convolutions
        self.weight = Parameter(torch.empty(out_f, in_f).uniform_(-bound, bound))
        self.bias = Parameter(torch.empty(out_f).uniform_(-bound, bound)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_f)  # (M, in_f), M = product of leading dims
        if self.bias is not None:
            y = torch.addmm(self.bias.data, x2, self.weight.data.t())
        else:
            y = x2 @ self.weight.data.t()
        return self._record(y.view(*x.shape[:-1], self.out_f), x, x2, x.shape)

    def backward(
        self, saved: tuple, grad_out: torch.Tensor, input_grad: bool = True
    ) -> torch.Tensor | None:
        x2, shape = saved
        g = grad_out.reshape(-1, self.out_f)  # (M, out_f)
        self.weight.accumulate(g.t() @ x2)  # dL/dW = G^T X, (out_f, in_f)
        if self.bias is not None:
            self.bias.accumulate(g.sum(0))
        return (g @ self.weight.data).view(shape) if input_grad else None

    def extra_repr(self) -> str:
        return f"{self.in_f}, {self.out_f}, bias={self.bias is not None}"


class BatchNorm2d(Module):
    r"""Per-channel normalisation of (N, C, H, W) over its M = N H W values.

    Train mode: mu, var = batch mean and biased variance; xhat = (x - mu) / sqrt(var + eps);
    y = gamma xhat + beta; running_mean/var <- (1 - momentum) * old + momentum * (mu,
    unbiased var). Eval mode uses the running statistics instead, so mu and var are
    constants and dx = dy gamma / sqrt(running_var + eps).

    Backward (train): with g = dL/dy and sums over the M values of a channel,
        dL/dbeta  = sum g
        dL/dgamma = sum g xhat
        dL/dx     = gamma / sqrt(var + eps) * (g - sum(g) / M - xhat * sum(g xhat) / M)
    the last two terms being the paths through mu and var.
    """

    def __init__(self, ch: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.ch, self.eps, self.momentum = ch, eps, momentum
        self.weight = Parameter(torch.ones(ch))
        self.bias = Parameter(torch.zeros(ch))
        self.register_buffer("running_mean", torch.zeros(ch))
        self.register_buffer("running_var", torch.ones(ch))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.ch
        if self.training:
            m = x.numel() // c
            if m < 2:
                raise ValueError("BatchNorm2d in train mode needs more than 1 value per channel")
            # two passes (mean, then the centred second moment): exact enough for
            # float64 checks and several times faster on CPU than torch.var_mean over
            # the non-adjacent dims (0, 2, 3)
            mean = x.sum((0, 2, 3)) / m  # (C,)
            xc = x - mean.view(1, c, 1, 1)  # (N, C, H, W), kept for backward
            var = (xc * xc).sum((0, 2, 3)) / m  # (C,) biased, used to normalise
            mom = self.momentum
            self.running_mean.mul_(1 - mom).add_(mean, alpha=mom)
            self.running_var.mul_(1 - mom).add_(var * (m / (m - 1)), alpha=mom)
            self.num_batches_tracked += 1
        else:
            var = self.running_var
            xc = x - self.running_mean.view(1, c, 1, 1)
        invstd = (var + self.eps).rsqrt()  # (C,)
        # y = beta + xc * (gamma * invstd) in one pass
        scale = self.weight.data * invstd
        y = torch.addcmul(self.bias.data.view(1, c, 1, 1), xc, scale.view(1, c, 1, 1))
        return self._record(y, x, xc, invstd, self.training)

    def backward(
        self, saved: tuple, grad_out: torch.Tensor, input_grad: bool = True
    ) -> torch.Tensor | None:
        xc, invstd, training = saved  # centred input (N, C, H, W), 1/std (C,)
        c = self.ch
        m = xc.numel() // c
        view = (1, c, 1, 1)
        sum_g = grad_out.sum((0, 2, 3))  # (C,)
        sum_g_xc = (grad_out * xc).sum((0, 2, 3))  # (C,) = sum g xhat / invstd
        self.weight.accumulate(sum_g_xc * invstd)
        self.bias.accumulate(sum_g)
        if not input_grad:
            return None
        w = self.weight.data * invstd  # (C,) = gamma / sqrt(var + eps)
        if not training:
            return grad_out * w.view(view)
        # dx = w * (g - sum_g / M - xc * invstd^2 * sum_g_xc / M), built as
        # xc * a + (g * w + b) with per-channel a, b so it takes two passes over x
        a = -(w * invstd * invstd * sum_g_xc / m)
        b = -(w * sum_g / m)
        dx = torch.addcmul(b.view(view), grad_out, w.view(view))
        return dx.addcmul_(xc, a.view(view))

    def extra_repr(self) -> str:
        return f"{self.ch}, eps={self.eps}, momentum={self.momentum}"


class ReLU(Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.clamp_min(0)
        return self._record(y, x, y)

    def backward(
        self, saved: tuple, grad_out: torch.Tensor, input_grad: bool = True
    ) -> torch.Tensor | None:
        (y,) = saved
        # d relu / dx = 1 where the output is positive, else 0 (0 at x = 0, as torch).
        # y >= 0, so sign(y) is exactly that 0/1 mask; a multiply by it is several
        # times faster on CPU than comparison + torch.where.
        return grad_out * y.sign() if input_grad else None


class LeakyReLU(Module):
    def __init__(self, slope: float = 0.01):
        super().__init__()
        self.slope = slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if 0.0 <= self.slope <= 1.0:
            y = torch.maximum(x, x * self.slope)  # same values as the where() below, faster
        else:
            y = torch.where(x > 0, x, x * self.slope)
        # the branch taken is "x > 0"; for slope >= 0 that equals "y > 0", so the output
        # (which the next layer keeps anyway) is saved; a negative slope flips y's sign
        return self._record(y, x, y if self.slope >= 0 else x)

    def backward(
        self, saved: tuple, grad_out: torch.Tensor, input_grad: bool = True
    ) -> torch.Tensor | None:
        (t,) = saved
        if not input_grad:
            return None
        # factor = 1 where t > 0, else slope (slope at exactly 0, as torch):
        # sign(t) clamped at 0 is the 0/1 mask, then mask * (1 - slope) + slope
        factor = t.sign().clamp_min_(0).mul_(1 - self.slope).add_(self.slope)
        return grad_out * factor

    def extra_repr(self) -> str:
        return f"slope={self.slope}"


class Tanh(Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(x)
        return self._record(y, x, y)

    def backward(
        self, saved: tuple, grad_out: torch.Tensor, input_grad: bool = True
    ) -> torch.Tensor | None:
        (y,) = saved
        return grad_out * (1 - y * y) if input_grad else None  # tanh' = 1 - tanh^2


class Sigmoid(Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.sigmoid(x)
        return self._record(y, x, y)

    def backward(
        self, saved: tuple, grad_out: torch.Tensor, input_grad: bool = True
    ) -> torch.Tensor | None:
        (y,) = saved
        return grad_out * (1 - y) * y if input_grad else None  # sigma' = sigma (1 - sigma)


class Dropout(Module):
    """Train mode zeroes each value with probability p and scales survivors by 1/(1-p);
    eval mode is the identity. The mask is saved, so backward applies the same one."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return self._record(x, x, None)  # the identity (recorded on an alias of x)
        if self.p == 1.0:
            mask = torch.zeros_like(x)
        else:
            mask = torch.empty_like(x).bernoulli_(1 - self.p).div_(1 - self.p)
        return self._record(x * mask, x, mask)

    def backward(
        self, saved: tuple, grad_out: torch.Tensor, input_grad: bool = True
    ) -> torch.Tensor | None:
        (mask,) = saved
        if not input_grad:
            return None
        return grad_out if mask is None else grad_out * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"
