"""The tape: every recorded forward call is a Node, and `backward(output)` walks them.

A Node is one call of one op (a layer, a loss, `add`, `reshape`): the op, the tensors
its backward needs (`saved`, kept on the node, never on the op), and the nodes of its
inputs in input order (`parents[i]` is input i's creator, or None for an input that
needs no gradient: data, or a tensor made under `no_grad()`). Two calls of the same
module are two nodes with their own saved tensors, so nothing depends on the order in
which losses are back-propagated.

The output carries its node as a Python attribute of the returned tensor (see
`record`). A wrapper class would have to forward every tensor operation callers use
(`.mean()`, `torch.sigmoid(...)`, state dicts, `.item()`), and a table keyed by `id()`
would go stale when a tensor dies and its id is reused; an attribute lives and dies
with the tensor, as torch's own `grad_fn` does.

`backward(output, grad)` sorts the nodes reachable from the output's node so that
each comes after every node that consumed its output, then calls each op's backward
once, with the sum of the gradients its consumers sent it. Parameter gradients
accumulate in `Parameter.grad` (the op's backward adds them); input gradients flow to
the parents. After the walk each node drops its saved tensors: a second backward
through the same forward is an error, not a silent reuse.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

import torch

_recording = [True]  # a one-element list so the flag can be flipped in place
_ATTR = "_engine_node"  # the attribute of an output tensor that holds its node


class Op(Protocol):
    """What a node calls: dL/d(inputs) from the saved tensors and dL/d(output).

    One-input ops get `input_grad: bool` and return one tensor (None when input_grad is
    False; parameter gradients are added all the same). Ops of several inputs get a
    tuple of flags and return a tuple, one entry per input."""

    def backward(self, saved: tuple, grad_out: torch.Tensor, input_grad: Any) -> Any: ...


class Node:
    """One forward call: its op, what that op's backward needs, its inputs' nodes.

    A node with op None is a leaf (`leaf()`): the walk stops there and adds the
    arriving gradient to `grad`."""

    __slots__ = ("op", "saved", "parents", "grad")

    def __init__(self, op: Op | None, saved: tuple | None, parents: tuple[Node | None, ...]):
        self.op, self.saved, self.parents = op, saved, parents
        self.grad: torch.Tensor | None = None

    def __repr__(self) -> str:
        name = "leaf" if self.op is None else type(self.op).__name__
        return f"Node({name}, inputs={len(self.parents)}, freed={self.saved is None})"


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Run forwards without recording nodes (and without torch's graph). BatchNorm in
    train mode still uses batch statistics and updates its running averages, as torch
    does under `torch.no_grad()`."""
    previous = _recording[0]
    _recording[0] = False
    try:
        with torch.no_grad():
            yield
    finally:
        _recording[0] = previous


def is_recording() -> bool:
    return _recording[0]


def node_of(t: torch.Tensor) -> Node | None:
    """The node that produced `t`, or None for a tensor no recorded op made."""
    return getattr(t, _ATTR, None)


def record(
    op: Op,
    out: torch.Tensor,
    inputs: tuple[torch.Tensor, ...],
    saved: tuple,
    trainable: bool = False,
) -> torch.Tensor:
    """Return `out` carrying a new node for this call of `op`.

    Nothing is recorded under `no_grad()`, nor when no input has a node and the op has
    no parameters (`trainable`): no gradient could flow through such a call. The
    returned tensor is a fresh alias of `out` (`detach()`, no copy), so the node never
    lands on an input returned unchanged (eval-mode Dropout) and never on a tensor the
    op saved for itself (ReLU saves its output): that would make a reference cycle,
    output -> node -> saved output, which only the cyclic garbage collector frees."""
    if not _recording[0]:
        return out
    parents = tuple(getattr(x, _ATTR, None) for x in inputs)
    if not trainable and all(p is None for p in parents):
        return out
    alias = out.detach()
    setattr(alias, _ATTR, Node(op, saved, parents))
    return alias


def leaf(t: torch.Tensor) -> torch.Tensor:
    """An alias of `t` whose gradient is kept: after `backward`, `grad(alias)` holds
    dL/dt (summed over every backward that reached it). For checks of input gradients."""
    alias = t.detach()
    setattr(alias, _ATTR, Node(None, (), ()))
    return alias


def grad(t: torch.Tensor) -> torch.Tensor | None:
    """The gradient accumulated on a `leaf()` tensor (None before any backward)."""
    node = node_of(t)
    if node is None or node.op is not None:
        raise ValueError("grad() is kept only for tensors made by engine.leaf()")
    return node.grad


def _topological(root: Node) -> list[Node]:
    """Nodes reachable from root, each after every node that consumes it (reverse
    post-order of an iterative depth-first search: no recursion limit)."""
    post: list[Node] = []
    seen = {root}
    stack = [(root, iter(root.parents))]
    while stack:
        node, parents = stack[-1]
        for p in parents:
            if p is not None and p not in seen:
                if p.saved is None:  # checked before any gradient is computed
                    raise RuntimeError(
                        f"backward through a forward that was already back-propagated ({p}): "
                        "its saved tensors are freed; run the forward again, or join the "
                        "outputs with engine.add and call backward once"
                    )
                seen.add(p)
                stack.append((p, iter(p.parents)))
                break
        else:
            stack.pop()
            post.append(node)
    post.reverse()
    return post


def backward(output: torch.Tensor, grad_out: torch.Tensor | None = None) -> None:
    """Back-propagate from `output` through every recorded call that produced it.

    grad_out is dL/d(output), of output's shape; None means 1 for a one-element output
    (a loss). Parameter gradients are added to `.grad`, leaf gradients to `grad(leaf)`.
    """
    root = node_of(output)
    if root is None or root.op is None:
        raise RuntimeError(
            "backward: this tensor was not produced by a recorded engine op "
            "(made under no_grad(), from data only, or a view of an output)"
        )
    if root.saved is None:
        raise RuntimeError(f"backward through a forward that was already back-propagated ({root})")
    if grad_out is None:
        if output.numel() != 1:
            raise RuntimeError(
                "backward: grad_out is needed for an output of more than "
                f"one element, got shape {tuple(output.shape)}"
            )
        grad_out = torch.ones_like(output)
    elif grad_out.shape != output.shape:
        raise ValueError(
            f"backward: grad_out shape {tuple(grad_out.shape)} != output "
            f"shape {tuple(output.shape)}"
        )
    pending: dict[Node, torch.Tensor] = {root: grad_out}  # summed dL/d(node's output)
    with torch.no_grad():
        for node in _topological(root):
            g = pending.pop(node)
            if node.op is None:  # a leaf: keep the gradient
                node.grad = g if node.grad is None else node.grad + g
                continue
            parents, saved = node.parents, node.saved
            node.saved, node.parents = None, ()  # free what this forward kept
            if len(parents) == 1:
                in_grads = (node.op.backward(saved, g, parents[0] is not None),)
            else:
                in_grads = node.op.backward(saved, g, tuple(p is not None for p in parents))
            for p, gi in zip(parents, in_grads, strict=True):
                if p is not None:
                    # out of place: gi may be the very tensor another branch received
                    pending[p] = gi if p not in pending else pending[p] + gi
