"""dcgan.sampler's two ways of serving batches: the array on the device, or gathered on the
host (from a memory map) and copied ahead by a thread. Same batches, bit for bit."""

import json
import subprocess
import sys
import threading
import tracemalloc

import numpy as np
import pytest
import torch

from dcgan import checkpoint, rundir, sampler
from dcgan.config import from_preset
from dcgan.errors import UserError
from dcgan.sampler import Batches, HostServedBatches, choose, serve
from dcgan.train import training_loop

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_images(n: int, c: int = 3, r: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, c, r, r), dtype=np.uint8)


def rng_state(device: str) -> torch.Tensor:
    return torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state()


def set_rng_state(device: str, state: torch.Tensor) -> None:
    if device == "cuda":
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)


def draw(stream, n: int, device: str, seed: int) -> list[torch.Tensor]:
    """n batches with the flip RNG seeded as a run seeds it."""
    torch.manual_seed(seed)
    return [next(stream) for _ in range(n)]


def prefetch_threads() -> set[threading.Thread]:
    """The prefetch threads alive now (a test compares with those alive at its start)."""
    return {t for t in threading.enumerate() if t.name == sampler.THREAD_NAME}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rank, world_size", [(0, 1), (0, 2), (1, 2)])
def test_host_path_serves_the_device_paths_batches_bit_for_bit(device, rank, world_size):
    images = random_images(43)  # 43 // 2 = 21 per rank: 5 batches of 4, one image dropped
    kw = dict(batch=4, device=device, flip=True, seed=7, rank=rank, world_size=world_size)
    on_device = Batches(images, **kw)
    on_host = HostServedBatches(images, **kw)
    assert on_host.batches_per_epoch == on_device.batches_per_epoch
    n = 3 * on_device.batches_per_epoch + 2  # three epochs and into the fourth
    want = draw(on_device, n, device, seed=1)
    got = draw(on_host, n, device, seed=1)
    for a, b in zip(want, got, strict=True):
        assert b.device == a.device and b.dtype == torch.float32
        assert torch.equal(a, b)
    assert on_host.state_dict() == on_device.state_dict() == {"epoch": 3, "position": 2}
    on_host.close()


def test_the_two_ranks_of_the_host_path_split_each_epoch():
    images = np.repeat(np.arange(40, dtype=np.uint8), 4).reshape(40, 1, 2, 2)
    r0, r1 = (HostServedBatches(images, 4, seed=5, rank=r, world_size=2) for r in (0, 1))
    for _ in range(2):
        a = torch.cat([next(r0) for _ in range(5)])[:, 0, 0, 0]
        b = torch.cat([next(r1) for _ in range(5)])[:, 0, 0, 0]
        ia, ib = (set(torch.round((x + 1) * 127.5).long().tolist()) for x in (a, b))
        assert not ia & ib and ia | ib == set(range(40))
    r0.close()
    r1.close()


@pytest.mark.parametrize("device", DEVICES)
def test_a_host_path_resumed_mid_epoch_continues_the_device_path(device):
    images = random_images(30)
    kw = dict(batch=4, device=device, flip=True, seed=9)  # 7 batches per epoch
    straight = draw(Batches(images, **kw), 20, device, seed=123)

    others = prefetch_threads()
    first = HostServedBatches(images, **kw)
    before = draw(first, 9, device, seed=123)  # stop inside epoch 1
    state, rng = first.state_dict(), rng_state(device)
    assert state == {"epoch": 1, "position": 2}
    first.close()
    torch.manual_seed(999)  # a fresh process: another RNG until restored
    resumed = HostServedBatches(images, **kw)
    resumed.load_state_dict(state)
    set_rng_state(device, rng)
    after = [next(resumed) for _ in range(11)]
    for a, b in zip(straight, before + after, strict=True):
        assert torch.equal(a, b)

    # A rollback loads a state into a stream whose thread has already gathered ahead: the
    # old thread goes, the batches restart from the loaded position.
    set_rng_state(device, rng)
    resumed.load_state_dict(state)
    for a in straight[9:13]:
        assert torch.equal(next(resumed), a)
    assert len(prefetch_threads() - others) == 1
    resumed.close()
    assert prefetch_threads() <= others
    with pytest.raises(UserError, match="batches per epoch"):
        resumed.load_state_dict({"epoch": 0, "position": 7})


def test_the_host_path_reads_a_memory_map_without_copying_it(tmp_path):
    n = 4096  # 4096 x 1 x 32 x 32: 4 MiB, against batches of 16 KiB
    path = tmp_path / "images.npy"
    written = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 1, 32, 32))
    written[:] = random_images(n, 1, 32)
    written.flush()
    del written
    images = np.load(path, mmap_mode="r")  # read-only, as the image store serves it
    assert isinstance(images, np.memmap) and not images.flags.writeable

    tracemalloc.start()
    try:
        stream = HostServedBatches(images, batch=16, flip=True, seed=2)
        got = draw(stream, 10, "cpu", seed=4)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < images.nbytes // 8, peak  # a few batches, never the array

    # Nothing the stream holds is an array or tensor of n rows, but for the map itself.
    held = [*vars(stream).values(), *vars(stream._ahead).values()]
    for value in held:
        if isinstance(value, torch.Tensor):
            assert value.shape[:1] != (n,), value.shape
        if isinstance(value, np.ndarray) and value.shape[:1] == (n,):
            assert value is images
    stream.close()
    # the very batches the device path serves from a copy in memory
    want = draw(Batches(np.array(images), batch=16, flip=True, seed=2), 10, "cpu", seed=4)
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))


def test_auto_keeps_the_array_on_the_device_only_within_the_budget():
    cpu = torch.device("cpu")
    fits = choose("auto", nbytes=10**6, device=cpu, free_bytes=10**9)
    assert fits.on == "device" and "fit" in fits.why
    big = choose("auto", nbytes=10**6, device=cpu, free_bytes=10**6)  # half is the budget
    assert big.on == "host" and "exceed" in big.why
    assert choose("auto", nbytes=500, device=cpu, free_bytes=1000).on == "device"
    assert choose("auto", nbytes=501, device=cpu, free_bytes=1000).on == "host"
    # asked for by name: taken as asked, whatever the budget
    assert choose("device", nbytes=10**9, device=cpu, free_bytes=1).on == "device"
    assert choose("host", nbytes=1, device=cpu, free_bytes=10**9).on == "host"
    assert big.line().startswith("data: served from the host")
    assert big.as_dict() == {"data_on": "host", "data_on_why": big.why}
    with pytest.raises(UserError, match="data_on must be one of auto, device or host"):
        choose("disk", nbytes=1, device=cpu, free_bytes=1)
    # the config field behind --data-on: auto by default, checked against the same list
    assert from_preset("fmnist32").data.data_on == "auto"
    assert from_preset("fmnist32", {"data_on": "host"}).data.data_on == "host"
    with pytest.raises(UserError, match="data_on must be one of auto, device or host, got disk"):
        from_preset("fmnist32", {"data_on": "disk"})
    images = random_images(8)
    assert type(serve(images, 4, cpu, "device")) is Batches
    host = serve(images, 4, cpu, "host")
    assert type(host) is HostServedBatches
    host.close()


def test_the_thread_draws_no_permutation(monkeypatch):
    """A thread that has run a parallel torch op slows every CPU step while it lives (see
    dcgan.sampler): the orders are drawn by the consumer, epoch after epoch."""
    real, callers = torch.randperm, []

    def spy(*args, **kwargs):
        callers.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "randperm", spy)
    stream = HostServedBatches(random_images(12), batch=4)  # 3 batches per epoch
    for _ in range(10):
        next(stream)
    stream.close()
    assert len(callers) == 5  # epochs 0 to 3 served, 4 handed ahead
    assert set(callers) == {threading.current_thread().name}


def test_a_failed_gather_is_raised_by_next(monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("the map's file is gone")

    monkeypatch.setattr(sampler, "gather", broken)
    others = prefetch_threads()
    stream = HostServedBatches(random_images(8), batch=4)
    with pytest.raises(OSError, match="file is gone"):
        next(stream)
    stream.close()
    assert prefetch_threads() <= others


def test_a_dropped_stream_stops_its_thread_and_the_interpreter_exits():
    others = prefetch_threads()
    stream = HostServedBatches(random_images(64), batch=4)
    next(stream)
    assert len(prefetch_threads() - others) == 1
    (thread,) = prefetch_threads() - others
    del stream  # no close(): __del__ stops it
    thread.join(timeout=10)
    assert not thread.is_alive()
    # A process that never closes its stream still exits at once.
    script = (
        "import numpy as np\n"
        "from dcgan.sampler import HostServedBatches\n"
        "s = HostServedBatches(np.zeros((64, 1, 4, 4), np.uint8), batch=4)\n"
        "next(s)\n"
        "print('done')\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "done\n", r.stderr


# ---- training with either path ------------------------------------------------------------

TINY = {
    "dataset": "fake",
    "resolution": 32,
    "channels": 1,
    "ngf": 8,
    "ndf": 8,
    "nz": 16,
    "batch": 16,
    "tick_kimg": 0.032,
    "checkpoint_ticks": 1,
    "precision": "fp32",
    "channels_last": "on",
    "flip": True,
}


def train(out, **overrides):
    cfg = from_preset("fmnist32", {**TINY, **overrides})
    rundir.RunDir(out).begin(force=False)
    return training_loop(cfg, out, progress=False)


def settings(out) -> dict:
    events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
    return next(e for e in events if e["event"] == "settings")


def test_training_from_the_host_ends_with_the_same_weights(tmp_path, capsys):
    others = prefetch_threads()
    train(tmp_path / "device", kimg=0.096, data_on="device")
    train(tmp_path / "host", kimg=0.096, data_on="host")
    a = checkpoint.load_state(tmp_path / "device" / rundir.CHECKPOINT)
    b = checkpoint.load_state(tmp_path / "host" / rundir.CHECKPOINT)
    assert a["nimg"] == b["nimg"] == 96 and a["batches"] == b["batches"]
    for net in ("G", "D", "G_ema"):
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), (net, k)
    assert settings(tmp_path / "device")["data_on"] == "device"
    assert settings(tmp_path / "host")["data_on"] == "host"
    assert "data:" not in capsys.readouterr().err  # asked for by name: nothing to say
    assert prefetch_threads() <= others  # the loop closed its stream

    train(tmp_path / "auto", kimg=0.032)  # the default: auto
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("data:")]
    assert len(line) == 1 and "fit" in line[0]  # the fake set is tiny: on the device
    chosen = settings(tmp_path / "auto")
    assert chosen["data_on"] == "device" and "fit" in chosen["data_on_why"]
