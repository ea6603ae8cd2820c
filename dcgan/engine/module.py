"""Parameters, the Module base class, Sequential, and the rule for saved tensors.

Saved-tensor rule (a stack per module). Every forward that runs while saving is on
pushes what its own backward will need onto that module's stack; every backward pops
the newest entry. Forward/backward pairs may therefore be nested LIFO:

    D(real); D.backward(g_real); D(fake); D.backward(g_fake)      # what ScratchGAN does
    D(real); D(fake); D.backward(g_fake); D.backward(g_real)      # also correct

A forward whose backward will never run must be done under `engine.no_grad()`, which
saves nothing (BatchNorm in train mode still uses batch statistics and still updates
its running averages, as torch does under `torch.no_grad()`). Leftover entries can be
dropped with `clear_saved()`.

Parameter gradients accumulate (`grad += ...`) across backward calls until
`zero_grad()`, so D's real and fake passes add up exactly as they do in torch.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch

_saving = [True]  # a one-element list so the flag can be flipped in place


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Run forwards without saving anything for backward (and without torch's graph)."""
    previous = _saving[0]
    _saving[0] = False
    try:
        with torch.no_grad():
            yield
    finally:
        _saving[0] = previous


def is_saving() -> bool:
    return _saving[0]


class Parameter:
    """A trainable tensor and its accumulated gradient, always of the same shape."""

    __slots__ = ("data", "grad")

    def __init__(self, data: torch.Tensor):
        self.data = data
        self.grad = torch.zeros_like(data)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def accumulate(self, g: torch.Tensor) -> None:
        self.grad.add_(g.view_as(self.grad))

    def __repr__(self) -> str:
        return f"Parameter(shape={tuple(self.data.shape)}, dtype={self.data.dtype})"


def _without_torch_graph(fn):
    """Wrap forward/backward in torch.no_grad(), so no engine op ever records a graph
    even when a caller hands in a tensor with requires_grad=True."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper


class Module:
    """Base class: parameters, buffers and child modules are found by attribute
    assignment (as in torch), so state_dict keys follow the attribute names."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in ("forward", "backward"):
            if name in cls.__dict__:
                setattr(cls, name, _without_torch_graph(cls.__dict__[name]))

    def __init__(self) -> None:
        object.__setattr__(self, "_params", {})
        object.__setattr__(self, "_children", {})
        object.__setattr__(self, "_buffer_names", [])
        object.__setattr__(self, "_saved", [])
        object.__setattr__(self, "training", True)

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, Parameter):
            self._params[name] = value
        elif isinstance(value, Module):
            self._children[name] = value
        elif value is None and name in self._params:
            del self._params[name]
        object.__setattr__(self, name, value)

    def register_buffer(self, name: str, tensor: torch.Tensor) -> None:
        """A tensor that is state (saved, moved by `to`) but not trained."""
        if name not in self._buffer_names:
            self._buffer_names.append(name)
        object.__setattr__(self, name, tensor)

    # ---- the forward/backward protocol -------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def backward(self, grad_out: torch.Tensor, input_grad: bool = True) -> torch.Tensor | None:
        """Gradient of the loss w.r.t. the input of the matching forward; parameter
        gradients are added to `.grad`. input_grad=False skips the input gradient (as
        torch does for inputs that do not require grad) and returns None."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def _push(self, *saved: Any) -> None:
        if _saving[0]:
            self._saved.append(saved)

    def _pop(self) -> tuple:
        if not self._saved:
            raise RuntimeError(
                f"{type(self).__name__}.backward called without a saved forward: call "
                "forward (outside engine.no_grad()) before each backward")
        return self._saved.pop()

    def clear_saved(self) -> None:
        for m in self.modules():
            m._saved.clear()

    # ---- traversal ---------------------------------------------------------------
    def modules(self) -> Iterator[Module]:
        yield self
        for child in self._children.values():
            yield from child.modules()

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        # torch's order: a module's own parameters, then each child's, depth first
        for name, p in self._params.items():
            yield prefix + name, p
        for cname, child in self._children.items():
            yield from child.named_parameters(f"{prefix}{cname}.")

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad.zero_()

    def train(self, mode: bool = True) -> Module:
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self) -> Module:
        return self.train(False)

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> Module:
        """Move/cast in place (Parameter objects keep their identity, so optimisers
        built earlier still see them). Integer buffers only change device."""

        def convert(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        for m in self.modules():
            for p in m._params.values():
                p.data = convert(p.data)
                p.grad = convert(p.grad)
            for name in m._buffer_names:
                object.__setattr__(m, name, convert(getattr(m, name)))
        return self

    # ---- state dicts (torch.nn key names and order) ------------------------------
    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, p in self._params.items():
            out[prefix + name] = p.data
        for name in self._buffer_names:
            out[prefix + name] = getattr(self, name)
        for cname, child in self._children.items():
            out.update(child.state_dict(f"{prefix}{cname}."))
        return out

    def _state_slots(self, prefix: str = "") -> dict[str, tuple[Module, str, bool]]:
        """key -> (owning module, attribute name, is_parameter)."""
        slots: dict[str, tuple[Module, str, bool]] = {}
        for name in self._params:
            slots[prefix + name] = (self, name, True)
        for name in self._buffer_names:
            slots[prefix + name] = (self, name, False)
        for cname, child in self._children.items():
            slots.update(child._state_slots(f"{prefix}{cname}."))
        return slots

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Copy values in place (keeping this module's device and dtype)."""
        slots = self._state_slots()
        missing = [k for k in slots if k not in state]
        unexpected = [k for k in state if k not in slots]
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict: missing {missing}, unexpected {unexpected}")
        for key, (owner, name, is_param) in slots.items():
            if key not in state:
                continue
            target = owner._params[name].data if is_param else getattr(owner, name)
            value = state[key]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"load_state_dict: {key} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(value)

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, child in self._children.items():
            lines.append(f"  ({name}): " + repr(child).replace("\n", "\n  "))
        return "\n".join(lines) + ")" if len(lines) > 1 else lines[0] + ")"


class Sequential(Module):
    """Children named "0", "1", ... (as torch.nn.Sequential); backward runs them in
    reverse, each popping the entry its own forward pushed."""

    def __init__(self, *modules: Module):
        super().__init__()
        for i, m in enumerate(modules):
            setattr(self, str(i), m)

    def __len__(self) -> int:
        return len(self._children)

    def __getitem__(self, i: int) -> Module:
        return list(self._children.values())[i]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self._children.values():
            x = m.forward(x)
        return x

    def backward(self, grad_out: torch.Tensor, input_grad: bool = True) -> torch.Tensor | None:
        children = list(self._children.values())
        g: torch.Tensor | None = grad_out
        for i in range(len(children) - 1, -1, -1):
            # only the first layer may skip its input gradient
            g = children[i].backward(g, input_grad=input_grad if i == 0 else True)
        return g
