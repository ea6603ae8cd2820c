"""`dcgan bench`: model FLOPs from layer shapes, a short real run of the table, and
the reference's DataLoader workers kept out of other rows' windows."""

import json
import time

import pytest
import torch

from dcgan.bench.train import (
    _children_cpu_ticks,
    run_bench,
    train_flops_per_image,
    wait_for_idle_workers,
    write_json,
)
from dcgan.machine import device_label
from dcgan.models import Discriminator, Generator

pytestmark = pytest.mark.usefixtures("one_thread")


def test_flops_of_the_canonical_64px_dcgan_match_a_hand_count():
    # multiply-adds written out layer by layer (conv: Cout*Hout*Wout*Cin*k*k,
    # transposed conv: Cin*Hin*Win*Cout*k*k), k = 4
    g_macs = (100 * 1 * 512 * 16 + 512 * 16 * 256 * 16 + 256 * 64 * 128 * 16
              + 128 * 256 * 64 * 16 + 64 * 1024 * 3 * 16)
    d_macs = (64 * 1024 * 3 * 16 + 128 * 256 * 64 * 16 + 256 * 64 * 128 * 16
              + 512 * 16 * 256 * 16 + 1 * 1 * 512 * 16)
    expected = 3 * 2 * g_macs + 8 * 2 * d_macs  # 3 F_G + 8 F_D per image
    assert train_flops_per_image(Generator(100, 64, 3, 64), Discriminator(64, 3, 64),
                                 100) == expected == 2_288_844_800


def test_a_short_bench_gives_one_row_per_switch_and_data_kind(tmp_path, monkeypatch):
    monkeypatch.setenv("DCGAN_CACHE", str(tmp_path / "cache"))
    rows = run_bench("cpu", batches=(4,), resolutions=(32,), data_kinds=("synthetic",),
                     names=("reference", "+channels_last", "default"), warmup=1, windows=2,
                     steps=1, peak_tflops=1.0, progress=False)
    assert [r.name for r in rows] == ["reference", "+channels_last", "default"]
    for r in rows:
        assert r.img_per_s > 0 and r.peak_mem_mb > 0 and r.warmup_s > 0
        assert (r.batch, r.resolution, r.data) == (4, 32, "synthetic")
        assert r.device == device_label(torch.device("cpu"))  # CPU model, ISA, threads
        assert "threads" in r.device and "(" in r.device
        assert r.peak_fraction == pytest.approx(r.tflops, abs=1e-4)
    write_json(rows, tmp_path / "b.json", "dcgan bench --batch 4")
    saved = json.loads((tmp_path / "b.json").read_text())
    required = {"name", "device", "batch", "resolution", "data", "img_per_s", "peak_mem_mb"}
    assert len(saved) == 3 and all(required <= set(row) for row in saved)


class _Busy(torch.utils.data.Dataset):
    """Each item burns ~30 ms of CPU, as decoding a PNG does."""

    def __len__(self):
        return 64

    def __getitem__(self, i):
        t = time.process_time()
        while time.process_time() - t < 0.03:
            pass
        return torch.zeros(1)


def test_reference_waits_until_its_loader_workers_stop_prefetching():
    """After a batch is taken the workers refill their queue (here 2 workers x 2 batches
    of 4 items, ~0.1 s each); once `wait_for_idle_workers` returns they use no more CPU,
    so none of their work spills into the next row's timed window."""
    loader = torch.utils.data.DataLoader(_Busy(), batch_size=4, num_workers=2,
                                         persistent_workers=True)
    it = iter(loader)
    next(it)
    wait_for_idle_workers()
    before = _children_cpu_ticks()
    time.sleep(0.3)
    assert before is not None and _children_cpu_ticks() == before
    del it, loader
