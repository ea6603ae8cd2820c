"""The in-turns timing loop that every benchmark table is built from."""

import pytest

from dcgan.bench.timing import clock, in_turns


def test_in_turns_rotates_the_first_step_and_counts_images_and_seconds():
    order, ticks = [], iter(range(1000))

    def step(name, images):
        def run():
            order.append(name)
            return images

        return run

    # a clock that advances by one each reading: every window lasts exactly 1 "second"
    out = in_turns(
        {"a": step("a", 2), "b": step("b", 3), "c": step("c", 5)},
        windows=4,
        calls={"a": 1, "b": 2, "c": 1},
        now=lambda: next(ticks),
    )
    assert order == [
        "a",
        "b",
        "b",
        "c",  # window 0 starts at a
        "b",
        "b",
        "c",
        "a",  # window 1 at b
        "c",
        "a",
        "b",
        "b",  # window 2 at c
        "a",
        "b",
        "b",
        "c",
    ]  # window 3 at a again
    assert out == {"a": [(2, 1)] * 4, "b": [(6, 1)] * 4, "c": [(5, 1)] * 4}


def test_clocks():
    wall, cpu = clock("wall", "cpu"), clock("cpu", "cpu")
    t0, c0 = wall(), cpu()
    sum(range(200_000))
    assert wall() > t0 and cpu() > c0
    with pytest.raises(ValueError, match="wall"):
        clock("gpu", "cpu")
