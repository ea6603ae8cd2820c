import pytest
import torch

from dcgan.config import ModelConfig
from dcgan.models import (
    Discriminator,
    Generator,
    block_widths,
    build_discriminator,
    build_generator,
    count_parameters,
)


def test_canonical_64px_parameter_counts():
    # the pytorch/examples DCGAN at nz=100, ngf=ndf=64, nc=3
    assert count_parameters(Generator(100, 64, 3, 64)) == 3_576_704
    assert count_parameters(Discriminator(64, 3, 64)) == 2_765_568


def test_canonical_state_dict_keys():
    # same layer indices as the example's nn.Sequential, so its checkpoints load
    g_keys = set(Generator(100, 64, 3, 64).state_dict())
    assert {"main.0.weight", "main.1.running_mean", "main.12.weight"} <= g_keys
    d_keys = set(Discriminator(64, 3, 64).state_dict())
    assert {"main.0.weight", "main.3.running_var", "main.11.weight"} <= d_keys


@pytest.mark.parametrize("resolution", [32, 64, 128])
@pytest.mark.parametrize("nc", [1, 3])
def test_shapes(resolution, nc):
    g = Generator(16, 8, nc, resolution)
    d = Discriminator(8, nc, resolution)
    z = torch.randn(3, 16)
    x = g(z)
    assert x.shape == (3, nc, resolution, resolution)
    assert x.abs().max() <= 1.0  # tanh output
    assert g(z.view(3, 16, 1, 1)).shape == x.shape  # both latent layouts
    logits = d(x)
    assert logits.shape == (3,)


def test_one_block_per_doubling():
    assert block_widths(64, 32) == [256, 128, 64]
    assert block_widths(64, 64) == [512, 256, 128, 64]
    assert block_widths(64, 128) == [512, 512, 256, 128, 64]  # multiplier capped at 8
    with pytest.raises(ValueError):
        block_widths(64, 48)


@pytest.mark.parametrize(
    "resolution,g_params,d_params", [(32, 1_068_928, 663_296), (128, 7_772_032, 6_960_896)]
)
def test_parameter_counts_other_resolutions(resolution, g_params, d_params):
    # computed from the layer shapes: e.g. at 32px G = 100*256*16 + 256*128*16 + 128*64*16
    # + 64*3*16 + 2*(256+128+64)
    assert count_parameters(Generator(100, 64, 3, resolution)) == g_params
    assert count_parameters(Discriminator(64, 3, resolution)) == d_params


def test_dcgan_init_statistics():
    torch.manual_seed(0)
    g = build_generator(ModelConfig(nz=100, ngf=64), 3, 64)
    d = build_discriminator(ModelConfig(ndf=64), 3, 64)
    convs = [m.weight for m in g.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    convs += [m.weight for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    w = torch.cat([c.flatten() for c in convs])
    assert abs(w.mean().item()) < 1e-3
    assert abs(w.std().item() - 0.02) < 1e-3
    bns = [m for m in list(g.modules()) + list(d.modules()) if isinstance(m, torch.nn.BatchNorm2d)]
    gamma = torch.cat([m.weight for m in bns])
    assert abs(gamma.mean().item() - 1.0) < 3e-3 and abs(gamma.std().item() - 0.02) < 3e-3
    assert all(m.bias.abs().max() == 0 for m in bns)


def test_dropout_only_when_asked():
    g = Generator(100, 64, 3, 64, dropout=0.5)
    assert any(isinstance(m, torch.nn.Dropout) for m in g.modules())
    assert count_parameters(g) == 3_576_704
    assert not any(isinstance(m, torch.nn.Dropout) for m in Generator(100, 64, 3, 64).modules())
