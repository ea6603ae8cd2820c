"""The training loop: Goodfellow et al.'s Algorithm 1 for the DCGAN, counted in kimg and ticks.

Each iteration is one call of the GAN's `Step` (`d_steps` D-updates, then one
G-update; autograd or the engine alike), then G's moving average. Progress is the
number of real images shown to D (`nimg`); every `tick_kimg` the loop collects
the statistics the step reported (`dcgan.training_stats`: the only host
synchronisation), appends a line to `stats.jsonl`, saves the fixed-noise grid,
redraws `losses.png`, and every `checkpoint_ticks` ticks saves the training state
and refreshes `report.html`. Every file name is the run folder's (`RunDir`).
"""

from __future__ import annotations

import json
import math
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dcgan import atomic, calibrate, checkpoint, report, runlog, training_stats
from dcgan.config import Config, apply_overrides
from dcgan.data import load_images
from dcgan.dist import DistEnv, cleanup, injected_fault, setup, weights_in_sync
from dcgan.errors import UserError
from dcgan.machine import resolve_device
from dcgan.rundir import RunDir
from dcgan.sampler import Batches
from dcgan.step import GAN, build_gan, ema_beta, instance_noise_std
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
    run = RunDir(out)
    if run.stats.exists() or run.checkpoint.exists():
        if not force and run.checkpoint.exists():
            raise UserError(f"{out} already holds a run; use --resume {out} to continue it "
                            "or --force to start over")
        run.clear()
    out.mkdir(parents=True, exist_ok=True)
    run.config.write_text(cfg.to_json() + "\n")


def restore(gan: GAN, batches: Batches, resume: dict[str, Any], env: DistEnv,
            device: torch.device) -> tuple[int, int]:
    """Load a checkpoint into fresh objects; returns (nimg, tick).

    In one process the RNG streams are restored too, so the continuation is
    bit-identical to an uninterrupted run. Under torchrun each rank reseeds from
    (seed, nimg, rank) instead, which also lets the process count change."""
    gan.load_state_dict(resume)
    nimg, tick = resume["nimg"], resume["tick"]
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


def trim_to(run: RunDir, rows: list[dict[str, Any]], nimg: int) -> list[dict[str, Any]]:
    """Keep the stats and metrics lines up to nimg (a checkpoint's); rewrite both files."""
    kept = [r for r in rows if r["kimg"] * 1000 <= nimg]
    atomic.write_text(run.stats, "".join(json.dumps(r) + "\n" for r in kept))
    if run.metrics.exists():
        m = [r for r in runlog.read_stats(run.metrics) if r["kimg"] * 1000 <= nimg]
        atomic.write_text(run.metrics, "".join(json.dumps(r) + "\n" for r in m))
    return kept


def write_report(run: RunDir) -> None:
    """RUN/report.html; a report that cannot be drawn costs a warning, never the run."""
    try:
        report.build_report(run.path)
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


class Progress:
    """Where the run is: images shown, ticks, rollbacks and the best FID so far."""

    def __init__(self, resume: dict[str, Any] | None) -> None:
        resume = resume or {}
        self.nimg, self.tick = resume.get("nimg", 0), resume.get("tick", 0)
        self.rollbacks = resume.get("rollbacks", 0)
        self.best_fid = resume.get("best_fid", float("inf"))


def training_state(gan: GAN, batches: Batches, p: Progress, cfg: Config, env: DistEnv,
                   device: torch.device) -> dict[str, Any]:
    """Everything resume needs: weights, optimisers, scalers, data order, RNG streams."""
    s = {**gan.state_dict(), "batches": batches.state_dict(), "nimg": p.nimg, "tick": p.tick,
         "world_size": env.world_size, "best_fid": p.best_fid, "rollbacks": p.rollbacks,
         "rng_cpu": torch.get_rng_state(), "config": cfg.to_dict()}
    if device.type == "cuda":
        s["rng_cuda"] = torch.cuda.get_rng_state(device)
    return s


def roll_back(run: RunDir, gan: GAN, batches: Batches, p: Progress, rows: list[dict[str, Any]],
              cfg: Config, env: DistEnv, device: torch.device) -> list[dict[str, Any]]:
    """Non-finite values: back to the last checkpoint with halved learning rates, or stop.

    Nothing of the bad tick was written, so the last checkpoint is the last good one."""
    where = (f"the last good checkpoint is {run.checkpoint}" if run.checkpoint.exists()
             else "no checkpoint was written yet")
    if cfg.train.on_nan == "stop" or p.rollbacks >= MAX_ROLLBACKS or not run.checkpoint.exists():
        raise UserError(f"non-finite loss or weights at {p.nimg / 1000:.3f} kimg "
                        f"(tick {p.tick}); training stopped; {where}")
    p.rollbacks += 1
    bad_kimg = p.nimg / 1000
    p.nimg, p.tick = restore(gan, batches, checkpoint.load_state(run.checkpoint), env, device)
    # from the configured rates, not the loaded ones: a checkpoint written after an
    # earlier rollback already holds a halved rate
    factor = 0.5 ** p.rollbacks
    set_lr_factor(gan, cfg, factor)
    if env.is_main:
        rows = trim_to(run, rows, p.nimg)  # the ticks after the checkpoint replay
        runlog.append_stats(run.events, {"event": "rollback", "at_kimg": bad_kimg,
                                         "to_kimg": p.nimg / 1000, "lr_factor": factor,
                                         "time": time.time()})
        print(f"\nnon-finite values: rolled back to {p.nimg / 1000:.3f} kimg with "
              f"learning rates x{factor} ({p.rollbacks}/{MAX_ROLLBACKS})", file=sys.stderr)
    return rows


def training_loop(cfg: Config, out: Path, resume: dict[str, Any] | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Train until cfg.train.kimg; return the last tick's stats.

    `resume` is a loaded checkpoint whose state replaces the fresh one. Under
    torchrun every rank runs this; rank 0 alone writes to `out`.
    """
    env, device = setup(resolve_device(cfg.train.device))
    main = env.is_main
    run = RunDir(out)
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank

    # Data, and what this machine resolves: `auto` settings and the image channels.
    data = load_images(cfg.data.dataset, cfg.data.resolution, cfg.data.channels,
                       cache_dir=cfg.data.cache_dir, progress=progress and main)
    nc = data.images.shape[1]
    choice = resolve_auto(cfg, nc, device, env)
    cfg = apply_overrides(calibrate.apply(cfg, choice), {"channels": nc})
    t = cfg.train
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if choice.how != "fixed":
            print(choice.line(), file=sys.stderr)
        run.config.write_text(cfg.to_json() + "\n")  # the resolved values
        runlog.append_stats(run.events, {"event": "settings", **choice.as_dict(),
                                         "time": time.time()})

    # Networks, optimisers and the step; D's weights before any step (transfer's baseline).
    batches = Batches(data.images, t.batch, device, flip=cfg.data.flip, seed=t.seed,
                      rank=env.rank, world_size=env.world_size)
    gan = build_gan(cfg, nc, device, env, t.precision)
    if resume is None and main:
        checkpoint.save_state_dict(gan.D, run.d_init)
    tb = None
    if main:
        report.save_machine(run.path)  # what the report shows as "the machine"
        if t.tensorboard:
            tb = TensorBoardLog(run.path, cfg.to_dict())

    p = Progress(resume)
    if resume is not None:
        restore(gan, batches, resume, env, device)
    elif env.enabled:
        torch.manual_seed(t.seed + 1_000_003 * env.rank)  # different noise per rank
    tracker = None
    if t.eval_every > 0 and main:
        from dcgan.evaluate import FidTracker

        tracker = FidTracker(cfg.data.dataset, cfg.data.resolution, nc, t.eval_features,
                             t.eval_n, device, cfg.data.cache_dir, progress=progress)

    total = int(round(t.kimg * 1000))
    per_step = t.batch * t.d_steps * env.world_size  # real images shown to D per iteration
    beta = ema_beta(cfg, t.batch * env.world_size)
    tick_nimg = t.tick_kimg * 1000
    z_fixed = fixed_latents(cfg, device)
    rows = runlog.read_stats(run.stats) if main else []
    if resume is not None and main:  # drop lines written after the checkpoint (a crash)
        rows = trim_to(run, rows, p.nimg)

    bar = tqdm(total=total, initial=p.nimg, unit="img", unit_scale=True, dynamic_ncols=True,
               disable=not (progress and main), desc="train")
    watch = Watch()
    row: dict[str, Any] = {}
    training_stats.reset()
    steps, tick_start, tick_start_nimg = 0, time.perf_counter(), p.nimg
    stopped = False
    with StopFlag() as stop:
        while p.nimg < total and not stopped:
            gan.step(batches, instance_noise_std(cfg, p.nimg, total))
            gan.ema.update(beta)  # beta 0 (no EMA) copies G
            steps += 1
            p.nimg += per_step
            bar.update(per_step)
            stopped = agree_to_stop(stop.set, steps, env, device)
            injected_fault(p.nimg, env)
            if p.nimg // tick_nimg == (p.nimg - per_step) // tick_nimg and p.nimg < total and (
                    not stopped):
                continue

            # ---- End of a tick: the one host synchronisation.
            p.tick += 1
            means = training_stats.collect(env)
            if not watch.finite(means, gan):
                rows = roll_back(run, gan, batches, p, rows, cfg, env, device)
                steps, tick_start, tick_start_nimg = 0, time.perf_counter(), p.nimg
                bar.n = p.nimg
                continue
            for warning in watch.collapse(means):
                if main:
                    print(f"\nwarning: {warning}", file=sys.stderr)
                    runlog.append_stats(run.events, {
                        "event": "warning", "kimg": p.nimg / 1000, "message": warning})
            dt = time.perf_counter() - tick_start
            row = {"tick": p.tick, "kimg": round(p.nimg / 1000, 3), **means,
                   "img_per_s": (p.nimg - tick_start_nimg) / dt,
                   "sec_per_kimg": dt * 1000 / (p.nimg - tick_start_nimg),
                   "peak_mem_mb": round(peak_mem_mb(device), 1),
                   "noise_std": instance_noise_std(cfg, p.nimg, total), "time": time.time()}
            if main:
                # Log the tick, save the image snapshot and G_ema.
                runlog.append_stats(run.stats, row)
                rows.append(row)
                with torch.no_grad():
                    fixed = runlog.to_uint8(gan.G_ema(z_fixed))  # (64, C, R, R)
                runlog.save_grid(fixed, run.grid(p.nimg))
                if tb is not None:
                    tb.tick(p.nimg, row, runlog.grid(fixed))
                runlog.plot_losses(rows, run.losses)
                meta = snapshot_meta(cfg, nc, p.nimg)
                checkpoint.save_generator(gan.G_ema, meta, run.snapshot)

                # Evaluate metrics; keep the best snapshot (DCGAN's FID often worsens later).
                eval_step = t.eval_every * 1000
                if tracker is not None and (p.nimg // eval_step > tick_start_nimg // eval_step
                                            or p.nimg >= total):
                    scores = tracker(gan.G_ema)
                    best = scores["fid"] < p.best_fid
                    if best:
                        p.best_fid = scores["fid"]
                        checkpoint.save_generator(gan.G_ema, meta, run.best)
                    runlog.append_stats(run.metrics, {
                        "kimg": row["kimg"], **scores, "best": best, "time": time.time()})
                    row["fid"] = scores["fid"]
                    if tb is not None:
                        tb.metrics(p.nimg, scores)

                # Save the training state, and refresh the run's HTML report beside it.
                if p.tick % t.checkpoint_ticks == 0 or p.nimg >= total or stopped:
                    state = training_state(gan, batches, p, cfg, env, device)
                    checkpoint.save_state(state, run.checkpoint)
                    if t.report:
                        write_report(run)
                bar.set_postfix(loss_d=f"{means['loss_d']:.3f}", loss_g=f"{means['loss_g']:.3f}",
                                refresh=False)
            steps, tick_start, tick_start_nimg = 0, time.perf_counter(), p.nimg
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
