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

TINY = ["--dataset", "fake", "--resolution", "32", "--channels", "3", "--ngf", "8", "--ndf", "8",
        "--nz", "16", "--batch", "16", "--tick-kimg", "0.032", "--precision", "fp32",
        "--channels-last", "on"]


def dcgan(*args, cwd=None, env_extra=None):
    env = {**os.environ, "DCGAN_CACHE": str(cwd / "cache") if cwd else "", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "dcgan", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_train_resume_sample_end_to_end(tmp_path, capsys, monkeypatch):
    """The first run goes through `python -m dcgan` as a user's would; the resume and
    the sampling then run in-process on its folder (the same code, minus one torch
    import each)."""
    out = tmp_path / "run"
    r = dcgan("train", *TINY, "--kimg", "0.032", "--out", out, "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "generator.safetensors" in r.stderr  # tells the user where things went
    for name in ("config.json", "stats.jsonl", "losses.png", "generator.safetensors",
                 "checkpoint.pt"):
        assert (out / name).is_file(), name
    code, _, err = run_main(capsys, monkeypatch, tmp_path, "train", "--resume", out, "--kimg",
                            "0.064", "--quiet")
    assert code == 0, err
    kimgs = [json.loads(x)["kimg"] for x in (out / "stats.jsonl").read_text().splitlines()]
    assert kimgs == [0.032, 0.064]
    code, _, err = run_main(capsys, monkeypatch, tmp_path, "sample", out, "--n", "16", "--seed",
                            "3", "--out", tmp_path / "grid.png")
    assert code == 0, err
    from PIL import Image

    # 4 x 4 images of 32 px with 2 px padding
    assert Image.open(tmp_path / "grid.png").size == (4 * 34 + 2, 4 * 34 + 2)


def test_dry_run_prints_resolved_config(tmp_path, capsys, monkeypatch):
    code, out, err = run_main(capsys, monkeypatch, tmp_path, "train", "--preset", "dcgan64",
                              "--lr", "1e-4", "--d-steps", "2", "--dry-run")
    assert code == 0, err
    cfg = json.loads(out)
    assert cfg["train"]["g_lr"] == cfg["train"]["d_lr"] == 1e-4
    assert cfg["train"]["d_steps"] == 2 and cfg["data"]["resolution"] == 64


@pytest.mark.parametrize("args,message", [
    (["train", "--batch", "0", "--dry-run"], "batch must be >= 1"),
    (["train", "--resolution", "48", "--dry-run"], "resolution must be one of"),
    (["train", "--preset", "huge", "--dry-run"], "unknown preset"),
    (["train", "--batch", "lots", "--dry-run"], "batch expects int"),
    (["train", "--resume", "/nonexistent"], "not a run folder"),
    (["train", "--dataset", "/nonexistent/folder", "--quiet"], "/nonexistent/folder"),
    (["sample", "/nonexistent"], "no generator snapshot"),
])
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
    code, out, err = run_main(capsys, monkeypatch, tmp_path, "data", "info", "fake",
                              "--resolution", "32", "--preview", tmp_path / "p.png")
    assert code == 0, err
    assert "images:" in out and "3 x 32 x 32" in out
    assert (tmp_path / "p.png").is_file()
