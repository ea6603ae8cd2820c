"""Training on CPU: a smoke run writing every artefact, exact resume, snapshots."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from dcgan import checkpoint, rundir
from dcgan.config import from_preset
from dcgan.train import ema_beta, instance_noise_std, training_loop

TINY = {
    "dataset": "fake",
    "resolution": 32,
    "channels": 1,
    "ngf": 8,
    "ndf": 8,
    "nz": 16,
    "batch": 16,
    "tick_kimg": 0.032,
    "checkpoint_ticks": 1,
    "precision": "fp32",
    "channels_last": "on",
}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DCGAN_CACHE", str(tmp_path / "cache"))


def run(out, resume=None, **overrides):
    cfg = from_preset("fmnist32", {**TINY, **overrides})
    if resume is None:
        rundir.RunDir(out).begin(force=False)
    return training_loop(cfg, out, resume=resume, progress=False)


def test_smoke_run_writes_every_artefact(tmp_path):
    out = tmp_path / "run"
    last = run(out, kimg=0.064)
    assert last["kimg"] == 0.064 and not last["stopped"]
    rows = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert [r["kimg"] for r in rows] == [0.032, 0.064]
    for key in (
        "kimg",
        "loss_d",
        "loss_g",
        "d_real",
        "d_fake",
        "img_per_s",
        "sec_per_kimg",
        "peak_mem_mb",
    ):
        assert all(key in r for r in rows), key
    assert all(0 < r["d_real"] < 1 and 0 < r["d_fake"] < 1 and r["img_per_s"] > 0 for r in rows)
    # one grid per tick, even with ticks of 32 images (named by image count, not kimg)
    assert sorted(p.name for p in (out / "samples").glob("fakes*.png")) == [
        "fakes000000032.png",
        "fakes000000064.png",
    ]
    assert (out / "losses.png").stat().st_size > 1000
    assert json.loads((out / "config.json").read_text())["train"]["kimg"] == 0.064
    # the full state loads without running code; the snapshot is safetensors
    state = checkpoint.load_state(out / rundir.CHECKPOINT)
    assert state["nimg"] == 64
    tensors = load_file(out / rundir.SNAPSHOT)
    assert "main.0.weight" in tensors
    g, meta = checkpoint.load_generator(out)
    assert meta["resolution"] == 32 and meta["nc"] == 1
    assert g(torch.randn(2, 16)).shape == (2, 1, 32, 32)
    # the snapshot holds the EMA generator
    for k, v in state["G_ema"].items():
        assert torch.equal(v, g.state_dict()[k]), k


def test_auto_settings_are_resolved_recorded_and_printed(tmp_path, capsys):
    out = tmp_path / "run"
    run(out, kimg=0.032, precision="auto", channels_last="auto")
    cfg = json.loads((out / "config.json").read_text())["train"]
    assert cfg["precision"] in ("fp32", "bf16") and cfg["channels_last"] in ("on", "off")
    first = json.loads((out / "events.jsonl").read_text().splitlines()[0])
    assert first["event"] == "settings" and first["how"] == "measured"
    assert first["precision"] == cfg["precision"]
    assert first["channels_last"] == (cfg["channels_last"] == "on")
    assert len(first["img_per_s"]) >= 2 and first["capability"]
    assert capsys.readouterr().err.count("auto: ") == 2  # "timing ..." and the choice
    # a second run of the same shape takes the cached answer, and says so
    run(tmp_path / "again", kimg=0.032, precision="auto", channels_last="auto")
    again = json.loads((tmp_path / "again" / "events.jsonl").read_text().splitlines()[0])
    assert again["how"] == "cached" and again["precision"] == first["precision"]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"d_steps": 2, "label_flip": 0.1, "flip": True, "d_opt": "sgd", "g_dropout": 0.2},
        {"precision": "fp16"},
        # the image-quality options: their RNG draws (interpolation weights, augmentations),
        # the power iterations of spectral norm and the lazy R1 schedule must all resume
        {
            "loss": "wgan-gp",
            "d_steps": 2,
            "diffaug": "color,translation,cutout",
            "d_spectral_norm": True,
        },
        {"loss": "hinge", "r1_gamma": 1.0, "r1_every": 3, "precision": "fp16"},
        {
            "loss": "lsgan",
            "r1_gamma": 0.5,
            "r1_every": 2,
            "precision": "bf16",
            "diffaug": "translation",
        },
    ],
)
def test_resume_is_exact(tmp_path, options):
    # 2N steps straight == N steps, resume, N steps: identical weights and optimiser state
    straight = tmp_path / "straight"
    run(straight, kimg=0.128, **options)
    split = tmp_path / "split"
    run(split, kimg=0.064, **options)
    state = checkpoint.load_state(split / rundir.CHECKPOINT)
    cfg_resumed = from_preset("fmnist32", {**TINY, **options, "kimg": 0.128})
    training_loop(cfg_resumed, split, resume=state, progress=False)
    a = checkpoint.load_state(straight / rundir.CHECKPOINT)
    b = checkpoint.load_state(split / rundir.CHECKPOINT)
    assert a["nimg"] == b["nimg"] == 128
    if options.get("precision") == "fp16":  # the loss scalers travel with the state
        assert a["scaler_g"] == b["scaler_g"] and a["scaler_d"] == b["scaler_d"]
        assert a["scaler_d"]["scale"] > 0 and a["scaler_g"]["scale"] > 0
    for net in ("G", "D", "G_ema"):
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), (net, k)
    for opt in ("opt_g", "opt_d"):
        for i, s in a[opt]["state"].items():
            for k, v in s.items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(b[opt]["state"][i][k]))


def test_run_folder_is_not_silently_reused(tmp_path):
    out = tmp_path / "run"
    run(out, kimg=0.016)
    from dcgan.errors import UserError

    with pytest.raises(UserError, match="already holds a run"):
        run(out, kimg=0.016)


def test_schedules():
    cfg = from_preset("fmnist32", {"instance_noise": 0.2, "ema_kimg": 1.0})
    assert instance_noise_std(cfg, 0, 1000) == pytest.approx(0.2)
    assert instance_noise_std(cfg, 500, 1000) == pytest.approx(0.1)
    assert instance_noise_std(cfg, 1000, 1000) == 0.0
    # half-life of 1 kimg at batch 100: ten steps halve the weight of the past
    assert ema_beta(cfg, 100) ** 10 == pytest.approx(0.5)


def test_checkpoint_damage_is_detected(tmp_path):
    from dcgan.errors import UserError

    state = {"w": torch.arange(1000, dtype=torch.float32), "nimg": 5}
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_state(state, path)
    assert torch.equal(checkpoint.load_state(path)["w"], state["w"])
    # the outer file itself is a weights_only-loadable container
    assert torch.load(path, weights_only=True)["format"] == "dcgan-state-1"
    data = bytearray(path.read_bytes())
    payload_at = data.find(b"nimg")  # a byte inside the serialised state
    data[payload_at] ^= 0x01
    (tmp_path / "flipped.pt").write_bytes(bytes(data))
    with pytest.raises(UserError, match="damaged|cannot load"):
        checkpoint.load_state(tmp_path / "flipped.pt")
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[: len(data) // 2])
    with pytest.raises(UserError, match="cannot load"):
        checkpoint.load_state(tmp_path / "cut.pt")


def test_pickle_that_runs_code_is_refused(tmp_path):
    import pickle

    from dcgan.errors import UserError

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "checkpoint.pt"
    torch.save({"x": Evil()}, path, pickle_module=pickle)
    with pytest.raises(UserError, match="cannot load"):
        checkpoint.load_state(path)
    assert not marker.exists()


def test_scratch_engine_run(tmp_path):
    # `dcgan train --engine scratch`: same loop, artefacts and resume on dcgan.engine
    out = tmp_path / "run"
    last = run(out, kimg=0.032, engine="scratch", ema_kimg=0.0, r1_gamma=0.0)
    assert last["kimg"] == 0.032 and 0 < last["d_real"] < 1
    state = checkpoint.load_state(out / rundir.CHECKPOINT)
    g, _ = checkpoint.load_generator(out)
    # without EMA the snapshot is the engine G itself, loaded into the torch model
    for k, v in state["G"].items():
        assert torch.allclose(v, g.state_dict()[k], atol=1e-7), k
    resumed = from_preset(
        "fmnist32", {**TINY, "engine": "scratch", "ema_kimg": 0.0, "r1_gamma": 0.0, "kimg": 0.064}
    )
    training_loop(resumed, out, resume=state, progress=False)
    assert checkpoint.load_state(out / rundir.CHECKPOINT)["nimg"] == 64


def _poison_after(monkeypatch, calls, what: str = "weights"):
    """Make the training steps numbered in `calls` (1-based, counted over the whole run,
    replays after a rollback included) leave a NaN in G's weights or in D's loss."""
    from dcgan import training_stats
    from dcgan.step import AutogradStep

    real_call, count = AutogradStep.__call__, {"n": 0}
    calls = set(calls) if not callable(calls) else calls

    def call(self, batches, noise_std):
        real_call(self, batches, noise_std)
        count["n"] += 1
        if calls(count["n"]) if callable(calls) else count["n"] in calls:
            if what == "weights":
                with torch.no_grad():
                    next(self.G_train.parameters()).fill_(float("nan"))
            else:
                training_stats.record("loss_d", torch.tensor(float("nan")))

    monkeypatch.setattr(AutogradStep, "__call__", call)


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    from dcgan.errors import UserError

    _poison_after(monkeypatch, [3])  # ticks are 2 steps: tick 1 good, tick 2 poisoned
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"non-finite .* 0.064 kimg .* last good checkpoint"):
        run(out, kimg=0.096)
    state = checkpoint.load_state(out / rundir.CHECKPOINT)
    assert state["nimg"] == 32
    assert all(v.isfinite().all() for v in state["G"].values() if v.is_floating_point())


@pytest.mark.parametrize("what", ["weights", "loss"])
def test_two_rollbacks_with_the_default_checkpoint_interval(tmp_path, monkeypatch, what):
    """Ticks are 2 steps, a checkpoint every 5 ticks (the default). Step 13 (tick 7) is
    poisoned: back to tick 5, lr x 0.5. The replay passes the checkpoint of tick 10 (saved
    with the halved lr); step 27 (tick 12 of the replay) is poisoned: back to tick 10, lr
    x 0.25 of the base exactly, not of the already-halved rate."""
    _poison_after(monkeypatch, [13, 27], what)
    out = tmp_path / "run"
    last = run(out, kimg=0.448, on_nan="rollback", checkpoint_ticks=5)
    assert last["kimg"] == 0.448
    events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
    rollbacks = [e for e in events if e["event"] == "rollback"]
    assert [(e["at_kimg"], e["to_kimg"], e["lr_factor"]) for e in rollbacks] == [
        (0.224, 0.16, 0.5),
        (0.384, 0.32, 0.25),
    ]
    state = checkpoint.load_state(out / rundir.CHECKPOINT)
    base = from_preset("fmnist32").train
    assert state["opt_g"]["param_groups"][0]["lr"] == base.g_lr * 0.25  # exact, not compounded
    assert state["opt_d"]["param_groups"][0]["lr"] == base.d_lr * 0.25
    # no tick written twice, none missing: stats.jsonl was trimmed to each checkpoint
    assert [r["tick"] for r in _rows(out)] == list(range(1, 15))
    assert [r["kimg"] for r in _rows(out)] == [round(0.032 * t, 3) for t in range(1, 15)]


def test_a_fourth_rollback_stops(tmp_path, monkeypatch):
    from dcgan.errors import UserError

    _poison_after(monkeypatch, lambda n: n >= 3, "loss")  # every step from tick 2 on
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"non-finite .* training stopped"):
        run(out, kimg=0.32, on_nan="rollback")
    events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
    assert [e["lr_factor"] for e in events if e["event"] == "rollback"] == [0.5, 0.25, 0.125]
    assert [r["tick"] for r in _rows(out)] == [1]


def _rows(out):
    return [json.loads(x) for x in (out / "stats.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_compiled_step_does_not_recompile_after_warm_up():
    """torch.compile(dynamic=False) per network: the first steps compile (D sees a
    leaf real batch and a fake batch that carries G's graph); after them, further
    steps of the same shapes must hit the cache. Checkpoint keys stay unprefixed."""
    import torch._dynamo

    from dcgan import training_stats
    from dcgan.sampler import Batches
    from dcgan.step import build_gan

    torch._dynamo.reset()
    # with both gradient penalties, which run through the raw D (no double backward
    # through compiled graphs): they must not make the compiled D recompile either
    cfg = from_preset(
        "fmnist32",
        {
            **TINY,
            "compile": True,
            "channels_last": True,
            "loss": "wgan-gp",
            "r1_gamma": 1.0,
            "r1_every": 2,
        },
    )
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 1, 32, 32), dtype=torch.uint8).numpy()
    batches = Batches(images, cfg.train.batch, torch.device("cpu"), flip=True, seed=0)
    gan = build_gan(cfg, 1, torch.device("cpu"), precision="fp32")
    for _ in range(2):  # warm-up: compiles
        gan.step(batches, 0.1)
    training_stats.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            gan.step(batches, 0.05)
    means = training_stats.collect()
    assert set(means) == {"loss_d", "loss_g", "d_real", "d_fake"}
    assert all(math.isfinite(v) for v in means.values())
    for net in (gan.G, gan.D):
        assert not any(k.startswith(("_orig_mod.", "module.")) for k in net.state_dict())


def test_the_run_folder_records_the_resolved_channels(tmp_path):
    """config.json holds what the run resolved, channels included (0 = the source's own),
    so sample, eval and transfer read it instead of re-deriving it from weights or data."""
    from dcgan.rundir import RunDir

    out = tmp_path / "run"
    run(out, kimg=0.032, channels=0)
    run_dir = RunDir(out)
    cfg = run_dir.read_config()
    _, meta = checkpoint.load_generator(out)
    assert cfg.data.channels == meta["nc"] == 3  # the fake source's own: colour
    assert (cfg.train.precision, cfg.train.channels_last) == ("fp32", "on")
    assert checkpoint.load_state(run_dir.checkpoint)["config"]["data"]["channels"] == 3
