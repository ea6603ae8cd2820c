"""Configuration: dataclasses, presets, strict overrides and a JSON round-trip.

A run is described by one `Config` made of three sections. Every field name is
unique across sections, so each one is also a command-line flag
(`--d-lr 1e-4` sets `train.d_lr`). Unknown keys and wrong types are errors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from dcgan.errors import UserError

RESOLUTIONS = (32, 64, 128)
TRISTATE = ("channels_last",)  # str fields that take auto, on or off
LOSSES = ("bce", "hinge", "lsgan", "wgan-gp")  # dcgan.losses implements each
DIFFAUG_POLICIES = ("color", "translation", "cutout")  # dcgan.augment implements each
FEATURES = ("inception", "domain")  # dcgan.features implements each
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
# The one list of allowed values for each string field: validation, the flags'
# help and their error messages all read it.
CHOICES: dict[str, tuple[str, ...]] = {
    "loss": LOSSES,
    "g_loss": ("nonsat", "minimax"),
    "g_opt": ("adam", "adamw"),
    "d_opt": ("adam", "adamw", "sgd"),
    "channels_last": ("auto", "on", "off"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "compile_mode": COMPILE_MODES,
    "eval_features": FEATURES,
    "on_nan": ("stop", "rollback"),
    "engine": ("torch", "scratch"),
    "data_on": ("auto", "device", "host"),
}


def one_of(values: tuple[str, ...]) -> str:
    """("a", "b", "c") -> "a, b or c", as the messages name choices."""
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"


def parse_policy(text: str) -> tuple[str, ...]:
    """ "translation,cutout" -> ("translation", "cutout"); "" -> (); unknown names fail."""
    names = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in names if p not in DIFFAUG_POLICIES]
    if unknown:
        raise ValueError(
            f"unknown diffaug policy {', '.join(unknown)}; choose from "
            f"{', '.join(DIFFAUG_POLICIES)}"
        )
    return names


@dataclass
class DataConfig:
    dataset: str = "fashion-mnist"  # a source name (fashion-mnist, mnist, emoji, fake) or a path
    resolution: int = 32  # 32, 64 or 128; the architecture follows it
    channels: int = 0  # 1 or 3; 0 keeps the source's own channel count
    flip: bool = False  # random horizontal flip of real images
    cache_dir: str = ""  # "" means $DCGAN_CACHE or ~/.cache/dcgan
    # where the training array lives: device (whole, on the training device), host (each
    # batch gathered from the store's memory map and copied ahead) or auto (device if the
    # array fits in half the device's free memory); the batches are the same on both
    data_on: str = "auto"


@dataclass
class ModelConfig:
    nz: int = 100  # latent size
    ngf: int = 64  # generator width: channels of the last hidden block
    ndf: int = 64  # discriminator width: channels of the first block
    g_dropout: float = 0.0  # ganhacks: dropout after G's hidden blocks (0 = none)
    d_spectral_norm: bool = False  # spectral normalisation of D's conv weights (Miyato 2018)


@dataclass
class TrainConfig:
    kimg: float = 150.0  # length of training in thousands of real images shown to D
    batch: int = 64  # per-process batch size
    d_steps: int = 1  # k of Goodfellow et al. Algorithm 1: D updates per G update
    loss: str = "bce"  # bce, hinge, lsgan or wgan-gp (dcgan.losses says what each is)
    g_loss: str = "nonsat"  # with loss bce: nonsat (-log D(G(z))) or minimax (log(1 - D(G(z))))
    gp_weight: float = 10.0  # lambda of wgan-gp's gradient penalty (Gulrajani et al.: 10)
    r1_gamma: float = 0.0  # R1 penalty gamma/2 E||dD(x)/dx||^2 on real images (0: off)
    r1_every: int = 16  # R1 applied lazily every this many D-steps, scaled by it
    diffaug: str = ""  # DiffAugment of both D inputs: any of color,translation,cutout
    g_opt: str = "adam"  # adam or adamw
    d_opt: str = "adam"  # adam, adamw or sgd (ganhacks: SGD for D)
    g_lr: float = 2e-4
    d_lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    weight_decay: float = 0.0  # used by adamw (decoupled) and sgd
    d_momentum: float = 0.9  # used by sgd
    label_smoothing: float = 0.0  # one-sided: real target is 1 - label_smoothing
    label_flip: float = 0.0  # probability of swapping a D target (ganhacks)
    instance_noise: float = 0.0  # std of N(0, s^2) added to D's inputs, decays linearly to 0
    ema_kimg: float = 2.0  # half-life of G's EMA in kimg; 0 disables the EMA
    tick_kimg: float = 4.0  # a tick: progress line, stats, sample grid
    checkpoint_ticks: int = 5  # full training state every this many ticks (and at the end)
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    # auto: on the CPU the fastest of fp32 and (with native bf16 instructions) bf16,
    # timed once per machine and model shape; on CUDA bf16, else fp16. fp16 on a CPU
    # runs (GradScalers included) but is slow: it is there for testing
    precision: str = "auto"  # auto, fp32, bf16 or fp16
    channels_last: str = "auto"  # auto (timed with precision on the CPU; on with CUDA), on, off
    compile: bool = False  # torch.compile each network (dynamic=False)
    # torch.compile mode: default, reduce-overhead (CUDA graphs on CUDA) or max-autotune
    compile_mode: str = "default"
    sync_bn: bool = False  # SyncBatchNorm across processes under torchrun
    eval_every: float = 0.0  # kimg between FID/KID evaluations against the training set (0: off)
    eval_features: str = "domain"  # domain (fast, Fashion-MNIST/MNIST) or inception
    eval_n: int = 5000  # generated and reference images per evaluation
    on_nan: str = "stop"  # stop, or rollback: reload the last checkpoint with halved lrs (3x)
    engine: str = "torch"  # torch (autograd) or scratch (dcgan.engine, hand-written backward)
    report: bool = True  # refresh RUN/report.html at every checkpoint (--report off: never)
    tensorboard: bool = False  # also log to RUN/tensorboard (needs the tensorboard package)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Config:
        """Strict inverse of to_dict: unknown sections or keys and wrong types fail."""
        if not isinstance(d, dict):
            raise UserError(f"config: expected an object of sections, got {type(d).__name__}")
        index = field_index()
        cfg = Config()
        for section, values in d.items():
            if section not in SECTIONS or not isinstance(values, dict):
                raise UserError(f"config: unknown section {section!r}")
            for name, value in values.items():
                if name not in index or index[name][0] != section:
                    raise UserError(f"config: unknown key {section}.{name}")
                setattr(getattr(cfg, section), name, coerce(name, value, index[name][1].type))
        validate(cfg)
        return cfg


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}

# The presets name only what differs from the defaults above.
PRESETS: dict[str, dict[str, Any]] = {
    # The CPU demo: Fashion-MNIST at 32x32, 150 kimg. Tuned by `dcgan tune` (docs/tuning.md,
    # best.json rounded to 3 digits): both learning rates ~3x the paper's, beta1 ~0, R1 on
    # real images, a short EMA, G 1.5x wider than D. Inception FID 50.6 against 88.2 for the
    # earlier untuned 32/32 preset, at 150 kimg (docs/quality.md).
    "fmnist32": {
        "dataset": "fashion-mnist",
        "resolution": 32,
        "channels": 1,
        "batch": 64,
        "kimg": 150.0,
        "tick_kimg": 5.0,
        "ngf": 48,
        "ndf": 32,
        "d_lr": 7.33e-4,
        "g_lr": 6.11e-4,
        "beta1": 0.0013,
        "r1_gamma": 0.776,
        "ema_kimg": 1.29,
    },
    # The paper / canonical PyTorch example: 64x64, batch 128, nz 100, ngf = ndf = 64.
    "dcgan64": {
        "dataset": "emoji",
        "resolution": 64,
        "channels": 3,
        "batch": 128,
        "kimg": 1000.0,
        "tick_kimg": 10.0,
    },
    # fmnist32's lessons at 64x64 colour: G 1.5x wider than the paper's D, beta1 ~0, both
    # rates ~3x the paper's, R1 on real images, a short EMA; and DiffAugment, since the
    # emoji set is small (3,780 glyphs). Measured against dcgan64 in docs/quality.md.
    "color64": {
        "dataset": "emoji",
        "resolution": 64,
        "channels": 3,
        "batch": 64,
        "kimg": 1000.0,
        "tick_kimg": 10.0,
        "ngf": 96,
        "ndf": 64,
        "d_lr": 7.33e-4,
        "g_lr": 6.11e-4,
        "beta1": 0.0013,
        "r1_gamma": 0.776,
        "ema_kimg": 1.29,
        "diffaug": "translation,cutout",
    },
    # Seed 004's "Safe-Params": AdamW with weight decay, instance noise, big G, small D.
    "safe128": {
        "dataset": "emoji",
        "resolution": 128,
        "channels": 3,
        "batch": 512,
        "g_lr": 2e-4,
        "d_lr": 2e-4,
        "ngf": 128,
        "ndf": 32,
        "nz": 128,
        "g_opt": "adamw",
        "d_opt": "adamw",
        "weight_decay": 0.05,
        "instance_noise": 0.2,
        "kimg": 2000.0,
        "tick_kimg": 20.0,
    },
}


def field_index() -> dict[str, tuple[str, dataclasses.Field]]:
    """Map each field name to (section name, dataclass field)."""
    index: dict[str, tuple[str, dataclasses.Field]] = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            f.type = hints[f.name]  # resolve the string annotation once
            index[f.name] = (section, f)
    return index


def coerce(name: str, value: Any, typ: type) -> Any:
    """Convert a command-line string or JSON value to the field's type, strictly."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif typ is float:  # finite only: --kimg inf or nan would never end or never start
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):
                return float(value)
            raise UserError(f"config: {name} expects a finite number, got {value!r}")
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                if math.isfinite(number):
                    return number
                raise UserError(f"config: {name} expects a finite number, got {value!r}")
    elif name in TRISTATE:  # on / off / auto; booleans of older config files still read
        word = str(value).lower() if isinstance(value, (bool, str)) else ""
        if word in ("1", "true", "yes", "on"):
            return "on"
        if word in ("0", "false", "no", "off"):
            return "off"
        if word == "auto":
            return "auto"
        raise UserError(f"config: {name} must be one of {one_of(CHOICES[name])}, got {value}")
    elif typ is str:
        if isinstance(value, str):
            return value
    raise UserError(f"config: {name} expects {typ.__name__}, got {value!r}")


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Return a copy of cfg with flat `name: value` overrides applied; unknown names fail."""
    cfg = Config.from_dict(cfg.to_dict())
    index = field_index()
    for name, value in overrides.items():
        if name not in index:
            raise UserError(f"config: unknown key {name!r}")
        section, f = index[name]
        setattr(getattr(cfg, section), name, coerce(name, value, f.type))
    validate(cfg)
    return cfg


def from_preset(name: str, overrides: dict[str, Any] | None = None) -> Config:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return apply_overrides(Config(), {**PRESETS[name], **(overrides or {})})


def load_json(path: str) -> Config:
    """A config file (a run's config.json, dcgan tune's best.json); damage is one line."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not a JSON config file: {e}") from None
    return Config.from_dict(d)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(f"config: {message}")


def validate(cfg: Config) -> None:
    """Reject values outside their allowed range, naming the range."""
    d, m, t = cfg.data, cfg.model, cfg.train
    _check(
        d.resolution in RESOLUTIONS, f"resolution must be one of {RESOLUTIONS}, got {d.resolution}"
    )
    _check(d.channels in (0, 1, 3), f"channels must be 0 (source's own), 1 or 3, got {d.channels}")
    _check(m.nz >= 1, f"nz must be >= 1, got {m.nz}")
    _check(m.ngf >= 1 and m.ndf >= 1, f"ngf and ndf must be >= 1, got {m.ngf}, {m.ndf}")
    _check(0.0 <= m.g_dropout < 1.0, f"g_dropout must be in [0, 1), got {m.g_dropout}")
    _check(t.kimg > 0, f"kimg must be > 0, got {t.kimg}")
    _check(t.batch >= 1, f"batch must be >= 1, got {t.batch}")
    _check(t.d_steps >= 1, f"d_steps must be >= 1, got {t.d_steps}")
    for name, allowed in CHOICES.items():
        value = next(getattr(s, name) for s in (d, m, t) if hasattr(s, name))
        _check(value in allowed, f"{name} must be one of {one_of(allowed)}, got {value}")
    _check(t.gp_weight >= 0, f"gp_weight must be >= 0, got {t.gp_weight}")
    _check(t.r1_gamma >= 0, f"r1_gamma must be >= 0, got {t.r1_gamma}")
    _check(t.r1_every >= 1, f"r1_every must be >= 1, got {t.r1_every}")
    try:
        parse_policy(t.diffaug)
    except ValueError as e:
        raise UserError(f"config: {e}") from None
    _check(t.g_lr > 0 and t.d_lr > 0, f"learning rates must be > 0, got {t.g_lr}, {t.d_lr}")
    _check(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "beta1 and beta2 must be in [0, 1)")
    _check(t.weight_decay >= 0, f"weight_decay must be >= 0, got {t.weight_decay}")
    _check(0 <= t.d_momentum < 1, f"d_momentum must be in [0, 1), got {t.d_momentum}")
    _check(
        0 <= t.label_smoothing < 0.5,
        f"label_smoothing must be in [0, 0.5), got {t.label_smoothing}",
    )
    _check(0 <= t.label_flip < 0.5, f"label_flip must be in [0, 0.5), got {t.label_flip}")
    _check(t.instance_noise >= 0, f"instance_noise must be >= 0, got {t.instance_noise}")
    _check(t.ema_kimg >= 0, f"ema_kimg must be >= 0, got {t.ema_kimg}")
    _check(t.tick_kimg > 0, f"tick_kimg must be > 0, got {t.tick_kimg}")
    _check(t.checkpoint_ticks >= 1, f"checkpoint_ticks must be >= 1, got {t.checkpoint_ticks}")
    _check(t.eval_every >= 0, f"eval_every must be >= 0, got {t.eval_every}")
    _check(t.eval_n >= 10, f"eval_n must be >= 10, got {t.eval_n}")
    if t.engine == "scratch":
        _check(
            t.precision in ("auto", "fp32")
            and not t.compile
            and t.instance_noise == 0
            and t.g_loss == "nonsat"
            and t.d_steps == 1
            and t.loss == "bce"
            and t.r1_gamma == 0
            and not t.diffaug
            and not m.d_spectral_norm,
            "engine scratch trains in fp32 with the bce loss, without compile, instance "
            "noise, minimax loss, d_steps > 1, penalties, diffaug or spectral norm",
        )
    _check(
        re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device) is not None,
        f"device must be auto, cpu, cuda or cuda:N, got {t.device}",
    )
