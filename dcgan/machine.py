"""Facts about the machine a run lands on: CPU model and ISA level, memory, GPUs, versions.

What a user needs before a long run (`dcgan info`), what every benchmark row
is labelled with, and what the `auto` calibration is keyed by. Reading only:
nothing here changes a setting.
"""

from __future__ import annotations

import os
import platform
import re
from typing import Any

import torch

from dcgan.errors import UserError


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_isa() -> dict[str, Any]:
    """What torch's CPU kernels dispatch to, and the bf16 instruction sets.

    `capability` is torch's own dispatch level (DEFAULT, AVX2, AVX512, ...).
    bf16 autocast is fast only with native bf16 arithmetic (AVX-512 BF16 or AMX);
    without it oneDNN emulates bf16 and a train step was measured 14-30x slower."""
    cpu = torch.cpu
    return {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "avx2": bool(getattr(cpu, "_is_avx2_supported", lambda: False)()),
        "avx512": bool(getattr(cpu, "_is_avx512_supported", lambda: False)()),
        "avx512_bf16": bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()),
        "amx": bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)()),
    }


def native_bf16(isa: dict[str, Any]) -> bool:
    """The probe rule behind the bf16 candidate on the CPU: the hardware has bf16
    arithmetic and torch dispatches to its AVX-512 kernels (ATEN_CPU_CAPABILITY=avx2
    or ONEDNN_MAX_CPU_ISA=AVX2 turn them off, and with them native bf16)."""
    onednn_cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    return bool(
        (isa["avx512_bf16"] or isa["amx"])
        and isa["capability"] == "AVX512"
        and (onednn_cap == "ALL" or "AVX512" in onednn_cap or "AMX" in onednn_cap)
    )


def isa_label(isa: dict[str, Any]) -> str:
    """A short ISA level for tables, as torch's kernels use it: AMX, AVX-512 BF16,
    AVX-512, AVX2 or torch's own word (a CPU with AVX-512 that torch was told to
    run at AVX2, e.g. by ATEN_CPU_CAPABILITY, is labelled AVX2)."""
    if native_bf16(isa):
        return "AMX" if isa["amx"] else "AVX-512 BF16"
    return {"AVX512": "AVX-512", "AVX2": "AVX2"}.get(str(isa["capability"]), str(isa["capability"]))


def memory_gib() -> float | None:
    """Total memory in GiB (from sysconf), None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def gpus() -> list[dict[str, Any]]:
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        with torch.cuda.device(i):
            bf16 = torch.cuda.is_bf16_supported()
        out.append(
            {
                "index": i,
                "name": p.name,
                "memory_gib": round(p.total_memory / 2**30, 1),
                "capability": f"{p.major}.{p.minor}",
                "bf16": bool(bf16),
            }
        )
    return out


def device_label(device: torch.device) -> str:
    """One line naming what a figure was measured on, e.g.
    'AMD EPYC 9B14 (AVX-512 BF16), 2 threads' or 'NVIDIA H200'."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({isa_label(cpu_isa())}), {torch.get_num_threads()} threads"


def facts() -> dict[str, Any]:
    """Everything `dcgan info` shows, as JSON values."""
    mem = memory_gib()
    return {
        "cpu": {
            "model": cpu_model(),
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            **cpu_isa(),
        },
        "memory_gib": round(mem, 1) if mem is not None else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "gpus": gpus(),
    }


def resolve_device(name: str) -> torch.device:
    """auto, cpu, cuda or cuda:N -> a device that exists here; anything else is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available here")
    return device
