"""`dcgan bench`: train-step throughput of the reference and of each optimisation.

All rows run in one process on the same device, timed in turns:

- `reference`: a step written to match the canonical PyTorch DCGAN example
  (eager, fp32, Sigmoid + BCELoss, contiguous tensors, default optimiser
  kernels, `.item()` on the losses every step as the example prints them, and
  on real data a DataLoader that decodes and resizes every image from a file);
- one row per optimisation switched on alone over the reference's dcgan step;
- `default`: what `dcgan train` uses on this device.

Throughput is the median images/s over several timed windows after warm-up.
Model FLOPs per image come from the layer shapes (see `train_flops_per_image`).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from dcgan import calibrate
from dcgan.bench.timing import clock, in_turns, sync
from dcgan.config import Config, from_preset
from dcgan.errors import UserError
from dcgan.machine import device_label
from dcgan.models import Discriminator, Generator, build_discriminator, build_generator
from dcgan.pixels import from_uint8
from dcgan.sampler import Batches
from dcgan.step import GAN, build_gan

# ---------------------------------------------------------------- FLOPs


def forward_flops(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-adds x 2 of every conv / transposed conv for one input of input_shape."""
    flops = 0

    def hook(m, inp, out):
        nonlocal flops
        if isinstance(m, nn.Conv2d):  # each output element: Cin * k * k MACs
            flops += 2 * out[0].numel() * m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.ConvTranspose2d):  # each input element: Cout * k * k MACs
            x = inp[0][0]
            flops += 2 * x.numel() * m.out_channels * m.kernel_size[0] * m.kernel_size[1]

    handles = [m.register_forward_hook(hook) for m in module.modules()]
    with torch.no_grad():
        module.eval()(torch.zeros(1, *input_shape))
    for h in handles:
        h.remove()
    return flops


def train_flops_per_image(g: Generator, d: Discriminator, nz: int) -> int:
    """Model FLOPs of one Algorithm-1 iteration (k=1) per real image.

    With F_G, F_D one forward of G and D: the D-step runs G forward (F_G), D on
    real and fake (2 F_D) and their backward (2 x 2 F_D: input and weight
    gradients); the G-step runs D forward (F_D), D backward for input gradients
    only (F_D) and G backward (2 F_G). Total 3 F_G + 8 F_D. Norms and
    activations are left out, as is usual for model FLOPs.
    """
    f_g = forward_flops(g, (nz, 1, 1))
    f_d = forward_flops(d, (d.nc, d.resolution, d.resolution))
    return 3 * f_g + 8 * f_d


# ---------------------------------------------------------------- memory


class PeakMemory:
    """Peak memory while the block runs: CUDA allocator peak, or on the CPU the
    resident set sampled every 5 ms from /proc (what the rows add over the baseline)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb = 0.0

    @staticmethod
    def rss_mb() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except OSError:
            return 0.0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self.rss_mb())
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()


# ---------------------------------------------------------------- the reference


class FileImages(torch.utils.data.Dataset):
    """Images decoded, resized and normalised per item, as torchvision's ImageFolder +
    Resize + CenterCrop + ToTensor + Normalize do in the canonical example."""

    def __init__(self, paths: list[Path], resolution: int, channels: int):
        self.paths, self.r, self.mode = paths, resolution, "L" if channels == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = Image.open(self.paths[i]).convert(self.mode)
        img = img.resize((self.r, self.r), Image.Resampling.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
        return (x - 0.5) / 0.5


def write_image_files(images: np.ndarray, folder: Path) -> list[Path]:
    """uint8 (N, C, R, R) -> PNG files, the form the canonical example reads."""
    paths = []
    for i, x in enumerate(images):
        arr = x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0)
        p = folder / f"{i:05d}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


class ReferenceStep:
    """The canonical example's iteration, kept literal (including its host syncs)."""

    def __init__(self, cfg: Config, nc: int, device: torch.device, loader):
        r = cfg.data.resolution
        self.netG = build_generator(cfg.model, nc, r).to(device)
        d = build_discriminator(cfg.model, nc, r).to(device)
        self.netD = nn.Sequential(d.main, nn.Sigmoid())
        self.criterion = nn.BCELoss()
        t = cfg.train
        self.optD = torch.optim.Adam(self.netD.parameters(), lr=t.d_lr, betas=(t.beta1, 0.999))
        self.optG = torch.optim.Adam(self.netG.parameters(), lr=t.g_lr, betas=(t.beta1, 0.999))
        self.nz, self.device, self.loader = cfg.model.nz, device, loader
        self.it = iter(loader)

    def _real(self) -> torch.Tensor:
        try:
            return next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            return next(self.it)

    def __call__(self) -> int:
        real = self._real().to(self.device)
        b = real.size(0)
        self.netD.zero_grad()
        label = torch.full((b,), 1.0, device=self.device)
        output = self.netD(real).view(-1)
        err_real = self.criterion(output, label)
        err_real.backward()
        d_x = output.mean().item()
        noise = torch.randn(b, self.nz, 1, 1, device=self.device)
        fake = self.netG(noise)
        label.fill_(0.0)
        output = self.netD(fake.detach()).view(-1)
        err_fake = self.criterion(output, label)
        err_fake.backward()
        d_g_z1 = output.mean().item()
        self.optD.step()
        self.netG.zero_grad()
        label.fill_(1.0)
        output = self.netD(fake).view(-1)
        err_g = self.criterion(output, label)
        err_g.backward()
        d_g_z2 = output.mean().item()
        self.optG.step()
        _ = (err_real + err_fake).item(), err_g.item(), d_x, d_g_z1, d_g_z2
        if self.loader.num_workers:
            wait_for_idle_workers()
        return b


def _children_cpu_ticks() -> int | None:
    """CPU time (clock ticks) used so far by this process's live children (Linux
    /proc); None where that cannot be read."""
    import multiprocessing

    total = 0
    for child in multiprocessing.active_children():
        try:
            fields = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total


def wait_for_idle_workers(
    poll_s: float = 0.02, quiet_polls: int = 3, timeout_s: float = 30.0
) -> None:
    """Block until the DataLoader workers stop using CPU (they refill their
    prefetch queue after each batch the reference takes).

    Without this, that decoding runs while the *next* row is timed. Waiting
    here charges the reference's decoding to the reference's own window. (It
    did not explain why two identical dcgan rows came out 15 % apart in one
    group on real data; docs/benchmarks.md records that open question.)
    """
    last, quiet = _children_cpu_ticks(), 0
    if last is None:
        return
    deadline = time.perf_counter() + timeout_s
    while quiet < quiet_polls and time.perf_counter() < deadline:
        time.sleep(poll_s)
        now = _children_cpu_ticks()
        if now is None:
            return
        quiet = quiet + 1 if now == last else 0
        last = now


# ---------------------------------------------------------------- dcgan's own step


class HostBatches:
    """Float batches built on the host and copied each step (no resident data): the
    variant rows' data path, so each isolates one switch. The `default` row uses
    the training loop's own `data.Batches` (uint8 resident on the device)."""

    def __init__(self, images: np.ndarray, batch: int, device: torch.device):
        self.images, self.batch, self.device = torch.from_numpy(images), batch, device
        self.gen = torch.Generator().manual_seed(0)

    def __next__(self) -> torch.Tensor:
        idx = torch.randint(0, self.images.shape[0], (self.batch,), generator=self.gen)
        return from_uint8(self.images[idx]).to(self.device)


class DcganStep:
    def __init__(self, cfg: Config, nc: int, device: torch.device, batches):
        # the `default` row resolves auto exactly as `dcgan train` does (cached)
        cfg = calibrate.apply(cfg, calibrate.resolve(cfg, nc, device, cfg.data.cache_dir))
        precision = cfg.train.precision
        self.gan: GAN = build_gan(cfg, nc, device, precision=precision)
        self.batch, self.batches = cfg.train.batch, batches

    def __call__(self) -> int:
        self.gan.step(self.batches, 0.0)  # the training loop's very step
        return self.batch


# ---------------------------------------------------------------- the rows

# Switches over the reference's dcgan step (fp32, contiguous, eager, per-tensor
# optimiser loops, host batches). Each row turns one on; `default` is train's.
BASE = {"precision": "fp32", "channels_last": False, "compile": False}
VARIANTS: dict[str, dict[str, Any]] = {
    "dcgan-fp32": {},
    "+channels_last": {"channels_last": True},
    "+bf16": {"precision": "bf16"},
    "+fp16": {"precision": "fp16"},
    "+compile": {"compile": True},
}


@dataclass
class Row:
    name: str
    device: str
    batch: int
    resolution: int
    data: str
    img_per_s: float
    peak_mem_mb: float
    warmup_s: float
    flops_per_img: int
    tflops: float
    peak_fraction: float | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def warm_up(step, warmup: int, device: torch.device) -> float:
    """Run `warmup` untimed steps (compilation, allocator and kernel caches); seconds."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    return time.perf_counter() - t0


def time_interleaved(
    steps: dict[str, Any],
    windows: int,
    steps_per_window: int,
    device: torch.device,
    after_window=lambda: None,
) -> dict[str, float]:
    """Median images/s of each step over `windows` windows of `steps_per_window`
    steps, the steps timed in turns (`dcgan.bench.timing.in_turns` says why)."""
    wins = in_turns(steps, windows, steps_per_window, clock("wall", device), after_window)
    return {name: statistics.median(n / s for n, s in w) for name, w in wins.items()}


def synthetic_images(batch: int, resolution: int) -> np.ndarray:
    """Random uint8 RGB images (max(4 batch, 512), 3, R, R), seed 0: the synthetic data."""
    return np.random.default_rng(0).integers(
        0, 256, (max(4 * batch, 512), 3, resolution, resolution), dtype=np.uint8
    )


def build_step(
    name: str, kind: str, cfg: Config, images: np.ndarray, device: torch.device, image_files
) -> Any:
    """One row's step: the reference with its DataLoader, or dcgan's step."""
    b, nc = cfg.train.batch, 3
    if name == "reference":
        if kind == "real":
            ds = FileImages(image_files(), cfg.data.resolution, nc)
            loader = torch.utils.data.DataLoader(
                ds,
                batch_size=b,
                shuffle=True,
                num_workers=2,
                drop_last=True,
                persistent_workers=True,
            )
        else:  # synthetic: tensors already decoded, as the example's fake data
            x = from_uint8(images)
            loader = torch.utils.data.DataLoader(x, batch_size=b, shuffle=True, drop_last=True)
        return ReferenceStep(cfg, nc, device, loader)
    if name == "default":
        return DcganStep(cfg, nc, device, Batches(images, b, device, flip=cfg.data.flip, seed=0))
    return DcganStep(cfg, nc, device, HostBatches(images, b, device))


def run_bench(
    device_name: str = "auto",
    *,
    batches: tuple[int, ...] = (64, 128),
    resolutions: tuple[int, ...] = (64, 32),
    data_kinds: tuple[str, ...] = ("synthetic", "real"),
    dataset: str = "emoji",
    names: tuple[str, ...] = (),
    warmup: int = 3,
    windows: int = 5,
    steps: int = 3,
    peak_tflops: float | None = None,
    progress: bool = True,
) -> list[Row]:
    """Rows for every (resolution, batch, data) group; within a group the rows are
    built and warmed up one by one, then timed in turns (`time_interleaved`).

    peak_mem_mb: on CUDA the allocator's peak during the row's build and warm-up;
    on the CPU the process's resident set before the group was built plus what
    it grew while this row was built and warmed up.
    """
    from dcgan.data import load_images
    from dcgan.machine import resolve_device

    device = resolve_device(device_name)
    plan = [
        "reference",
        *[v for v in VARIANTS if not (v == "+fp16" and device.type != "cuda")],
        "default",
    ]
    if names:
        unknown = set(names) - set(plan)
        if unknown:
            raise UserError(f"unknown bench rows {sorted(unknown)}; choose from {plan}")
        plan = [n for n in plan if n in names]
    groups = [(r, b, d) for r in resolutions for b in batches for d in data_kinds]
    rows: list[Row] = []
    bar = tqdm(
        total=len(groups) * len(plan) * (1 + windows),
        desc="bench",
        unit="window",
        disable=not progress,
        dynamic_ncols=True,
    )
    with tempfile.TemporaryDirectory(prefix="dcgan-bench-") as tmp:
        files: dict[int, list[Path]] = {}
        real: dict[int, np.ndarray] = {}
        for r, b, kind in groups:
            if kind == "real" and r not in real:
                real[r] = load_images(dataset, r, 3, progress=False).images
            images = real[r] if kind == "real" else synthetic_images(b, r)

            def image_files(r=r, images=images) -> list[Path]:
                if r not in files:  # the reference reads PNG files, as the example does
                    folder = Path(tmp) / f"{r}px"
                    folder.mkdir()
                    files[r] = write_image_files(images[:2048], folder)
                return files[r]

            built: dict[str, Any] = {}
            warm: dict[str, float] = {}
            mem: dict[str, float] = {}
            base = PeakMemory.rss_mb()
            for name in plan:
                bar.set_postfix_str(f"warm-up {name} {kind} b{b} {r}px")
                overrides = {"resolution": r, "batch": b, "dataset": dataset, "channels": 3}
                if name == "reference":
                    overrides.update(BASE)
                elif name != "default":
                    overrides.update({**BASE, **VARIANTS[name]})
                cfg = from_preset("dcgan64", overrides)
                torch.manual_seed(0)
                before = PeakMemory.rss_mb()
                with PeakMemory(device) as pm:
                    built[name] = build_step(name, kind, cfg, images, device, image_files)
                    warm[name] = warm_up(built[name], warmup, device)
                mem[name] = pm.peak_mb if device.type == "cuda" else base + pm.peak_mb - before
                bar.update(1)
            bar.set_postfix_str(f"timing {kind} b{b} {r}px")
            rates = time_interleaved(
                built, windows, steps, device, after_window=lambda: bar.update(len(plan))
            )
            g = Generator(cfg.model.nz, cfg.model.ngf, 3, r)
            d = Discriminator(cfg.model.ndf, 3, r)
            flops = train_flops_per_image(g, d, cfg.model.nz)
            for name in plan:
                rate = rates[name]
                tflops = rate * flops / 1e12
                rows.append(
                    Row(
                        name,
                        device_label(device),
                        b,
                        r,
                        kind,
                        round(rate, 1),
                        round(mem[name], 1),
                        round(warm[name], 2),
                        flops,
                        round(tflops, 4),
                        round(tflops / peak_tflops, 4) if peak_tflops else None,
                    )
                )
            del built
    bar.close()
    return rows


def format_table(rows: list[Row]) -> str:
    head = (
        f"{'name':<16} {'data':<9} {'batch':>5} {'res':>4} {'img/s':>9} {'x ref':>6} "
        f"{'peak MB':>8} {'warm s':>7} {'TFLOP/s':>8} {'of peak':>8}"
    )
    lines = [head, "-" * len(head)]
    ref = {(r.batch, r.resolution, r.data): r.img_per_s for r in rows if r.name == "reference"}
    for r in rows:
        base = ref.get((r.batch, r.resolution, r.data))
        speedup = f"{r.img_per_s / base:.2f}" if base else "-"
        frac = f"{100 * r.peak_fraction:.1f}%" if r.peak_fraction is not None else "-"
        lines.append(
            f"{r.name:<16} {r.data:<9} {r.batch:>5} {r.resolution:>4} "
            f"{r.img_per_s:>9.1f} {speedup:>6} {r.peak_mem_mb:>8.0f} "
            f"{r.warmup_s:>7.2f} {r.tflops:>8.3f} {frac:>8}"
        )
    return "\n".join(lines)


def save_chart(rows: list[Row], path: Path) -> None:
    """Horizontal bars of img/s, one group per (data, batch, resolution)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.name} | {r.data} b{r.batch} {r.resolution}px" for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(rows) + 1.2))
    colours = [
        "tab:gray" if r.name == "reference" else "tab:green" if r.name == "default" else "tab:blue"
        for r in rows
    ]
    ax.barh(range(len(rows)), [r.img_per_s for r in rows], color=colours)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("train-step images/s (median)")
    ax.set_title(f"dcgan bench on {rows[0].device}" if rows else "dcgan bench")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(rows: list[Row], path: Path, command: str) -> None:
    meta = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    path.write_text(json.dumps([{**r.as_dict(), **meta} for r in rows], indent=1) + "\n")


# ---------------------------------------------------------------- profiler


def profile_default(
    device_name: str = "auto",
    batch: int = 64,
    resolution: int = 64,
    data: str = "synthetic",
    dataset: str = "emoji",
    warmup: int = 3,
    steps: int = 3,
    trace: Path | None = None,
    top: int = 15,
) -> str:
    """torch.profiler over `steps` default train steps after warm-up.

    Returns the operator table sorted by self time on the device that does the
    work (CUDA kernels on a GPU, else CPU), and writes a Chrome trace (open it in
    chrome://tracing or https://ui.perfetto.dev) when `trace` is given.
    """
    from torch.profiler import ProfilerActivity, profile

    from dcgan.data import load_images
    from dcgan.machine import resolve_device

    device = resolve_device(device_name)
    cfg = from_preset(
        "dcgan64", {"resolution": resolution, "batch": batch, "dataset": dataset, "channels": 3}
    )
    images = (
        load_images(dataset, resolution, 3, progress=False).images
        if data == "real"
        else synthetic_images(batch, resolution)
    )
    torch.manual_seed(0)
    step = build_step("default", data, cfg, images, device, image_files=None)
    warm_up(step, warmup, device)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            step()
        sync(device)
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=top)
