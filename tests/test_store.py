"""Tests for the store at scale (dcgan.data): the .npy mapped read-only with its .json,
conversion in chunks over processes, resume after a crash, one converter per file."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from dcgan import data, sources
from dcgan.cli import main
from dcgan.data import ImagesKey, StoreFiles, load_images
from dcgan.errors import UserError
from dcgan.sampler import Batches

ROOT = Path(__file__).resolve().parents[1]
DECODE = sources._load_image_file  # the real decoder, whatever a test patches in


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own cache folder; nothing touches ~/.cache."""
    root = tmp_path / "cache"
    monkeypatch.setenv("DCGAN_CACHE", str(root))
    return root


def photo(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    """A smooth gradient plus noise: JPEG sizes like a photo's, not like flat colour."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w)], axis=-1)
    noisy = base + rng.normal(0, 12, (h, w, 3)) + rng.uniform(-60, 60, 3)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def photo_folder(root: Path, n: int, seed: int = 0, bad: tuple[int, ...] = ()) -> Path:
    """n real files written by Pillow, JPEGs and PNGs of several sizes and modes, in two
    sub-folders; the files at the sorted positions in `bad` are unreadable."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        sub = root / ("a" if i % 3 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        name = sub / f"{i:04d}"
        im = photo(rng, 40 + i % 23, 36 + (7 * i) % 31)
        if i % 4 == 0:
            im.save(name.with_suffix(".png"))
        elif i % 4 == 1:
            im.convert("L").save(name.with_suffix(".png"))
        else:
            im.save(name.with_suffix(".jpg"), quality=85)
    files = sources._list_images(root)
    for i in bad:
        files[i].write_bytes(files[i].read_bytes()[:40])  # cut inside its header
    return root


def counting_decoder(monkeypatch: pytest.MonkeyPatch, stop_at: int = -1) -> list[Path]:
    """Record each file decoded in this process; raise KeyboardInterrupt (Ctrl-C) at the
    decode numbered `stop_at`."""
    seen: list[Path] = []

    def decode(path: Path, resolution: int) -> np.ndarray:
        if len(seen) == stop_at:
            raise KeyboardInterrupt
        seen.append(path)
        return DECODE(path, resolution)

    monkeypatch.setattr(sources, "_load_image_file", decode)
    return seen


def store_files(cache: Path) -> StoreFiles:
    """The files of the one key in `cache`, from its .json or .progress.json."""
    (meta,) = [*cache.glob("images-*.json")]
    key = ImagesKey(**json.loads(meta.read_text())["key"]["fields"])
    return StoreFiles.of(cache, key)


# ---- the layout: a .npy mapped read-only, a .json beside it ----------------------------------


def test_layout_map_and_metadata(tmp_path: Path, cache: Path) -> None:
    folder = photo_folder(tmp_path / "photos", 12, bad=(5,))
    s = load_images(str(folder), 32, progress=False)
    assert s.converted and s.skipped == 1 and s.images.shape == (11, 3, 32, 32)
    names = sorted(p.name for p in cache.glob("images-*"))
    assert [n.rsplit(".", 1)[1] for n in names] == ["json", "npy"]  # nothing else left over
    files = store_files(cache)
    assert str(files.array) == s.path
    meta = json.loads(files.meta.read_text())
    assert meta["count"] == 11 and meta["skipped"] == 1 and meta["labels"] is None
    # a plain .npy whose header says what the .json says (shrunk: 12 files, 11 images)
    plain = np.load(files.array)
    assert plain.shape == (11, 3, 32, 32) and plain.dtype == np.uint8
    assert files.array.stat().st_size == 128 + plain.nbytes

    again = load_images(str(folder), 32, progress=False)
    assert not again.converted and isinstance(again.images, np.memmap)
    np.testing.assert_array_equal(again.images, plain)
    before = files.array.read_bytes()
    again.images[:] = 7  # copy-on-write: this process's pages change, never the file
    again.images.flush()
    del again
    assert files.array.read_bytes() == before
    np.testing.assert_array_equal(load_images(str(folder), 32, progress=False).images, plain)


def test_a_map_the_os_will_not_promise_memory_for_is_read_only(tmp_path: Path, monkeypatch) -> None:
    """A private writable map counts against the commit limit: an array larger than
    the OS promises (strict overcommit, or larger than memory) is mapped read-only."""
    folder = photo_folder(tmp_path / "photos", 5)
    want = np.array(load_images(str(folder), 32, progress=False).images)
    real_load = np.load

    def strict(path, mmap_mode=None, **kw):
        if mmap_mode == "c":
            raise OSError(errno.ENOMEM, "Cannot allocate memory")
        return real_load(path, mmap_mode=mmap_mode, **kw)

    monkeypatch.setattr(np, "load", strict)
    s = load_images(str(folder), 32, progress=False)
    assert not s.converted and not s.images.flags.writeable
    np.testing.assert_array_equal(s.images, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = next(Batches(s.images, batch=5, seed=0))  # training takes it all the same
    assert x.shape == (5, 3, 32, 32)


def test_info_on_a_warm_cache_reads_the_header_only(tmp_path: Path, cache: Path, capsys) -> None:
    """A 24 GB array (a sparse file of 2 million 64px images) answers at once: `data info`
    maps the file and reads its header, the .json and the 64 images of the preview."""
    folder = photo_folder(tmp_path / "photos", 3)
    load_images(str(folder), 64, progress=False)
    files = store_files(cache)
    n = 2_000_000
    np.lib.format.open_memmap(files.array, mode="w+", dtype=np.uint8, shape=(n, 3, 64, 64))
    meta = json.loads(files.meta.read_text())
    files.meta.write_text(json.dumps({**meta, "count": n}))
    assert files.array.stat().st_size > 24e9 and files.array.stat().st_blocks * 512 < 1e8

    rss = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    argv = ["data", "info", str(folder), "--resolution", "64", "--preview", str(tmp_path / "p.png")]
    assert main(argv) == 0
    seconds = time.perf_counter() - t0
    out = capsys.readouterr().out
    assert f"images:  {n}\n" in out and f"file:    {files.array}" in out
    assert seconds < 5 and psutil.Process().memory_info().rss - rss < 200e6


def test_torch_and_batches_take_the_map_without_warnings(tmp_path: Path) -> None:
    folder = photo_folder(tmp_path / "photos", 20)
    load_images(str(folder), 32, progress=False)
    s = load_images(str(folder), 32, progress=False)
    assert isinstance(s.images, np.memmap)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns on tensors over read-only memory
        b = Batches(s.images, batch=20, seed=0)
        x = next(b)
        view = torch.from_numpy(s.images)  # zero-copy: the map's pages
    assert view.data_ptr() == s.images.ctypes.data
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0)).tolist()
    want = torch.from_numpy(np.array(s.images))[perm].float() / 127.5 - 1
    assert torch.equal(x, want)


# ---- the same array with any number of processes ------------------------------------------


def test_two_workers_give_the_same_array_bit_for_bit(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setattr(sources, "CHUNK_MAX", 5)  # 13 chunks, spread over both processes
    folder = photo_folder(tmp_path / "photos", 63, bad=(4, 31, 62))
    results = {}
    for workers in (1, 2):
        s = load_images(str(folder), 32, cache_dir=str(tmp_path / f"c{workers}"), workers=workers)
        err = capsys.readouterr().err
        assert f"({workers} process{'es' if workers > 1 else ''})" in err
        results[workers] = (np.array(s.images), s.skipped, err.splitlines()[-1])
    one, two = results[1], results[2]
    assert one[0].shape == (60, 3, 32, 32) and one[1] == two[1] == 3
    assert one[0].tobytes() == two[0].tobytes()
    assert one[2] == two[2] and one[2].startswith("warning: skipped 3 unreadable")
    # and the same as decoding each readable file on its own
    files = [f for i, f in enumerate(sources._list_images(folder)) if i not in (4, 31, 62)]
    for i in (0, 17, 59):
        np.testing.assert_array_equal(one[0][i], sources._load_image_file(files[i], 32))

    gray = load_images(str(folder), 32, channels=1, cache_dir=str(tmp_path / "g"), workers=2)
    luma = [np.asarray(Image.fromarray(x.transpose(1, 2, 0)).convert("L")) for x in one[0]]
    np.testing.assert_array_equal(gray.images[:, 0], np.stack(luma))


def test_workers_argument_is_checked() -> None:
    with pytest.raises(UserError, match="workers must be >= 1"):
        load_images("fake", 32, workers=-1)


# ---- resume ----------------------------------------------------------------------------------


def test_ctrl_c_at_90_percent_resumes_there(tmp_path: Path, cache: Path, monkeypatch, capsys):
    monkeypatch.setattr(sources, "CHUNK_MAX", 4)
    monkeypatch.setattr(data, "COMMIT_EVERY_S", 1e9)  # no record but the one Ctrl-C makes
    folder = photo_folder(tmp_path / "photos", 40, bad=(3, 37))
    want = load_images(str(folder), 32, cache_dir=str(tmp_path / "fresh"), progress=False)

    seen = counting_decoder(monkeypatch, stop_at=36)  # in the 10th chunk, files 36..39
    with pytest.raises(KeyboardInterrupt):
        load_images(str(folder), 32, progress=False, workers=1)
    files = StoreFiles.of(cache, ImagesKey(want.source, want.content, 32, 3, "train"))
    assert not files.array.exists() and not files.lock.exists()
    record = json.loads(files.progress.read_text())
    assert (record["done"], record["written"], record["skipped"]) == (36, 35, 1)
    assert record["first_bad"][0] == str(sources._list_images(folder)[3])
    capsys.readouterr()

    seen.clear()
    s = load_images(str(folder), 32, progress=False, workers=1)
    assert len(seen) == 4  # the last chunk only, not the whole folder again
    assert "resuming after 36" in capsys.readouterr().err
    assert s.skipped == 2 and s.images.tobytes() == want.images.tobytes()
    assert not files.progress.exists() and not files.partial.exists()


_KILLED = """
import os, signal, sys
from dcgan import data, sources
sources.CHUNK_MAX = 4
data.COMMIT_EVERY_S = 0.0
real, calls = sources._load_image_file, []
def decode(path, resolution):
    calls.append(path)
    if len(calls) == {stop}:
        os.kill(os.getpid(), signal.SIGKILL)  # a crash: no finally, no cleanup
    return real(path, resolution)
sources._load_image_file = decode
data.load_images(sys.argv[1], 32, progress=False, workers=1)
"""


def test_a_killed_conversion_resumes_and_its_lock_is_taken_over(
    tmp_path: Path, cache: Path, monkeypatch, capsys
) -> None:
    folder = photo_folder(tmp_path / "photos", 40)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    code = textwrap.dedent(_KILLED).replace("{stop}", "31")
    r = subprocess.run([sys.executable, "-c", code, str(folder)], env=env, cwd=ROOT)
    assert r.returncode == -signal.SIGKILL
    files = store_files_from_progress(cache)
    assert files.lock.exists() and files.partial.exists() and not files.array.exists()
    assert json.loads(files.progress.read_text())["done"] == 28  # chunks of 4: 7 recorded

    monkeypatch.setattr(sources, "CHUNK_MAX", 4)
    seen = counting_decoder(monkeypatch)
    s = load_images(str(folder), 32, progress=False, workers=1)
    err = capsys.readouterr().err
    assert "taking over" in err and "(gone)" in err and "resuming after 28" in err
    assert len(seen) == 12 and not files.lock.exists()
    want = load_images(str(folder), 32, cache_dir=str(tmp_path / "fresh"), progress=False)
    assert s.images.tobytes() == want.images.tobytes()


def store_files_from_progress(cache: Path) -> StoreFiles:
    (progress,) = [*cache.glob("images-*.progress.json")]
    key = ImagesKey(**json.loads(progress.read_text())["key"]["fields"])
    return StoreFiles.of(cache, key)


@pytest.mark.parametrize(
    "damage",
    [
        lambda files: files.progress.write_text("{not json"),
        lambda files: files.progress.write_text(
            json.dumps({**json.loads(files.progress.read_text()), "done": 99, "written": 99})
        ),
        lambda files: files.partial.write_bytes(files.partial.read_bytes()[:300]),
        lambda files: files.partial.unlink(),
    ],
)
def test_a_damaged_record_starts_again(tmp_path, cache, monkeypatch, capsys, damage) -> None:
    monkeypatch.setattr(sources, "CHUNK_MAX", 4)
    monkeypatch.setattr(data, "COMMIT_EVERY_S", 0.0)
    folder = photo_folder(tmp_path / "photos", 16)
    counting_decoder(monkeypatch, stop_at=10)
    with pytest.raises(KeyboardInterrupt):
        load_images(str(folder), 32, progress=False, workers=1)
    damage(store_files_from_progress(cache))
    seen = counting_decoder(monkeypatch)
    s = load_images(str(folder), 32, progress=False, workers=1)
    assert len(seen) == 16 and "resuming" not in capsys.readouterr().err
    want = load_images(str(folder), 32, cache_dir=str(tmp_path / "fresh"), progress=False)
    assert s.images.tobytes() == want.images.tobytes()


# ---- one converter per file ---------------------------------------------------------------


def test_two_processes_at_once_convert_once(tmp_path: Path) -> None:
    """Two `dcgan data info` on a new folder, started together: one converts, the other
    says it waits; both print the same count and write the same preview."""
    folder = photo_folder(tmp_path / "photos", 400, bad=(7,))
    env = {**os.environ, "DCGAN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "dcgan", "data", "info", str(folder), "--resolution", "64"]
    procs = [
        subprocess.Popen(
            [*cmd, "--workers", "1", "--preview", str(tmp_path / f"p{i}.png")],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
        assert "images:  399\n" in out and "skipped: 1\n" in out
    errs = [err for _, err in outs]
    assert sum("converting 400 images" in e for e in errs) == 1, errs
    assert not any("taking over" in e for e in errs), errs
    assert (tmp_path / "p0.png").read_bytes() == (tmp_path / "p1.png").read_bytes()
    mapped = load_images(str(folder), 64, cache_dir=str(tmp_path / "cache"), progress=False)
    fresh = load_images(str(folder), 64, cache_dir=str(tmp_path / "fresh"), progress=False)
    assert not mapped.converted and mapped.images.tobytes() == fresh.images.tobytes()
    assert not list((tmp_path / "cache").glob("images-*.lock"))


def test_a_live_lock_is_waited_for_and_a_dead_one_taken_over(tmp_path, cache, capsys) -> None:
    folder = photo_folder(tmp_path / "photos", 6)
    key_source = sources.resolve(str(folder), "train", cache)
    key = ImagesKey(key_source.key, key_source.slug, 32, 3, "train")
    files = StoreFiles.of(cache, key)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        started = psutil.Process(holder.pid).create_time()
        cache.mkdir(exist_ok=True)
        files.lock.write_text(f"{holder.pid} {socket.gethostname()} {started}\n")
        result = {}
        waiter = threading.Thread(
            target=lambda: result.update(s=load_images(str(folder), 32, progress=False))
        )
        waiter.start()
        t0 = time.monotonic()
        err = ""
        while "waiting for" not in err and time.monotonic() - t0 < 30:
            time.sleep(0.05)
            err += capsys.readouterr().err
        assert f"waiting for pid {holder.pid} to convert {folder}" in err
        time.sleep(0.5)
        assert waiter.is_alive() and not files.array.exists()  # it waits, converting nothing
    finally:
        holder.kill()
        holder.wait()
    waiter.join(60)
    assert not waiter.is_alive() and result["s"].images.shape == (6, 3, 32, 32)
    assert "taking over" in capsys.readouterr().err and not files.lock.exists()


def test_a_lock_naming_a_reused_pid_is_stale(tmp_path, cache, capsys) -> None:
    """Our own pid, with a start time that is not ours: the pid was reused after the
    converter died, so the lock is taken over at once."""
    folder = photo_folder(tmp_path / "photos", 4)
    src = sources.resolve(str(folder), "train", cache)
    files = StoreFiles.of(cache, ImagesKey(src.key, src.slug, 32, 3, "train"))
    cache.mkdir(exist_ok=True)
    files.lock.write_text(f"{os.getpid()} {socket.gethostname()} 12345.0\n")
    t0 = time.monotonic()
    load_images(str(folder), 32, progress=False)
    assert time.monotonic() - t0 < 10 and "taking over" in capsys.readouterr().err


def test_other_local_ranks_leave_local_rank_0_the_first_try(tmp_path, monkeypatch) -> None:
    """Under torchrun a rank other than local rank 0 gives rank 0 RANK0_GRACE_S to take
    the lock; with no rank 0 about (or the file already there) it goes on alone."""
    folder = photo_folder(tmp_path / "photos", 3)
    monkeypatch.setattr(data, "RANK0_GRACE_S", 1.5)
    monkeypatch.setenv("LOCAL_RANK", "1")
    t0 = time.monotonic()
    assert load_images(str(folder), 32, progress=False).converted
    assert time.monotonic() - t0 >= 1.5  # waited for a rank 0 that never came
    t0 = time.monotonic()
    assert not load_images(str(folder), 32, progress=False).converted
    assert time.monotonic() - t0 < 1.0  # a finished file: no wait, no lock
    monkeypatch.setenv("LOCAL_RANK", "0")
    t0 = time.monotonic()
    assert load_images(str(folder), 64, progress=False).converted
    assert time.monotonic() - t0 < 1.5


# ---- older files ------------------------------------------------------------------------------


def test_old_npz_caches_and_other_versions_are_replaced(tmp_path, cache, monkeypatch) -> None:
    folder = photo_folder(tmp_path / "photos", 6)
    first = load_images(str(folder), 32, progress=False)
    files = store_files(cache)
    base = files.array.name[: -len(".npy")]
    # what the format before this one wrote: the same name with .npz, and the name before
    # keys were stored (no digest)
    digest = ImagesKey(first.source, first.content, 32, 3, "train").digest()
    old = [cache / f"{base}.npz", cache / f"{base.replace('-' + digest, '')}.npz"]
    for path in old:
        np.savez(path, images=np.zeros((6, 3, 32, 32), np.uint8), skipped=np.int64(0))
    files.array.unlink()
    # an interrupted conversion of an earlier version of the folder, and one of a version
    # that a live process converts now
    stale = cache / base.replace(first.content, first.content[:-8] + "deadbeef")
    live = cache / base.replace(first.content, first.content[:-8] + "0badf00d")
    for b in (stale, live):
        for ext in (".npy.partial", ".progress.json"):
            Path(str(b) + ext).write_bytes(b"x")
    host = socket.gethostname()
    Path(str(stale) + ".lock").write_text(f"999999999 {host} 1.0\n")  # its process is gone
    Path(str(live) + ".lock").write_text(f"{os.getpid()} {host} {psutil.Process().create_time()}\n")

    load_images(str(folder), 32, progress=False)
    left = sorted(p.name for p in cache.glob("images-*"))
    assert left == sorted(
        [files.array.name, files.meta.name]
        + [Path(str(live) + ext).name for ext in (".lock", ".npy.partial", ".progress.json")]
    )


def test_data_build_converts_ahead_then_says_it_is_built(tmp_path: Path, capsys) -> None:
    folder = photo_folder(tmp_path / "photos", 10, bad=(2,))
    argv = ["data", "build", str(folder), "--resolution", "64", "--channels", "1"]
    assert main([*argv, "--workers", "2"]) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first.startswith("built 9 images (1 x 64 x 64 uint8, 0.0 MB) in ")
    assert " s -> " in first and first.endswith("-64px-1ch-train.npy")
    assert second == "skipped 1 unreadable file(s)"
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("already built: 9 images (1 x 64 x 64 uint8")
    assert main(["data", "build", "fake", "--resolution", "32"]) == 0
    assert "never cached" in capsys.readouterr().out
    assert main([*argv, "--workers", "-2"]) == 2
    assert "workers must be >= 1" in capsys.readouterr().err
