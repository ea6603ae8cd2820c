"""Mean-reduced losses. forward(pred, target) returns a 0-d tensor and saves what
backward() needs on a stack (same LIFO rule as modules); backward() returns dL/dpred."""

from __future__ import annotations

import torch

from dcgan.engine.module import _without_torch_graph, is_saving


class _Loss:
    def __init__(self) -> None:
        self._saved: list[tuple] = []

    def __call__(self, pred: torch.Tensor, target: torch.Tensor | float) -> torch.Tensor:
        return self.forward(pred, target)

    def _push(self, *saved: object) -> None:
        if is_saving():
            self._saved.append(saved)

    def _pop(self) -> tuple:
        if not self._saved:
            raise RuntimeError(f"{type(self).__name__}.backward called without a forward")
        return self._saved.pop()

    def forward(self, pred: torch.Tensor, target: torch.Tensor | float) -> torch.Tensor:
        raise NotImplementedError

    def backward(self) -> torch.Tensor:
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
        self._push(diff)
        return (diff * diff).mean()

    @_without_torch_graph
    def backward(self) -> torch.Tensor:
        (diff,) = self._pop()
        return diff * (2.0 / diff.numel())


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
        self._push(pred, t)
        return loss.mean()

    @_without_torch_graph
    def backward(self) -> torch.Tensor:
        pred, t = self._pop()
        return (torch.sigmoid(pred) - t) / pred.numel()
