"""Export: BatchNorm folding, TorchScript and ONNX files equal to the eager G, speed rows."""

import json

import pytest
import torch
from torch import nn

from dcgan import checkpoint, rundir
from dcgan.bench.generator import time_generator
from dcgan.errors import UserError
from dcgan.export import export_generator, fold_batchnorm, load_exported
from dcgan.models import Generator, init_weights

TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_generator(resolution: int, nc: int = 3, g_dropout: float = 0.0) -> Generator:
    """A small G whose BatchNorms hold trained-looking statistics, so folding is tested
    with scales and shifts far from the identity."""
    torch.manual_seed(resolution)
    g = Generator(nz=12, ngf=8, nc=nc, resolution=resolution, dropout=g_dropout)
    g.apply(init_weights)
    with torch.no_grad():
        for m in g.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.2, 3.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return g.eval()


def make_snapshot(folder, resolution: int, nc: int = 3):
    g = tiny_generator(resolution, nc)
    meta = {
        "nz": 12,
        "ngf": 8,
        "nc": nc,
        "resolution": resolution,
        "g_dropout": 0.0,
        "dataset": "fake",
        "kimg": 0.5,
    }
    checkpoint.save_generator(g, meta, folder / rundir.SNAPSHOT)
    return g


def latents(n: int, nz: int = 12) -> torch.Tensor:
    return torch.randn(n, nz, 1, 1, generator=torch.Generator().manual_seed(n))


@pytest.mark.parametrize("resolution, nc", [(32, 1), (64, 3), (128, 3)])
def test_folding_alone_matches_the_eager_generator(resolution, nc):
    g = tiny_generator(resolution, nc)
    folded = fold_batchnorm(g)
    kinds = {type(m) for m in folded}
    assert kinds == {nn.ConvTranspose2d, nn.ReLU, nn.Tanh}
    convs = [m for m in folded if isinstance(m, nn.ConvTranspose2d)]
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in g.modules())
    assert len(convs) == n_bn + 1  # the output conv has no BatchNorm after it
    assert all(m.bias is not None for m in convs[:-1]) and convs[-1].bias is None
    z = latents(5)
    with torch.no_grad():
        err = (folded(z) - g(z)).abs().max().item()
    assert err <= TOL


def test_folding_drops_dropout_and_rejects_a_lone_batchnorm():
    g = tiny_generator(32, g_dropout=0.3)
    folded = fold_batchnorm(g)
    assert not any(isinstance(m, (nn.Dropout, nn.BatchNorm2d)) for m in folded)
    z = latents(3)
    with torch.no_grad():
        assert (folded(z) - g(z)).abs().max().item() <= TOL
    with pytest.raises(ValueError, match="must follow"):
        fold_batchnorm(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4)))


@pytest.mark.parametrize("fmt, suffix", [("torchscript", ".pt"), ("onnx", ".onnx")])
@pytest.mark.parametrize("resolution", [32, 64])
def test_exported_file_equals_the_eager_generator(tmp_path, fmt, suffix, resolution):
    g = make_snapshot(tmp_path, resolution)
    path = export_generator(str(tmp_path), fmt, str(tmp_path / "out" / f"g{suffix}"))
    assert path.is_file()
    run = load_exported(path)
    for n in (1, 5):  # the batch axis is dynamic
        z = latents(n)
        with torch.no_grad():
            want = g(z)
            got = run(z)
        assert got.shape == (n, 3, resolution, resolution)
        assert (got - want).abs().max().item() <= TOL, (fmt, resolution, n)


def test_export_carries_its_metadata(tmp_path):
    import onnx

    make_snapshot(tmp_path, 32)
    pt = export_generator(str(tmp_path / rundir.SNAPSHOT), "torchscript", str(tmp_path / "g.pt"))
    extra = {"dcgan.json": ""}
    with pytest.warns(DeprecationWarning):  # torch.jit is deprecated upstream; it still loads
        torch.jit.load(str(pt), _extra_files=extra)
    meta = json.loads(extra["dcgan.json"])
    assert meta["nz"] == 12 and meta["resolution"] == 32 and "(N, 12, 1, 1)" in meta["input"]
    ox = export_generator(str(tmp_path), "onnx", str(tmp_path / "g.onnx"), batch_dynamic=False)
    model = onnx.load(str(ox))
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["dcgan"])["nc"] == 3
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 12, 1, 1]  # fixed batch when not dynamic


def test_export_user_errors(tmp_path):
    with pytest.raises(UserError, match="no generator snapshot"):
        export_generator(str(tmp_path), "torchscript", str(tmp_path / "g.pt"))
    make_snapshot(tmp_path, 32)
    with pytest.raises(UserError, match="unknown export format"):
        export_generator(str(tmp_path), "tflite", str(tmp_path / "g.tflite"))
    with pytest.raises(UserError, match="is a folder"):
        export_generator(str(tmp_path), "onnx", str(tmp_path))


def test_time_generator_rows(tmp_path):
    make_snapshot(tmp_path, 32)
    rows = time_generator(
        str(tmp_path),
        variants=("eager", "torchscript", "onnx"),
        batches=(1, 3),
        warmup=0,
        windows=2,
        min_window_s=0.01,
        progress=False,
    )
    assert [(r["variant"], r["batch"]) for r in rows] == [
        (v, b) for v in ("eager", "torchscript", "onnx") for b in (1, 3)
    ]
    for r in rows:
        assert r["images_per_s"] > 0 and r["first_call_s"] >= 0
        assert r["ms_per_batch"] == pytest.approx(1000 * r["batch"] / r["images_per_s"])
        assert r["resolution"] == 32 and r["device"] == "cpu"
    with pytest.raises(UserError, match="unknown generator variant"):
        time_generator(None, variants=("tensorrt",))
