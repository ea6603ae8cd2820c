"""`dcgan tune`: the search space's checks, a real SQLite study end to end, and two workers
sharing a study on a real PostgreSQL server, one of them killed mid-trial."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dcgan.config import from_preset
from dcgan.errors import UserError
from dcgan.tune import SPACE, load_space, parse_fix

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
# tiny trials: a few seconds each; the domain classifier is the session cache's
TINY = [
    "--fix",
    "ngf=8",
    "--fix",
    "ndf=8",
    "--fix",
    "nz=16",
    "--fix",
    "batch=16",
    "--fix",
    "tick_kimg=0.064",
    "--fix",
    "checkpoint_ticks=1",
    "--fix",
    "report=off",
    "--kimg",
    "0.192",
    "--eval-every",
    "0.064",
    "--eval-n",
    "64",
    "--quiet",
]


def _space_file(tmp_path: Path, space: dict) -> str:
    path = tmp_path / "space.json"
    path.write_text(json.dumps(space))
    return str(path)


def test_space_names_ranges_and_fixes_are_checked_by_the_config(tmp_path):
    base = from_preset("fmnist32")
    assert {p.name for p in load_space(None, {}, base)} == {p.name for p in SPACE}
    narrowed = load_space(
        _space_file(tmp_path, {"d_lr": {"low": 1e-4, "high": 3e-4, "log": True}}),
        {"loss": "hinge"},
        base,
    )
    names = [p.name for p in narrowed]
    assert "loss" not in names and next(p for p in narrowed if p.name == "d_lr").high == 3e-4
    only = load_space(
        _space_file(tmp_path, {"only": True, "beta1": {"low": 0, "high": 0.5}}), {}, base
    )
    assert [p.name for p in only] == ["beta1"]
    with pytest.raises(UserError, match="unknown key 'd_learning_rate'"):
        load_space(_space_file(tmp_path, {"d_learning_rate": {"low": 1, "high": 2}}), {}, base)
    with pytest.raises(UserError, match="label_smoothing must be in"):
        load_space(_space_file(tmp_path, {"label_smoothing": {"low": 0, "high": 0.7}}), {}, base)
    with pytest.raises(UserError, match="loss must be one of"):
        load_space(_space_file(tmp_path, {"loss": {"choices": ["bce", "wasserstein"]}}), {}, base)
    with pytest.raises(UserError, match="set by dcgan tune itself"):
        load_space(_space_file(tmp_path, {"kimg": {"low": 1, "high": 2}}), {}, base)
    with pytest.raises(UserError, match="expected key=value"):
        parse_fix(["ngf"])
    with pytest.raises(UserError, match="unknown key 'nfg'"):
        from_preset("fmnist32", parse_fix(["nfg=8"]))


def _dcgan(*args, env=None, cwd=None, **kw):
    return subprocess.run(
        [sys.executable, "-m", "dcgan", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=600,
        **kw,
    )


@pytest.mark.skipif(not FMNIST.is_file(), reason="Fashion-MNIST missing")
def test_a_sqlite_study_end_to_end(tmp_path):
    space = _space_file(
        tmp_path,
        {
            "only": True,
            "d_lr": {"low": 1e-4, "high": 1e-3, "log": True},
            "loss": {"choices": ["bce", "hinge"]},
        },
    )
    out = tmp_path / "study"
    r = _dcgan("tune", "--trials", "3", "--out", out, "--space", space, "--seed", "1", *TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "study.db").is_file()
    folders = sorted(p.name for p in out.glob("trial-*"))
    assert folders == ["trial-0000", "trial-0001", "trial-0002"]
    for f in folders:  # ordinary run folders: config, stats, metrics, snapshot
        assert (out / f / "generator.safetensors").is_file()
        assert (out / f / "metrics.jsonl").is_file()
    assert "best: trial" in r.stdout and "wrote" in r.stdout
    best = json.loads((out / "best.json").read_text())
    assert best["train"]["precision"] == "auto" and best["train"]["eval_every"] == 0.0
    assert best["model"]["ngf"] == 8 and best["train"]["loss"] in ("bce", "hinge")
    assert (out / "tune-history.png").stat().st_size > 1000
    # the summary again, from the folder alone; and best.json trains as it is
    again = _dcgan("tune", "--summary", out)
    assert (
        again.returncode == 0
        and again.stdout.count(" complete ") + again.stdout.count(" pruned ") == 3
    ), again.stdout
    run = _dcgan(
        "train",
        "--config",
        out / "best.json",
        "--kimg",
        "0.064",
        "--out",
        tmp_path / "best-run",
        "--quiet",
    )
    assert run.returncode == 0, run.stderr[-2000:]
    # a second study on the same folder with other settings is refused in one line
    other = _dcgan("tune", "--trials", "3", "--out", out, "--eval-features", "inception", *TINY)
    assert other.returncode == 2 and "other settings" in other.stderr
    assert other.stderr.count("\n") == 1


# -- PostgreSQL ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres():
    """A real PostgreSQL server of its own on 127.0.0.1 (Debian's postgresql, installed by
    `make postgres`), trust authentication, removed afterwards."""
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    if not bins:
        pytest.fail("PostgreSQL is not installed (run `make postgres`: Debian postgresql)")
    bin_dir = bins[-1]
    root = Path(tempfile.mkdtemp(prefix="dcgan-pg-"))
    os.chmod(root, 0o755)
    as_pg: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(root, "postgres", "postgres")
        as_pg = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", _free_port()
    subprocess.run(
        [*as_pg, str(bin_dir / "initdb"), "-D", str(data), "--auth=trust", "-U", "postgres"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    subprocess.run(
        [
            *as_pg,
            str(bin_dir / "pg_ctl"),
            "-D",
            str(data),
            "-w",
            "-l",
            str(root / "log"),
            "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1",
            "start",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_pg, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=120,
        )
        shutil.rmtree(root, ignore_errors=True)


def _trial_of(out: Path, worker_pid: int) -> Path | None:
    """The trial folder whose training process (the lock's owner) is this worker's child."""
    for lock in out.glob("trial-*/.lock"):
        try:
            pid = int(lock.read_text().split()[0])
            stat = Path(f"/proc/{pid}/stat").read_text()
        except (OSError, ValueError, IndexError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == worker_pid:  # field 4: the parent pid
            return lock.parent
    return None


def _worker(out: Path, url: str, trials: int) -> subprocess.Popen:
    space = out.parent / "space.json"
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dcgan",
            "tune",
            "--trials",
            str(trials),
            "--out",
            str(out),
            "--storage",
            url,
            "--space",
            str(space),
            "--heartbeat",
            "1",
            *TINY,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.skipif(not FMNIST.is_file(), reason="Fashion-MNIST missing")
def test_two_workers_share_a_postgresql_study_and_a_killed_trial_resumes(tmp_path, postgres):
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    out = tmp_path / "study"
    (tmp_path / "space.json").write_text(
        json.dumps({"only": True, "d_lr": {"low": 1e-4, "high": 1e-3, "log": True}})
    )
    victim, other = _worker(out, postgres, 4), _worker(out, postgres, 4)
    # kill the first worker (and its training subprocess) once its own trial has a checkpoint
    t0 = time.monotonic()
    while True:
        assert victim.poll() is None, victim.communicate()[1][-2000:]
        assert time.monotonic() - t0 < 300, "the worker's trial never reached a checkpoint"
        mine = _trial_of(out, victim.pid)
        if mine is not None and (mine / "checkpoint.pt").is_file():
            break
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    _, err = other.communicate(timeout=600)
    assert other.returncode == 0, err[-3000:]
    # a third worker resumes the study and adds one trial
    third = _worker(out, postgres, 5)
    _, err = third.communicate(timeout=600)
    assert third.returncode == 0, err[-3000:]

    study = optuna.load_study(study_name="dcgan", storage=postgres)
    trials = study.get_trials()
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))  # no trial duplicated
    assert all(
        t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) for t in trials
    )  # every trial finished, pruned or failed: none lost
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) >= 5
    failed = [t for t in trials if t.state == TrialState.FAIL]
    retries = [
        t for t in trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) is not None
    ]
    assert failed and retries, [(t.number, t.state) for t in trials]
    retry = retries[0]
    assert retry.state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retry.params == failed[0].params
    # the retry continued the killed trial's own folder from its checkpoint: the run's
    # events show a start and a resume, and its stats have every tick once
    folder = out / retry.user_attrs["folder"]
    assert folder.name == f"trial-{failed[0].number:04d}" == mine.name
    events = [json.loads(x) for x in (folder / "events.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "settings" for e in events) >= 2
    kimg = [json.loads(x)["kimg"] for x in (folder / "stats.jsonl").read_text().splitlines()]
    assert kimg == sorted(set(kimg))


def test_tune_takes_dataset_and_resolution_like_train(tmp_path):
    from dcgan.cli import build_parser
    from dcgan.tune import base_config

    args = build_parser().parse_args(
        [
            "tune",
            "--preset",
            "fmnist32",
            "--dataset",
            "emoji",
            "--resolution",
            "64",
            "--fix",
            "ngf=16",
            "--out",
            "x",
        ]
    )
    fixed, base = base_config(args.preset, args.fix, args.dataset, args.resolution)
    assert fixed == {"ngf": "16", "dataset": "emoji", "resolution": "64"}
    assert base.data.dataset == "emoji" and base.data.resolution == 64 and base.model.ngf == 16
    assert base.train.r1_gamma == from_preset("fmnist32").train.r1_gamma  # the rest: the preset's
    fixed, base = base_config("fmnist32", [], None, None)  # neither given: the preset's own
    assert fixed == {} and base.data.dataset == "fashion-mnist"
    with pytest.raises(UserError, match="resolution must be one of"):
        base_config("fmnist32", [], None, 48)
    with pytest.raises(UserError, match="--dataset emoji and --fix dataset=mnist"):
        base_config("fmnist32", ["dataset=mnist"], "emoji", None)
