r"""Convolution and transposed convolution with two interchangeable kernels.

"unfold" kernel (seed 003's derivation)
---------------------------------------
Let x be (N, C, H, W), the weight w be (C', C, K1, K2), stride s, padding p, and the
output s = x (*) w be (N, C', H', W') with H' = (H + 2p - K1) // s + 1 (same for W').
`unfold` copies every receptive field into one column:

    X = unfold(x)            X[(c, i, j), (n, h', w')] = x_pad[n, c, s h' + i, s w' + j]
                             shape (C K1 K2, N H' W')

after which the convolution is one matrix product with W = w.view(C', C K1 K2):

    S = W X                  shape (C', N H' W'), reshaped to (N, C', H', W')

Backward, with G = dL/dS laid out like S (C', N H' W'):

    dL/dW = G X^T            (C', C K1 K2): a sum over every output position
    dL/dX = W^T G            (C K1 K2, N H' W')
    dL/dx = fold(dL/dX)      fold is the adjoint of unfold: each column entry is
                             *added* back to the pixel it was copied from (overlapping
                             windows sum), then the padding border is cut off.
    dL/db = sum of G over (n, h', w')

A transposed convolution with weight (C, C', K1, K2) is defined as the adjoint of that
convolution (the map x -> dL/dx above, with W = w.view(C, C' K1 K2)):

    forward:  y = fold(W^T x2)        x2 = x as (C, N H W);  y is (N, C', H_out, W_out)
              H_out = (H - 1) s - 2p + K1
    backward: G2 = unfold(dL/dy)      (C' K1 K2, N H W)
              dL/dx = W G2  (as (N, C, H, W)),  dL/dW = x2 G2^T,  dL/db = sum of dL/dy

`unfold` here is an `as_strided` view of the zero-padded input (no copy) followed by
one reshape that materialises the columns; `fold` loops over the K1 K2 kernel offsets
and adds each (C, N, H', W') slab into a strided slice of the padded result. Neither
uses torch.nn.functional.

"native" kernel
---------------
Calls ATen's `convolution` and `convolution_backward` operators directly (the same
backends torch autograd reaches: oneDNN/MKL on CPU, cuDNN on CUDA), with no autograd
graph. The backward formulas are the same as above; only the implementation differs.
"""

from __future__ import annotations

import math

import torch

from dcgan.engine.module import Module, Parameter

KERNELS = ("native", "unfold")
_default_kernel = ["native"]


def set_conv_kernel(name: str) -> None:
    """Select the kernel used by every conv layer built with kernel=None."""
    if name not in KERNELS:
        raise ValueError(f"conv kernel must be one of {KERNELS}, got {name!r}")
    _default_kernel[0] = name


def get_conv_kernel() -> str:
    return _default_kernel[0]


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _pad(x: torch.Tensor, p: tuple[int, int]) -> torch.Tensor:
    """Zero-pad the two spatial dims of (N, C, H, W) -> (N, C, H + 2p0, W + 2p1)."""
    if p == (0, 0):
        return x.contiguous()
    n, c, h, w = x.shape
    out = x.new_zeros(n, c, h + 2 * p[0], w + 2 * p[1])
    out[:, :, p[0] : p[0] + h, p[1] : p[1] + w] = x
    return out


def unfold(
    x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]
) -> tuple[torch.Tensor, tuple[int, int]]:
    """(N, C, H, W) -> columns (C K1 K2, N H' W') and (H', W'), as in the docstring."""
    n, c, h, w = x.shape
    (k1, k2), (s1, s2) = kernel, stride
    xp = _pad(x, padding)
    hp, wp = xp.shape[2], xp.shape[3]
    ho, wo = (hp - k1) // s1 + 1, (wp - k2) // s2 + 1
    if ho <= 0 or wo <= 0:
        raise ValueError(f"kernel {kernel} larger than padded input {(hp, wp)}")
    sn, sc, sh, sw = xp.stride()
    # view (C, K1, K2, N, H', W'): element [c,i,j,n,h',w'] = xp[n, c, s1 h' + i, s2 w' + j]
    windows = xp.as_strided(
        (c, k1, k2, n, ho, wo), (sc, sh, sw, sn, sh * s1, sw * s2), xp.storage_offset()
    )
    return windows.reshape(c * k1 * k2, n * ho * wo), (ho, wo)


def fold(
    cols: torch.Tensor,
    shape: tuple[int, int, int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
) -> torch.Tensor:
    """Adjoint of `unfold`: columns (C K1 K2, N H' W') -> (N, C, H, W) of `shape`,
    summing the entries of overlapping windows."""
    n, c, h, w = shape
    (k1, k2), (s1, s2), (p1, p2) = kernel, stride, padding
    hp, wp = h + 2 * p1, w + 2 * p2
    ho, wo = (hp - k1) // s1 + 1, (wp - k2) // s2 + 1
    # accumulate channel-major (C, N, Hp, Wp) so each offset's slab needs no permute
    out = cols.new_zeros(c, n, hp, wp)
    slabs = cols.view(c, k1, k2, n, ho, wo)
    for i in range(k1):
        for j in range(k2):
            out[:, :, i : i + s1 * (ho - 1) + 1 : s1, j : j + s2 * (wo - 1) + 1 : s2] += slabs[
                :, i, j
            ]
    return out[:, :, p1 : p1 + h, p2 : p2 + w].transpose(0, 1).contiguous()


def _channel_major(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (C, N H W), the layout the column matrices use."""
    n, c, h, w = t.shape
    return t.transpose(0, 1).reshape(c, n * h * w)


def _batch_major(t: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """(C, N H W) -> contiguous (N, C, H, W)."""
    return t.view(t.shape[0], n, h, w).transpose(0, 1).contiguous()


class _ConvBase(Module):
    transposed = False

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int],
        padding: int | tuple[int, int],
        bias: bool,
        kernel: str | None,
    ):
        super().__init__()
        if kernel is not None and kernel not in KERNELS:
            raise ValueError(f"conv kernel must be one of {KERNELS}, got {kernel!r}")
        self.in_ch, self.out_ch = in_ch, out_ch
        self.kernel_size, self.stride, self.padding = (
            _pair(kernel_size),
            _pair(stride),
            _pair(padding),
        )
        self.kernel = kernel
        k1, k2 = self.kernel_size
        shape = (in_ch, out_ch, k1, k2) if self.transposed else (out_ch, in_ch, k1, k2)
        # torch's default init (kaiming_uniform with a=sqrt(5)) reduces to
        # U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = weight.shape[1] * K1 * K2
        bound = 1.0 / math.sqrt(shape[1] * k1 * k2)
        self.weight = Parameter(torch.empty(shape).uniform_(-bound, bound))
        self.bias = Parameter(torch.empty(out_ch).uniform_(-bound, bound)) if bias else None

    def _kernel(self) -> str:
        return self.kernel or _default_kernel[0]

    def _aten_args(self) -> tuple:
        # stride, padding, dilation, transposed, output_padding, groups
        return (list(self.stride), list(self.padding), [1, 1], self.transposed, [0, 0], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__} expects (N, C, H, W), got {tuple(x.shape)}")
        if self._kernel() == "native":
            b = self.bias.data if self.bias is not None else None
            y = torch.ops.aten.convolution(x, self.weight.data, b, *self._aten_args())
            return self._record(y, x, "native", x)
        y, saved = self._unfold_forward(x)
        return self._record(y, x, *saved)

    def backward(
        self, saved: tuple, grad_out: torch.Tensor, input_grad: bool = True
    ) -> torch.Tensor | None:
        if saved[0] == "native":
            x = saved[1]
            has_bias = self.bias is not None
            gx, gw, gb = torch.ops.aten.convolution_backward(
                grad_out,
                x,
                self.weight.data,
                [self.out_ch] if has_bias else None,
                *self._aten_args(),
                [input_grad, True, has_bias],
            )
            self.weight.accumulate(gw)
            if has_bias:
                self.bias.accumulate(gb)
            return gx
        return self._unfold_backward(grad_out, saved, input_grad)

    def extra_repr(self) -> str:
        return (
            f"{self.in_ch}, {self.out_ch}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}, "
            f"kernel={self.kernel or 'global'}"
        )


class Conv2d(_ConvBase):
    """2-d cross-correlation, torch.nn.Conv2d semantics (no dilation, no groups)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        bias: bool = True,
        kernel: str | None = None,
    ):
        super().__init__(in_ch, out_ch, kernel_size, stride, padding, bias, kernel)

    def _unfold_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        n = x.shape[0]
        cols, (ho, wo) = unfold(x, self.kernel_size, self.stride, self.padding)  # (CKK, NL)
        w2 = self.weight.data.view(self.out_ch, -1)  # (C', CKK)
        if self.bias is not None:
            s = torch.addmm(self.bias.data.view(-1, 1), w2, cols)  # (C', N H' W')
        else:
            s = w2 @ cols
        return _batch_major(s, n, ho, wo), ("unfold", cols, x.shape)

    def _unfold_backward(
        self, grad_out: torch.Tensor, saved: tuple, input_grad: bool
    ) -> torch.Tensor | None:
        _, cols, x_shape = saved
        g = _channel_major(grad_out)  # (C', N H' W')
        self.weight.accumulate(g @ cols.t())  # (C', CKK)
        if self.bias is not None:
            self.bias.accumulate(g.sum(1))
        if not input_grad:
            return None
        gcols = self.weight.data.view(self.out_ch, -1).t() @ g  # (CKK, N H' W')
        return fold(gcols, tuple(x_shape), self.kernel_size, self.stride, self.padding)


class ConvTranspose2d(_ConvBase):
    """Transposed convolution (the adjoint of Conv2d), torch.nn.ConvTranspose2d
    semantics without output_padding, dilation or groups. Weight (C_in, C_out, K1, K2)."""

    transposed = True

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        bias: bool = True,
        kernel: str | None = None,
    ):
        super().__init__(in_ch, out_ch, kernel_size, stride, padding, bias, kernel)

    def _out_size(self, h: int, w: int) -> tuple[int, int]:
        (k1, k2), (s1, s2), (p1, p2) = self.kernel_size, self.stride, self.padding
        return (h - 1) * s1 - 2 * p1 + k1, (w - 1) * s2 - 2 * p2 + k2

    def _unfold_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        n, _, h, w = x.shape
        ho, wo = self._out_size(h, w)
        if ho <= 0 or wo <= 0:
            raise ValueError(f"ConvTranspose2d output would be empty for input {(h, w)}")
        x2 = _channel_major(x)  # (C, N H W)
        cols = self.weight.data.view(self.in_ch, -1).t() @ x2  # (C' K1 K2, N H W)
        y = fold(cols, (n, self.out_ch, ho, wo), self.kernel_size, self.stride, self.padding)
        if self.bias is not None:
            y += self.bias.data.view(1, -1, 1, 1)
        return y, ("unfold", x2, x.shape)

    def _unfold_backward(
        self, grad_out: torch.Tensor, saved: tuple, input_grad: bool
    ) -> torch.Tensor | None:
        _, x2, (n, _, h, w) = saved
        gcols, _ = unfold(grad_out, self.kernel_size, self.stride, self.padding)  # (C'KK, NHW)
        self.weight.accumulate(x2 @ gcols.t())  # (C, C' K1 K2)
        if self.bias is not None:
            self.bias.accumulate(grad_out.sum((0, 2, 3)))
        if not input_grad:
            return None
        gx2 = self.weight.data.view(self.in_ch, -1) @ gcols  # (C, N H W)
        return _batch_major(gx2, n, h, w)
