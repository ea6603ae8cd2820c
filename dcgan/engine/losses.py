"""Mean-reduced losses. forward(pred, target) returns a 0-d tensor that carries its tape
node (dcgan.engine.graph), so `engine.backward(loss)` starts there; the loss's own
backward returns dL/dpred. The target is data: no gradient flows into it."""

from __future__ import annotations

import torch

from dcgan.engine.graph import record
from dcgan.engine.module import _without_torch_graph


class _Loss:
    def __call__(self, pred: torch.Tensor, target: torch.Tensor | float) -> torch.Tensor:
        return self.forward(pred, target)

    def forward(self, pred: torch.Tensor, target: torch.Tensor | float) -> torch.Tensor:
        raise NotImplementedError

    def backward(
        self, saved: tuple, grad_out: torch.Tensor, input_grad: bool = True
    ) -> torch.Tensor | None:
        """dL/dpred times grad_out (a 0-d tensor: 1 when the loss is the root)."""
        raise NotImplementedError


def _as_target(target: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(target, torch.Tensor):
        return torch.full_like(like, float(target))
    return target.to(device=like.device, dtype=like.dtype).expand_as(like)


class MSELoss(_Loss):
    """L = mean((p - t)^2);  dL/dp = 2 (p - t) / numel."""

    @_without_torch_graph
    def forward(self, pred: torch.Tensor, target: torch.Tensor | float) -> torch.Tensor:
        diff = pred - _as_target(target, pred)
        return record(self, (diff * diff).mean(), (pred,), (diff,))

    def backward(
        self, saved: tuple, grad_out: torch.Tensor, input_grad: bool = True
    ) -> torch.Tensor | None:
        (diff,) = saved
        return diff * (2.0 / diff.numel() * grad_out) if input_grad else None


class BCEWithLogitsLoss(_Loss):
    r"""Binary cross-entropy on logits x with targets t in [0, 1]:

        l = -[t log sigma(x) + (1 - t) log(1 - sigma(x))]
          = max(x, 0) - x t + log(1 + exp(-|x|))        (never exponentiates a large x)

    and since d/dx log sigma(x) = 1 - sigma(x) and d/dx log(1 - sigma(x)) = -sigma(x),
    dl/dx = sigma(x) - t; the mean divides by the number of elements."""

    @_without_torch_graph
    def forward(self, pred: torch.Tensor, target: torch.Tensor | float) -> torch.Tensor:
        t = _as_target(target, pred)
        loss = pred.clamp_min(0) - pred * t + torch.log1p(torch.exp(-pred.abs()))
        return record(self, loss.mean(), (pred,), (pred, t))

    def backward(
        self, saved: tuple, grad_out: torch.Tensor, input_grad: bool = True
    ) -> torch.Tensor | None:
        pred, t = saved
        if not input_grad:
            return None
        return ((torch.sigmoid(pred) - t) / pred.numel()).mul_(grad_out)
