"""Parameters, the Module base class and Sequential.

A module with a hand-written backward (a layer) ends its forward with
`return self._record(y, x, *saved)`: the tensors its backward needs go on a new tape
node attached to the output (dcgan.engine.graph), not on the module, so every call
keeps its own. `engine.backward(loss)` later calls `layer.backward(saved, g,
input_grad)` once per recorded call. Composite modules (Sequential, the DCGAN networks)
only chain forwards; their layers' nodes form the graph.

Parameter gradients accumulate (`grad += ...`) across backward walks until
`zero_grad()`, so D's real and fake passes add up exactly as they do in torch.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import torch

from dcgan.engine.graph import no_grad, record

__all__ = ["Module", "Parameter", "Sequential", "no_grad"]


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
    """Wrap a forward in torch.no_grad(), so no engine op ever records a torch graph
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
        # backward needs no wrapper: only the graph walk calls it, under torch.no_grad()
        if "forward" in cls.__dict__:
            cls.forward = _without_torch_graph(cls.__dict__["forward"])

    def __init__(self) -> None:
        object.__setattr__(self, "_params", {})
        object.__setattr__(self, "_children", {})
        object.__setattr__(self, "_buffer_names", [])
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

    def backward(
        self, saved: tuple, grad_out: torch.Tensor, input_grad: bool = True
    ) -> torch.Tensor | None:
        """Gradient of the loss w.r.t. the input of the forward call that saved `saved`;
        parameter gradients are added to `.grad`. input_grad=False skips the input
        gradient (the input needs none: data, or made under no_grad()) and returns None.
        Called by the graph walk (`engine.backward(output)`), not by hand."""
        raise NotImplementedError(
            f"{type(self).__name__} has no backward of its own: call "
            "engine.backward(output) on what its forward returned"
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def _record(self, y: torch.Tensor, x: torch.Tensor, *saved: Any) -> torch.Tensor:
        """y carrying this call's node: `saved` for backward, x's node as the parent."""
        return record(self, y, (x,), saved, trainable=bool(self._params))

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

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Module:
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
                raise ValueError(
                    f"load_state_dict: {key} has shape {tuple(value.shape)}, "
                    f"expected {tuple(target.shape)}"
                )
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
    """Children named "0", "1", ... (as torch.nn.Sequential). Only a forward: each child
    records its own node, and the graph walk runs their backwards in reverse."""

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
