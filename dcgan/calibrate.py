"""`auto` settings chosen by measurement: the fastest precision and memory format here.

Which precision and memory format train fastest depends on the CPU, not on the
code: bf16 autocast is fast with native bf16 arithmetic (AVX-512 BF16, AMX) and
emulated, 14-30x slower, without it; channels-last helps oneDNN's convolutions
on some CPUs and not on others. So on the CPU `--precision auto` and
`--channels-last auto` are settled the way cuDNN's benchmark mode settles a
convolution algorithm: a few real train steps of each candidate, timed in
turns, and the fastest wins. The answer is cached per CPU model, ISA level,
torch version, thread count and model shape (a `CalibrationKey`, stored in its
entry and checked on read), so later runs start at once.

Bounded cost: every candidate first runs one step at a small batch, and one
that is clearly slower than the best is dropped before it costs a full-size
step; full-size rounds stop once about `budget_s` seconds are spent.

On CUDA there is nothing to measure that the hardware does not say: bf16 where
the GPU supports it, else fp16 with loss scalers; channels-last on.
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from dcgan import atomic, machine
from dcgan.cache_key import CacheKey
from dcgan.config import Config, apply_overrides
from dcgan.errors import UserError
from dcgan.step import build_gan

CACHE_FILE = "calibration.json"
CACHE_VERSION = 1


@dataclass(frozen=True)
class Setting:
    precision: str  # fp32, bf16 or fp16
    channels_last: bool

    @property
    def name(self) -> str:
        return f"{self.precision}/{'channels-last' if self.channels_last else 'NCHW'}"


@dataclass
class Choice:
    """The resolved setting and how it was reached (printed once, written to the run)."""

    setting: Setting
    how: str  # fixed (nothing was auto), rule (CUDA, scratch engine), measured or cached
    capability: str
    img_per_s: dict[str, float] = field(default_factory=dict)  # candidate name -> img/s
    dropped: list[str] = field(default_factory=list)  # screened out at the small batch
    seconds: float = 0.0  # wall time the measurement took

    def as_dict(self) -> dict[str, Any]:
        return {
            "precision": self.setting.precision,
            "channels_last": self.setting.channels_last,
            "how": self.how,
            "capability": self.capability,
            "img_per_s": {k: round(v, 1) for k, v in self.img_per_s.items()},
            "dropped": self.dropped,
            "seconds": round(self.seconds, 2),
        }

    @staticmethod
    def from_dict(d: dict[str, Any], how: str) -> Choice:
        return Choice(
            Setting(d["precision"], bool(d["channels_last"])),
            how,
            d["capability"],
            dict(d["img_per_s"]),
            list(d["dropped"]),
            float(d["seconds"]),
        )

    def line(self) -> str:
        """One line for the log: the choice, the timings behind it, the CPU level."""
        s = f"auto: {self.setting.name} ({self.how}"
        if self.img_per_s:
            timings = ", ".join(
                f"{k} {v:.0f}" for k, v in sorted(self.img_per_s.items(), key=lambda kv: -kv[1])
            )
            s += f"; img/s {timings}"
        if self.dropped:
            s += f"; dropped after one small step: {', '.join(self.dropped)}"
        return s + f"; CPU capability {self.capability})"


def candidates(precision: str, channels_last: str, isa: dict[str, Any]) -> list[Setting]:
    """The settings `auto` chooses among on the CPU, the safest first.

    bf16 is a candidate only with native bf16 instructions: elsewhere it is
    emulated and never wins, and one step of it can take most of a minute.
    fp16 is never chosen on the CPU (no fp16 arithmetic to speak of)."""
    precisions = (
        [precision]
        if precision != "auto"
        else (["fp32", "bf16"] if machine.native_bf16(isa) else ["fp32"])
    )
    layouts = {"on": [True], "off": [False], "auto": [True, False]}[channels_last]
    return [Setting(p, cl) for p in precisions for cl in layouts]


# A candidate's runner: run(n) takes n real training steps (`dcgan.step`'s Step) with
# that candidate's settings. Not a Step itself: it owns the GAN and the batches.
Runner = Callable[[int], None]


def measure(
    steps: dict[str, Runner],
    batch: int,
    clock: Callable[[], float] = time.perf_counter,
    budget_s: float = 10.0,
    small: int = 8,
    slower: float = 2.0,
    max_rounds: int = 4,
) -> tuple[dict[str, float], list[str]]:
    """Images/s of each step (called with a batch size), and the names dropped early.

    (1) Screen: each candidate runs one warm-up step and one timed step at
        `small` images; one more than `slower` times slower than the best is
        dropped, so a 30x-slow candidate costs two small steps, not a full one.
    (2) Full-size rounds, candidates in turns (a slow phase of a shared machine
        then hits all of them): after each round, stop once `budget_s` is spent.
        The first full round warms the full-size shapes up and is left out of
        the median when later rounds exist.
    """
    start = clock()

    def rate(name: str, b: int) -> float:
        t0 = clock()
        steps[name](b)
        return b / max(clock() - t0, 1e-9)

    small = min(small, batch)
    screen = {}
    for name in steps:
        steps[name](small)
        screen[name] = rate(name, small)
    best = max(screen.values())
    dropped = [n for n, r in screen.items() if r * slower < best]
    alive = [n for n in steps if n not in dropped]
    rounds: dict[str, list[float]] = {n: [] for n in alive}
    for _ in range(max_rounds):
        for name in alive:
            rounds[name].append(rate(name, batch))
        if clock() - start >= budget_s:
            break
    img_per_s = {n: statistics.median(r[1:] if len(r) > 1 else r) for n, r in rounds.items()}
    img_per_s.update({n: screen[n] for n in dropped})  # small-batch figure, for the record
    return img_per_s, dropped


@dataclass(frozen=True)
class CalibrationKey(CacheKey):
    """Everything that decides which setting trains fastest here."""

    kind: ClassVar[str] = "calibration"
    version: int
    cpu: str
    capability: str  # torch's CPU dispatch level
    bf16: bool  # native bf16 arithmetic (the probe rule)
    torch_version: str
    threads: int
    resolution: int
    nc: int
    nz: int
    ngf: int
    ndf: int
    batch: int
    d_steps: int
    precision: str  # as asked: "auto" or fixed
    channels_last: str


def cache_key(cfg: Config, nc: int, precision: str, channels_last: str) -> CalibrationKey:
    isa = machine.cpu_isa()
    m, t = cfg.model, cfg.train
    return CalibrationKey(
        version=CACHE_VERSION,
        cpu=machine.cpu_model(),
        capability=str(isa["capability"]),
        bf16=machine.native_bf16(isa),
        torch_version=torch.__version__,
        threads=torch.get_num_threads(),
        resolution=cfg.data.resolution,
        nc=nc,
        nz=m.nz,
        ngf=m.ngf,
        ndf=m.ndf,
        batch=t.batch,
        d_steps=t.d_steps,
        precision=precision,
        channels_last=channels_last,
    )


def _read_cache(path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):  # missing or damaged: measure again
        return {}


def _cached(path: Path, key: CalibrationKey) -> Choice | None:
    """The choice stored for `key`, or None: missing, damaged, or an entry of another key
    under its name (the entry holds its key; one without is of the older format)."""
    entry = _read_cache(path).get(key.digest())
    if not isinstance(entry, dict) or not key.matches(entry.get("key")):
        return None
    try:
        return Choice.from_dict(entry["choice"], "cached")
    except (KeyError, TypeError, ValueError):
        return None  # an entry of another shape: measure again


def _store(path: Path, key: CalibrationKey, choice: Choice) -> None:
    # Entries without a key (the format before keys were stored) are never read: dropped.
    entries = {
        name: e for name, e in _read_cache(path).items() if isinstance(e, dict) and "key" in e
    }
    entries[key.digest()] = {"key": key.as_dict(), "choice": choice.as_dict()}
    try:
        atomic.write_text(path, json.dumps(entries, indent=1, sort_keys=True) + "\n")
    except UserError as e:  # a read-only cache costs 10 s next time, nothing more
        print(f"warning: calibration not cached ({e})", file=sys.stderr)


def train_steps(
    cfg: Config, nc: int, device: torch.device, settings: list[Setting]
) -> dict[str, Runner]:
    """One real Algorithm-1 iteration per call for each setting, on random images.

    Eager even when the run compiles: the ranking of precisions and layouts is
    the kernels', and compiling every candidate would cost minutes."""
    r = cfg.data.resolution
    steps = {}
    for s in settings:
        c = apply_overrides(
            cfg,
            {
                "precision": s.precision,
                "channels_last": "on" if s.channels_last else "off",
                "compile": False,
            },
        )
        gan = build_gan(c, nc, device, precision=s.precision)

        def step(b: int, gan=gan) -> None:
            x = torch.rand(b, nc, r, r, device=device) * 2 - 1
            gan.step(itertools.repeat(x), 0.0)

        steps[s.name] = step
    return steps


def resolve(
    cfg: Config, nc: int, device: torch.device, cache_dir: str = "", use_cache: bool = True
) -> Choice:
    """Settle cfg.train.precision and cfg.train.channels_last for this machine."""
    from dcgan.data import cache_root

    t = cfg.train
    isa = machine.cpu_isa()
    cap = str(isa["capability"])
    if device.type == "cuda":
        p = (
            t.precision
            if t.precision != "auto"
            else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
        )
        how = "rule" if "auto" in (t.precision, t.channels_last) else "fixed"
        return Choice(Setting(p, t.channels_last != "off"), how, "cuda")
    if t.engine == "scratch":  # the engine computes in fp32, NCHW
        return Choice(Setting("fp32", False), "rule", cap)
    cands = candidates(t.precision, t.channels_last, isa)
    if len(cands) == 1:
        how = "fixed" if "auto" not in (t.precision, t.channels_last) else "rule"
        return Choice(cands[0], how, cap)
    path = cache_root(cache_dir) / CACHE_FILE
    key = cache_key(cfg, nc, t.precision, t.channels_last)
    if use_cache and (cached := _cached(path, key)) is not None:
        return cached
    print(
        f"auto: timing {len(cands)} settings on this CPU ({cap}; about 10 s, once)", file=sys.stderr
    )
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # the run's own RNG stream stays untouched
        rates, dropped = measure(train_steps(cfg, nc, device, cands), t.batch)
    best = max(rates, key=lambda n: rates[n] if n not in dropped else -1.0)
    choice = Choice(
        next(s for s in cands if s.name == best),
        "measured",
        cap,
        rates,
        dropped,
        time.perf_counter() - t0,
    )
    if use_cache:
        _store(path, key, choice)
    return choice


def apply(cfg: Config, choice: Choice) -> Config:
    """cfg with the resolved precision and layout written in (what config.json records)."""
    return apply_overrides(
        cfg,
        {
            "precision": choice.setting.precision,
            "channels_last": "on" if choice.setting.channels_last else "off",
        },
    )
