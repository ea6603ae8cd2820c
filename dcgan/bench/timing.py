"""Timing steps in turns: the one timing loop behind every `dcgan bench` table.

The hosts this project is measured on are shared: they take the CPU away for up
to a second at a time and have slow phases that last minutes (speed drifting by
2-3x). Rows timed one after another each see a different phase, so their
ratios say little; rows timed in turns, window by window, share the phases, so
their ratios hold. `in_turns` is that loop; the train-step bench, the engine
comparison and the generator bench all call it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch

Timed = Callable[[], int]  # runs one step and returns how many images it processed


def counted(fn: Callable[[], object], images: int) -> Timed:
    """The Timed that runs fn() and counts `images` images (a batch's size)."""

    def run() -> int:
        fn()
        return images

    return run


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(kind: str, device: torch.device | str) -> Callable[[], float]:
    """A clock in seconds. "wall": elapsed time, reading only after the device's
    queued work finished; "cpu": this process's CPU time (steadier when other jobs
    compete for the cores, meaningful with one intra-op thread)."""
    if kind == "cpu":
        return time.process_time
    if kind != "wall":
        raise ValueError(f"clock must be 'wall' or 'cpu', got {kind!r}")

    def wall() -> float:
        sync(device)
        return time.perf_counter()

    return wall


def in_turns(
    steps: Mapping[str, Timed],
    windows: int,
    calls: int | Mapping[str, int],
    now: Callable[[], float],
    after_window: Callable[[], None] = lambda: None,
) -> dict[str, list[tuple[int, float]]]:
    """(images, seconds) of every window of each step.

    Window w runs each step `calls` times (an int, or one count per step), the
    steps in their given order rotated to start at step w mod len(steps), so no
    step always follows the same neighbour. `after_window` runs after each
    window (a progress bar).
    """
    names = list(steps)
    out: dict[str, list[tuple[int, float]]] = {name: [] for name in names}
    for w in range(windows):
        for name in names[w % len(names) :] + names[: w % len(names)]:
            k = calls if isinstance(calls, int) else calls[name]
            t0 = now()
            images = sum(steps[name]() for _ in range(k))
            out[name].append((images, now() - t0))
        after_window()
    return out
