"""`dcgan bench`: model FLOPs from layer shapes, and a short real run of the table."""

import json

import pytest

from dcgan.bench import run_bench, train_flops_per_image, write_json
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
        assert r.device.startswith("cpu")
        assert r.peak_fraction == pytest.approx(r.tflops, abs=1e-4)
    write_json(rows, tmp_path / "b.json", "dcgan bench --batch 4")
    saved = json.loads((tmp_path / "b.json").read_text())
    required = {"name", "device", "batch", "resolution", "data", "img_per_s", "peak_mem_mb"}
    assert len(saved) == 3 and all(required <= set(row) for row in saved)
