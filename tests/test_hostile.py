"""What a hostile new user does: two processes on one cache file, damaged caches, files
swapped under the same size and time, symlinks at output paths, absurd sizes, a stale lock
of a reused pid, and shared folders that must stay readable to others."""

import json
import multiprocessing
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcgan import atomic, checkpoint, rundir
from dcgan.cli import main
from dcgan.errors import UserError
from dcgan.feature_cache import StatsKey, cached_reference
from dcgan.models import Generator


def _slow_writer(path: str, started: str, go: str) -> None:
    """Child process: start an atomic write, then wait for `go` before finishing it."""

    def writer(tmp: str) -> None:
        Path(tmp).write_bytes(b"A" * 1000)
        Path(started).touch()
        t0 = time.monotonic()
        while not os.path.exists(go) and time.monotonic() - t0 < 60:
            time.sleep(0.01)

    atomic.write(path, writer)


def test_two_processes_writing_one_file_both_succeed(tmp_path):
    """A second writer must not delete the first writer's temporary file: before the
    fix, the first one failed with 'No such file or directory'."""
    target, started, go = (str(tmp_path / n) for n in ("cache.npz", "started", "go"))
    ctx = multiprocessing.get_context("spawn")
    first = ctx.Process(target=_slow_writer, args=(target, started, go))
    first.start()
    t0 = time.monotonic()
    while not os.path.exists(started):
        assert first.is_alive() and time.monotonic() - t0 < 60
        time.sleep(0.01)
    atomic.write_bytes(target, b"B" * 1000)  # the second writer, while the first is mid-write
    Path(go).touch()
    first.join(60)
    assert first.exitcode == 0
    assert Path(target).read_bytes() in (b"A" * 1000, b"B" * 1000)  # whole, one of the two
    assert not list(tmp_path.glob(".cache.npz.*"))  # no temporary left behind


def test_a_dead_writers_temporary_is_removed(tmp_path):
    """What a killed write leaves (a temporary naming a pid that no longer runs) is
    cleaned by the next write; a live process's is not."""
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    stale = tmp_path / f".x.bin.{atomic.HOST}.{dead}.abc123.tmp"
    live = tmp_path / f".x.bin.{atomic.HOST}.{os.getppid()}.def456.tmp"
    stale.write_bytes(b"old")
    live.write_bytes(b"live")
    atomic.write_bytes(tmp_path / "x.bin", b"new")
    assert not stale.exists() and live.exists()


def test_two_data_info_processes_on_a_new_folder_both_succeed(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(300):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    env = {**os.environ, "DCGAN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "dcgan", "data", "info", str(folder), "--resolution", "32"]
    for attempt in range(2):
        procs = [
            subprocess.Popen(
                cmd + ["--preview", str(tmp_path / f"p{attempt}{i}.png")],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]
        outs = [p.communicate(timeout=300) for p in procs]
        for p, (out, err) in zip(procs, outs, strict=True):
            assert p.returncode == 0, err[-1000:]
            assert "images:  300" in out
        for f in (tmp_path / "cache").glob("images-*"):
            f.unlink()  # build again at once on the next attempt


def test_a_truncated_statistics_cache_is_rebuilt_with_a_warning(tmp_path, capsys):
    key = StatsKey("src", "train", 32, 1, 50, "pixels", "abc")
    calls = []

    def compute():
        calls.append(1)
        return np.random.default_rng(0).normal(size=(50, 4)), None

    first = cached_reference(key, compute, tmp_path)
    path = tmp_path / "stats" / key.filename()
    data = path.read_bytes()
    for damaged in (data[: len(data) // 2], data[:10], b"", b"\xff" * 40):
        path.write_bytes(damaged)
        again = cached_reference(key, compute, tmp_path)
        np.testing.assert_array_equal(again.mu, first.mu)
        assert "is damaged" in capsys.readouterr().err
    assert len(calls) == 5
    cached_reference(key, compute, tmp_path)  # rebuilt whole: read, not computed
    assert len(calls) == 5


def test_a_same_size_same_mtime_replacement_changes_the_cache(tmp_path):
    """cp -p, rsync -a and unpacked archives keep size and mtime: the cache must follow
    the bytes, not the file's stat."""
    from dcgan.data import load_images

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, value in enumerate((10, 20, 30)):
        Image.new("RGB", (32, 32), (value, value, value)).save(folder / f"{i}.bmp")
    target = folder / "1.bmp"
    before = load_images(str(folder), 32, cache_dir=str(tmp_path / "cache"), progress=False)
    st = target.stat()
    Image.new("RGB", (32, 32), (200, 200, 200)).save(target)  # BMP: same size
    assert target.stat().st_size == st.st_size
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = load_images(str(folder), 32, cache_dir=str(tmp_path / "cache"), progress=False)
    assert before.content != after.content
    assert sorted(after.images[:, 0, 0, 0].tolist()) == [10, 30, 200]


def _tiny_snapshot(path: Path, **meta_changes) -> None:
    g = Generator(8, 8, 1, 32)
    meta = {
        "nz": 8,
        "ngf": 8,
        "nc": 1,
        "resolution": 32,
        "g_dropout": 0.0,
        "kimg": 1.0,
        "dataset": "fake",
        **meta_changes,
    }
    checkpoint.save_generator(g, meta, path)


def test_sample_replaces_an_output_symlink_instead_of_following_it(tmp_path, capsys):
    _tiny_snapshot(tmp_path / "g.safetensors")
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"precious")
    link = tmp_path / "out.png"
    link.symlink_to(victim)
    assert (
        main(
            [
                "sample",
                str(tmp_path / "g.safetensors"),
                "--n",
                "4",
                "--out",
                str(link),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert victim.read_bytes() == b"precious"
    assert not link.is_symlink() and Image.open(link).size[0] > 0
    preview = tmp_path / "preview.png"
    preview.symlink_to(victim)
    assert main(["data", "info", "fake", "--preview", str(preview)]) == 0
    assert victim.read_bytes() == b"precious" and not preview.is_symlink()


def test_snapshots_are_readable_by_others_under_umask_022(tmp_path):
    old = os.umask(0o022)
    try:
        _tiny_snapshot(tmp_path / "g.safetensors")
        checkpoint.save_state_dict(torch.nn.Linear(2, 2), tmp_path / "d.safetensors")
    finally:
        os.umask(old)
    for name in ("g.safetensors", "d.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def one_line_error(capsys, argv) -> str:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, (argv, err)
    assert "Traceback" not in err and err.startswith("dcgan: error:"), (argv, err)
    assert err.count("\n") == 1, (argv, err)
    return err


@pytest.mark.parametrize(
    "content", [b'{"train": {"kimg": 1', b"\xff\xfe{}", b"[1, 2]", b"", b'{"train": []}', b'"text"']
)
def test_a_damaged_config_file_is_one_line(tmp_path, capsys, content):
    cfg = tmp_path / "config.json"
    cfg.write_bytes(content)
    one_line_error(capsys, ["train", "--config", cfg, "--dry-run"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_bytes(content)
    one_line_error(capsys, ["train", "--resume", run, "--dry-run"])


@pytest.mark.parametrize("line", ["[]", "{}", '{"kimg": "x"}', "3", '{"kimg": null}'])
def test_a_damaged_stats_line_is_skipped_by_report(tmp_path, capsys, line):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"train": {"kimg": 1.0}}))
    (run / "stats.jsonl").write_text(
        json.dumps({"kimg": 0.5, "loss_d": 1.0, "loss_g": 1.0, "d_real": 0.5, "d_fake": 0.5})
        + "\n"
        + line
        + "\n"
    )
    assert main(["report", str(run)]) == 0, capsys.readouterr().err
    assert "Traceback" not in capsys.readouterr().err


def _limited(argv: list, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run dcgan in a child whose address space is capped at 8 GB: a size check that
    regresses fails the test instead of filling the machine."""
    import resource

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))

    return subprocess.run(
        [sys.executable, "-m", "dcgan", *map(str, argv)],
        capture_output=True,
        text=True,
        preexec_fn=cap,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "DCGAN_CACHE": str(tmp_path / "cache")},
    )


def test_absurd_sizes_are_one_line(tmp_path):
    _tiny_snapshot(tmp_path / "g.safetensors")
    base = [
        "train",
        "--dataset",
        "fake",
        "--quiet",
        "--out",
        tmp_path / "run",
        "--precision",
        "fp32",
        "--channels-last",
        "off",
        "--device",
        "cpu",
    ]
    for argv in (
        [
            "sample",
            tmp_path / "g.safetensors",
            "--n",
            100_000_000,
            "--out",
            tmp_path / "s.png",
            "--device",
            "cpu",
        ],
        [*base, "--batch", 100_000_000],
        [*base, "--ngf", 100_000, "--force"],
    ):
        proc = _limited(argv, tmp_path)
        assert proc.returncode == 2, (argv, proc.stderr[-1500:])
        assert proc.stderr.startswith("dcgan: error:") and proc.stderr.count("\n") == 1, (
            argv,
            proc.stderr[-1500:],
        )
        assert "GB" in proc.stderr, proc.stderr


@pytest.mark.parametrize("value", ['"8"', "8.5", "true", "null", "-3", "[8]", '{"a": 8}'])
def test_snapshot_metadata_of_the_wrong_type_is_one_line(tmp_path, capsys, value):
    _tiny_snapshot(tmp_path / "g.safetensors", nz=json.loads(value))
    one_line_error(
        capsys,
        [
            "sample",
            tmp_path / "g.safetensors",
            "--n",
            2,
            "--out",
            tmp_path / "s.png",
            "--device",
            "cpu",
        ],
    )


def test_truncation_nan_is_one_line(tmp_path, capsys):
    _tiny_snapshot(tmp_path / "g.safetensors")
    for bad in ("nan", "inf", "-1"):
        one_line_error(
            capsys,
            [
                "sample",
                tmp_path / "g.safetensors",
                "--truncation",
                bad,
                "--out",
                tmp_path / "s.png",
            ],
        )


def test_resume_with_a_preset_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"train": {"kimg": 1.0}}))
    err = one_line_error(capsys, ["train", "--resume", run, "--preset", "dcgan64"])
    assert "--preset" in err


def test_a_failed_command_creates_no_output_folder(tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "s.png"
    one_line_error(capsys, ["sample", tmp_path / "missing", "--out", out])
    assert not (tmp_path / "new").exists()


def test_a_full_disk_during_sample_names_the_file(tmp_path, capsys, monkeypatch):
    _tiny_snapshot(tmp_path / "g.safetensors")
    import resource

    out = tmp_path / "s.png"

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dcgan",
            "sample",
            str(tmp_path / "g.safetensors"),
            "--out",
            str(out),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        preexec_fn=small_files,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2, proc.stderr
    assert str(out) in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_a_lock_of_a_reused_pid_is_taken_over(tmp_path):
    """After a reboot the lock's pid may belong to another, newer process: the lock
    records its owner's start time, so a live pid that started later is not the owner."""
    run = tmp_path / "run"
    run.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # written as if by an older process with the sleeper's pid (its start time earlier)
        (run / rundir.LOCK).write_text(f"{sleeper.pid} {socket.gethostname()} 1000.0\n")
        assert rundir.live_owner(run) is None
        with rundir.locked(run):
            assert (run / rundir.LOCK).read_text().split()[0] == str(os.getpid())
        # a lock of the sleeper with its own start time is held, and the message says what
        # to do if it is not a dcgan process
        import psutil

        created = psutil.Process(sleeper.pid).create_time()
        (run / rundir.LOCK).write_text(f"{sleeper.pid} {socket.gethostname()} {created}\n")
        with pytest.raises(UserError, match="remove"):
            with rundir.locked(run):
                pass
    finally:
        sleeper.kill()
        sleeper.wait()
