"""`python -m dcgan.gpu_check`: the prepared GPU check. Its part runner (a part past its
budget is killed and recorded, the next still runs), its plan (budgets, peak TFLOPS,
the optional --data-on part) and its CPU rehearsal (`--dry-run`), so that the script
still works on the day a GPU is lent for a few minutes."""

import json
import shlex
import subprocess
import sys
import time

import pytest

from dcgan import gpu_check
from dcgan.gpu_check import Part, run_parts


def test_a_part_past_its_budget_is_recorded_as_timed_out_and_the_next_still_runs(tmp_path):
    slow = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    parts = [
        Part("slow", "sleeps past its budget", slow, budget_s=1.5),
        Part("fails", "exits 3", [sys.executable, "-c", "raise SystemExit(3)"], 20),
        Part("next", "prints", [sys.executable, "-c", "print('one\\ntwo')"], 20),
    ]
    t0 = time.perf_counter()
    results = run_parts(parts, tmp_path)
    assert time.perf_counter() - t0 < 20  # the sleeper was killed, not waited for
    slow_r, fails_r, next_r = results
    assert slow_r["status"] == "timed out" and slow_r["rc"] is None
    assert 1.5 <= slow_r["wall_s"] < 10 and slow_r["budget_s"] == 1.5
    assert slow_r["tail"] == ["started"]  # output before the kill is kept
    assert fails_r["status"] == "failed" and fails_r["rc"] == 3
    assert next_r["status"] == "ok" and next_r["rc"] == 0 and next_r["tail"] == ["one", "two"]
    assert next_r["command"] == shlex.join(parts[2].argv)
    assert (tmp_path / "logs" / "next.log").read_text().split() == ["one", "two"]


def test_a_timed_out_part_takes_its_children_with_it(tmp_path):
    # torchrun's workers and inductor's compile workers are grandchildren: killing
    # only the direct child would leave them holding the GPU during the next parts
    pid_file = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    )
    [r] = run_parts([Part("parent", "starts a child", [sys.executable, "-c", code], 3)], tmp_path)
    assert r["status"] == "timed out"
    pid = int(pid_file.read_text())
    for _ in range(50):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":  # a zombie is gone
                    break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild {pid} outlived its part")


def test_the_gpu_plan_fits_in_8_minutes_and_names_its_parts(tmp_path):
    parts = gpu_check.plan(
        tmp_path, dry_run=False, peak_tflops=989.0, data_on_host=True, fashion_mnist=True
    )
    assert [p.name for p in parts] == list(gpu_check.PART_NAMES)
    assert sum(p.budget_s for p in parts) < 8 * 60
    commands = {p.name: " ".join(p.argv) for p in parts}
    for name in ("bench-128", "bench-512"):
        assert "--device cuda" in commands[name] and "--peak-tflops 989.0" in commands[name]
    assert "--batch 128" in commands["bench-128"] and "--batch 512" in commands["bench-512"]
    assert "--compile-mode reduce-overhead" in commands["compile-reduce-overhead"]
    assert "bench features --device cuda" in commands["inception-features"]
    assert "--nproc-per-node 1" in commands["torchrun"]
    assert "--data-on host" in commands["data-on-host"]
    assert "-k cuda" in commands["tests"]


def test_the_docstring_table_says_the_budgets_the_code_uses():
    rows = {
        line.split("|")[1].strip(): line
        for line in gpu_check.__doc__.splitlines()
        if line.startswith("| ")
    }
    for name, (gpu, cpu) in gpu_check.BUDGETS.items():
        assert rows[name].endswith(f"| {gpu:g} | {cpu:g} |"), name
    total = sum(b[0] for b in gpu_check.BUDGETS.values())
    assert rows["total"].startswith(f"| total | | {total:g} ")


def test_the_plan_without_a_peak_the_flag_or_fashion_mnist(tmp_path):
    parts = {
        p.name: p
        for p in gpu_check.plan(
            tmp_path, dry_run=False, peak_tflops=None, data_on_host=False, fashion_mnist=False
        )
    }
    assert "--peak-tflops" not in parts["bench-128"].argv
    assert parts["data-on-host"].skip == "skipped: not available"
    # without Fashion-MNIST (a bare GPU box) Inception still runs on CUDA, through eval
    features = " ".join(parts["inception-features"].argv)
    assert "eval fake fake --features inception" in features and "--device cuda" in features


def test_a_skipped_part_runs_nothing(tmp_path):
    [r] = run_parts([Part("host", "x", ["false"], 5, skip="skipped: not available")], tmp_path)
    assert r["status"] == "skipped" and r["reason"] == "skipped: not available"
    assert r["rc"] is None and r["wall_s"] == 0


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_says_so_and_points_to_the_dry_run(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path / "gc")]) == 2
    assert "--dry-run" in capsys.readouterr().err
    assert not (tmp_path / "gc").exists()  # nothing half-written


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA H100 NVL", None),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_tflops_of_known_gpus(name, peak):
    assert gpu_check.peak_tflops(name) == peak


@pytest.mark.slow
def test_the_dry_run_on_the_cpu_writes_the_whole_report(tmp_path):
    out = tmp_path / "gpu-check"
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "dcgan.gpu_check", "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=400,
    )
    wall = time.perf_counter() - t0
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    assert report["mode"] == "dry-run" and report["device"] in md
    assert report["torch"] in md and report["date"] in md
    parts = {p["name"]: p for p in report["parts"]}
    assert list(parts) == list(gpu_check.PART_NAMES)
    for name, p in parts.items():
        if p["status"] == "skipped":
            assert name == "data-on-host" and p["reason"] == "skipped: not available"
        else:
            assert p["status"] == "ok" and p["rc"] == 0, (name, p["tail"])
        assert f"| {name} |" in md and p["command"] in md
    assert "passed" in parts["tests"]["results"]["summary"]
    for name in ("bench-128", "bench-512"):
        rows = parts[name]["results"]["rows"]
        assert {"reference", "+compile", "default"} <= {r["name"] for r in rows}
        assert all(r["img_per_s"] > 0 for r in rows)
    assert parts["inception-features"]["results"]["rows"]
    for name in ("compile-reduce-overhead", "torchrun"):
        assert parts[name]["results"]["img_per_s"] > 0
    assert wall < 240, f"the dry run took {wall:.0f} s"
