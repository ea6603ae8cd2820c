"""Parameter-free ops on the tape: `add` (joins two outputs, e.g. two losses, so one
backward walks both) and `reshape` (a layout change whose backward restores the
input's layout)."""

from __future__ import annotations

import torch

from dcgan.engine.graph import record


class _Add:
    """y = a + b (same shape);  dL/da = dL/db = dL/dy."""

    def backward(
        self, saved: tuple, grad_out: torch.Tensor, input_grad: tuple[bool, bool]
    ) -> tuple[torch.Tensor | None, ...]:
        # the same tensor may go to both inputs: the walk sums gradients out of place
        return tuple(grad_out if need else None for need in input_grad)


class _Reshape:
    """y = x.reshape(shape);  dL/dx = dL/dy reshaped back to x's shape."""

    def backward(
        self, saved: tuple, grad_out: torch.Tensor, input_grad: bool
    ) -> torch.Tensor | None:
        (in_shape,) = saved
        return grad_out.reshape(in_shape) if input_grad else None


_ADD, _RESHAPE = _Add(), _Reshape()


def add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.shape != b.shape:
        raise ValueError(
            f"add: shapes {tuple(a.shape)} and {tuple(b.shape)} differ "
            "(no broadcasting: its backward would have to sum it away)"
        )
    with torch.no_grad():
        out = a + b
    return record(_ADD, out, (a, b), ())


def reshape(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    with torch.no_grad():
        out = x.reshape(shape)
    return record(_RESHAPE, out, (x,), (x.shape,))
