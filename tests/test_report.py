"""The run report in a real browser, TensorBoard logs read back, and `dcgan compare`.

The browser is Debian's Chromium (`make browser` installs it), driven by Playwright for
Python with the page's console captured; it opens the report of a short real training
run from a file:// URL, with no network."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dcgan.config import from_preset
from dcgan.report import build_report, compare_runs, read_run
from dcgan.rundir import RunDir
from dcgan.train import training_loop

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def _run(out: Path, **overrides) -> Path:
    """A short real run on Fashion-MNIST: 4 ticks, FID (domain features) every 2 ticks."""
    cfg = from_preset(
        "fmnist32",
        {
            "ngf": 8,
            "ndf": 8,
            "nz": 16,
            "batch": 16,
            "kimg": 0.256,
            "tick_kimg": 0.064,
            "checkpoint_ticks": 2,
            "eval_every": 0.128,
            "eval_n": 64,
            "precision": "fp32",
            "channels_last": "on",
            **overrides,
        },
    )
    RunDir(out).begin(force=False)
    training_loop(cfg, out, progress=False)
    return out


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    if not FMNIST.is_file():
        pytest.skip("Fashion-MNIST (Debian dataset-fashion-mnist) missing")
    return _run(tmp_path_factory.mktemp("report") / "run")


def test_training_writes_a_report_with_every_part(real_run):
    page = RunDir(real_run).report.read_text()
    run = read_run(real_run)
    assert run.status == "finished" and len(run.grids) == 4 and len(run.metrics) == 2
    assert page.count(', "data:image/png;base64,') == 4  # every tick's grid, inlined
    # Plotly's JavaScript is inside the page (the browser test checks that nothing is fetched)
    assert page.index("<script>") < page.index("Plotly") and len(page) > 1_000_000
    for part in (
        "Losses",
        "D's outputs",
        "FID",
        "Speed",
        "Peak memory",
        "Machine",
        "Config (resolved)",
        "Events",
        "best FID",
    ):
        assert part in page, part
    assert json.loads((real_run / "machine.json").read_text())["cpu"]["model"]


def test_the_report_in_a_real_browser(real_run, tmp_path):
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} missing: run `make browser` (Debian chromium)")
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as p:
        # an empty profile of its own (Playwright passes it as --user-data-dir)
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            headless=True,
            viewport={"width": 1100, "height": 1400},
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
            ],
        )
        page = browser.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        fetched: list[str] = []  # anything but the file itself and inline data is a network use
        page.on(
            "request",
            lambda r: (
                fetched.append(r.url) if not r.url.startswith(("file:", "data:", "blob:")) else None
            ),
        )
        page.goto(RunDir(real_run).report.as_uri())
        page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length >= 5")
        first_src = page.get_attribute("#run-img", "src")
        assert "tick 1 of 4" in page.inner_text("#run-label")
        page.focus("body")
        for _ in range(3):  # arrow keys scrub to the last tick
            page.keyboard.press("ArrowRight")
        assert page.input_value("#run-slider") == "3"
        assert "tick 4 of 4, 0.256 kimg" in page.inner_text("#run-label")
        assert page.get_attribute("#run-img", "src") != first_src
        points = page.evaluate("""Array.from(document.querySelectorAll('.js-plotly-plot'))
            .map(d => [d.id, d.data.reduce((n, t) => n + (t.x ? t.x.length : 0), 0)])""")
        assert len(points) >= 5 and all(n > 0 for _, n in points), points
        assert page.inner_text("#status") == "finished"
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        browser.close()
    assert errors == [] and fetched == []
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000


def test_tensorboard_logs_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    _run(run, dataset="fake", channels=1, tensorboard=True, eval_every=0.0)
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()
    for key in ("loss_d", "loss_g", "d_real", "d_fake", "img_per_s", "peak_mem_mb"):
        events = acc.Scalars(f"train/{key}")
        assert [e.step for e in events] == [64, 128, 192, 256], key
    rows = [json.loads(x) for x in (run / "stats.jsonl").read_text().splitlines()]
    assert [e.value for e in acc.Scalars("train/loss_d")] == pytest.approx(
        [r["loss_d"] for r in rows], rel=1e-6
    )
    assert len(acc.Images("samples/fixed_noise")) == 4
    assert "config/text_summary" in tags["tensors"]


def test_compare_overlays_two_runs(real_run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(real_run, other)
    path, table = compare_runs([str(real_run), str(other)], tmp_path / "cmp.html")
    page = path.read_text()
    assert table.splitlines()[0].split()[:2] == ["run", "status"]
    assert real_run.name in table and "other" in table
    assert page.count("alt='last grid of") == 2
    assert page.count('"name":"run: D loss"') == 1 and page.count('"name":"other: D loss"') == 1
    with pytest.raises(Exception, match="at least two"):
        compare_runs([str(real_run)], tmp_path / "one.html")


def test_report_on_a_folder_that_is_not_a_run(tmp_path):
    from dcgan.errors import UserError

    with pytest.raises(UserError, match="not a run folder"):
        build_report(tmp_path)
