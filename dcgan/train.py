"""The training loop: Goodfellow et al.'s Algorithm 1 for the DCGAN, counted in kimg and ticks.

Each iteration is one `dcgan.step.train_step` (`d_steps` D-updates, then one
G-update). Progress is the number of real images shown to D (`nimg`); every
`tick_kimg` the loop reads its accumulated statistics back from the device (the
only host synchronisation), appends a line to `stats.jsonl`, saves the
fixed-noise grid, redraws `losses.png`, and every `checkpoint_ticks` ticks saves
the training state and refreshes `report.html`.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dcgan import atomic, calibrate, checkpoint, page, report
from dcgan.config import Config
from dcgan.data import Batches, load_images
from dcgan.dist import (
    DistEnv,
    all_reduce_mean,
    cleanup,
    injected_fault,
    setup,
    weights_in_sync,
)
from dcgan.errors import UserError
from dcgan.machine import resolve_device
from dcgan.step import (  # noqa: F401 (ema_beta, instance_noise_std: the loop's schedules)
    GAN,
    autocast,
    build_gan,
    ema_beta,
    ema_update,
    instance_noise_std,
    memory_format,
    scratch_step,
    train_step,
)
from dcgan.tblog import TensorBoardLog

N_FIXED = 64  # latents in the per-tick sample grid


def peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in KiB on Linux: the process's peak resident set
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def snapshot_meta(cfg: Config, nc: int, nimg: int) -> dict[str, Any]:
    return {"nz": cfg.model.nz, "ngf": cfg.model.ngf, "nc": nc,
            "resolution": cfg.data.resolution, "g_dropout": cfg.model.g_dropout,
            "dataset": cfg.data.dataset, "kimg": nimg / 1000.0}


def fixed_latents(cfg: Config, device: torch.device) -> torch.Tensor:
    """The same N_FIXED latents for every tick, from their own generator (the
    global RNG stream, which resume restores, is left untouched)."""
    gen = torch.Generator().manual_seed(cfg.train.seed)
    return torch.randn(N_FIXED, cfg.model.nz, 1, 1, generator=gen).to(device)


class StopFlag:
    """SIGINT/SIGTERM set a flag that the loop checks between steps, so the state
    is saved whole; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.set = False
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if self.set and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.set = True
        print(f"\n{signal.Signals(signum).name}: saving the training state at the end of "
              "this step (Ctrl-C again to abort without saving)", file=sys.stderr)

    def __enter__(self) -> StopFlag:
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def agree_to_stop(flag: bool, steps: int, env: DistEnv, device: torch.device) -> bool:
    """All ranks must leave the loop at the same step or the next collective hangs.

    A signal can reach ranks between different steps, so under torchrun the
    ranks compare flags every 16 steps (a small all-reduce, one host sync)."""
    if not env.enabled:
        return flag
    if steps % 16:
        return False
    t = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


MAX_ROLLBACKS = 3


class Watch:
    """Per-tick health checks: non-finite values, and the collapse patterns users
    report (D right about everything, or G's loss climbing tick after tick)."""

    def __init__(self, patience: int = 4):
        self.patience = patience
        self.d_certain = 0  # consecutive ticks with D(x) > 0.99 and D(G(z)) < 0.01
        self.g_rising = 0  # consecutive ticks of growing G loss
        self.last_g = float("inf")
        self.warned: set[str] = set()

    @staticmethod
    def finite(means: dict[str, float], gan: GAN) -> bool:
        if not all(math.isfinite(v) for v in means.values()):
            return False
        weights = [v for net in (gan.G, gan.D) for v in net.state_dict().values()
                   if v.is_floating_point()]
        return bool(torch.stack([w.isfinite().all() for w in weights]).all())

    def collapse(self, means: dict[str, float]) -> list[str]:
        self.d_certain = self.d_certain + 1 if (
            means["d_real"] > 0.99 and means["d_fake"] < 0.01) else 0
        self.g_rising = self.g_rising + 1 if means["loss_g"] > self.last_g else 0
        self.last_g = means["loss_g"]
        found = []
        if self.d_certain >= self.patience and "d" not in self.warned:
            self.warned.add("d")
            found.append(f"D has separated real from fake almost perfectly for {self.d_certain} "
                         "ticks: G gets little gradient (try --label-smoothing 0.1, "
                         "--instance-noise 0.1 or a lower --d-lr)")
        if self.g_rising >= self.patience and "g" not in self.warned:
            self.warned.add("g")
            found.append(f"G's loss has grown for {self.g_rising} ticks in a row: a sign of "
                         "collapse; compare samples/ across ticks")
        return found


def prepare_run_dir(out: Path, cfg: Config, force: bool) -> None:
    """A fresh run folder; refuse to mix two runs unless --force.

    A folder whose earlier attempt stopped before its first checkpoint holds nothing
    that could be continued, so it is cleared and started again without --force
    (under torchrun --max-restarts the relaunch of such a run lands here)."""
    if (out / "stats.jsonl").exists() or (out / checkpoint.CHECKPOINT).exists():
        if not force and (out / checkpoint.CHECKPOINT).exists():
            raise UserError(f"{out} already holds a run; use --resume {out} to continue it "
                            "or --force to start over")
        for name in ("stats.jsonl", "events.jsonl", "metrics.jsonl", "losses.png",
                     checkpoint.CHECKPOINT, checkpoint.SNAPSHOT, checkpoint.BEST, "config.json",
                     checkpoint.D_INIT, page.REPORT, page.MACHINE):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "samples", ignore_errors=True)
        shutil.rmtree(out / "tensorboard", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(cfg.to_json() + "\n")


def restore(gan: GAN, batches: Batches, resume: dict[str, Any], env: DistEnv,
            device: torch.device) -> tuple[int, int]:
    """Load a checkpoint into fresh objects; returns (nimg, tick).

    In one process the RNG streams are restored too, so the continuation is
    bit-identical to an uninterrupted run. Under torchrun each rank reseeds from
    (seed, nimg, rank) instead, which also lets the process count change."""
    gan.G.load_state_dict(resume["G"])
    gan.D.load_state_dict(resume["D"])
    gan.G_ema.load_state_dict(resume["G_ema"])
    gan.opt_g.load_state_dict(resume["opt_g"])
    gan.opt_d.load_state_dict(resume["opt_d"])
    if gan.scaler_g is not None and "scaler_g" in resume:
        gan.scaler_g.load_state_dict(resume["scaler_g"])
        gan.scaler_d.load_state_dict(resume["scaler_d"])
    nimg, tick = resume["nimg"], resume["tick"]
    gan.d_updates = resume.get("d_updates", 0)
    if resume.get("world_size", 1) == env.world_size:
        batches.load_state_dict(resume["batches"])
    else:  # shards differ: start the interrupted epoch's new shards from their beginning
        batches.load_state_dict({"epoch": resume["batches"]["epoch"], "position": 0})
    if env.enabled:
        torch.manual_seed(resume["config"]["train"]["seed"] + 1_000_003 * env.rank + nimg)
    else:
        torch.set_rng_state(resume["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in resume:
            torch.cuda.set_rng_state(resume["rng_cuda"], device)
    return nimg, tick


def set_lr_factor(gan: GAN, cfg: Config, factor: float) -> None:
    """Both optimisers' learning rates = the configured rate x factor."""
    for opt, lr in ((gan.opt_g, cfg.train.g_lr), (gan.opt_d, cfg.train.d_lr)):
        for group in opt.param_groups:
            group["lr"] = lr * factor


def trim_to(out: Path, rows: list[dict[str, Any]], nimg: int) -> list[dict[str, Any]]:
    """Keep the stats and metrics lines up to nimg (a checkpoint's); rewrite both files."""
    kept = [r for r in rows if r["kimg"] * 1000 <= nimg]
    atomic.write_text(out / "stats.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        m = [r for r in report.read_stats(metrics) if r["kimg"] * 1000 <= nimg]
        atomic.write_text(metrics, "".join(json.dumps(r) + "\n" for r in m))
    return kept


def write_report(out: Path) -> None:
    """RUN/report.html; a report that cannot be drawn costs a warning, never the run."""
    try:
        page.build_report(out)
    except (ImportError, UserError) as e:
        print(f"\nwarning: report.html not refreshed ({e})", file=sys.stderr)


def resolve_auto(cfg: Config, nc: int, device: torch.device,
                 env: DistEnv) -> calibrate.Choice:
    """`auto` precision and layout for this machine; under torchrun rank 0 measures
    and every rank takes its answer (ranks must run the same computation)."""
    choice = calibrate.resolve(cfg, nc, device, cfg.data.cache_dir) if env.is_main else None
    if env.enabled:
        box = [choice]
        torch.distributed.broadcast_object_list(
            box, src=0, device=device if device.type == "cuda" else None)
        choice = box[0]
    return choice


def training_loop(cfg: Config, out: Path, resume: dict[str, Any] | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Train until cfg.train.kimg; return the last tick's stats.

    `resume` is a loaded checkpoint whose state replaces the fresh one. Under
    torchrun every rank runs this; rank 0 alone writes to `out`.
    """
    env, device = setup(resolve_device(cfg.train.device))
    main = env.is_main
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank

    data = load_images(cfg.data.dataset, cfg.data.resolution, cfg.data.channels,
                       cache_dir=cfg.data.cache_dir, progress=progress and main)
    nc = data.images.shape[1]
    choice = resolve_auto(cfg, nc, device, env)
    cfg = calibrate.apply(cfg, choice)
    t, precision = cfg.train, cfg.train.precision
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if choice.how != "fixed":
            print(choice.line(), file=sys.stderr)
        (out / "config.json").write_text(cfg.to_json() + "\n")  # the resolved values
        report.append_stats(out / "events.jsonl", {"event": "settings", **choice.as_dict(),
                                                   "time": time.time()})
    batches = Batches(data.images, t.batch, device, flip=cfg.data.flip, seed=t.seed,
                      rank=env.rank, world_size=env.world_size)
    gan = build_gan(cfg, nc, device, env, precision)
    ctx = autocast(precision, device)
    fmt = memory_format(cfg)
    if resume is None and main:  # D before its first step: transfer's "untrained D" baseline
        checkpoint.save_state_dict(gan.D, out / checkpoint.D_INIT)
    tb = None
    if main:
        page.save_machine(out)  # what the report shows as "the machine"
        if t.tensorboard:
            tb = TensorBoardLog(out, cfg.to_dict())

    nimg, tick, rollbacks = 0, 0, 0
    watch = Watch()
    if resume is not None:
        nimg, tick = restore(gan, batches, resume, env, device)
        rollbacks = resume.get("rollbacks", 0)
    elif env.enabled:
        torch.manual_seed(t.seed + 1_000_003 * env.rank)  # different noise per rank

    tracker = None
    if t.eval_every > 0 and main:
        from dcgan.evaluate import FidTracker

        tracker = FidTracker(cfg.data.dataset, cfg.data.resolution, nc, t.eval_features,
                             t.eval_n, device, cfg.data.cache_dir, progress=progress)
    best_fid = resume.get("best_fid", float("inf")) if resume is not None else float("inf")

    total = int(round(t.kimg * 1000))
    per_step = t.batch * t.d_steps * env.world_size  # real images shown to D per iteration
    beta = ema_beta(cfg, t.batch * env.world_size)
    tick_nimg = t.tick_kimg * 1000
    z_fixed = fixed_latents(cfg, device)
    rows = report.read_stats(out / "stats.jsonl") if main else []
    if resume is not None and main:  # drop lines written after the checkpoint (a crash)
        rows = trim_to(out, rows, nimg)

    def state() -> dict[str, Any]:
        s = {"G": gan.G.state_dict(), "D": gan.D.state_dict(), "G_ema": gan.G_ema.state_dict(),
             "opt_g": gan.opt_g.state_dict(), "opt_d": gan.opt_d.state_dict(),
             "batches": batches.state_dict(), "nimg": nimg, "tick": tick,
             "world_size": env.world_size, "best_fid": best_fid, "rollbacks": rollbacks,
             "d_updates": gan.d_updates,
             "rng_cpu": torch.get_rng_state(),
             "config": cfg.to_dict()}
        if device.type == "cuda":
            s["rng_cuda"] = torch.cuda.get_rng_state(device)
        if gan.scaler_g is not None:
            s["scaler_g"], s["scaler_d"] = gan.scaler_g.state_dict(), gan.scaler_d.state_dict()
        return s

    bar = tqdm(total=total, initial=nimg, unit="img", unit_scale=True, dynamic_ncols=True,
               disable=not (progress and main), desc="train")
    row: dict[str, Any] = {}
    sums: dict[str, torch.Tensor] = {}
    steps, tick_start, tick_start_nimg = 0, time.perf_counter(), nimg
    stopped = False
    with StopFlag() as stop:
        while nimg < total and not stopped:
            if t.engine == "scratch":
                step_stats = scratch_step(gan, batches, cfg)
            else:
                step_stats = train_step(gan, batches, cfg, instance_noise_std(cfg, nimg, total),
                                        ctx, fmt)
            ema_update(gan.G_ema, gan.G, beta)  # beta 0 (no EMA) copies G
            for k, v in step_stats.items():  # summed on the device: no sync until the tick
                sums[k] = sums[k] + v if k in sums else v.clone()
            steps += 1
            nimg += per_step
            bar.update(per_step)
            stopped = agree_to_stop(stop.set, steps, env, device)
            injected_fault(nimg, env)
            if nimg // tick_nimg == (nimg - per_step) // tick_nimg and nimg < total and (
                    not stopped):
                continue
            # ---- end of a tick: the one host synchronisation
            tick += 1
            means = {k: v.item() for k, v in all_reduce_mean(
                {k: v / steps for k, v in sums.items()}, env).items()}
            if not watch.finite(means, gan):
                # nothing of this tick is written: the last checkpoint stays the last good one
                ckpt = out / checkpoint.CHECKPOINT
                where = f"the last good checkpoint is {ckpt}" if ckpt.exists() else (
                    "no checkpoint was written yet")
                if t.on_nan == "stop" or rollbacks >= MAX_ROLLBACKS or not ckpt.exists():
                    raise UserError(f"non-finite loss or weights at {nimg / 1000:.3f} kimg "
                                    f"(tick {tick}); training stopped; {where}")
                rollbacks += 1
                bad_kimg = nimg / 1000
                good = checkpoint.load_state(ckpt)
                nimg, tick = restore(gan, batches, good, env, device)
                # from the configured rates, not the loaded ones: a checkpoint written after
                # an earlier rollback already holds a halved rate
                set_lr_factor(gan, cfg, 0.5 ** rollbacks)
                event = {"event": "rollback", "at_kimg": bad_kimg, "to_kimg": nimg / 1000,
                         "lr_factor": 0.5 ** rollbacks, "time": time.time()}
                if main:
                    rows = trim_to(out, rows, nimg)  # the ticks after the checkpoint replay
                    report.append_stats(out / "events.jsonl", event)
                    print(f"\nnon-finite values: rolled back to {nimg / 1000:.3f} kimg with "
                          f"learning rates x{0.5 ** rollbacks} ({rollbacks}/{MAX_ROLLBACKS})",
                          file=sys.stderr)
                sums, steps, tick_start, tick_start_nimg = {}, 0, time.perf_counter(), nimg
                bar.n = nimg
                continue
            for warning in watch.collapse(means):
                if main:
                    print(f"\nwarning: {warning}", file=sys.stderr)
                    report.append_stats(out / "events.jsonl", {
                        "event": "warning", "kimg": nimg / 1000, "message": warning})
            dt = time.perf_counter() - tick_start
            row = {"tick": tick, "kimg": round(nimg / 1000, 3), **means,
                   "img_per_s": (nimg - tick_start_nimg) / dt,
                   "sec_per_kimg": dt * 1000 / (nimg - tick_start_nimg),
                   "peak_mem_mb": round(peak_mem_mb(device), 1),
                   "noise_std": instance_noise_std(cfg, nimg, total), "time": time.time()}
            if main:
                report.append_stats(out / "stats.jsonl", row)
                rows.append(row)
                # Save image snapshot (named by image count: ticks may be shorter than 1 kimg).
                with torch.no_grad():
                    fixed = report.to_uint8(gan.G_ema(z_fixed))  # (64, C, R, R)
                report.save_grid(fixed, out / "samples" / f"fakes{nimg:09d}.png")
                if tb is not None:
                    tb.tick(nimg, row, report.grid(fixed))
                report.plot_losses(rows, out / "losses.png")
                checkpoint.save_generator(gan.G_ema, snapshot_meta(cfg, nc, nimg),
                                          out / checkpoint.SNAPSHOT)
                eval_step = t.eval_every * 1000
                if tracker is not None and (nimg // eval_step > tick_start_nimg // eval_step
                                            or nimg >= total):
                    scores = tracker(gan.G_ema)
                    best = scores["fid"] < best_fid
                    if best:  # keep the best snapshot: DCGAN's FID often worsens later on
                        best_fid = scores["fid"]
                        checkpoint.save_generator(gan.G_ema, snapshot_meta(cfg, nc, nimg),
                                                  out / checkpoint.BEST)
                    report.append_stats(out / "metrics.jsonl", {
                        "kimg": row["kimg"], **scores, "best": best, "time": time.time()})
                    row["fid"] = scores["fid"]
                    if tb is not None:
                        tb.metrics(nimg, scores)
                # Save the training state, and refresh the run's HTML report beside it.
                if tick % t.checkpoint_ticks == 0 or nimg >= total or stopped:
                    checkpoint.save_state(state(), out / checkpoint.CHECKPOINT)
                    if t.report:
                        write_report(out)
                bar.set_postfix(loss_d=f"{means['loss_d']:.3f}", loss_g=f"{means['loss_g']:.3f}",
                                refresh=False)
            sums, steps, tick_start, tick_start_nimg = {}, 0, time.perf_counter(), nimg
    bar.close()
    if tb is not None:
        tb.close()
    if env.enabled:
        in_sync = weights_in_sync([gan.G, gan.D], env)
        if main:
            print(f"{env.world_size} ranks hold identical G and D weights: {in_sync}",
                  file=sys.stderr)
    cleanup(env)
    return {**row, "stopped": stopped}
