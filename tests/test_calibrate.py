"""`auto` precision and layout: the choice logic under a fake clock, the probe rule,
the cache, and a real calibration of a small model on this CPU."""

import dataclasses
import json

import pytest
import torch

from dcgan import calibrate, machine
from dcgan.calibrate import Setting, candidates, measure
from dcgan.config import from_preset

TINY = {
    "dataset": "fake",
    "resolution": 32,
    "channels": 1,
    "ngf": 8,
    "ndf": 8,
    "nz": 16,
    "batch": 16,
}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DCGAN_CACHE", str(tmp_path / "cache"))


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fake_steps(clock: FakeClock, sec_per_img: dict[str, float], calls: dict[str, list[int]]):
    """Steps that cost sec_per_img[name] * batch seconds of fake time."""

    def make(name):
        def step(b: int) -> None:
            calls[name].append(b)
            clock.now += sec_per_img[name] * b

        return step

    return {n: make(n) for n in sec_per_img}


def test_measure_picks_the_fastest_and_screens_out_a_30x_slower_one_cheaply():
    clock, calls = FakeClock(), {n: [] for n in ("fp32/cl", "fp32/nchw", "bf16/cl")}
    cost = {"fp32/cl": 0.010, "fp32/nchw": 0.012, "bf16/cl": 0.30}  # seconds per image
    rates, dropped = measure(
        fake_steps(clock, cost, calls), batch=128, clock=clock, budget_s=10.0, small=8
    )
    assert max(rates, key=rates.get) == "fp32/cl"
    assert rates["fp32/cl"] == pytest.approx(100.0) and rates["fp32/nchw"] == pytest.approx(
        1 / 0.012
    )
    assert dropped == ["bf16/cl"]
    assert calls["bf16/cl"] == [8, 8]  # the slow candidate never ran a full-size step
    assert all(b in (8, 128) for b in calls["fp32/cl"]) and 128 in calls["fp32/cl"]
    # the screen (bf16's two small steps: 4.8 s) and full rounds of 2.8 s until the
    # 10 s budget is spent: it ends within one round of the budget
    assert 10.0 <= clock.now < 10.0 + 128 * (0.010 + 0.012)


def test_measure_stops_at_the_budget_after_a_full_round():
    clock, calls = FakeClock(), {"a": [], "b": []}
    cost = {"a": 0.05, "b": 0.04}  # one full step of 128 images: 6.4 s and 5.1 s
    rates, dropped = measure(
        fake_steps(clock, cost, calls), batch=128, clock=clock, budget_s=10.0, small=8
    )
    assert dropped == [] and max(rates, key=rates.get) == "b"
    assert calls["a"].count(128) == 1 and calls["b"].count(128) == 1  # one round: 11.5 s
    assert clock.now < 10.0 + 6.4 + 5.1 + 1


def test_warm_up_round_is_left_out_of_the_median():
    clock, calls = FakeClock(), {"a": [], "b": []}
    seen = {"a": 0}

    def slow_first(b):  # a's first full-size step pays a one-off cost of 5 s
        calls["a"].append(b)
        seen["a"] += b == 16
        clock.now += 0.001 * b + (5.0 if b == 16 and seen["a"] == 1 else 0.0)

    def steady(b):
        calls["b"].append(b)
        clock.now += 0.002 * b

    rates, _ = measure({"a": slow_first, "b": steady}, batch=16, clock=clock, budget_s=100, small=4)
    assert max(rates, key=rates.get) == "a"


def test_candidates_follow_the_probe_rule_and_explicit_values():
    no_bf16 = {
        "capability": "AVX2",
        "avx2": True,
        "avx512": False,
        "avx512_bf16": False,
        "amx": False,
    }
    bf16 = {"capability": "AVX512", "avx2": True, "avx512": True, "avx512_bf16": True, "amx": False}
    assert candidates("auto", "auto", no_bf16) == [Setting("fp32", True), Setting("fp32", False)]
    assert Setting("bf16", True) in candidates("auto", "auto", bf16)
    assert len(candidates("auto", "auto", bf16)) == 4
    assert candidates("bf16", "auto", no_bf16) == [Setting("bf16", True), Setting("bf16", False)]
    assert candidates("fp32", "off", bf16) == [Setting("fp32", False)]
    # the rule's inputs: native bf16 instructions and torch dispatching to AVX-512
    assert machine.native_bf16(bf16) and not machine.native_bf16(no_bf16)
    assert not machine.native_bf16({**bf16, "capability": "AVX2"})
    assert machine.native_bf16({**no_bf16, "amx": True, "capability": "AVX512"})


def test_real_calibration_on_this_cpu_is_cached_and_keeps_the_rng(tmp_path):
    cfg = from_preset("fmnist32", TINY)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    choice = calibrate.resolve(cfg, 1, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), before)  # the run's stream is untouched
    assert choice.how in ("measured", "rule")
    names = {s.name for s in candidates("auto", "auto", machine.cpu_isa())}
    if choice.how == "measured":
        assert set(choice.img_per_s) == names and all(v > 0 for v in choice.img_per_s.values())
        best = max(
            (n for n in choice.img_per_s if n not in choice.dropped), key=choice.img_per_s.get
        )
        assert choice.setting.name == best
        cache = json.loads((tmp_path / "cache" / calibrate.CACHE_FILE).read_text())
        key = calibrate.cache_key(cfg, 1, "auto", "auto")
        assert list(cache) == [key.digest()] and key.matches(cache[key.digest()]["key"])
        again = calibrate.resolve(cfg, 1, torch.device("cpu"))
        assert again.how == "cached" and again.setting == choice.setting
    resolved = calibrate.apply(cfg, choice)
    assert resolved.train.precision in ("fp32", "bf16")
    assert resolved.train.channels_last in ("on", "off")
    assert choice.capability in choice.line() and choice.setting.name in choice.line()


def test_fixed_values_are_not_measured():
    cfg = from_preset("fmnist32", {**TINY, "precision": "fp32", "channels_last": "off"})
    choice = calibrate.resolve(cfg, 1, torch.device("cpu"))
    assert choice.how == "fixed" and choice.setting == Setting("fp32", False)
    assert choice.img_per_s == {}


def test_a_damaged_cache_is_measured_again(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / calibrate.CACHE_FILE).write_text("{not json")
    cfg = from_preset("fmnist32", {**TINY, "precision": "fp32"})  # layouts only: quick
    choice = calibrate.resolve(cfg, 1, torch.device("cpu"))
    assert choice.how == "measured"
    assert json.loads((tmp_path / "cache" / calibrate.CACHE_FILE).read_text())


def test_an_entry_of_another_key_or_of_the_old_format_is_measured_again(tmp_path, monkeypatch):
    """Same entry name, other content: the key stored in the entry decides. Entries of the
    format before keys were stored (named by a `|`-joined string) are never read, and
    dropped when the file is written again."""
    cfg = from_preset("fmnist32", {**TINY, "precision": "fp32"})  # two candidates
    measured = []

    def fake_measure(steps, batch):
        measured.append(batch)
        return {"fp32/channels-last": 100.0, "fp32/NCHW": 50.0}, []

    monkeypatch.setattr(calibrate, "measure", fake_measure)
    monkeypatch.setattr(calibrate, "train_steps", lambda *a: {})
    key = calibrate.cache_key(cfg, 1, "fp32", "auto")
    wrong = {
        "precision": "fp32",
        "channels_last": False,
        "how": "measured",
        "capability": "X",
        "img_per_s": {},
        "dropped": [],
        "seconds": 0.0,
    }
    other = dataclasses.replace(key, cpu="another CPU")
    path = tmp_path / "cache" / calibrate.CACHE_FILE
    path.parent.mkdir()
    entries = (
        {key.digest(): {"key": other.as_dict(), "choice": wrong}},  # another key's entry
        {key.digest(): {"choice": wrong}},  # no key
        {key.digest(): {"key": key.to_json()[:-1], "choice": wrong}},  # a damaged key
        {"v1|old|string|key": wrong},  # the old format
    )
    for stored in entries:
        path.write_text(json.dumps(stored))
        measured.clear()
        choice = calibrate.resolve(cfg, 1, torch.device("cpu"))
        assert measured and choice.how == "measured", stored
        assert choice.setting == Setting("fp32", True)
        written = json.loads(path.read_text())
        assert list(written) == [key.digest()] and key.matches(written[key.digest()]["key"])
    measured.clear()
    assert calibrate.resolve(cfg, 1, torch.device("cpu")).how == "cached" and not measured


def test_channels_last_reads_booleans_of_older_configs():
    from dcgan.config import Config

    cfg = Config.from_dict({"train": {"channels_last": True}})
    assert cfg.train.channels_last == "on"
    assert from_preset("fmnist32", {"channels_last": "false"}).train.channels_last == "off"
    from dcgan.errors import UserError

    with pytest.raises(UserError, match="auto, on or off"):
        from_preset("fmnist32", {"channels_last": "sometimes"})
