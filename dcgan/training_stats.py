"""Training statistics recorded by name from anywhere in a step, reduced once per tick.

A step calls `record("loss_d", loss)` with a device scalar: it is added to a
running sum on the device, so recording costs no host synchronisation. The loop
calls `collect(env)` at the end of a tick: the mean of each name over its
reports, averaged over ranks, read back to the host in one go. Steps therefore
return nothing and thread no statistics dicts around.
"""

from __future__ import annotations

import torch

from dcgan.dist import DistEnv, all_reduce_mean

_sums: dict[str, torch.Tensor] = {}
_counts: dict[str, int] = {}


def record(name: str, value: torch.Tensor) -> None:
    """Add one observation of `name` (a 0-d tensor, any device and dtype)."""
    v = value.detach().float()
    if name in _sums:
        _sums[name] = _sums[name] + v
        _counts[name] += 1
    else:
        _sums[name] = v.clone()
        _counts[name] = 1


def reset() -> None:
    """Forget what was reported (a new tick, or a rollback that discards the tick)."""
    _sums.clear()
    _counts.clear()


def collect(env: DistEnv | None = None) -> dict[str, float]:
    """The mean of every name since the last collect or reset; then reset.

    Under torchrun every rank must report the same names the same number of
    times (they run the same step), and the means are averaged over ranks."""
    means = {k: s / _counts[k] for k, s in _sums.items()}
    reset()
    return {k: v.item() for k, v in all_reduce_mean(means, env or DistEnv()).items()}
