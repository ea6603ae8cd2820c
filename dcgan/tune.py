"""`dcgan tune`: hyper-parameter search with Optuna; every trial an ordinary run folder.

A study lives in a folder (`--out`): `study.db` (SQLite, the default storage:
embedded, nothing to start) or any SQLAlchemy URL Optuna takes (`--storage
postgresql://...`), which lets workers on one machine or many share one study:
start the same command on each, and each asks Optuna for the next trial.

Each trial is `dcgan train` in a subprocess writing `OUT/trial-NNNN`, with FID of
G-EMA every `--eval-every` kimg (domain features by default, fast on a CPU). The
worker reads `metrics.jsonl` as it grows and reports each FID to Optuna
(`trial.report`); when the pruner says so it stops the run with SIGTERM (it
saves and exits) and marks the folder pruned. The objective is the FID at the
trial's end; lower is better.

A worker killed mid-trial stops sending Optuna heartbeats; after the grace
period the next worker to ask for a trial marks it failed, and
`RetryHeartbeatStaleTrialCallback` queues a copy with the same parameters,
which resumes the killed trial's own folder from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcgan import atomic
from dcgan.config import Config, apply_overrides, field_index, from_preset
from dcgan.errors import UserError
from dcgan.rundir import RunDir

STUDY_NAME = "dcgan"
DB = "study.db"


@dataclass(frozen=True)
class Param:
    """One dimension of the search: a config field, its range (log or not) or choices."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        if self.choices:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def describe(self) -> str:
        if self.choices:
            return f"{self.name} in {list(self.choices)}"
        return f"{self.name} in [{self.low:g}, {self.high:g}]{' log' if self.log else ''}"


# The default search space: Algorithm 1's and Adam's knobs, the ganhacks tricks, the widths
# and batch, and the image-quality options (loss, spectral norm, R1, DiffAugment).
SPACE: tuple[Param, ...] = (
    Param("d_lr", 2e-5, 1e-3, log=True),
    Param("g_lr", 2e-5, 1e-3, log=True),
    Param("beta1", 0.0, 0.9),
    Param("d_steps", 1, 2, integer=True),
    Param("label_smoothing", 0.0, 0.3),
    Param("instance_noise", 0.0, 0.3),
    Param("ema_kimg", 0.0, 10.0),
    Param("ngf", choices=(32, 48, 64)),
    Param("ndf", choices=(32, 48, 64)),
    Param("batch", choices=(32, 64, 128)),
    Param("g_loss", choices=("nonsat", "minimax")),
    Param("weight_decay", 0.0, 0.1),
    Param("g_opt", choices=("adam", "adamw")),
    Param("d_opt", choices=("adam", "adamw")),
    Param("loss", choices=("bce", "hinge", "lsgan")),
    Param("d_spectral_norm", choices=(False, True)),
    Param("r1_gamma", 0.0, 1.0),
    Param("diffaug", choices=("", "translation,cutout", "color,translation,cutout")),
)
# what a trial's run does regardless of the space: it must measure itself
RESERVED = (
    "kimg",
    "eval_every",
    "eval_features",
    "eval_n",
    "dataset",
    "resolution",
    "channels",
    "device",
    "cache_dir",
)


def _check_value(base: Config, name: str, value: Any) -> None:
    apply_overrides(base, {name: value})  # the config's own validation, its own message


def load_space(path: str | None, fixed: dict[str, Any], base: Config) -> tuple[Param, ...]:
    """SPACE, with the entries of a JSON file replacing those of the same name (a file
    with "only": true replaces the whole space), less the --fix'ed fields; checked."""
    space = {p.name: p for p in SPACE}
    if path:
        try:
            data = json.loads(Path(path).read_text())
        except OSError as e:
            raise UserError(f"--space {path}: {e.strerror or e}") from None
        except json.JSONDecodeError as e:
            raise UserError(f"--space {path} is not JSON: {e}") from None
        if not isinstance(data, dict):
            raise UserError(f"--space {path}: expected an object of name -> range")
        if data.pop("only", False):
            space = {}
        for name, spec in data.items():
            if not isinstance(spec, dict):
                raise UserError(
                    f"--space {path}: {name} needs an object such as "
                    '{"low": 1e-4, "high": 1e-3, "log": true} or {"choices": [...]}'
                )
            unknown = set(spec) - {"low", "high", "log", "choices", "int"}
            if unknown:
                raise UserError(f"--space {path}: {name}: unknown keys {sorted(unknown)}")
            if "choices" in spec:
                space[name] = Param(name, choices=tuple(spec["choices"]))
            elif "low" in spec and "high" in spec:
                space[name] = Param(
                    name,
                    float(spec["low"]),
                    float(spec["high"]),
                    bool(spec.get("log", False)),
                    bool(spec.get("int", False)),
                )
            else:
                raise UserError(f"--space {path}: {name} needs low and high, or choices")
    index = field_index()
    for name in list(space):
        if name not in index:
            raise UserError(f"config: unknown key {name!r} in the search space")
        if name in RESERVED:
            raise UserError(
                f"{name} is set by dcgan tune itself (--kimg, --eval-every, ...), not searched"
            )
        if name in fixed:
            del space[name]
    for p in space.values():  # every end of every range must pass the config's checks
        for v in p.choices or (p.low, p.high):
            _check_value(base, p.name, int(v) if p.integer else v)
        if not p.choices and (p.low > p.high or (p.log and p.low <= 0)):
            raise UserError(f"search space: {p.describe()} is not a valid range")
    return tuple(space.values())


def parse_fix(items: list[str]) -> dict[str, str]:
    fixed = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--fix {item!r}: expected key=value, e.g. --fix loss=hinge")
        k, v = item.split("=", 1)
        fixed[k.strip().replace("-", "_")] = v.strip()
    return fixed


def base_config(
    preset: str, fix: list[str], dataset: str | None = None, resolution: str | int | None = None
) -> tuple[dict[str, str], Config]:
    """(the fixed fields, the checked base config) of `dcgan tune`: --fix KEY=VALUE, plus
    --dataset and --resolution, which take what `dcgan train` takes and pin those fields.

    >>> fixed, base = base_config("fmnist32", ["ngf=16"], "emoji", 64)
    >>> fixed, base.data.dataset, base.data.resolution
    ({'ngf': '16', 'dataset': 'emoji', 'resolution': '64'}, 'emoji', 64)
    """
    fixed = parse_fix(fix)
    for name, value in (("dataset", dataset), ("resolution", resolution)):
        if value is None:
            continue
        if name in fixed and fixed[name] != str(value):
            raise UserError(f"--{name} {value} and --fix {name}={fixed[name]} disagree: give one")
        fixed[name] = str(value)
    return fixed, from_preset(preset, fixed)  # unknown or bad values: the config's message


# ---------------------------------------------------------------------------- the study


@dataclass
class Settings:
    """What a study is; recorded in its user attributes so that workers and later
    summaries can never mix studies of different objectives."""

    preset: str
    trials: int
    kimg: float
    features: str = "domain"
    n: int = 2000
    eval_every: float = 10.0
    pruner: str = "median"
    seed: int = 0
    device: str = "auto"

    def attrs(self) -> dict[str, Any]:
        return {
            "objective": "fid of G-EMA at the end of the trial (lower is better)",
            "features": self.features,
            "n": self.n,
            "preset": self.preset,
            "kimg": self.kimg,
            "eval_every": self.eval_every,
        }


def storage_for(out: Path, url: str | None, heartbeat: int = 20, grace: int = 60):
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    url = url or f"sqlite:///{(out / DB).resolve()}"
    for attempt in range(6):
        try:
            with _quiet_optuna():
                return RDBStorage(
                    url,
                    heartbeat_interval=heartbeat,
                    grace_period=grace,
                    heartbeat_stale_trial_callback=(RetryHeartbeatStaleTrialCallback(max_retry=2)),
                )
        except ImportError as e:
            cause = f" ({e.__cause__})" if e.__cause__ else ""
            raise UserError(
                f"--storage {url}: no database driver{cause}; for PostgreSQL: "
                "pip install 'dcgan[postgres]'"
            ) from None
        except Exception as e:  # sqlalchemy's errors: host, port, password, or a race
            if not type(e).__module__.startswith(("sqlalchemy", "psycopg")):
                raise
            if "IntegrityError" in type(e).__name__ and attempt < 5:
                # workers starting at once on a new database race to create Optuna's
                # tables; the loser finds them made a moment later
                time.sleep(0.5 * (attempt + 1))
                continue
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise UserError(f"--storage {url}: cannot connect ({first})") from None
        finally:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
    raise UserError(f"--storage {url}: cannot create the study's tables")


@contextlib.contextmanager
def _quiet_optuna():
    """Optuna warns that heartbeats are experimental at every storage it makes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def open_study(out: Path, settings: Settings, storage):
    import optuna

    sampler = optuna.samplers.TPESampler(seed=settings.seed)
    pruner = (
        optuna.pruners.HyperbandPruner()
        if settings.pruner == "hyperband"
        else optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)
    )
    study = optuna.create_study(
        study_name=STUDY_NAME,
        storage=storage,
        sampler=sampler,
        pruner=pruner,
        direction="minimize",
        load_if_exists=True,
    )
    have = study.user_attrs
    want = settings.attrs()
    if have:
        differs = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
        if differs:
            raise UserError(
                "this study was made with other settings, its numbers would not "
                f"compare: {differs} (stored, asked); use another --out or --storage"
            )
    else:
        for k, v in want.items():
            study.set_user_attr(k, v)
    return study


def trial_folder(out: Path, trial) -> Path:
    """The run folder of a trial; a retry of a killed trial reuses the original's folder."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    # the retry chain is in the stored (frozen) trial's system attributes
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    history = RetryHeartbeatStaleTrialCallback.retry_history(frozen)
    return out / f"trial-{(history[0] if history else trial.number):04d}"


class TrialFailed(Exception):
    pass


def _read_metrics(folder: Path) -> list[dict[str, Any]]:
    from dcgan.runlog import read_stats

    return read_stats(RunDir(folder).metrics)


def run_trial(
    trial,
    out: Path,
    settings: Settings,
    space: tuple[Param, ...],
    fixed: dict[str, Any],
    poll_s: float = 0.5,
) -> float:
    """The objective: train one run in a subprocess, report its FIDs, return the last."""
    import optuna

    params = {p.name: p.suggest(trial) for p in space}
    folder = trial_folder(out, trial)
    overrides = {
        **params,
        **fixed,
        "kimg": settings.kimg,
        "eval_every": settings.eval_every,
        "eval_features": settings.features,
        "eval_n": settings.n,
        "device": settings.device,
    }
    try:
        cfg = from_preset(settings.preset, overrides)
    except UserError as e:  # a point of the space the config refuses: a failed trial
        raise TrialFailed(str(e)) from None
    if RunDir(folder).checkpoint.is_file():  # the retry of a killed trial: continue it
        cmd = ["train", "--resume", str(folder), "--kimg", str(settings.kimg)]
    else:
        atomic.write_text(RunDir(folder).trial_config, cfg.to_json() + "\n")
        cmd = [
            "train",
            "--config",
            str(RunDir(folder).trial_config),
            "--out",
            str(folder),
            "--force",
        ]
    trial.set_user_attr("folder", folder.name)
    log = open(RunDir(folder).log, "a")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dcgan", *cmd, "--quiet"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=os.environ.copy(),
    )
    seen = 0
    try:
        while True:
            done = proc.poll() is not None
            rows = _read_metrics(folder)
            for row in rows[seen:]:
                trial.report(float(row["fid"]), step=int(round(row["kimg"] * 1000)))
                if not done and trial.should_prune():
                    proc.send_signal(signal.SIGTERM)  # it saves its state and exits
                    proc.wait()
                    atomic.write_text(
                        RunDir(folder).pruned,
                        json.dumps({"trial": trial.number, "kimg": row["kimg"], "fid": row["fid"]})
                        + "\n",
                    )
                    raise optuna.TrialPruned(f"pruned at {row['kimg']} kimg")
            seen = len(rows)
            if done:
                break
            time.sleep(poll_s)
    finally:
        if proc.poll() is None:  # the worker itself is being stopped: stop the run with it
            proc.send_signal(signal.SIGTERM)
            proc.wait()
        log.close()
    if proc.returncode != 0:
        tail = RunDir(folder).log.read_text().strip().splitlines()[-1:] or ["?"]
        raise TrialFailed(f"dcgan train exited with {proc.returncode}: {tail[0]}")
    rows = _read_metrics(folder)
    if not rows or not math.isfinite(rows[-1]["fid"]):
        raise TrialFailed("the run ended without an FID")
    return float(rows[-1]["fid"])


def counted(study) -> tuple[int, bool]:
    """(trials that count towards --trials: complete, pruned or running; retries waiting)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    n = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING) for t in trials)
    return n, any(t.state == TrialState.WAITING for t in trials)


def tune(
    out: str | Path,
    settings: Settings,
    space: tuple[Param, ...],
    fixed: dict[str, Any],
    storage_url: str | None = None,
    progress: bool = True,
    heartbeat: int = 20,
    grace: int = 60,
) -> Any:
    """Run trials until the study holds settings.trials of them (all workers together)."""
    import optuna
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(out, settings, storage_for(out, storage_url, heartbeat, grace))
    if progress:
        print(
            f"searching {len(space)} parameters: " + "; ".join(p.describe() for p in space),
            file=sys.stderr,
        )
    bar = tqdm(
        total=settings.trials,
        initial=min(counted(study)[0], settings.trials),
        desc="tune",
        unit="trial",
        disable=not progress,
        dynamic_ncols=True,
    )

    def objective(trial) -> float:
        return run_trial(trial, out, settings, space, fixed)

    while True:
        with _quiet_optuna():  # a dead worker's trial must not count as running
            optuna.storages.fail_stale_trials(study)
        n, waiting = counted(study)
        if n >= settings.trials and not waiting:
            break
        with _quiet_optuna():
            study.optimize(objective, n_trials=1, catch=(TrialFailed,))
        bar.n = min(counted(study)[0], settings.trials)
        best = _best(study)
        bar.set_postfix_str(f"best FID {best.value:.2f} (trial {best.number})" if best else "")
    bar.close()
    return study


def _best(study):
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    return min(done, key=lambda t: t.value) if done else None


# ---------------------------------------------------------------------------- results


def summary(out: str | Path, storage_url: str | None = None, plots: bool = True) -> str:
    """A table of the trials, the best one, parameter importances; writes best.json and
    the PNG plots into the study folder."""
    import optuna

    out = Path(out)
    if storage_url is None and not (out / DB).is_file():
        raise UserError(f"{out} holds no study ({DB} missing); pass --storage for a shared one")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with _quiet_optuna():
        study = optuna.load_study(study_name=STUDY_NAME, storage=storage_for(out, storage_url))
    trials = study.get_trials(deepcopy=False)
    attrs = study.user_attrs
    lines = [
        f"study in {out}: {len(trials)} trials; objective: {attrs.get('objective')}, "
        f"{attrs.get('features')} features, n = {attrs.get('n')}, {attrs.get('kimg')} kimg",
        f"{'#':>4} {'state':<9} {'FID':>8} {'kimg':>8} {'s':>7}  params",
    ]
    for t in trials:
        steps = sorted(t.intermediate_values)
        kimg = steps[-1] / 1000 if steps else 0.0
        secs = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if (t.datetime_complete and t.datetime_start)
            else float("nan")
        )
        value = f"{t.value:8.2f}" if t.value is not None else f"{'-':>8}"
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(t.params.items()))
        lines.append(
            f"{t.number:>4} {t.state.name.lower():<9} {value} {kimg:>8.1f} {secs:>7.0f}  {params}"
        )
    best = _best(study)
    if best is None:
        lines.append("no trial has completed yet")
        return "\n".join(lines)
    lines.append(
        f"best: trial {best.number}, FID {best.value:.2f} (folder {best.user_attrs.get('folder')})"
    )
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    if len(complete) >= 3 and len({tuple(sorted(t.params.items())) for t in complete}) >= 3:
        try:
            with _quiet_optuna():
                imp = optuna.importance.get_param_importances(
                    study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
                )
            lines.append(
                "parameter importances (fANOVA): "
                + ", ".join(f"{k} {v:.2f}" for k, v in imp.items())
            )
        except (ValueError, RuntimeError) as e:
            lines.append(f"parameter importances: not computed ({e})")
    folder = out / best.user_attrs.get("folder", "")
    cfg_file = RunDir(folder).config
    if cfg_file.is_file():
        # the trial's config, less what was settled for the machine it ran on and less
        # the in-training evaluation the search needed: a config to train anywhere
        cfg = apply_overrides(
            Config.from_dict(json.loads(cfg_file.read_text())),
            {"precision": "auto", "channels_last": "auto", "device": "auto", "eval_every": 0.0},
        )
        (out / "best.json").write_text(cfg.to_json() + "\n")
        lines.append(
            f"wrote {out / 'best.json'}: dcgan train --config {out / 'best.json'} "
            "[--kimg ...] trains it"
        )
    if plots and len(complete) >= 2:
        lines += _plots(study, out)
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else repr(v) if isinstance(v, str) else str(v)


def _plots(study, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    written = []
    for name, draw in (
        ("history", ovm.plot_optimization_history),
        ("importances", ovm.plot_param_importances),
        ("slice", ovm.plot_slice),
    ):
        try:
            with _quiet_optuna():  # experimental-API and tight_layout warnings
                ax = draw(study)
                fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
                fig.set_size_inches(max(8, fig.get_size_inches()[0]), 4.5)
                fig.tight_layout()
                fig.savefig(out / f"tune-{name}.png", dpi=90)
            plt.close(fig)
            written.append(f"wrote {out / f'tune-{name}.png'}")
        except (ValueError, RuntimeError, ImportError) as e:
            written.append(f"{name} plot skipped ({e})")
    return written
