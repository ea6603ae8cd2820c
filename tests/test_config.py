import json

import pytest

from dcgan.config import PRESETS, Config, apply_overrides, from_preset, load_json
from dcgan.errors import UserError


def test_presets_resolve():
    cfg = from_preset("dcgan64")
    assert (cfg.data.resolution, cfg.train.batch, cfg.model.nz, cfg.model.ngf, cfg.model.ndf) == (
        64,
        128,
        100,
        64,
        64,
    )
    safe = from_preset("safe128")
    assert (
        safe.data.resolution,
        safe.train.batch,
        safe.model.ngf,
        safe.model.ndf,
        safe.model.nz,
        safe.train.weight_decay,
        safe.train.instance_noise,
        safe.train.g_opt,
    ) == (128, 512, 128, 32, 128, 0.05, 0.2, "adamw")
    assert from_preset("fmnist32").data.dataset == "fashion-mnist"
    assert set(PRESETS) == {"fmnist32", "dcgan64", "color64", "safe128"}


def test_overrides_are_typed_and_strict():
    cfg = from_preset("fmnist32", {"batch": "32", "d_lr": "1e-4", "flip": "true"})
    assert cfg.train.batch == 32 and cfg.train.d_lr == 1e-4 and cfg.data.flip is True
    with pytest.raises(UserError, match="unknown key 'bacth'"):
        from_preset("fmnist32", {"bacth": 32})
    with pytest.raises(UserError, match="batch expects int"):
        from_preset("fmnist32", {"batch": "many"})
    with pytest.raises(UserError, match="unknown preset"):
        from_preset("nope")


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("batch", 0, "batch must be >= 1"),
        ("g_lr", 0.0, "learning rates must be > 0"),
        ("resolution", 48, "resolution must be one of"),
        ("nz", 0, "nz must be >= 1"),
        ("d_opt", "rmsprop", "d_opt must be"),
        ("precision", "fp8", "precision must be"),
    ],
)
def test_validation_names_the_range(key, value, message):
    with pytest.raises(UserError, match=message):
        apply_overrides(Config(), {key: value})


def test_json_round_trip(tmp_path):
    cfg = from_preset("safe128", {"seed": 7})
    path = tmp_path / "config.json"
    path.write_text(cfg.to_json())
    assert load_json(str(path)) == cfg
    bad = cfg.to_dict()
    bad["train"]["unknown"] = 1
    with pytest.raises(UserError, match="unknown key train.unknown"):
        Config.from_dict(json.loads(json.dumps(bad)))


def test_every_choice_comes_from_one_list():
    """Validation, the train flags' help and their messages read config.CHOICES."""
    import subprocess
    import sys

    from dcgan.config import CHOICES, one_of

    for name, allowed in CHOICES.items():
        with pytest.raises(UserError, match=f"{name} must be one of {one_of(allowed)}, got nope"):
            from_preset("fmnist32", {name: "nope"})
    assert from_preset("fmnist32", {"loss": "hinge", "d_opt": "sgd"}).train.d_opt == "sgd"
    help_ = subprocess.run(
        [sys.executable, "-m", "dcgan", "train", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "bce, hinge, lsgan or wgan-gp" in " ".join(help_.split())


def test_the_64px_colour_preset_keeps_fmnist32s_lessons():
    c, f = from_preset("color64"), from_preset("fmnist32")
    assert (c.data.resolution, c.data.channels, c.model.ngf, c.model.ndf) == (64, 3, 96, 64)
    for name in ("d_lr", "g_lr", "beta1", "r1_gamma", "ema_kimg"):
        assert getattr(c.train, name) == getattr(f.train, name), name
    assert c.train.diffaug == "translation,cutout"
    dcgan64 = from_preset("dcgan64")  # the paper's model stays the reference
    assert (dcgan64.model.ngf, dcgan64.model.ndf, dcgan64.train.beta1) == (64, 64, 0.5)
