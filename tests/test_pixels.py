"""The one pair of pixel conversions: exact at the ends, a byte survives the round trip."""

import numpy as np
import pytest
import torch

from dcgan.pixels import from_uint8, to_uint8


def test_every_byte_survives_the_round_trip_and_the_ends_are_exact():
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    u = from_uint8(x)
    assert u.dtype == torch.float32
    assert u.min().item() == -1.0 and u.max().item() == 1.0  # 0 -> -1, 255 -> 1 exactly
    assert torch.equal(to_uint8(u), x)
    assert torch.equal(from_uint8(x.numpy()), u)  # numpy in, same values


def test_to_uint8_rounds_to_nearest_and_clamps():
    # 0.5 / 127.5 above -1 is half a byte: rounds to byte 0 or 1 by round-half-even;
    # values outside [-1, 1] clamp to the ends
    v = torch.tensor([-2.0, -1.0, -1.0 + 0.6 / 127.5, 1.0, 3.0])
    assert to_uint8(v).tolist() == [0, 0, 1, 255, 255]


def test_to_unit_refuses_floats():
    """A float input would be scaled twice (and changed in place): refuse it."""
    with pytest.raises(TypeError, match="uint8"):
        from_uint8(np.zeros((1, 1, 2, 2), dtype=np.float32))
