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

import math
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dcgan import calibrate, checkpoint, report, runlog, training_stats
from dcgan.config import Config, apply_overrides
from dcgan.data import ImageSet, load_images
from dcgan.dist import DistEnv, cleanup, injected_fault, setup, weights_in_sync
from dcgan.errors import UserError
from dcgan.machine import resolve_device
from dcgan.memory import available_bytes
from dcgan.rundir import RunDir
from dcgan.sampler import BatchStream, Serving, choose, serve
from dcgan.step import GAN, build_gan, ema_beta, instance_noise_std
from dcgan.tblog import TensorBoardLog

N_FIXED = 64  # latents in the per-tick sample grid


def peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in KiB on Linux: the process's peak resident set
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def snapshot_meta(cfg: Config, nc: int, nimg: int) -> dict[str, Any]:
    return {
        "nz": cfg.model.nz,
        "ngf": cfg.model.ngf,
        "nc": nc,
        "resolution": cfg.data.resolution,
        "g_dropout": cfg.model.g_dropout,
        "dataset": cfg.data.dataset,
        "kimg": nimg / 1000.0,
    }


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
        print(
            f"\n{signal.Signals(signum).name}: saving the training state at the end of "
            "this step (Ctrl-C again to abort without saving)",
            file=sys.stderr,
        )

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
        weights = [
            v for net in (gan.G, gan.D) for v in net.state_dict().values() if v.is_floating_point()
        ]
        return bool(torch.stack([w.isfinite().all() for w in weights]).all())

    def collapse(self, means: dict[str, float]) -> list[str]:
        self.d_certain = (
            self.d_certain + 1 if (means["d_real"] > 0.99 and means["d_fake"] < 0.01) else 0
        )
        self.g_rising = self.g_rising + 1 if means["loss_g"] > self.last_g else 0
        self.last_g = means["loss_g"]
        found = []
        if self.d_certain >= self.patience and "d" not in self.warned:
            self.warned.add("d")
            found.append(
                f"D has separated real from fake almost perfectly for {self.d_certain} "
                "ticks: G gets little gradient (try --label-smoothing 0.1, "
                "--instance-noise 0.1 or a lower --d-lr)"
            )
        if self.g_rising >= self.patience and "g" not in self.warned:
            self.warned.add("g")
            found.append(
                f"G's loss has grown for {self.g_rising} ticks in a row: a sign of "
                "collapse; compare samples/ across ticks"
            )
        return found


class Progress:
    """Where the run is: images shown, ticks, rollbacks and the best FID so far."""

    def __init__(self, resume: dict[str, Any] | None) -> None:
        resume = resume or {}
        self.nimg, self.tick = resume.get("nimg", 0), resume.get("tick", 0)
        self.rollbacks = resume.get("rollbacks", 0)
        self.best_fid = resume.get("best_fid", float("inf"))


def restore(
    gan: GAN, batches: BatchStream, state: dict[str, Any], env: DistEnv, device: torch.device
) -> Progress:
    """Load a checkpoint into fresh objects; returns where it was (the one reading of a
    checkpoint's progress).

    In one process the RNG streams are restored too, so the continuation is
    bit-identical to an uninterrupted run. Under torchrun each rank reseeds from
    (seed, nimg, rank) instead, which also lets the process count change."""
    gan.load_state_dict(state)
    p = Progress(state)
    if state.get("world_size", 1) == env.world_size:
        batches.load_state_dict(state["batches"])
    else:  # shards differ: start the interrupted epoch's new shards from their beginning
        batches.load_state_dict({"epoch": state["batches"]["epoch"], "position": 0})
    if env.enabled:
        torch.manual_seed(state["config"]["train"]["seed"] + 1_000_003 * env.rank + p.nimg)
    else:
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
    return p


def set_lr_factor(gan: GAN, cfg: Config, factor: float) -> None:
    """Both optimisers' learning rates = the configured rate x factor."""
    for opt, lr in ((gan.opt_g, cfg.train.g_lr), (gan.opt_d, cfg.train.d_lr)):
        for group in opt.param_groups:
            group["lr"] = lr * factor


def write_report(run: RunDir) -> None:
    """RUN/report.html; a report that cannot be drawn costs a warning, never the run."""
    try:
        report.build_report(run.path)
    except (ImportError, UserError) as e:
        print(f"\nwarning: report.html not refreshed ({e})", file=sys.stderr)


def resolve_auto(cfg: Config, nc: int, device: torch.device, env: DistEnv) -> calibrate.Choice:
    """`auto` precision and layout for this machine; under torchrun rank 0 measures
    and every rank takes its answer (ranks must run the same computation)."""
    choice = calibrate.resolve(cfg, nc, device, cfg.data.cache_dir) if env.is_main else None
    if env.enabled:
        box = [choice]
        torch.distributed.broadcast_object_list(
            box, src=0, device=device if device.type == "cuda" else None
        )
        choice = box[0]
    return choice


def training_state(
    gan: GAN, batches: BatchStream, p: Progress, cfg: Config, env: DistEnv, device: torch.device
) -> dict[str, Any]:
    """Everything resume needs: weights, optimisers, scalers, data order, RNG streams."""
    s = {
        **gan.state_dict(),
        "batches": batches.state_dict(),
        "nimg": p.nimg,
        "tick": p.tick,
        "world_size": env.world_size,
        "best_fid": p.best_fid,
        "rollbacks": p.rollbacks,
        "rng_cpu": torch.get_rng_state(),
        "config": cfg.to_dict(),
    }
    if device.type == "cuda":
        s["rng_cuda"] = torch.cuda.get_rng_state(device)
    return s


def roll_back(
    run: RunDir,
    gan: GAN,
    batches: BatchStream,
    p: Progress,
    cfg: Config,
    env: DistEnv,
    device: torch.device,
) -> tuple[Progress, list[dict[str, Any]]]:
    """Non-finite values: back to the last checkpoint with halved learning rates, or stop.
    Returns the restored progress and the stats rows kept (rank 0; others get []).

    Nothing of the bad tick was written, so the last checkpoint is the last good one."""
    where = (
        f"the last good checkpoint is {run.checkpoint}"
        if run.checkpoint.exists()
        else "no checkpoint was written yet"
    )
    if cfg.train.on_nan == "stop" or p.rollbacks >= MAX_ROLLBACKS or not run.checkpoint.exists():
        raise UserError(
            f"non-finite loss or weights at {p.nimg / 1000:.3f} kimg "
            f"(tick {p.tick}); training stopped; {where}"
        )
    bad_kimg = p.nimg / 1000
    restored = restore(gan, batches, checkpoint.load_state(run.checkpoint), env, device)
    restored.rollbacks = p.rollbacks + 1
    # from the configured rates, not the loaded ones: a checkpoint written after an
    # earlier rollback already holds a halved rate
    factor = 0.5**restored.rollbacks
    set_lr_factor(gan, cfg, factor)
    if not env.is_main:
        return restored, []
    rows = run.trim(restored.nimg)  # the ticks after the checkpoint replay
    runlog.append_stats(
        run.events,
        {
            "event": "rollback",
            "at_kimg": bad_kimg,
            "to_kimg": restored.nimg / 1000,
            "lr_factor": factor,
            "time": time.time(),
        },
    )
    print(
        f"\nnon-finite values: rolled back to {restored.nimg / 1000:.3f} kimg with "
        f"learning rates x{factor} ({restored.rollbacks}/{MAX_ROLLBACKS})",
        file=sys.stderr,
    )
    return restored, rows


def resolve_run(
    cfg: Config, run: RunDir, env: DistEnv, device: torch.device, progress: bool
) -> tuple[Config, ImageSet, Serving]:
    """Read the data and resolve what this machine decides (`auto` precision and layout,
    the image channels, where the array lives); rank 0 writes the resolved config, once,
    and the machine. `--data-on` stays as given in the config: it changes no result, and
    `auto` should decide afresh on the machine a run resumes on."""
    data = load_images(
        cfg.data.dataset,
        cfg.data.resolution,
        cfg.data.channels,
        cache_dir=cfg.data.cache_dir,
        progress=progress and env.is_main,
    )
    nc = data.images.shape[1]
    choice = resolve_auto(cfg, nc, device, env)
    cfg = apply_overrides(calibrate.apply(cfg, choice), {"channels": nc})
    # each rank decides for its own device; the batches are the same either way
    serving = choose(cfg.data.data_on, data.images.nbytes, device, available_bytes(device))
    if env.is_main:
        if choice.how != "fixed":
            print(choice.line(), file=sys.stderr)
        if cfg.data.data_on == "auto":
            print(serving.line(), file=sys.stderr)
        run.write_config(cfg)
        run.save_machine()  # what the report shows as "the machine"
        runlog.append_stats(
            run.events,
            {"event": "settings", **choice.as_dict(), **serving.as_dict(), "time": time.time()},
        )
    return cfg, data, serving


def tick_row(
    means: dict[str, float],
    p: Progress,
    since_nimg: int,
    seconds: float,
    cfg: Config,
    total: int,
    device: torch.device,
) -> dict[str, Any]:
    """One line of stats.jsonl: the tick's mean statistics, speed and memory."""
    shown = p.nimg - since_nimg
    return {
        "tick": p.tick,
        "kimg": round(p.nimg / 1000, 3),
        **means,
        "img_per_s": shown / seconds,
        "sec_per_kimg": seconds * 1000 / shown,
        "peak_mem_mb": round(peak_mem_mb(device), 1),
        "noise_std": instance_noise_std(cfg, p.nimg, total),
        "time": time.time(),
    }


def log_tick(
    run: RunDir,
    gan: GAN,
    nimg: int,
    row: dict[str, Any],
    rows: list[dict[str, Any]],
    z_fixed: torch.Tensor,
    meta: dict[str, Any],
    tb: TensorBoardLog | None,
) -> None:
    """The tick's stats line, its fixed-noise grid, losses.png and the G_ema snapshot."""
    runlog.append_stats(run.stats, row)
    rows.append(row)
    with torch.no_grad():
        fixed = runlog.to_uint8(gan.G_ema(z_fixed))  # (64, C, R, R)
    runlog.save_grid(fixed, run.grid(nimg))
    if tb is not None:
        tb.tick(nimg, row, runlog.grid(fixed))
    runlog.plot_losses(rows, run.losses)
    checkpoint.save_generator(gan.G_ema, meta, run.snapshot)


def evaluate_tick(
    run: RunDir,
    gan: GAN,
    tracker: Any,
    p: Progress,
    row: dict[str, Any],
    meta: dict[str, Any],
    tb: TensorBoardLog | None,
) -> None:
    """FID (and the tracker's other metrics) of G_ema; keep the best snapshot, since a
    DCGAN's FID often worsens later in training."""
    scores = tracker(gan.G_ema)
    best = scores["fid"] < p.best_fid
    if best:
        p.best_fid = scores["fid"]
        checkpoint.save_generator(gan.G_ema, meta, run.best)
    runlog.append_stats(
        run.metrics, {"kimg": row["kimg"], **scores, "best": best, "time": time.time()}
    )
    row["fid"] = scores["fid"]
    if tb is not None:
        tb.metrics(p.nimg, scores)


def training_loop(
    cfg: Config, run: RunDir | Path, resume: dict[str, Any] | None = None, progress: bool = True
) -> dict[str, Any]:
    """Train until cfg.train.kimg in a run folder made ready by `RunDir.begin` (or being
    resumed); return the last tick's stats.

    `resume` is a loaded checkpoint whose state replaces the fresh one. Under
    torchrun every rank runs this; rank 0 alone writes to the folder.
    """
    run = run if isinstance(run, RunDir) else RunDir(run)
    env, device = setup(resolve_device(cfg.train.device))
    main = env.is_main
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
    cfg, data, serving = resolve_run(cfg, run, env, device, progress)
    t, nc = cfg.train, cfg.data.channels

    # Networks, optimisers and the step; D's weights before any step (transfer's baseline).
    batches = serve(
        data.images,
        t.batch,
        device,
        serving.on,
        flip=cfg.data.flip,
        seed=t.seed,
        rank=env.rank,
        world_size=env.world_size,
    )
    gan = build_gan(cfg, nc, device, env, t.precision)
    if resume is None and main:
        checkpoint.save_state_dict(gan.D, run.d_init)
    if resume is not None:
        p = restore(gan, batches, resume, env, device)
    else:
        p = Progress(None)
        if env.enabled:
            torch.manual_seed(t.seed + 1_000_003 * env.rank)  # different noise per rank
    tb = TensorBoardLog(run.path, cfg.to_dict()) if main and t.tensorboard else None
    tracker = None
    if main and t.eval_every > 0:
        from dcgan.evaluate import FidTracker

        tracker = FidTracker(
            cfg.data.dataset,
            cfg.data.resolution,
            nc,
            t.eval_features,
            t.eval_n,
            device,
            cfg.data.cache_dir,
            progress=progress,
        )
    # drop lines written after the checkpoint (a crash), or those of no run at all
    rows = run.trim(p.nimg) if main else []

    total = int(round(t.kimg * 1000))
    per_step = t.batch * t.d_steps * env.world_size  # real images shown to D per iteration
    beta = ema_beta(cfg, t.batch * env.world_size)
    tick_nimg, eval_nimg = t.tick_kimg * 1000, t.eval_every * 1000
    z_fixed = fixed_latents(cfg, device)
    bar = tqdm(
        total=total,
        initial=p.nimg,
        unit="img",
        unit_scale=True,
        dynamic_ncols=True,
        disable=not (progress and main),
        desc="train",
    )
    watch, row, stopped = Watch(), {}, False
    training_stats.reset()
    steps, tick_start, tick_start_nimg = 0, time.perf_counter(), p.nimg
    with StopFlag() as stop:
        while p.nimg < total and not stopped:
            gan.step(batches, instance_noise_std(cfg, p.nimg, total))
            gan.ema.update(beta)  # beta 0 (no EMA) copies G
            steps += 1
            p.nimg += per_step
            bar.update(per_step)
            stopped = agree_to_stop(stop.set, steps, env, device)
            injected_fault(p.nimg, env)
            if (
                p.nimg // tick_nimg == (p.nimg - per_step) // tick_nimg
                and p.nimg < total
                and (not stopped)
            ):
                continue

            # ---- End of a tick: the one host synchronisation.
            p.tick += 1
            means = training_stats.collect(env)
            if not watch.finite(means, gan):
                p, rows = roll_back(run, gan, batches, p, cfg, env, device)
                steps, tick_start, tick_start_nimg = 0, time.perf_counter(), p.nimg
                bar.n = p.nimg
                continue
            warnings = watch.collapse(means)
            row = tick_row(
                means, p, tick_start_nimg, time.perf_counter() - tick_start, cfg, total, device
            )
            if main:  # the run folder's files: rank 0 alone writes them
                for warning in warnings:
                    print(f"\nwarning: {warning}", file=sys.stderr)
                    runlog.append_stats(
                        run.events, {"event": "warning", "kimg": p.nimg / 1000, "message": warning}
                    )
                meta = snapshot_meta(cfg, nc, p.nimg)
                log_tick(run, gan, p.nimg, row, rows, z_fixed, meta, tb)
                if tracker is not None and (
                    p.nimg // eval_nimg > tick_start_nimg // eval_nimg or p.nimg >= total
                ):
                    evaluate_tick(run, gan, tracker, p, row, meta, tb)
                if p.tick % t.checkpoint_ticks == 0 or p.nimg >= total or stopped:
                    checkpoint.save_state(
                        training_state(gan, batches, p, cfg, env, device), run.checkpoint
                    )
                    if t.report:
                        write_report(run)  # the run's HTML report beside its state
                bar.set_postfix(
                    loss_d=f"{means['loss_d']:.3f}", loss_g=f"{means['loss_g']:.3f}", refresh=False
                )
            steps, tick_start, tick_start_nimg = 0, time.perf_counter(), p.nimg
    bar.close()
    batches.close()  # the host path's prefetch thread
    if tb is not None:
        tb.close()
    if env.enabled:
        in_sync = weights_in_sync([gan.G, gan.D], env)
        if main:
            print(
                f"{env.world_size} ranks hold identical G and D weights: {in_sync}", file=sys.stderr
            )
    cleanup(env)
    return {**row, "stopped": stopped}
