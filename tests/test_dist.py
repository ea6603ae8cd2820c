"""DistributedDataParallel: two CPU processes with gloo under torchrun."""

import json
import os
import re
import subprocess
import sys

import pytest

from dcgan.checkpoint import load_state

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
    "8",
    "--tick-kimg",
    "0.032",
    "--precision",
    "fp32",
    "--quiet",
]


def torchrun(tmp_path, *args, nproc=2):
    env = {**os.environ, "DCGAN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "dcgan",
        "train",
        *map(str, args),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)


@pytest.mark.slow
def test_two_processes_stay_in_sync_and_resume_with_one(tmp_path):
    out = tmp_path / "run"
    r = torchrun(tmp_path, *TINY, "--kimg", "0.064", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 ranks hold identical G and D weights: True" in r.stderr
    rows = [json.loads(x) for x in (out / "stats.jsonl").read_text().splitlines()]
    # global batch 2 x 8 = 16 images per iteration: 0.032 kimg = 2 iterations per tick
    assert [row["kimg"] for row in rows] == [0.032, 0.064]
    for name in ("config.json", "losses.png", "generator.safetensors", "checkpoint.pt"):
        assert (out / name).is_file(), name
    state = load_state(out / "checkpoint.pt")
    assert state["world_size"] == 2 and state["nimg"] == 64
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["G"])
    # resume the two-process run in one process
    env = {**os.environ, "DCGAN_CACHE": str(tmp_path / "cache")}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "dcgan",
            "train",
            "--resume",
            str(out),
            "--kimg",
            "0.096",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert load_state(out / "checkpoint.pt")["nimg"] == 96


@pytest.mark.slow
def test_a_dead_rank_is_restarted_and_resumes(tmp_path):
    """Rank 1 dies after 64 images in the first attempt (test hook); torchrun
    --max-restarts relaunches both ranks, which resume from the last checkpoint."""
    out = tmp_path / "run"
    env = {
        **os.environ,
        "DCGAN_CACHE": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
        "DCGAN_FAULT_RANK": "1",
        "DCGAN_FAULT_NIMG": "64",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "1",
        "-m",
        "dcgan",
        "train",
        *TINY,
        "--kimg",
        "0.128",
        "--checkpoint-ticks",
        "1",
        "--out",
        str(out),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 1: injected fault at 64 images" in r.stderr
    assert "restart 1: resuming" in r.stderr
    rows = [json.loads(x) for x in (out / "stats.jsonl").read_text().splitlines()]
    assert [row["kimg"] for row in rows] == [0.032, 0.064, 0.096, 0.128]


@pytest.mark.slow
def test_gradient_penalties_train_in_sync_under_ddp(tmp_path):
    """WGAN-GP and R1 need a double backward, which DDP's forward does not take: they run
    through the raw D and their gradients join the all-reduced backward. Two gloo
    processes must end with bit-identical G and D, spectral norm and DiffAugment on."""
    out = tmp_path / "run"
    r = torchrun(
        tmp_path,
        *TINY,
        "--kimg",
        "0.064",
        "--out",
        out,
        "--loss",
        "wgan-gp",
        "--r1-gamma",
        "1",
        "--r1-every",
        "2",
        "--d-spectral-norm",
        "--diffaug",
        "translation,cutout",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 ranks hold identical G and D weights: True" in r.stderr
    state = load_state(out / "checkpoint.pt")
    assert state["nimg"] == 64 and state["d_updates"] == 4
    assert any("parametrizations.weight.original" in k for k in state["D"])


SYNC_CHECK = """
import torch
from dcgan.dist import cleanup, setup, weights_in_sync
env, _ = setup(torch.device("cpu"))
torch.manual_seed(0)
net = torch.nn.Linear(4, 3)
same = weights_in_sync([net], env)
with torch.no_grad():  # rank 1 swaps two entries: same values, other places
    if env.rank == 1:
        w = net.weight
        w[0, 0], w[0, 1] = w[0, 1].clone(), w[0, 0].clone()
swapped = weights_in_sync([net], env)
with torch.no_grad():
    if env.rank == 1:
        net.bias[2] += 1e-6
nudged = weights_in_sync([net], env)
print(f"rank {env.rank}: {same} {swapped} {nudged}", flush=True)
cleanup(env)
"""


def test_weights_in_sync_tells_identical_from_different_weights(tmp_path):
    script = tmp_path / "sync_check.py"
    script.write_text(SYNC_CHECK)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(script),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # identical -> True; two entries swapped on one rank -> False; one bias moved -> False
    # (the two ranks' lines can interleave in torchrun's stdout: match them, not lines)
    found = sorted(re.findall(r"rank (\d): (True|False) (True|False) (True|False)", r.stdout))
    assert found == [("0", "True", "False", "False"), ("1", "True", "False", "False")], r.stdout
