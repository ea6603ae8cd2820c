"""Tests for dcgan.data: every source built from real files written here, the cache, Batches."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcgan import sources
from dcgan.data import ImageSet, ImagesKey, load_images
from dcgan.errors import UserError
from dcgan.sampler import Batches
from dcgan.sources import IMAGE_EXTENSIONS

LANCZOS = Image.Resampling.LANCZOS
# Batches run on every device at hand: the CUDA path (pinned, non-blocking indices) too.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own cache folder; nothing touches ~/.cache."""
    root = tmp_path / "cache"
    monkeypatch.setenv("DCGAN_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the expensive real builds (Fashion-MNIST, emoji) of this module."""
    return tmp_path_factory.mktemp("shared-cache")


# ---- helpers that write real files -------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    """IDX: 00 00 08 ndim, big-endian uint32 dims, then the bytes."""
    raw = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    return path


def write_idx_folder(folder: Path, n_train: int, n_test: int, gz: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    sets = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        images[:, :4] = 0  # a flat border and a hard edge, like real digits
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz)
        sets[prefix] = (images, labels)
    return sets


def pil_resize(images: np.ndarray, r: int) -> np.ndarray:
    """Reference: Pillow LANCZOS image by image; (N, H, W) or (N, H, W, 3) uint8."""
    return np.stack([np.asarray(Image.fromarray(x).resize((r, r), LANCZOS)) for x in images])


def png_bytes(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


# ---- IDX ---------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_round_trip_matches_pillow(tmp_path: Path, gz: bool) -> None:
    folder = tmp_path / "idx"
    sets = write_idx_folder(folder, 40, 12, gz)

    train = load_images(str(folder), 32, progress=False)
    assert isinstance(train, ImageSet)
    assert train.source == str(folder.resolve()) and train.split == "train"
    assert train.images.dtype == np.uint8 and train.images.shape == (40, 1, 32, 32)
    assert train.labels.dtype == np.int64
    np.testing.assert_array_equal(train.labels, sets["train"][1])
    # Byte-identical to Pillow's own LANCZOS, image by image.
    np.testing.assert_array_equal(train.images[:, 0], pil_resize(sets["train"][0], 32))

    test = load_images(str(folder), 64, split="test", progress=False)
    assert test.images.shape == (12, 1, 64, 64) and test.split == "test"
    np.testing.assert_array_equal(test.labels, sets["t10k"][1])
    np.testing.assert_array_equal(test.images[:, 0], pil_resize(sets["t10k"][0], 64))

    rgb = load_images(str(folder), 32, channels=3, progress=False)
    assert rgb.images.shape == (40, 3, 32, 32)
    for c in range(3):  # replicated grey
        np.testing.assert_array_equal(rgb.images[:, c], train.images[:, 0])


def test_resize_stack_equals_pillow_for_every_resolution() -> None:
    rng = np.random.default_rng(1)
    for size in (28, 32, 100):
        x = rng.integers(0, 256, (6, size, size), dtype=np.uint8)
        x[:3] = (x[:3] > 127) * 255  # hard edges: Lanczos overshoots and must clip
        for r in (32, 64, 128):
            np.testing.assert_array_equal(sources._resize_square_stack(x, r), pil_resize(x, r))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda raw: b"\x00\x01" + raw[2:], "malformed header"),  # bad magic
        (lambda raw: raw[:2] + b"\x0d" + raw[3:], "malformed header"),  # float data
        (lambda raw: raw[:2] + b"\x08\x02" + raw[4:], "malformed header"),  # wrong rank
        (lambda raw: raw[:-10], "needs"),  # truncated data
        (lambda raw: raw[:9], "truncated inside its header"),
        (lambda raw: gzip.compress(raw)[:-20], "not a valid gzip"),
    ],
)
def test_malformed_idx_is_a_user_error(tmp_path: Path, damage, message: str) -> None:
    folder = tmp_path / "idx"
    write_idx_folder(folder, 5, 2, gz=False)
    images = folder / "train-images-idx3-ubyte"
    images.write_bytes(damage(images.read_bytes()))
    with pytest.raises(UserError, match=message) as e:
        load_images(str(folder), 32, progress=False)
    assert str(images) in str(e.value)


def test_idx_label_count_mismatch(tmp_path: Path) -> None:
    folder = tmp_path / "idx"
    write_idx_folder(folder, 5, 2, gz=True)
    write_idx(folder / "train-labels-idx1-ubyte", np.zeros(4, np.uint8), gz=True)
    with pytest.raises(UserError, match="4 entries for 5 images"):
        load_images(str(folder), 32, progress=False)


def test_mnist_from_cache_folder_and_missing_files(cache: Path, monkeypatch) -> None:
    sets = write_idx_folder(cache / "mnist", 6, 3, gz=True)
    s = load_images("mnist", 32, progress=False)
    assert s.source == "mnist" and s.images.shape == (6, 1, 32, 32)
    np.testing.assert_array_equal(s.labels, sets["train"][1])

    monkeypatch.setattr(sources, "FASHION_MNIST_SYSTEM_DIR", Path("/nonexistent/fashion-mnist"))
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist") as e:
        load_images("fashion-mnist", 32, progress=False)
    assert str(cache / "fashion-mnist") in str(e.value) and "--dataset PATH" in str(e.value)


def test_idx_folder_without_test_split(tmp_path: Path) -> None:
    folder = tmp_path / "idx"
    write_idx_folder(folder, 5, 2, gz=False)
    for f in folder.glob("t10k-*"):
        f.unlink()
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte"):
        load_images(str(folder), 32, split="test", progress=False)


def test_real_fashion_mnist(shared_cache: Path, monkeypatch) -> None:
    if not (sources.FASHION_MNIST_SYSTEM_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(
            f"{sources.FASHION_MNIST_SYSTEM_DIR} missing: apt-get install dataset-fashion-mnist"
        )
    monkeypatch.setenv("DCGAN_CACHE", str(shared_cache))
    t0 = time.perf_counter()
    train = load_images("fashion-mnist", 32, progress=False)
    print(f"fashion-mnist 60k at 32px built in {time.perf_counter() - t0:.1f} s")
    assert train.source == "fashion-mnist"
    assert train.images.shape == (60000, 1, 32, 32) and train.images.dtype == np.uint8
    assert np.bincount(train.labels).tolist() == [6000] * 10  # the published class balance
    test = load_images("fashion-mnist", 32, split="test", progress=False)
    assert test.images.shape == (10000, 1, 32, 32)
    assert np.bincount(test.labels).tolist() == [1000] * 10
    # The first training image resized independently from the raw file.
    raw = gzip.decompress(
        (sources.FASHION_MNIST_SYSTEM_DIR / "train-images-idx3-ubyte.gz").read_bytes()
    )
    first = np.frombuffer(raw, np.uint8, count=28 * 28, offset=16).reshape(1, 28, 28)
    np.testing.assert_array_equal(train.images[0, 0], pil_resize(first, 32)[0])
    assert train.labels[0] == 9  # Fashion-MNIST's first training item is an ankle boot
    # named by the files' content digest: images-fashion-mnist-DIGEST-32px-1ch-SPLIT.npy
    assert len(list(shared_cache.glob("images-fashion-mnist-*-32px-1ch-*.npy"))) == 2


# ---- image folders -------------------------------------------------------------------------


def make_mixed_folder(root: Path) -> dict[str, tuple]:
    """Every kind of file a user's folder holds. Returns name -> expected RGB at the centre."""
    (root / "a" / "b").mkdir(parents=True)
    (root / "c").mkdir()
    (root / ".thumbs").mkdir()
    expect = {}

    Image.new("L", (40, 40), 100).save(root / "a" / "gray.png")
    expect["a/gray.png"] = (100, 100, 100)

    pal = Image.new("P", (40, 40), 3)
    pal.putpalette([0, 0, 0] * 3 + [10, 200, 30] + [0, 0, 0] * 252)
    pal.save(root / "a" / "b" / "palette.png")
    expect["a/b/palette.png"] = (10, 200, 30)

    rgba = np.zeros((40, 40, 4), np.uint8)  # left half fully transparent black
    rgba[:, 20:] = (0, 0, 255, 255)  # right half opaque blue
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    expect["rgba.png"] = None  # checked separately

    Image.new("CMYK", (48, 48), (0, 255, 255, 0)).save(root / "c" / "cmyk.jpg", quality=95)
    expect["c/cmyk.jpg"] = (255, 0, 0)  # cyan-free, full magenta + yellow = red

    frames = [Image.new("RGB", (30, 30), (255, 0, 0)), Image.new("RGB", (30, 30), (0, 255, 0))]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    expect["anim.gif"] = (255, 0, 0)  # the first frame

    gif = Image.new("P", (30, 30), 0)  # palette index 0 marked transparent
    gif.putpalette([0, 0, 0, 200, 0, 0] + [0, 0, 0] * 254)
    gif.save(root / "still.GIF", transparency=0)  # upper-case extension
    expect["still.GIF"] = (255, 255, 255)

    Image.new("RGB", (33, 33), (20, 40, 60)).save(root / "plain.bmp")
    expect["plain.bmp"] = (20, 40, 60)

    Image.new("RGB", (36, 36), (50, 60, 70)).save(root / "img.webp", lossless=True)
    expect["img.webp"] = (50, 60, 70)

    Image.new("LA", (36, 36), (0, 128)).save(root / "la.png")  # half-transparent black
    expect["la.png"] = (127, 127, 127)

    wide = np.zeros((30, 90, 3), np.uint8)
    wide[:, :30] = (255, 0, 0)
    wide[:, 30:60] = (0, 255, 0)
    wide[:, 60:] = (0, 0, 255)
    Image.fromarray(wide).save(root / "wide.png")  # the centre square is the green third
    expect["wide.png"] = (0, 255, 0)

    Image.fromarray(np.full((20, 20), 40000, np.uint16)).save(root / "deep.png")  # 16-bit
    expect["deep.png"] = (156, 156, 156)  # 40000 / 257

    (root / "corrupt.jpg").write_bytes(os.urandom(3000))
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    full = png_bytes(Image.fromarray(noise))
    (root / "c" / "truncated.png").write_bytes(full[: len(full) // 2])
    (root / "notes.txt").write_text("not an image")
    Image.new("RGB", (8, 8)).save(root / ".hidden.png")  # hidden: ignored
    Image.new("RGB", (8, 8)).save(root / ".thumbs" / "t.png")  # hidden folder: ignored
    return expect


def test_image_folder_mixed_modes(tmp_path: Path, capsys) -> None:
    root = tmp_path / "photos"
    expect = make_mixed_folder(root)
    s = load_images(str(root), 32, progress=False)
    assert s.images.shape == (len(expect), 3, 32, 32) and s.images.dtype == np.uint8
    assert s.skipped == 2 and s.labels is None and s.source == str(root.resolve())
    err = capsys.readouterr().err
    assert err.count("warning: skipped 2 unreadable") == 1
    assert str(root / "c" / "truncated.png") in err  # first bad file in sorted order ("c/...")

    order = sorted(expect)  # files are read in sorted relative-path order
    for name, rgb in expect.items():
        image = s.images[order.index(name)].astype(int)  # (3, 32, 32)
        if rgb is None:
            continue
        centre = image[:, 8:24, 8:24].reshape(3, -1)
        tol = 12 if name.endswith(".jpg") else 1
        assert np.abs(centre - np.array(rgb)[:, None]).max() <= tol, (name, centre.mean(1))

    rgba = s.images[order.index("rgba.png")].astype(int)
    assert (rgba[:, :, :12] == 255).all()  # transparent -> white
    assert (np.abs(rgba[:, :, 20:] - np.array([0, 0, 255])[:, None, None]) <= 1).all()

    gray = load_images(str(root), 32, channels=1, progress=False)
    assert gray.images.shape == (len(expect), 1, 32, 32)
    ref = Image.fromarray(s.images[order.index("a/b/palette.png")].transpose(1, 2, 0)).convert("L")
    np.testing.assert_array_equal(gray.images[order.index("a/b/palette.png"), 0], np.asarray(ref))


def test_image_folder_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="no images found") as e:
        load_images(str(empty), 32, progress=False)
    assert str(empty) in str(e.value) and all(x in str(e.value) for x in IMAGE_EXTENSIONS)

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "one.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(100))
    (bad / "two.jpg").write_bytes(os.urandom(100))
    with pytest.raises(UserError, match="none of the 2 image files"):
        load_images(str(bad), 32, progress=False)

    Image.new("RGB", (8, 8)).save(bad / "good.png")
    with pytest.raises(UserError, match="resolution 48"):
        load_images(str(bad), 48, progress=False)
    with pytest.raises(UserError, match="no test split"):
        load_images(str(bad), 32, split="test", progress=False)
    with pytest.raises(UserError, match="is a file"):
        load_images(str(bad / "good.png"), 32, progress=False)


def test_argument_errors() -> None:
    with pytest.raises(UserError, match="fashion-mnist, mnist, emoji, fake"):
        load_images("no-such-dataset", 32)
    with pytest.raises(UserError, match="channels 2"):
        load_images("fake", 32, channels=2)
    with pytest.raises(UserError, match="split 'val'"):
        load_images("fake", 32, split="val")
    with pytest.raises(UserError, match="fake has no test split"):
        load_images("fake", 32, split="test")


def test_fake_is_seeded_and_not_cached(cache: Path) -> None:
    a = load_images("fake", 32)
    b = load_images("fake", 32)
    assert a.images.shape == (1024, 3, 32, 32) and a.labels is None and a.source == "fake"
    np.testing.assert_array_equal(a.images, b.images)
    assert 120 < a.images.mean() < 135  # uniform bytes
    assert load_images("fake", 32, channels=1).images.shape == (1024, 1, 32, 32)
    assert not cache.exists() or not list(cache.iterdir())


# ---- CIFAR-10 -----------------------------------------------------------------------------


def write_cifar(folder: Path, per_batch: int = 10) -> dict[str, tuple[np.ndarray, list[int]]]:
    """The python-version layout: dicts with bytes keys, data (n, 3072) uint8 in R,G,B planes."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    out = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for protocol, name in zip([2, 3, 4, 5, 5, 2], names, strict=True):
        rows = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": rows,
            b"filenames": [f"img_{i}.png".encode() for i in range(per_batch)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        out[name] = (rows, labels)
    return out


def test_cifar_batches(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    batches = write_cifar(folder)
    train = load_images(str(tmp_path), 32, progress=False)  # the parent folder works too
    assert train.images.shape == (50, 3, 32, 32)
    rows = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    np.testing.assert_array_equal(train.labels, labels)
    # Row layout: 1024 red values, then 1024 green, then 1024 blue, each row-major 32x32.
    np.testing.assert_array_equal(train.images[7, 0], rows[7, :1024].reshape(32, 32))
    np.testing.assert_array_equal(train.images[7, 2, 5], rows[7, 2048 + 5 * 32 : 2048 + 6 * 32])

    test = load_images(str(folder), 64, split="test", progress=False)
    assert test.images.shape == (10, 3, 64, 64) and test.labels.tolist() == batches["test_batch"][1]
    hwc = batches["test_batch"][0].reshape(10, 3, 32, 32).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(test.images.transpose(0, 2, 3, 1), pil_resize(hwc, 64))

    gray = load_images(str(folder), 32, channels=1, split="test", progress=False)
    luma = np.stack([np.asarray(Image.fromarray(x).convert("L")) for x in hwc])  # ITU-R 601
    np.testing.assert_array_equal(gray.images[:, 0], luma)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_malicious_cifar_pickle_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "cifar"
    write_cifar(folder)
    marker = tmp_path / "pwned"
    payload = pickle.dumps({b"data": _Evil(marker), b"labels": [0]})
    pickle.loads(payload)  # the payload is real: a plain unpickler runs it
    assert marker.is_dir()
    marker.rmdir()

    (folder / "test_batch").write_bytes(payload)
    with pytest.raises(UserError, match="refusing to load") as e:
        load_images(str(folder), 32, split="test", progress=False)
    assert str(folder / "test_batch") in str(e.value)
    assert not marker.exists()

    (folder / "test_batch").write_bytes(b"not a pickle at all")
    with pytest.raises(UserError, match="cannot be read"):
        load_images(str(folder), 32, split="test", progress=False)


# ---- emoji --------------------------------------------------------------------------------


def test_emoji_render_and_cache(shared_cache: Path, monkeypatch) -> None:
    if not sources.EMOJI_FONT.is_file():
        pytest.skip(f"{sources.EMOJI_FONT} missing: apt-get install fonts-noto-color-emoji")
    monkeypatch.setenv("DCGAN_CACHE", str(shared_cache))
    t0 = time.perf_counter()
    s = load_images("emoji", 64, progress=False)
    t1 = time.perf_counter()
    again = load_images("emoji", 64, progress=False)
    t2 = time.perf_counter()
    print(f"emoji: {len(s.images)} images built in {t1 - t0:.1f} s, cached in {t2 - t1:.2f} s")

    n = len(s.images)
    assert 3000 < n < 5000 and s.images.shape == (n, 3, 64, 64) and s.labels is None
    drawn = (s.images < 240).any(axis=1).mean(axis=(1, 2))  # fraction of non-white pixels
    assert (drawn > 0.02).all()  # every image shows a glyph
    assert (s.images[:, :, 0, 0] == 255).mean() > 0.9  # on a white background
    assert len({hashlib.sha1(x.tobytes()).digest() for x in s.images}) == n  # deduplicated
    np.testing.assert_array_equal(again.images, s.images)
    assert t2 - t1 < (t1 - t0) / 3


def test_emoji_edges_composite_like_drawing_on_white() -> None:
    """Antialiased glyph edges over white must not darken (premultiplied canvas)."""
    if not sources.EMOJI_FONT.is_file():
        pytest.skip(f"{sources.EMOJI_FONT} missing: apt-get install fonts-noto-color-emoji")
    from PIL import ImageDraw, ImageFont

    face = "\U0001f600"
    got = sources._render_emoji({face: {"status": 2}}, {"fully_qualified": 2}, 128, False)
    font = ImageFont.truetype(str(sources.EMOJI_FONT), sources.EMOJI_FONT_SIZE)
    alpha = Image.new("RGBA", (136, 128), (0, 0, 0, 0))
    ImageDraw.Draw(alpha).text((0, 0), face, font=font, embedded_color=True)
    white = Image.new("RGB", (136, 128), (255, 255, 255))
    ImageDraw.Draw(white).text((0, 0), face, font=font, embedded_color=True)
    left, top, right, bottom = alpha.getbbox()
    glyph = white.crop((left, top, right, bottom))
    side = max(glyph.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(glyph, ((side - glyph.size[0]) // 2, (side - glyph.size[1]) // 2))
    want = np.asarray(square.resize((128, 128), LANCZOS)).transpose(2, 0, 1)
    assert got.shape == (1, 3, 128, 128)
    np.testing.assert_array_equal(got[0], want)


# ---- the cache ---------------------------------------------------------------------------


def small_folder(root: Path, n: int = 5) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (20 + i, 24), (i * 40, 255 - i * 40, 7)).save(root / f"{i:02d}.png")
    return root


def test_cache_round_trip_damage_and_change(
    tmp_path: Path, cache: Path, monkeypatch, capsys
) -> None:
    folder = small_folder(tmp_path / "imgs")
    first = load_images(str(folder), 32, progress=False)
    # a copy: the damage below rewrites the file in place, and a map of a file cut
    # short kills the process that reads it (SIGBUS); the store itself only renames
    first.images = np.array(first.images)
    files = sorted(cache.glob("images-*"))  # beside digests/, the content manifests
    assert all(f.name.startswith("images-imgs-") for f in files)
    # the array and its key, and no temporary, partial, progress or lock file left over
    assert [f.name.rsplit("-", 1)[1] for f in files] == ["train.json", "train.npy"]
    meta, array = files
    assert sorted(json.loads(meta.read_text())) == ["count", "key", "labels", "skipped"]
    np.testing.assert_array_equal(np.load(array), first.images)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded an image instead of reading the cache")

    with monkeypatch.context() as m:
        m.setattr(sources, "_load_image_file", no_decoding)
        second = load_images(str(folder), 32, progress=False)
    np.testing.assert_array_equal(second.images, first.images)

    good_array, good_meta = array.read_bytes(), meta.read_text()
    wrong_shape = io.BytesIO()
    np.save(wrong_shape, np.zeros((2, 3, 8, 8), np.uint8))
    stored = json.loads(good_meta)
    for path, damaged in [
        (array, b"not an npy file at all"),
        (array, good_array[:50]),  # cut inside the header
        (array, good_array[:-10]),  # cut inside the pixels
        (array, good_array + b"\0"),  # longer than its header says
        (array, wrong_shape.getvalue()),
        (array, good_array.replace(b"'|u1'", b"'<u2'")),  # another dtype
        (meta, b"{not json"),
        (meta, json.dumps({**stored, "count": 4}).encode()),
        (meta, json.dumps({**stored, "skipped": -1}).encode()),
        (meta, json.dumps({**stored, "labels": [0, 1]}).encode()),
        (meta, json.dumps({**stored, "count": True}).encode()),
        (meta, b"[]"),
    ]:
        array.write_bytes(good_array)
        meta.write_text(good_meta)
        path.write_bytes(damaged)
        again = load_images(str(folder), 32, progress=False)  # rebuilt, no crash
        np.testing.assert_array_equal(again.images, first.images)
        assert again.converted and "is damaged; rebuilding it" in capsys.readouterr().err
        assert array.read_bytes() == good_array and json.loads(meta.read_text()) == stored

    Image.new("RGB", (30, 30), (1, 2, 3)).save(folder / "99.png")  # the folder changed
    changed = load_images(str(folder), 32, progress=False)
    assert changed.images.shape == (6, 3, 32, 32)
    np.testing.assert_array_equal(changed.images[:5], first.images)
    files_now = sorted(cache.glob("images-*"))
    assert len(files_now) == 2 and not set(files_now) & set(files)  # stale version removed


def test_a_file_of_another_key_is_rebuilt(tmp_path: Path, cache: Path, monkeypatch, capsys) -> None:
    """Same name, other content: the key stored beside the array decides, not the name."""
    folder = small_folder(tmp_path / "imgs")
    first = load_images(str(folder), 32, progress=False)
    first.images = np.array(first.images)  # not a map of the file rewritten below
    meta, array = sorted(cache.glob("images-*"))
    stored = json.loads(meta.read_text())
    assert stored["key"]["kind"] == "images" and stored["key"]["fields"]["resolution"] == 32
    key = ImagesKey(**stored["key"]["fields"])
    assert key.filename(".npy") == array.name and key.filename(".json") == meta.name
    assert key.content == first.content
    wrong = np.zeros_like(first.images)
    decoded = []
    real_build = sources._load_image_file
    monkeypatch.setattr(
        sources, "_load_image_file", lambda *a, **k: decoded.append(1) or real_build(*a, **k)
    )

    other = ImagesKey(key.source, key.content, 32, 3, "test")  # another split's key
    older = {**key.as_dict(), "fields": {**key.fields(), "version": 0}}
    for stored_key in (other.as_dict(), None, "", older, other.to_json()):
        np.save(array, wrong)
        meta.write_text(json.dumps({**stored, "key": stored_key}))
        decoded.clear()
        again = load_images(str(folder), 32, progress=False)
        np.testing.assert_array_equal(again.images, first.images)
        assert decoded, "read a file holding another key instead of rebuilding"
        assert "is damaged; rebuilding it" in capsys.readouterr().err
    decoded.clear()
    load_images(str(folder), 32, progress=False)
    assert not decoded  # and the rebuilt file is read


def test_a_named_sources_old_format_files_are_removed(cache: Path) -> None:
    """mnist from IDX files in the cache: its files of the older formats (one .npz, named
    with or without the key's digest) are not read, and go once the new one is written."""
    write_idx_folder(cache / "mnist", 4, 2, gz=False)
    slug = sources.resolve("mnist", "train", cache).slug
    key = ImagesKey("mnist", slug, 32, 1, "train")
    legacy = [cache / f"images-{slug}-32px-1ch-train.npz", cache / key.filename(".npz")]
    for path in legacy:
        with open(path, "wb") as f:
            np.savez(f, images=np.zeros((4, 1, 32, 32), np.uint8), skipped=np.int64(0))
    s = load_images("mnist", 32, progress=False)
    assert s.images.any() and not any(p.exists() for p in legacy)
    assert sorted(p.name for p in cache.glob(f"images-{slug}-*")) == [
        key.filename(".json"),
        key.filename(".npy"),
    ]


def test_cache_keys_channels_and_labels(tmp_path: Path, cache: Path) -> None:
    folder = tmp_path / "idx"
    sets = write_idx_folder(folder, 4, 2, gz=True)
    load_images(str(folder), 32, progress=False)
    load_images(str(folder), 32, channels=3, progress=False)
    s = load_images(str(folder), 32, split="test", progress=False)
    keys = {tuple(p.name.rsplit("-", 3)[1:]): p for p in cache.glob("images-*.npy")}
    assert sorted(keys) == [
        ("32px", "1ch", "test.npy"),
        ("32px", "1ch", "train.npy"),
        ("32px", "3ch", "train.npy"),
    ]
    meta = json.loads(keys["32px", "1ch", "train.npy"].with_suffix(".json").read_text())
    assert meta["labels"] == sets["train"][1].tolist()
    assert s.labels.dtype == np.int64 and s.labels.tolist() == sets["t10k"][1].tolist()


# ---- Batches ------------------------------------------------------------------------------


def numbered_images(n: int, size: int = 4) -> np.ndarray:
    """uint8 (n, 1, size, size) where image i is filled with the value i."""
    images = np.repeat(np.arange(n, dtype=np.uint8), size * size).reshape(n, 1, size, size)
    return images.copy()


def ids(batch: torch.Tensor) -> list[int]:
    """Recover image numbers from a float batch (x = i / 127.5 - 1)."""
    return torch.round((batch[:, 0, 0, 1] + 1) * 127.5).long().tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_batches_values_and_epochs(device: str) -> None:
    images = numbered_images(22)
    images[0] = 255  # the extremes map to exactly +1 and -1
    b = Batches(images, batch=5, device=device, seed=3)
    assert b.batches_per_epoch == 4
    seen, xs = [], []
    for _ in range(4):
        x = next(b)
        xs.append(x.cpu())
        assert x.dtype == torch.float32 and x.shape == (5, 1, 4, 4)
        assert x.device.type == device
        assert x.min() >= -1 and x.max() <= 1
        seen += ids(x)
    assert b.epoch == 1 and b.state_dict() == {"epoch": 1, "position": 0}
    assert len(set(seen)) == 20  # each image at most once; 2 left over in the dropped batch
    perm = torch.randperm(22, generator=torch.Generator().manual_seed(3))[:20].tolist()
    assert seen == [255 if i == 0 else i for i in perm]
    want = torch.from_numpy(images)[perm].float() / 127.5 - 1  # every pixel, exactly
    assert torch.equal(torch.cat(xs), want)
    perm = torch.randperm(22, generator=torch.Generator().manual_seed(4))[:20].tolist()
    assert sum((ids(next(b)) for _ in range(4)), []) == [255 if i == 0 else i for i in perm]

    full = Batches(numbered_images(20), batch=4)
    assert sorted(ids(torch.cat([next(full) for _ in range(5)]))) == list(range(20))
    edge = Batches(np.array([0, 255], np.uint8).reshape(2, 1, 1, 1), batch=2)
    assert sorted(next(edge).flatten().tolist()) == [-1.0, 1.0]


def test_batches_flip() -> None:
    images = np.zeros((64, 1, 4, 4), np.uint8)
    images[:, :, :, 0] = 255  # a bright left column
    b = Batches(images, batch=64, flip=True, seed=0)
    torch.manual_seed(0)
    x = next(b)
    left = (x[:, 0, :, 0] == 1).all(dim=1)
    right = (x[:, 0, :, 3] == 1).all(dim=1)
    assert (left ^ right).all()  # each image is either itself or its exact mirror
    assert 16 < int(right.sum()) < 48  # about half flipped
    plain = next(Batches(images, batch=64))
    assert (plain[:, 0, :, 0] == 1).all()


def test_batches_two_ranks_are_disjoint() -> None:
    images = numbered_images(40)
    r0 = Batches(images, batch=4, seed=5, rank=0, world_size=2)
    r1 = Batches(images, batch=4, seed=5, rank=1, world_size=2)
    assert r0.batches_per_epoch == r1.batches_per_epoch == 5
    for _ in range(2):  # two epochs
        a = sum((ids(next(r0)) for _ in range(5)), [])
        c = sum((ids(next(r1)) for _ in range(5)), [])
        assert not set(a) & set(c) and sorted(a + c) == list(range(40))
    odd = [Batches(numbered_images(41), batch=4, rank=r, world_size=2) for r in (0, 1)]
    assert odd[0].batches_per_epoch == odd[1].batches_per_epoch  # same step count per rank


def get_rng(device: str) -> torch.Tensor:
    return torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state()


def set_rng(device: str, state: torch.Tensor) -> None:
    if device == "cuda":
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)


@pytest.mark.parametrize("device", DEVICES)
def test_batches_resume_is_exact(device: str) -> None:
    images = np.random.default_rng(0).integers(0, 256, (30, 3, 8, 8), dtype=np.uint8)
    torch.manual_seed(123)
    stream = Batches(images, batch=4, device=device, flip=True, seed=9)
    assert stream.images.device.type == device and stream.images.dtype == torch.uint8
    for _ in range(9):  # 7 batches per epoch: stop inside epoch 1
        next(stream)
    state, rng = stream.state_dict(), get_rng(device)
    assert state == {"epoch": 1, "position": 2}
    expected = [next(stream) for _ in range(10)]  # crosses into epoch 2
    assert expected[0].device.type == device

    torch.manual_seed(999)  # a fresh process: different RNG until restored
    resumed = Batches(images, batch=4, device=device, flip=True, seed=9)
    resumed.load_state_dict(state)
    set_rng(device, rng)
    for want in expected:  # bit-identical, flips included
        assert torch.equal(next(resumed), want)
    assert resumed.state_dict() == stream.state_dict()

    with pytest.raises(UserError, match="batches per epoch"):
        resumed.load_state_dict({"epoch": 0, "position": 7})


def test_batches_too_few_images() -> None:
    with pytest.raises(UserError, match=r"10 images .* batch of 8 .* 2 process"):
        Batches(numbered_images(10), batch=8, world_size=2)
    Batches(numbered_images(16), batch=8, world_size=2)  # exactly enough


def test_batches_accept_tensors_and_read_only_arrays() -> None:
    images = numbered_images(8)
    images.flags.writeable = False
    x = next(Batches(images, batch=8))
    y = next(Batches(torch.from_numpy(numbered_images(8)), batch=8))
    assert torch.equal(x, y) and sorted(ids(x)) == list(range(8))
