"""Transfer from D: feature shapes, the linear classifier, baselines, and an end-to-end run."""

import gzip
import struct

import numpy as np
import pytest
import torch

from dcgan import checkpoint, rundir
from dcgan.config import from_preset
from dcgan.errors import UserError
from dcgan.models import Discriminator
from dcgan.transfer import (
    d_features,
    draw_subset,
    feature_dim,
    format_table,
    linear_probe,
    run_transfer,
)

FMNIST = "/usr/share/datasets/fashion-mnist"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DCGAN_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize(
    "resolution, nc, ndf, want",
    [
        (32, 1, 8, (8 + 16 + 32) * 16),
        (32, 3, 64, (64 + 128 + 256) * 16),
        (64, 3, 64, 15360),  # (64 + 128 + 256 + 512) * 16, the paper's 64px D
        (128, 1, 16, (16 + 32 + 64 + 128 + 128) * 16),  # widths capped at 8 * ndf
    ],
)
def test_feature_shapes(resolution, nc, ndf, want):
    d = Discriminator(ndf, nc, resolution).eval()
    with torch.no_grad():
        f = d_features(d, torch.rand(2, nc, resolution, resolution) * 2 - 1)
    assert feature_dim(ndf, resolution) == want
    assert f.shape == (2, want)
    # LeakyReLU outputs pooled by max: finite, and not all of one sign
    assert torch.isfinite(f).all() and (f > 0).any() and (f < 0).any()


def blobs(n_per_class: int, k: int, dim: int, spread: float, seed: int):
    """k Gaussian clusters in `dim` dimensions, labels 0..k-1."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, dim, generator=g) * 5
    y = torch.arange(k).repeat_interleave(n_per_class)
    x = centres[y] + spread * torch.randn(len(y), dim, generator=g)
    return x, y.numpy()


def test_classifier_separates_a_separable_problem_and_not_noise():
    x, y = blobs(20, 4, 30, 0.5, seed=0)
    xt, yt = blobs(50, 4, 30, 0.5, seed=0)  # same centres (same seed), fresh points below
    xt = xt + 0.5 * torch.randn(xt.shape, generator=torch.Generator().manual_seed(9))
    acc, l2 = linear_probe(x, y, xt, yt, 4, np.random.default_rng(0))
    assert acc == 1.0 and l2 in (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    # shuffled training labels carry no information: about 1/4 on the test points
    shuffled = np.random.default_rng(1).permutation(y)
    acc, _ = linear_probe(x, shuffled, xt, yt, 4, np.random.default_rng(0))
    assert acc < 0.6


def test_draw_subset_is_class_balanced():
    y = np.repeat(np.arange(3), [10, 20, 30])
    idx = draw_subset(y, 4, np.random.default_rng(0))
    assert np.bincount(y[idx]).tolist() == [4, 4, 4] and len(set(idx)) == 12
    assert len(draw_subset(y, "all", np.random.default_rng(0), max_train=25)) == 25
    with pytest.raises(UserError, match="class 0 has only 10"):
        draw_subset(y, 11, np.random.default_rng(0))


def write_idx(path, array: np.ndarray) -> None:
    """uint8 array -> gzipped IDX file (the format of the Debian Fashion-MNIST files)."""
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.tobytes(), compresslevel=1))


def read_idx(path) -> np.ndarray:
    raw = gzip.decompress(open(path, "rb").read())
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


@pytest.fixture
def fmnist_subset(tmp_path):
    """The first 400 train and 300 test images of the real Fashion-MNIST, as an IDX folder
    (the full train split takes ~20 s to resize here: too slow for a unit test)."""
    folder = tmp_path / "fmnist-small"
    folder.mkdir()
    for prefix, n in (("train", 400), ("t10k", 300)):
        write_idx(
            folder / f"{prefix}-images-idx3-ubyte.gz",
            read_idx(f"{FMNIST}/{prefix}-images-idx3-ubyte.gz")[:n],
        )
        write_idx(
            folder / f"{prefix}-labels-idx1-ubyte.gz",
            read_idx(f"{FMNIST}/{prefix}-labels-idx1-ubyte.gz")[:n],
        )
    return folder


def tiny_run(folder, dataset: str):
    """A run folder holding a checkpoint.pt as training_loop writes it at step 0: G and D
    built after seeding with train.seed (the transfer code only reads D and the config)."""
    from dcgan.models import build_discriminator, build_generator

    cfg = from_preset(
        "fmnist32",
        {
            "dataset": dataset,
            "resolution": 32,
            "channels": 1,
            "ngf": 8,
            "ndf": 8,
            "nz": 16,
            "seed": 3,
        },
    )
    torch.manual_seed(cfg.train.seed)
    g = build_generator(cfg.model, 1, 32)
    d = build_discriminator(cfg.model, 1, 32)
    folder.mkdir()
    checkpoint.save_state(
        {
            "G": g.state_dict(),
            "D": d.state_dict(),
            "G_ema": g.state_dict(),
            "config": cfg.to_dict(),
            "nimg": 0,
        },
        folder / rundir.CHECKPOINT,
    )
    return folder


@pytest.mark.skipif(not __import__("os").path.isdir(FMNIST), reason="no Fashion-MNIST files")
def test_run_transfer_end_to_end(tmp_path, fmnist_subset):
    run = tiny_run(tmp_path / "run", str(fmnist_subset))
    result = run_transfer(str(run), labels=[10], draws=1, progress=False, sup_min_steps=30)
    assert result["classes"] == 10 and result["n_test"] == 300 and result["channels"] == 1
    assert result["feature_dims"] == {"d": (8 + 16 + 32) * 16, "pixels": 32 * 32}
    (row,) = result["rows"]
    assert row["labels"] == 10 and row["n_train"] == 100
    for method in ("d_features", "pixels", "untrained_d", "supervised"):
        # 10 labels per class, 300 test images: 0.67 to 0.72 measured; chance is 0.1
        assert 0.5 < row[method]["mean"] <= 1.0, method
        assert row[method]["std"] == 0.0 and len(row[method]["per_draw"]) == 1
    table = format_table(result)
    assert "D features" in table and "supervised D" in table and "±" in table
    # the trained D of this run is its own initial D: same seed policy, same features
    assert row["d_features"]["mean"] == pytest.approx(row["untrained_d"]["mean"])


def test_run_transfer_user_errors(tmp_path):
    run = tiny_run(tmp_path / "run", "fake")
    with pytest.raises(UserError, match="no labels"):
        run_transfer(str(run), labels=[10], draws=1, progress=False)
    with pytest.raises(UserError, match="at least 2 labels"):
        run_transfer(str(run), labels=[1], progress=False)
    with pytest.raises(UserError, match="neither"):
        run_transfer(str(run), labels=["many"], progress=False)
    with pytest.raises(UserError, match="no training state"):
        run_transfer(str(tmp_path), labels=[10], progress=False)


def test_untrained_d_baseline_is_d_before_its_first_step(tmp_path, monkeypatch):
    """Capture D at the first step of a real training_loop: the run's d_init.safetensors
    holds exactly it, and so does the replayed seeding used for older runs."""
    import importlib

    import torch
    from safetensors.torch import load_file

    from dcgan.config import from_preset
    from dcgan.models import build_discriminator, build_generator
    from dcgan.step import AutogradStep

    # the loop module (`import dcgan.train as m` would name the function dcgan.train)
    train_module = importlib.import_module("dcgan.train")

    seen = {}
    real_call = AutogradStep.__call__

    def spy(self, *args, **kwargs):
        seen.setdefault("D", {k: v.clone() for k, v in self.D.state_dict().items()})
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(AutogradStep, "__call__", spy)
    cfg = from_preset(
        "fmnist32",
        {
            "dataset": "fake",
            "channels": 1,
            "ngf": 8,
            "ndf": 8,
            "nz": 16,
            "batch": 16,
            "kimg": 0.032,
            "tick_kimg": 0.016,
            "precision": "fp32",
            "channels_last": "on",
            "seed": 5,
        },
    )
    out = tmp_path / "run"
    rundir.RunDir(out).begin(force=False)
    train_module.training_loop(cfg, out, progress=False)
    recorded = load_file(str(out / rundir.D_INIT))
    assert set(recorded) == set(seen["D"])
    assert all(torch.equal(recorded[k], seen["D"][k]) for k in recorded)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        build_generator(cfg.model, 1, 32)
        replayed = build_discriminator(cfg.model, 1, 32).state_dict()
    assert all(torch.equal(replayed[k], seen["D"][k]) for k in recorded)
    # and the trained D moved away from it
    trained = checkpoint.load_state(out / rundir.CHECKPOINT)["D"]
    assert not torch.equal(trained["main.0.weight"], recorded["main.0.weight"])
