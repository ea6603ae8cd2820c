"""The step interface: autograd and engine steps alike, statistics by name, G's EMA."""

import itertools
import math

import pytest
import torch

from dcgan import training_stats
from dcgan.config import from_preset
from dcgan.step import build_gan

TINY = {
    "dataset": "fake",
    "resolution": 32,
    "channels": 1,
    "ngf": 8,
    "ndf": 8,
    "nz": 16,
    "batch": 8,
    "precision": "fp32",
    "channels_last": "off",
    "r1_gamma": 0.0,
}


def _gan(engine: str, ema_kimg: float = 0.016):
    cfg = from_preset("fmnist32", {**TINY, "engine": engine, "ema_kimg": ema_kimg})
    torch.manual_seed(0)
    return build_gan(cfg, 1, torch.device("cpu")), cfg


def test_training_stats_are_means_per_name_and_reset():
    training_stats.reset()
    for v in (1.0, 2.0, 6.0):
        training_stats.record("a", torch.tensor(v))
    training_stats.record("b", torch.tensor(5.0, dtype=torch.bfloat16))
    assert training_stats.collect() == {"a": 3.0, "b": 5.0}
    assert training_stats.collect() == {}  # collect starts the next tick


@pytest.mark.parametrize("engine", ["torch", "scratch"])
def test_both_steps_report_the_same_statistics(engine):
    gan, _ = _gan(engine)
    x = torch.rand(8, 1, 32, 32) * 2 - 1
    training_stats.reset()
    for _ in range(2):
        gan.step(itertools.repeat(x), 0.0)
    means = training_stats.collect()
    assert set(means) == {"loss_d", "loss_g", "d_real", "d_fake"}
    assert all(math.isfinite(v) for v in means.values())
    assert 0 < means["d_real"] < 1 and 0 < means["d_fake"] < 1
    assert gan.step.state_dict()["d_updates"] == 2


@pytest.mark.parametrize("engine", ["torch", "scratch"])
def test_ema_tracks_the_live_generator(engine):
    """G_ema = beta G_ema + (1 - beta) G after each step, computed by hand from copies of
    G's weights, also after G is overwritten in place (what resume and rollback do):
    the EMA must read G's live tensors, not a copy taken when it was built."""
    gan, cfg = _gan(engine)
    beta = 0.7
    x = torch.rand(8, 1, 32, 32) * 2 - 1
    expect = {k: v.clone() for k, v in gan.G_ema.state_dict().items()}
    params = {n for n, _ in gan.G_ema.named_parameters()}
    for i in range(4):
        gan.step(itertools.repeat(x), 0.0)
        if i == 2:  # a restore: new values copied into G's tensors
            other, _ = _gan(engine)
            torch.manual_seed(1)
            for p in other.G.parameters():
                p.data.normal_()
            gan.G.load_state_dict(other.G.state_dict())
        gan.ema.update(beta)
        g = gan.G.state_dict()
        for k in expect:
            expect[k] = beta * expect[k] + (1 - beta) * g[k] if k in params else g[k].clone()
    for k, v in gan.G_ema.state_dict().items():
        torch.testing.assert_close(v, expect[k], rtol=1e-5, atol=1e-6, msg=k)
