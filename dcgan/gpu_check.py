"""`make gpu-check`: every CUDA path of this project in one prepared run, for a GPU lent
for minutes (`python -m dcgan.gpu_check [--dry-run] [--out DIR]`).

No GPU has been available to this project, so the CUDA paths have never run. When
one is, there is no time to think of commands: this runs them all, each part a
subprocess with its own time budget (a part that fails or overruns is recorded and
the next one still runs), and writes `OUT/report.json` and `OUT/report.md` (device,
versions, date, each part's exact command, status, exit code, wall seconds, the last
40 lines of its output and the numbers parsed from it), full logs under `OUT/logs/`
and the training runs under `OUT/runs/`.

| part | what | GPU budget s | dry-run budget s |
|---|---|---|---|
| tests | the tests parametrised over devices, their cuda cases (`pytest -k cuda`) | 40 | 60 |
| bench-128 | `dcgan bench train --device cuda --batch 128` 64px, all rows, peak TFLOPS | 85 | 60 |
| bench-512 | the same at batch 512 | 85 | 60 |
| compile-reduce-overhead | `dcgan train --compile-mode reduce-overhead`, 4 kimg | 75 | 60 |
| inception-features | `dcgan bench features --device cuda` (Inception, domain) | 60 | 120 |
| torchrun | `torchrun --standalone --nproc-per-node 1 -m dcgan train`, 4 kimg | 60 | 60 |
| data-on-host | `dcgan train --data-on host`, 2 kimg; skipped without the flag | 45 | 60 |
| total | | 450 (7.5 min) | 480 |

The GPU budgets sum to 7.5 minutes, leaving half a minute of the 8 for starting
Python, the checks before the parts and the report. torch.compile's `default` mode
runs in the bench parts' `+compile` row; `max-autotune` is not run (its autotuning
alone can take minutes). The training parts use `--dataset fake` (noise, built in
memory) so that the GPU machine needs no data packages; without Fashion-MNIST
installed, `dcgan bench features` cannot run, and Inception runs on CUDA through
`dcgan eval fake fake --features inception` instead.

`--dry-run` rehearses the same parts on the CPU at tiny sizes (batch 4 and 8, one
timed step, a few training steps) so that the script is tested and does not rot; it
sets TORCH_COMPILE_DISABLE=1, because a cold inductor compile takes about 40 s on a
2-core CPU (the compile paths themselves are tested on the CPU elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PART_NAMES = (
    "tests",
    "bench-128",
    "bench-512",
    "compile-reduce-overhead",
    "inception-features",
    "torchrun",
    "data-on-host",
)
# seconds: (on the GPU, in the CPU dry run); the module docstring's table says the same
BUDGETS: dict[str, tuple[float, float]] = {
    "tests": (40, 60),
    "bench-128": (85, 60),
    "bench-512": (85, 60),
    "compile-reduce-overhead": (75, 60),
    "inception-features": (60, 120),
    "torchrun": (60, 60),
    "data-on-host": (45, 60),
}
# The tests that take a device: `DEVICES` in tests/test_data.py is ["cpu"] plus "cuda"
# when CUDA is present, so `-k cuda` selects their CUDA cases (the rest of the suite
# runs on the CPU or on `auto`, and is too long for the budget).
DEVICE_TESTS = (
    "tests/test_data.py::test_batches_values_and_epochs",
    "tests/test_data.py::test_batches_resume_is_exact",
    # host-served batches: pinned memory and non-blocking copies on CUDA
    "tests/test_sampler.py::test_host_path_serves_the_device_paths_batches_bit_for_bit",
    "tests/test_sampler.py::test_a_host_path_resumed_mid_epoch_continues_the_device_path",
)
# Dense (no sparsity) bf16 peak TFLOPS from the vendors' data sheets; first match wins.
# The H100 NVL and other GPUs are left out rather than guessed: no --peak-tflops then.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"H200", 989.0),
    (r"H100.*PCIe", 756.0),
    (r"H100.*(SXM|HBM3)", 989.0),
    (r"A100", 312.0),
)
TAIL_LINES = 40
SKIP_NO_FLAG = "skipped: not available"


@dataclass
class Part:
    name: str
    what: str
    argv: list[str]
    budget_s: float
    skip: str | None = None  # a reason: the part is recorded, not run
    note: str = ""
    parse: Callable[[str], dict[str, Any]] | None = None  # its output -> numbers


def peak_tflops(gpu_name: str) -> float | None:
    """Dense bf16 peak of a GPU named as torch.cuda.get_device_name says, if known."""
    for pattern, peak in PEAK_BF16_TFLOPS:
        if re.search(pattern, gpu_name):
            return peak
    return None


# ---------------------------------------------------------------- running the parts


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc. torchrun starts its workers in sessions
    of their own, so killing the part's process group alone would leave them running."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name may hold spaces
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the part and everything it started (a process killed mid-compile or
    mid-step holds nothing worth saving, and must not hold the GPU for the next part)."""
    for pid in [*_descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # started with start_new_session: its group
    except ProcessLookupError:
        pass


def _lines(output: str) -> list[str]:
    """Non-empty lines; progress bars redraw with \\r, so each redraw is a line."""
    return [s.rstrip() for s in output.replace("\r", "\n").split("\n") if s.strip()]


def run_part(part: Part, out: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one part within its budget and record what happened; never raises for the
    part's own failures. The full output goes to OUT/logs/NAME.log."""
    record: dict[str, Any] = {
        "name": part.name,
        "what": part.what,
        "command": shlex.join(part.argv),
        "budget_s": part.budget_s,
        "note": part.note,
        "rc": None,
        "wall_s": 0,
        "tail": [],
        "results": {},
    }
    if part.skip:
        return {**record, "status": "skipped", "reason": part.skip}
    t0 = time.perf_counter()
    try:
        # Popen rather than subprocess.run(timeout=...): run() kills only the direct
        # child on a timeout, and waits for grandchildren that still hold its pipe.
        proc = subprocess.Popen(
            part.argv,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as e:
        return {**record, "status": "failed", "reason": f"could not start: {e}"}
    try:
        raw, _ = proc.communicate(timeout=part.budget_s)
        status = "ok" if proc.returncode == 0 else "failed"
        record["rc"] = proc.returncode
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        try:
            raw, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # a survivor still holds the pipe: give up on it
            raw = b""
        status = "timed out"
    record["wall_s"] = round(time.perf_counter() - t0, 1)
    output = (raw or b"").decode("utf-8", "replace")
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (logs / f"{part.name}.log").write_text(output)
    record["tail"] = _lines(output)[-TAIL_LINES:]
    if part.parse is not None:
        try:
            record["results"] = part.parse(output)
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
            record["results"] = {"parse_error": f"{type(e).__name__}: {e}"}
    return {**record, "status": status}


def run_parts(
    parts: list[Part], out: Path, env: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """Every part in order, whatever the earlier ones did."""
    results = []
    for i, part in enumerate(parts, 1):
        print(
            f"[{i}/{len(parts)}] {part.name} (budget {part.budget_s:g} s): "
            f"{part.skip or shlex.join(part.argv)}",
            flush=True,
        )
        r = run_part(part, out, env)
        print(f"      {r['status']}, rc {r['rc']}, {r['wall_s']} s", flush=True)
        results.append(r)
    return results


# ---------------------------------------------------------------- what each part reports


def _pytest_summary(output: str) -> dict[str, Any]:
    found = [
        s
        for s in _lines(output)
        if re.search(r"\d+ (passed|failed|errors?|skipped|deselected)|no tests ran", s)
    ]
    return {"summary": found[-1].strip("= ") if found else None}


def _bench_rows(path: Path) -> dict[str, Any]:
    keep = (
        "name",
        "device",
        "batch",
        "resolution",
        "img_per_s",
        "tflops",
        "peak_fraction",
        "peak_mem_mb",
        "warmup_s",
    )
    rows = json.loads(path.read_text())
    return {"rows": [{k: r.get(k) for k in keep if k in r} for r in rows]}


def _last_tick(run: Path) -> dict[str, Any]:
    from dcgan.rundir import RunDir
    from dcgan.runlog import read_stats

    ticks = read_stats(RunDir(run).stats)
    last = ticks[-1]
    train = json.loads(RunDir(run).config.read_text())["train"]
    return {
        "ticks": len(ticks),
        "kimg": last["kimg"],
        "img_per_s": round(last["img_per_s"], 1),
        "peak_mem_mb": last["peak_mem_mb"],
        "resolved": {
            k: train.get(k)
            for k in ("device", "precision", "channels_last", "compile", "compile_mode", "batch")
        },
    }


def _numbers(part: dict[str, Any]) -> str:
    """The parsed numbers of a part on one table cell."""
    res = part.get("results") or {}
    if "parse_error" in res:
        return f"(no numbers: {res['parse_error']})"
    if "summary" in res:
        return str(res["summary"])
    if "rows" in res:
        text = "img/s: " + ", ".join(f"{r['name']} {r['img_per_s']:,.0f}" for r in res["rows"])
        default = [r for r in res["rows"] if r["name"] == "default"]
        if default and default[0].get("peak_fraction") is not None:
            text += f"; default at {100 * default[0]['peak_fraction']:.1f}% of peak"
        return text
    if "img_per_s" in res:
        return (
            f"{res['img_per_s']:,.0f} img/s at {res['kimg']} kimg, "
            f"peak {res['peak_mem_mb']} MB, {res['resolved']['precision']}"
        )
    if "fid" in res:
        return f"FID {res['fid']:.3g} in {res['time']:.1f} s"
    return part.get("reason", "")


# ---------------------------------------------------------------- the plan


def has_data_on_flag() -> bool:
    """Whether `dcgan train --help` offers --data-on (planned, not written yet)."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "dcgan", "train", "--help"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:  # the train part will say what is wrong
        return False
    return "--data-on" in done.stdout


def fashion_mnist_present() -> bool:
    """Whether the Fashion-MNIST test split is installed (`dcgan bench features` reads it);
    only looks for the files."""
    from dcgan.data import cache_root
    from dcgan.errors import UserError
    from dcgan.sources import resolve

    try:
        resolve("fashion-mnist", "test", cache_root())
    except UserError:
        return False
    return True


def plan(
    out: Path, *, dry_run: bool, peak_tflops: float | None, data_on_host: bool, fashion_mnist: bool
) -> list[Part]:
    """The parts, in order: on CUDA at full size, or on the CPU at tiny sizes (--dry-run)."""
    device = "cpu" if dry_run else "cuda"
    budget = {name: b[1] if dry_run else b[0] for name, b in BUDGETS.items()}
    dcgan = [sys.executable, "-m", "dcgan"]
    runs = out / "runs"
    if dry_run:  # one timed step; fp32/NCHW given, so `auto` does not time candidates
        batches, resolution = (4, 8), "32"
        timing = ["--warmup", "1", "--windows", "1", "--steps", "1"]
        size = [
            "--resolution",
            "32",
            "--batch",
            "8",
            "--kimg",
            "0.016",
            "--tick-kimg",
            "0.008",
            "--precision",
            "fp32",
            "--channels-last",
            "off",
        ]
        host_size = size
        features = ["--batch", "2", "--windows", "1", "--steps", "1"]
        eval_n = "10"
    else:  # dcgan64 at its batch 128: 4 kimg is 31 steps, past compile and CUDA graphs
        batches, resolution = (128, 512), "64"
        timing = ["--warmup", "5", "--windows", "5", "--steps", "10"]
        size = ["--kimg", "4", "--tick-kimg", "1"]
        host_size = ["--kimg", "2", "--tick-kimg", "1"]
        features = ["--batch", "64", "--windows", "5", "--steps", "3"]
        eval_n = "1024"
    peak = ["--peak-tflops", str(peak_tflops)] if peak_tflops else []

    def train_part(
        name: str,
        what: str,
        launcher: list[str],
        extra: list[str],
        train_size: list[str],
        note: str = "",
    ) -> Part:
        run = runs / name
        argv = [
            *launcher,
            "train",
            "--preset",
            "dcgan64",
            "--dataset",
            "fake",
            "--device",
            device,
            *train_size,
            *extra,
            "--out",
            str(run),
            "--quiet",
            "--report",
            "off",
        ]
        return Part(
            name, what, argv, budget[name], note=note, parse=lambda _, run=run: _last_tick(run)
        )

    parts = [
        Part(
            "tests",
            "the device-parametrised tests, their cuda cases",
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                *DEVICE_TESTS,
                "-k",
                device,
            ],
            budget["tests"],
            parse=_pytest_summary,
            note="the CPU cases stand in for the cuda ones in a dry run" if dry_run else "",
        )
    ]
    for name, b in zip(("bench-128", "bench-512"), batches, strict=True):
        path = out / f"{name}.json"
        parts.append(
            Part(
                name,
                f"train-step img/s of every bench row at batch {b}, {resolution}px",
                [
                    *dcgan,
                    "bench",
                    "train",
                    "--device",
                    device,
                    "--batch",
                    str(b),
                    "--resolution",
                    resolution,
                    "--data",
                    "synthetic",
                    *timing,
                    *peak,
                    "--json",
                    str(path),
                    "--quiet",
                ],
                budget[name],
                parse=lambda _, path=path: _bench_rows(path),
            )
        )
    parts.append(
        train_part(
            "compile-reduce-overhead",
            "train with torch.compile mode reduce-overhead (CUDA graphs)",
            dcgan,
            ["--compile", "--compile-mode", "reduce-overhead"],
            size,
            "compile mode default: the bench parts' +compile row; max-autotune: not run",
        )
    )
    path = out / "inception-features.json"
    if fashion_mnist:
        parts.append(
            Part(
                "inception-features",
                "feature extractors' img/s: Inception "
                "(TorchScript, eager folded) and the domain classifier",
                [
                    *dcgan,
                    "bench",
                    "features",
                    "--device",
                    device,
                    *features,
                    "--json",
                    str(path),
                    "--quiet",
                ],
                budget["inception-features"],
                parse=lambda _: _bench_rows(path),
            )
        )
    else:
        parts.append(
            Part(
                "inception-features",
                "Inception features of the noise images on "
                "both sides, and their FID (about 0: the same images)",
                [
                    *dcgan,
                    "eval",
                    "fake",
                    "fake",
                    "--features",
                    "inception",
                    "--metrics",
                    "fid",
                    "--n",
                    eval_n,
                    "--device",
                    device,
                    "--json",
                    str(path),
                    "--quiet",
                ],
                budget["inception-features"],
                note="Fashion-MNIST not installed: `dcgan bench features` needs it",
                parse=lambda _: {k: json.loads(path.read_text())[k] for k in ("fid", "time")},
            )
        )
    parts.append(
        train_part(
            "torchrun",
            "one process under torchrun (DDP, NCCL on CUDA)",
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                "1",
                "-m",
                "dcgan",
            ],
            [],
            size,
            "python -m torch.distributed.run is torchrun",
        )
    )
    if data_on_host:
        parts.append(
            train_part(
                "data-on-host",
                "train with the data set kept on the host",
                dcgan,
                ["--data-on", "host"],
                host_size,
            )
        )
    else:
        parts.append(
            Part(
                "data-on-host",
                "train with the data set kept on the host",
                [],
                budget["data-on-host"],
                skip=SKIP_NO_FLAG,
                note="`dcgan train --help` has no --data-on flag",
            )
        )
    return parts


# ---------------------------------------------------------------- the report


def describe(dry_run: bool) -> dict[str, Any]:
    """Device, versions, date and commit for the report's head."""
    import torch

    from dcgan.machine import cpu_model, facts

    info = facts()
    if dry_run:
        device = (
            f"{cpu_model()} (torch CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} cores"
        )
    else:
        g = info["gpus"][0]
        device = f"{g['name']} ({g['memory_gib']} GiB, compute capability {g['capability']})"
    try:
        smi = (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.TimeoutExpired):
        smi = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    return {
        "mode": "dry-run" if dry_run else "gpu",
        "device": device,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "torch": info["torch"],
        "cuda": info["cuda"],
        "cudnn": info["cudnn"],
        "python": info["python"],
        "nvidia_smi": smi,
        "commit": commit or None,
        "machine": info,
    }


def markdown(report: dict[str, Any]) -> str:
    mode = (
        "dry run on the CPU (tiny sizes; TORCH_COMPILE_DISABLE=1)"
        if report["mode"] == "dry-run"
        else "on CUDA"
    )
    lines = [
        f"# dcgan GPU check: {report['device']}",
        "",
        f"- mode: {mode}",
        f"- date: {report['date']}; commit {report['commit'] or 'unknown'}",
        f"- torch {report['torch']}, CUDA {report['cuda']}, cuDNN {report['cudnn']}, "
        f"Python {report['python']}",
    ]
    if report["nvidia_smi"]:
        lines.append(f"- nvidia-smi: {report['nvidia_smi']}")
    lines += [
        f"- peak TFLOPS passed to the bench: {report['peak_tflops']} ({report['peak_note']})",
        f"- {report['wall_s']} s in all; the parts' budgets sum to {report['budget_s']} s",
        "",
        "| part | status | rc | wall s | budget s | numbers |",
        "|---|---|---|---|---|---|",
    ]
    for p in report["parts"]:
        lines.append(
            f"| {p['name']} | {p['status']} | {'' if p['rc'] is None else p['rc']} | "
            f"{p['wall_s']} | {p['budget_s']:g} | {_numbers(p).replace('|', '/')} |"
        )
    for p in report["parts"]:
        what = p["what"][:1].upper() + p["what"][1:]
        lines += ["", f"## {p['name']}: {p['status']}", "", f"{what}.", ""]
        if p.get("note"):
            lines += [f"Note: {p['note']}.", ""]
        if p["status"] == "skipped":
            lines += [f"{p['reason']}.", ""]
            continue
        lines += [
            "```sh",
            p["command"],
            "```",
            "",
            f"Last {len(p['tail'])} lines of output:",
            "",
            "```",
            *p["tail"],
            "```",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m dcgan.gpu_check",
        description=(
            "Run every CUDA path once within 8 minutes and write OUT/report.json and OUT/report.md."
        ),
    )
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="rehearse the same parts on the CPU at tiny sizes (about a minute)",
    )
    ap.add_argument("--out", default="gpu-check", help="report folder (default gpu-check)")
    args = ap.parse_args(argv)

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(
            "gpu-check: CUDA is not available here (torch "
            f"{torch.__version__}); --dry-run rehearses the check on the CPU",
            file=sys.stderr,
        )
        return 2
    t0 = time.perf_counter()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("runs", "logs"):  # this script's own folders, from an earlier check
        shutil.rmtree(out / sub, ignore_errors=True)
    head = describe(args.dry_run)
    if args.dry_run:  # a placeholder that exercises the flag and the fraction column
        peak, peak_note = 1.0, "a placeholder in a dry run"
    else:
        name = torch.cuda.get_device_name(0)
        peak = peak_tflops(name)
        peak_note = (
            "dense bf16, from the table in dcgan/gpu_check.py"
            if peak
            else f"{name} is not in the table: --peak-tflops omitted"
        )
    parts = plan(
        out,
        dry_run=args.dry_run,
        peak_tflops=peak,
        data_on_host=has_data_on_flag(),
        fashion_mnist=fashion_mnist_present(),
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # so a killed part's last lines are kept
    if args.dry_run:
        env["TORCH_COMPILE_DISABLE"] = "1"
    results = run_parts(parts, out, env)
    report = {
        **head,
        "peak_tflops": peak,
        "peak_note": peak_note,
        "budget_s": sum(p.budget_s for p in parts),
        "wall_s": round(time.perf_counter() - t0, 1),
        "parts": results,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(markdown(report))
    bad = [r["name"] for r in results if r["status"] not in ("ok", "skipped")]
    print(
        f"wrote {out / 'report.md'} and report.json in {report['wall_s']} s"
        + (f"; not ok: {', '.join(bad)}" if bad else "; every part ok or skipped")
    )
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
