"""The containers big data sets come in: a ZIP of images (stylegan2-ada's dataset_tool),
an LMDB database (LSUN) and Parquet files (the Hugging Face Hub), each written by the
real library, decoded by the store."""

from __future__ import annotations

import io
import json
import pathlib
import zipfile

import lmdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dcgan import sources
from dcgan.data import load_images
from dcgan.errors import UserError

R = 32


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # chunks of 8, so tens of images make several chunks and a pool of 2 has work
    monkeypatch.setattr(sources, "CHUNK_MAX", 8)


def _encoded(n: int, fmt: str, seed: int = 0) -> list[bytes]:
    """n small non-square images of random pixels, encoded by Pillow."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        size = (20 + i % 5, 24)  # non-square: centre-cropped by the decoder
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, fmt)
        out.append(buf.getvalue())
    return out


def _expected(blobs: list[bytes]) -> np.ndarray:
    """Pillow decoding the same bytes, with the project's own crop and resize."""
    return np.stack([sources._load_image_file(io.BytesIO(b), R) for b in blobs])


def _load(path: pathlib.Path, cache: pathlib.Path, workers: int = 1, **kw):
    return load_images(str(path), R, cache_dir=str(cache), progress=False, workers=workers, **kw)


def _zip(
    path: pathlib.Path, blobs: list[bytes], labels: object = None, json_file: bool = True
) -> pathlib.Path:
    """dataset_tool's layout; labels None writes `"labels": null`, json_file=False none."""
    names = [f"{i // 10:05d}/img{i:08d}.png" for i in range(len(blobs))]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for name, b in zip(names[::-1], blobs[::-1], strict=True):  # stored out of order
            z.writestr(name, b)
        if json_file:
            pairs = (
                None
                if labels is None
                else [[n, int(v)] for n, v in zip(names, labels, strict=True)]
            )
            z.writestr("dataset.json", json.dumps({"labels": pairs}))
    return path


def test_zip_pixels_labels_and_workers(tmp_path: pathlib.Path) -> None:
    blobs = _encoded(30, "PNG")
    labels = np.arange(30) % 7
    path = _zip(tmp_path / "set.zip", blobs, labels)
    one = _load(path, tmp_path / "c1")
    np.testing.assert_array_equal(one.images, _expected(blobs))  # sorted member order
    assert one.labels is not None and one.labels.dtype == np.int64
    np.testing.assert_array_equal(one.labels, labels)
    two = _load(path, tmp_path / "c2", workers=2)
    np.testing.assert_array_equal(two.images, one.images)
    np.testing.assert_array_equal(two.labels, one.labels)
    assert one.source == str(path) and one.skipped == 0


def test_zip_null_labels_and_no_json(tmp_path: pathlib.Path) -> None:
    blobs = _encoded(5, "PNG")
    assert _load(_zip(tmp_path / "a.zip", blobs, None), tmp_path / "c").labels is None
    no_json = _zip(tmp_path / "b.zip", blobs, json_file=False)
    assert _load(no_json, tmp_path / "c").labels is None


def test_zip_corrupt_member_skipped_with_its_label(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blobs = _encoded(12, "PNG")
    bad = list(blobs)
    bad[3] = b"not an image at all"
    path = _zip(tmp_path / "set.zip", bad, np.arange(12))
    for workers in (1, 2):
        got = _load(path, tmp_path / f"c{workers}", workers=workers)
        assert got.skipped == 1 and len(got.images) == 11
        np.testing.assert_array_equal(got.images, _expected(blobs[:3] + blobs[4:]))
        np.testing.assert_array_equal(got.labels, [i for i in range(12) if i != 3])
    assert "img00000003.png" in capsys.readouterr().err


def test_zip_crc_damage_is_a_skipped_member(tmp_path: pathlib.Path) -> None:
    blobs = _encoded(4, "PNG")
    path = _zip(tmp_path / "set.zip", blobs)
    raw = bytearray(path.read_bytes())
    at = raw.find(blobs[0][200:216])  # inside a stored member's bytes
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert _load(path, tmp_path / "c").skipped == 1


def test_not_a_zip_is_one_line(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "fake.zip"
    path.write_bytes(b"hello, no zip here")
    with pytest.raises(UserError, match="not a readable ZIP file") as e:
        _load(path, tmp_path / "c")
    assert "\n" not in str(e.value)


def test_unknown_file_kind_is_one_line(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "x.tar"
    path.write_bytes(b"x")
    with pytest.raises(UserError, match="no known kind"):
        _load(path, tmp_path / "c")


def _lmdb(path: pathlib.Path, values: list[bytes]) -> pathlib.Path:
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, v in enumerate(values):
            txn.put(f"{(i * 7919) % 1000:040x}".encode(), v)  # LSUN: hex ids, not in order
    env.close()
    return path


@pytest.mark.parametrize("fmt", ["WEBP", "JPEG", "PNG"])
def test_lmdb_key_order_and_workers(tmp_path: pathlib.Path, fmt: str) -> None:
    blobs = _encoded(20, fmt)
    path = _lmdb(tmp_path / "db", blobs)
    order = sorted(range(20), key=lambda i: f"{(i * 7919) % 1000:040x}")
    one = _load(path, tmp_path / "c1")
    np.testing.assert_array_equal(one.images, _expected([blobs[i] for i in order]))
    assert one.labels is None
    two = _load(path, tmp_path / "c2", workers=2)
    np.testing.assert_array_equal(two.images, one.images)


def test_lmdb_without_images_is_one_line(tmp_path: pathlib.Path) -> None:
    path = _lmdb(tmp_path / "db", [b"metadata %d" % i for i in range(10)])
    with pytest.raises(UserError, match="holds no images") as e:
        _load(path, tmp_path / "c")
    assert "\n" not in str(e.value)
    empty = _lmdb(tmp_path / "empty", [])
    with pytest.raises(UserError, match="holds no entries"):
        _load(empty, tmp_path / "c")


def _table(blobs: list[bytes], labels: list[int] | None = None) -> pa.Table:
    image = pa.array(
        [{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(blobs)],
        pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    columns = {"image": image}
    if labels is not None:
        columns["label"] = pa.array(labels, pa.int64())
    return pa.table(columns)


def test_parquet_file_and_folder(tmp_path: pathlib.Path) -> None:
    blobs = _encoded(25, "JPEG") + _encoded(10, "WEBP", seed=1)
    labels = [i % 3 for i in range(35)]
    single = tmp_path / "one.parquet"
    pq.write_table(_table(blobs, labels), single, row_group_size=7)
    got = _load(single, tmp_path / "c1")
    np.testing.assert_array_equal(got.images, _expected(blobs))
    np.testing.assert_array_equal(got.labels, labels)
    # a folder of the Hub's files: sorted by name, split by their prefix
    folder = tmp_path / "data"
    folder.mkdir()
    pq.write_table(_table(blobs[20:], labels[20:]), folder / "train-00001-of-00002.parquet")
    pq.write_table(_table(blobs[:20], labels[:20]), folder / "train-00000-of-00002.parquet")
    pq.write_table(_table(blobs[:4], [9] * 4), folder / "test-00000-of-00001.parquet")
    whole = _load(folder, tmp_path / "c2", workers=2)
    np.testing.assert_array_equal(whole.images, got.images)
    np.testing.assert_array_equal(whole.labels, labels)
    test = load_images(str(folder), R, split="test", cache_dir=str(tmp_path / "c2"), progress=False)
    np.testing.assert_array_equal(test.labels, [9] * 4)


def test_parquet_null_image_is_skipped(tmp_path: pathlib.Path) -> None:
    blobs = _encoded(6, "PNG")
    image = pa.array(
        [{"bytes": None if i == 2 else b, "path": "x"} for i, b in enumerate(blobs)],
        pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    pq.write_table(pa.table({"image": image, "label": list(range(6))}), tmp_path / "a.parquet")
    got = _load(tmp_path / "a.parquet", tmp_path / "c")
    assert got.skipped == 1
    np.testing.assert_array_equal(got.labels, [0, 1, 3, 4, 5])


def test_parquet_bad_inputs_are_one_line(tmp_path: pathlib.Path) -> None:
    pq.write_table(pa.table({"text": ["a", "b"], "label": [0, 1]}), tmp_path / "t.parquet")
    with pytest.raises(UserError, match="no image column"):
        _load(tmp_path / "t.parquet", tmp_path / "c")
    junk = pa.array([{"bytes": b"junk %d" % i, "path": "x"} for i in range(5)])
    pq.write_table(pa.table({"image": junk}), tmp_path / "j.parquet")
    with pytest.raises(UserError, match="holds no images"):
        _load(tmp_path / "j.parquet", tmp_path / "c")
    (tmp_path / "n.parquet").write_bytes(b"not parquet")
    with pytest.raises(UserError, match="cannot be read") as e:
        _load(tmp_path / "n.parquet", tmp_path / "c")
    assert "\n" not in str(e.value)


def test_max_images(tmp_path: pathlib.Path) -> None:
    blobs = _encoded(12, "PNG")
    path = _zip(tmp_path / "set.zip", blobs, np.arange(12))
    whole = _load(path, tmp_path / "c")
    cut = _load(path, tmp_path / "c", max_images=5)
    np.testing.assert_array_equal(cut.images, whole.images[:5])
    np.testing.assert_array_equal(cut.labels, np.arange(5))
    assert cut.path != whole.path and pathlib.Path(whole.path).exists()
    assert len(_load(path, tmp_path / "c", max_images=5).images) == 5  # from the cache
    fake = load_images("fake", R, progress=False, max_images=3, cache_dir=str(tmp_path / "c"))
    assert len(fake.images) == 3
    with pytest.raises(UserError, match="max-images"):
        _load(path, tmp_path / "c", max_images=-1)
