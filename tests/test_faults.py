"""Faults a long run meets: SIGKILL at any moment, SIGTERM, a dying rank under torchrun, a
failed disk write, and random command lines and random bytes from a user."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dcgan import checkpoint, rundir
from dcgan.checkpoint import load_state
from dcgan.cli import main
from dcgan.errors import UserError

TINY = [
    "--dataset",
    "fake",
    "--resolution",
    "32",
    "--channels",
    "1",
    "--ngf",
    "8",
    "--ndf",
    "8",
    "--nz",
    "16",
    "--batch",
    "16",
    "--tick-kimg",
    "0.016",
    "--checkpoint-ticks",
    "1",
    "--precision",
    "fp32",
    "--channels-last",
    "on",
    "--quiet",
]


def env_for(tmp_path, **extra):
    return {**os.environ, "DCGAN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", **extra}


def start(tmp_path, *args):
    return subprocess.Popen(
        [sys.executable, "-m", "dcgan", "train", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env_for(tmp_path),
        cwd=tmp_path,
    )


def wait_for(path, proc, timeout=120.0):
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


def stats_kimg(run):
    return [json.loads(x)["kimg"] for x in (run / "stats.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sigkill_at_random_moments_then_sigterm_and_sigint(tmp_path):
    """Kill a real training process with SIGKILL at random points (a checkpoint is written
    every tick, so kills land inside writes too); each resume must load the last complete
    checkpoint and progress never goes backwards. Then SIGTERM and SIGINT: the state is
    saved at the stop and the process exits 0 with the --resume command to run."""
    run, ckpt = tmp_path / "run", tmp_path / "run" / rundir.CHECKPOINT
    rng = random.Random(7)
    seen = 0
    for attempt, sig in enumerate((signal.SIGKILL, signal.SIGKILL, signal.SIGTERM, signal.SIGINT)):
        args = ["--resume", run] if attempt else [*TINY, "--kimg", "1000", "--out", run]
        proc = start(tmp_path, *args)
        if attempt:  # the resumed process is past its start-up once it writes a new tick
            n_lines = len(stats_kimg(run))
            t0 = time.monotonic()
            while len(stats_kimg(run)) <= n_lines:
                assert proc.poll() is None, proc.communicate()[1][-2000:]
                assert time.monotonic() - t0 < 180, "no progress after resume"
                time.sleep(0.05)
        else:
            wait_for(ckpt, proc)
        time.sleep(rng.uniform(0.2, 1.5))
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=180)
        if sig == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL
        else:
            assert proc.returncode == 0, err[-2000:]
            assert "stopped early; continue with --resume" in err
        state = load_state(ckpt)  # whole and verified, never half-written
        assert state["nimg"] >= seen
        seen = state["nimg"]
        last = round(stats_kimg(run)[-1] * 1000)
        if sig == signal.SIGKILL:
            # loses at most --checkpoint-ticks (1) tick of 16 images: a kill between a
            # tick's stats line and its checkpoint leaves the stats one tick ahead
            assert 0 <= last - seen <= 16, (last, seen)
        else:  # saved at the stop: stats end exactly there
            assert last == seen
    kimg = stats_kimg(run)
    # contiguous: lines from after a checkpoint were dropped on resume, none repeated or lost
    assert kimg == [round(0.016 * t, 3) for t in range(1, len(kimg) + 1)]
    assert not list(run.glob(".*.tmp"))  # temporaries of killed writes were swept


def test_killed_before_its_first_checkpoint_resumes_or_restarts(tmp_path):
    """The default --checkpoint-ticks (5): a run killed after its first tick but before
    its first checkpoint holds stats.jsonl and no checkpoint.pt. `--resume` starts it
    again from its own config, and so does the same command without --force."""
    tiny = [a for a in TINY]
    i = tiny.index("--checkpoint-ticks")
    del tiny[i : i + 2]  # the default interval
    for k in range(2):
        run = tmp_path / f"run{k}"
        again = [["--resume", run, "--kimg", "0.16"], [*tiny, "--kimg", "0.16", "--out", run]][k]
        proc = start(tmp_path, *tiny, "--kimg", "50", "--out", run)
        wait_for(run / "stats.jsonl", proc)
        proc.kill()
        proc.communicate(timeout=60)
        assert not (run / rundir.CHECKPOINT).exists()  # killed in its first ticks
        done = subprocess.run(
            [sys.executable, "-m", "dcgan", "train", *map(str, again)],
            capture_output=True,
            text=True,
            env=env_for(tmp_path),
            cwd=tmp_path,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert load_state(run / rundir.CHECKPOINT)["nimg"] == 160
        assert stats_kimg(run) == [round(0.016 * t, 3) for t in range(1, 11)]  # one run


def test_a_second_process_on_one_run_folder_is_refused_and_a_stale_lock_taken_over(tmp_path):
    run = tmp_path / "run"
    first = start(tmp_path, *TINY, "--kimg", "50", "--out", run)
    wait_for(run / "stats.jsonl", first)
    second = subprocess.run(
        [sys.executable, "-m", "dcgan", "train", "--resume", str(run), "--kimg", "0.032"],
        capture_output=True,
        text=True,
        env=env_for(tmp_path),
        cwd=tmp_path,
        timeout=120,
    )
    assert second.returncode == 2, second.stderr
    assert second.stderr.count("\n") == 1
    assert second.stderr.startswith(
        f"dcgan: error: {run} is in use by another dcgan process (pid {first.pid})"
    )
    first.kill()  # its lock stays behind, naming a dead pid
    first.communicate(timeout=60)
    assert (run / ".lock").read_text().split()[0] == str(first.pid)
    third = subprocess.run(
        [sys.executable, "-m", "dcgan", "train", "--resume", str(run), "--kimg", "0.064"],
        capture_output=True,
        text=True,
        env=env_for(tmp_path),
        cwd=tmp_path,
        timeout=300,
    )
    assert third.returncode == 0, third.stderr[-2000:]
    assert not (run / ".lock").exists()  # released at the end


def test_force_removes_everything_of_the_old_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    old = [
        "stats.jsonl",
        "events.jsonl",
        "metrics.jsonl",
        "losses.png",
        rundir.CHECKPOINT,
        rundir.SNAPSHOT,
        rundir.BEST,
        "config.json",
    ]
    for name in old:
        (run / name).write_text("old")
    (run / "samples").mkdir()
    (run / "samples" / "fakes000000016.png").write_text("old")
    with pytest.raises(UserError, match="already holds a run"):
        rundir.RunDir(run).begin(force=False)
    rundir.RunDir(run).begin(force=True)
    assert sorted(p.name for p in run.iterdir()) == []  # the loop writes the new config


# A real full disk: after a first checkpoint the subprocess lowers its own file-size limit
# (RLIMIT_FSIZE, SIGXFSZ ignored so the write fails with EFBIG instead of killing it) and
# resumes; the next write that grows past the limit fails inside torch.save (which raises
# RuntimeError) or inside safetensors, as on a disk that filled up.
FULL_DISK = """
import resource, signal, sys
from pathlib import Path
from dcgan.cli import main
run, which = Path(sys.argv[1]), sys.argv[2]
args = {tiny!r}
assert main(["train", *args, "--kimg", "0.032", "--out", str(run)]) == 0
ckpt, snap = (run / "checkpoint.pt").stat().st_size, (run / "generator.safetensors").stat().st_size
small = max(p.stat().st_size for p in run.rglob("*") if p.suffix in (".png", ".jsonl", ".json"))
assert small < snap < ckpt, (small, snap, ckpt)
limit = (snap + ckpt) // 2 if which == "checkpoint" else (small + snap) // 2
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.exit(main(["train", "--resume", str(run), "--kimg", "0.064", "--quiet"]))
"""


@pytest.mark.parametrize("which", ["checkpoint", "snapshot"])
def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so_in_one_line(tmp_path, which):
    run = tmp_path / "run"
    tiny = [a for a in TINY if a not in ()]
    tiny[tiny.index("--ngf") + 1] = tiny[tiny.index("--ndf") + 1] = "32"  # G bigger than a PNG
    proc = subprocess.run(
        [sys.executable, "-c", FULL_DISK.format(tiny=tiny), str(run), which],
        capture_output=True,
        text=True,
        env=env_for(tmp_path),
        cwd=tmp_path,
        timeout=300,
    )
    name = rundir.CHECKPOINT if which == "checkpoint" else rundir.SNAPSHOT
    last = proc.stderr.rstrip("\n").split("\n")[-1]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert last.startswith(f"dcgan: error: cannot write {run / name}: "), last
    assert last.endswith("the previous file is unchanged"), last
    assert not list(run.glob(".*.tmp"))  # the temporary file was removed
    # the checkpoint of the first run is whole and still the one at 32 images
    state = load_state(run / rundir.CHECKPOINT)
    assert state["nimg"] == 32
    checkpoint.load_generator(run)


def test_unwritable_output_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = main(["train", *TINY, "--kimg", "0.016", "--out", str(blocker / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("dcgan: error:") and err.count("\n") == 1


# -- random input: work or one line, never a traceback ---------------------------------------

WORDS = [
    "train",
    "sample",
    "eval",
    "export",
    "transfer",
    "data",
    "info",
    "bench",
    "--preset",
    "fmnist32",
    "dcgan64",
    "--batch",
    "--lr",
    "--kimg",
    "--resolution",
    "--nz",
    "--seed",
    "--dataset",
    "--d-steps",
    "--label-smoothing",
    "--precision",
    "--on-nan",
    "--resume",
    "--out",
    "--n",
    "--format",
    "--metrics",
    "--features",
    "--truncation",
    "0",
    "-1",
    "1e-4",
    "nan",
    "inf",
    "abc",
    "64",
    "48",
    "/nonexistent",
    "bf16",
    "fp8",
    "",
]


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.lists(st.sampled_from(WORDS) | st.text(max_size=8), max_size=6))
def test_random_command_lines_never_traceback(tmp_path, capsys, argv):
    # no command may start real work: training only as a dry run, no benchmarks, and
    # `info` with fixed settings (its calibration of each model shape is tested apart)
    if "train" in argv:
        argv = [*argv, "--dry-run"]
    if "bench" in argv:
        argv = [a for a in argv if a != "bench"]
    if argv[:1] == ["info"]:
        argv = [*argv, "--precision", "fp32", "--channels-last", "on"]
    os.environ["DCGAN_CACHE"] = str(tmp_path / "cache")
    try:
        code = main(argv)
    except SystemExit as e:  # argparse: usage line + one error line, status 2 (0 for --help)
        code = e.code
    err = capsys.readouterr().err
    assert code in (0, 2), (argv, err)
    assert "Traceback" not in err, (argv, err)
    if code == 2 and err.startswith("dcgan: error:"):
        assert err.count("\n") == 1, (argv, err)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(st.binary(max_size=300), min_size=1, max_size=4),
    st.sampled_from([".png", ".jpg", ".gif", ".webp", ".bmp"]),
)
def test_random_bytes_as_images_never_traceback(tmp_path_factory, capsys, blobs, ext):
    root = tmp_path_factory.mktemp("junk")
    for i, blob in enumerate(blobs):
        (root / f"{i}{ext}").write_bytes(blob)
    os.environ["DCGAN_CACHE"] = str(root / "cache")
    code = main(["data", "info", str(root), "--resolution", "32"])
    err = capsys.readouterr().err  # the progress bar's \r-lines, then the error line
    assert code == 2 and "Traceback" not in err, err
    assert err.endswith("\n") and err.count("dcgan: error:") == 1, err
    assert err.rstrip("\n").split("\n")[-1].split("\r")[-1].startswith("dcgan: error:"), err
    # random bytes as a checkpoint or a snapshot are refused the same way
    run = root / "run"
    run.mkdir()
    (run / rundir.CHECKPOINT).write_bytes(blobs[0])
    (run / rundir.SNAPSHOT).write_bytes(blobs[-1])
    for argv in (["train", "--resume", str(run)], ["sample", str(run)]):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("dcgan: error:") and err.count("\n") == 1, err
