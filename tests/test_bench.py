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
    g_macs = (
        100 * 1 * 512 * 16
        + 512 * 16 * 256 * 16
        + 256 * 64 * 128 * 16
        + 128 * 256 * 64 * 16
        + 64 * 1024 * 3 * 16
    )
    d_macs = (
        64 * 1024 * 3 * 16
        + 128 * 256 * 64 * 16
        + 256 * 64 * 128 * 16
        + 512 * 16 * 256 * 16
        + 1 * 1 * 512 * 16
    )
    expected = 3 * 2 * g_macs + 8 * 2 * d_macs  # 3 F_G + 8 F_D per image
    assert (
        train_flops_per_image(Generator(100, 64, 3, 64), Discriminator(64, 3, 64), 100)
        == expected
        == 2_288_844_800
    )


def test_a_short_bench_gives_one_row_per_switch_and_data_kind(tmp_path, monkeypatch):
    monkeypatch.setenv("DCGAN_CACHE", str(tmp_path / "cache"))
    rows = run_bench(
        "cpu",
        batches=(4,),
        resolutions=(32,),
        data_kinds=("synthetic",),
        names=("reference", "+channels_last", "default"),
        warmup=1,
        windows=2,
        steps=1,
        peak_tflops=1.0,
        progress=False,
    )
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
    loader = torch.utils.data.DataLoader(
        _Busy(), batch_size=4, num_workers=2, persistent_workers=True
    )
    it = iter(loader)
    next(it)
    wait_for_idle_workers()
    before = _children_cpu_ticks()
    time.sleep(0.3)
    assert before is not None and _children_cpu_ticks() == before
    del it, loader


# -- the command line: one subcommand per table, the old flags as aliases ---------------------

SUBCOMMANDS = {
    "train": "bench_train",
    "features": "bench_features",
    "generator": "bench_generator",
    "engine": "bench_engine",
}


@pytest.mark.parametrize(
    "argv, mode, alias",
    [
        ([], "train", ""),
        (["--batch", "4", "--profile", "t.json"], "train", ""),
        (["train"], "train", ""),
        (["features"], "features", ""),
        (["--features"], "features", "--features"),
        (["--device", "cpu", "--features", "--batch", "32"], "features", "--features"),
        (["generator"], "generator", ""),
        (["--generator", "--run", "R", "--gen-batch", "1,8"], "generator", "--generator"),
        (["engine"], "engine", ""),
        (["--engine", "--denoise-epochs", "0"], "engine", "--engine"),
    ],
)
def test_each_subcommand_and_each_old_flag_reach_the_same_function(argv, mode, alias):
    from dcgan.bench import cli as bench_cli
    from dcgan.cli import build_parser

    args = build_parser().parse_args(["bench", *argv])
    assert args.func is getattr(bench_cli, SUBCOMMANDS[mode])
    assert (args.bench_command, args.bench_alias) == (mode, alias)
    # the alias and the subcommand parse to the same settings
    same = build_parser().parse_args(["bench", mode, *(a for a in argv if a not in (alias, mode))])
    assert {**vars(same), "bench_alias": alias} == vars(args)


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--denoise-epochs", "0"],
        ["engine", "--profile", "x"],
        ["features", "--data", "real"],
        ["generator", "--windows", "2"],
        ["--engine", "--generator"],
    ],
)
def test_each_subcommand_has_only_its_own_flags(argv, capsys):
    from dcgan.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["bench", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err or "--engine and --generator name different" in err


def test_an_old_flag_runs_its_subcommand_after_a_one_line_note(monkeypatch, capsys):
    from dcgan.bench import features
    from dcgan.cli import main

    calls = []

    def fake_time(device, batch, windows, calls_per_window, progress):
        calls.append((device, batch, windows, calls_per_window, progress))
        return [{"name": "inception", "device": "cpu", "batch": batch, "img_per_s": 1.0}]

    monkeypatch.setattr(features, "time_extractors", fake_time)
    assert main(["bench", "--features", "--batch", "8", "--device", "cpu", "--quiet"]) == 0
    out = capsys.readouterr()
    assert out.err == (
        "dcgan: note: `dcgan bench --features` is deprecated: use `dcgan bench features`\n"
    )
    assert main(["bench", "features", "--batch", "8", "--device", "cpu", "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert calls == [("cpu", 8, 5, 3, False)] * 2
    # a mistake is still one line: checked before the note
    assert main(["bench", "--features", "--windows", "0"]) == 2
    assert capsys.readouterr().err == "dcgan: error: --windows must be >= 1, got 0\n"
