"""The command line: end to end through subprocesses as a user runs it (`python -m dcgan`),
and the quick checks in-process through `dcgan.cli.main` (each subprocess pays torch's
import, tens of seconds on a loaded 2-core machine)."""

import json
import os
import subprocess
import sys

import pytest

from dcgan.cli import main


def run_main(capsys, monkeypatch, tmp_path, *args):
    monkeypatch.setenv("DCGAN_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


TINY = [
    "--dataset",
    "fake",
    "--resolution",
    "32",
    "--channels",
    "3",
    "--ngf",
    "8",
    "--ndf",
    "8",
    "--nz",
    "16",
    "--batch",
    "16",
    "--tick-kimg",
    "0.032",
    "--precision",
    "fp32",
    "--channels-last",
    "on",
]


def dcgan(*args, cwd=None, env_extra=None):
    env = {**os.environ, "DCGAN_CACHE": str(cwd / "cache") if cwd else "", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "dcgan", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


@pytest.mark.slow
def test_train_resume_sample_end_to_end(tmp_path, capsys, monkeypatch):
    """The first run goes through `python -m dcgan` as a user's would; the resume and
    the sampling then run in-process on its folder (the same code, minus one torch
    import each)."""
    out = tmp_path / "run"
    r = dcgan("train", *TINY, "--kimg", "0.032", "--out", out, "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "generator.safetensors" in r.stderr  # tells the user where things went
    for name in (
        "config.json",
        "stats.jsonl",
        "losses.png",
        "generator.safetensors",
        "checkpoint.pt",
    ):
        assert (out / name).is_file(), name
    code, _, err = run_main(
        capsys, monkeypatch, tmp_path, "train", "--resume", out, "--kimg", "0.064", "--quiet"
    )
    assert code == 0, err
    kimgs = [json.loads(x)["kimg"] for x in (out / "stats.jsonl").read_text().splitlines()]
    assert kimgs == [0.032, 0.064]
    code, _, err = run_main(
        capsys,
        monkeypatch,
        tmp_path,
        "sample",
        out,
        "--n",
        "16",
        "--seed",
        "3",
        "--out",
        tmp_path / "grid.png",
    )
    assert code == 0, err
    from PIL import Image

    # 4 x 4 images of 32 px with 2 px padding
    assert Image.open(tmp_path / "grid.png").size == (4 * 34 + 2, 4 * 34 + 2)


def test_dry_run_prints_resolved_config(tmp_path, capsys, monkeypatch):
    code, out, err = run_main(
        capsys,
        monkeypatch,
        tmp_path,
        "train",
        "--preset",
        "dcgan64",
        "--lr",
        "1e-4",
        "--d-steps",
        "2",
        "--dry-run",
    )
    assert code == 0, err
    cfg = json.loads(out)
    assert cfg["train"]["g_lr"] == cfg["train"]["d_lr"] == 1e-4
    assert cfg["train"]["d_steps"] == 2 and cfg["data"]["resolution"] == 64


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--batch", "0", "--dry-run"], "batch must be >= 1"),
        (["train", "--resolution", "48", "--dry-run"], "resolution must be one of"),
        (["train", "--preset", "huge", "--dry-run"], "unknown preset"),
        (["train", "--batch", "lots", "--dry-run"], "batch expects int"),
        (["train", "--resume", "/nonexistent"], "not a run folder"),
        (["train", "--dataset", "/nonexistent/folder", "--quiet"], "/nonexistent/folder"),
        (["sample", "/nonexistent"], "no generator snapshot"),
    ],
)
def test_user_mistakes_give_one_line(tmp_path, capsys, monkeypatch, args, message):
    code, _, err = run_main(capsys, monkeypatch, tmp_path, *args)
    assert code == 2
    assert message in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2  # "run folder: ..." may precede the error


def test_a_mistake_through_python_m_dcgan(tmp_path):
    r = dcgan("train", "--batch", "0", "--dry-run", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr == "dcgan: error: config: batch must be >= 1, got 0\n"


def test_data_info(tmp_path, capsys, monkeypatch):
    code, out, err = run_main(
        capsys,
        monkeypatch,
        tmp_path,
        "data",
        "info",
        "fake",
        "--resolution",
        "32",
        "--preview",
        tmp_path / "p.png",
    )
    assert code == 0, err
    assert "images:" in out and "3 x 32 x 32" in out
    assert (tmp_path / "p.png").is_file()


# -- one line, never a traceback: each user mistake of the issue list ------------------------


def _one_line(argv, capsys, match):
    from dcgan.cli import main

    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, (argv, err)
    assert "Traceback" not in err and err.count("\n") == 1, (argv, err)
    assert err.startswith("dcgan: error:") and match in err, (argv, err)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["transfer", "{run}", "--labels", "abc"], "'abc' is neither a number"),
        (["transfer", "{run}", "--labels", "ALL"], "'ALL' is neither a number"),
        (["train", "--kimg", "inf", "--dry-run"], "kimg expects a finite number"),
        (["train", "--kimg", "nan", "--dry-run"], "kimg expects a finite number"),
        (["train", "--device", "gpu", "--dry-run"], "device must be auto, cpu, cuda or cuda:N"),
        (["train", "--device", "cudaX", "--dry-run"], "device must be auto, cpu, cuda or cuda:N"),
        (["sample", "{run}", "--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N"),
        (["eval", "{run}", "fashion-mnist:test", "--device", "cudaX"], "--device must be"),
        (["transfer", "{run}", "--device", "gpu"], "--device must be"),
        (["bench", "--device", "gpu"], "--device must be"),
        (["sample", "{run}", "--out", "{tmp}/grid"], "give an image file name ending in .png"),
        (["data", "info", "fake", "--preview", "{tmp}/p"], "give an image file name"),
        (["eval", "{run}", "fashion-mnist:test", "--json", "{tmp}"], "is a folder"),
        (
            ["eval", "{run}", "fashion-mnist:test", "--json", "{tmp}/file.txt/x.json"],
            "cannot create the folder",
        ),
        (["bench", "--windows", "0"], "--windows must be >= 1, got 0"),
        (["bench", "--engine", "--denoise-epochs", "-1"], "--denoise-epochs must be >= 0"),
    ],
)
def test_user_mistakes_end_in_one_line(tmp_path, capsys, argv, match):
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "file.txt").write_text("not a folder")
    argv = [a.replace("{run}", str(run)).replace("{tmp}", str(tmp_path)) for a in argv]
    _one_line(argv, capsys, match)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--dry-run"],
        ["sample", "{run}"],
        ["eval", "{run}", "fashion-mnist:test"],
        ["transfer", "{run}"],
        ["bench"],
        ["info"],
    ],
)
def test_device_cuda_without_cuda_is_one_line_for_every_subcommand(tmp_path, capsys, argv):
    run = tmp_path / "run"
    run.mkdir()
    argv = [a.replace("{run}", str(run)) for a in argv] + ["--device", "cuda"]
    _one_line(argv, capsys, "CUDA is not available")


def test_a_snapshot_with_the_wrong_keys_or_metadata_is_one_line(tmp_path, capsys):
    import json as json_

    import torch
    from safetensors.torch import save_file

    wrong_keys = tmp_path / "wrong-keys.safetensors"
    meta = {
        "nz": 16,
        "ngf": 8,
        "nc": 1,
        "resolution": 32,
        "g_dropout": 0.0,
        "kimg": 0.0,
        "dataset": "fake",
    }
    save_file({"w": torch.zeros(2)}, wrong_keys, metadata={"dcgan": json_.dumps(meta)})
    _one_line(
        ["sample", wrong_keys, "--out", tmp_path / "s.png"],
        capsys,
        "does not hold a dcgan generator",
    )
    no_nz = tmp_path / "no-nz.safetensors"
    save_file(
        {"w": torch.zeros(2)},
        no_nz,
        metadata={"dcgan": json_.dumps({k: v for k, v in meta.items() if k != "nz"})},
    )
    _one_line(
        ["sample", no_nz, "--out", tmp_path / "s.png"],
        capsys,
        "metadata nz must be a positive integer",
    )
