"""`dcgan report` and `dcgan compare`: one self-contained HTML page per run (or runs).

A run is judged by looking: the fixed-noise grid tick after tick, the two
losses and D's outputs against each other, FID against kimg. The page holds
all of it in one file that opens without a network: the grids inlined as PNG
data URIs behind a slider (arrow keys move it too), the charts drawn by Plotly
with its JavaScript inlined once (`plotly.offline.get_plotlyjs`), the resolved
config, the machine the run trained on, its events, and its status (finished,
stopped or running: the page is rebuilt from the files as they are, so it also
opens on a live run). Plotly because it is the standard interactive plotting
library in Python, draws in the browser (zoom, hover values) and can be inlined.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcgan import atomic
from dcgan.config import Config
from dcgan.errors import UserError
from dcgan.rundir import RunDir, live_owner
from dcgan.runlog import EVENTS_FIELDS, METRICS_FIELDS, STATS_FIELDS, is_number, read_stats


@dataclass
class Run:
    """What the page shows of one run folder, read from its files."""

    path: Path
    config: dict[str, Any]
    stats: list[dict[str, Any]]
    metrics: list[dict[str, Any]]
    events: list[dict[str, Any]]
    machine: dict[str, Any]
    grids: list[tuple[int, Path]]  # (nimg, file), in training order

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def status(self) -> str:
        if live_owner(self.path) is not None:
            return "running"
        total = self.config.get("train", {}).get("kimg", 0)
        if self.stats and self.stats[-1]["kimg"] >= total - 1e-9:
            return "finished"
        return "stopped" if self.stats else "not started"


def read_run(path: str | Path) -> Run:
    rd = RunDir(path)
    if not rd.config.is_file():
        raise UserError(f"{rd.path} is not a run folder (no {rd.config.name})")
    try:
        config = json.loads(rd.config.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{rd.config} is not JSON: {e}") from None
    try:
        Config.from_dict(config)  # the strict reading: every field present has its type
    except UserError as e:
        raise UserError(f"{rd.config}: {e}") from None
    machine: dict[str, Any] = {}
    if rd.machine.is_file():
        try:
            machine = json.loads(rd.machine.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            machine = {}  # only shown on the page: a damaged one is left out
        machine = machine if isinstance(machine, dict) else {}
    events = [e for e in read_stats(rd.events, EVENTS_FIELDS) if isinstance(e.get("event"), str)]
    return Run(
        rd.path,
        config,
        read_stats(rd.stats, STATS_FIELDS),
        read_stats(rd.metrics, METRICS_FIELDS),
        events,
        machine,
        rd.grids(),
    )


# ---------------------------------------------------------------------------- charts


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pairs = [(r["kimg"], r[key]) for r in rows if is_number(r.get(key))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _figure(
    title: str, runs: list[Run], keys: list[tuple[str, str, str]], y_title: str, events: bool = True
):
    """One chart: for each run and (source, key, label), a line against kimg."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for run in runs:
        prefix = f"{run.name}: " if len(runs) > 1 else ""
        for source, key, label in keys:
            x, y = _series(getattr(run, source), key)
            if x:
                fig.add_trace(
                    go.Scatter(
                        x=x, y=y, mode="lines+markers", name=prefix + label, marker={"size": 4}
                    )
                )
        if any(k[0] == "metrics" for k in keys) and run.metrics:  # the best snapshot
            best = [r for r in run.metrics if r.get("best")]
            if best:
                b = best[-1]
                fig.add_trace(
                    go.Scatter(
                        x=[b["kimg"]],
                        y=[b["fid"]],
                        mode="markers",
                        name=prefix + "best snapshot",
                        marker={"size": 12, "symbol": "star"},
                    )
                )
        if events:
            for e in run.events:
                at = e.get("at_kimg", e.get("kimg"))
                if is_number(at) and e["event"] in ("rollback", "warning"):
                    fig.add_vline(
                        x=at,
                        line_dash="dot",
                        line_color="red" if e["event"] == "rollback" else "orange",
                    )
    fig.update_layout(
        title=title,
        xaxis_title="kimg",
        yaxis_title=y_title,
        height=320,
        margin={"l": 50, "r": 20, "t": 40, "b": 40},
        template="plotly_white",
    )
    return fig


def _charts(runs: list[Run]) -> list[tuple[str, Any]]:
    charts = [
        (
            "losses",
            _figure(
                "Losses",
                runs,
                [("stats", "loss_d", "D loss"), ("stats", "loss_g", "G loss")],
                "loss",
            ),
        ),
        (
            "d-outputs",
            _figure(
                "D's outputs (sigmoid of the logits)",
                runs,
                [("stats", "d_real", "D(x)"), ("stats", "d_fake", "D(G(z))")],
                "mean",
            ),
        ),
        (
            "speed",
            _figure("Speed", runs, [("stats", "img_per_s", "img/s")], "images/s", events=False),
        ),
        (
            "memory",
            _figure("Peak memory", runs, [("stats", "peak_mem_mb", "peak MB")], "MB", events=False),
        ),
    ]
    if any(r.metrics for r in runs):
        charts.append(
            ("fid", _figure("FID (lower is better)", runs, [("metrics", "fid", "FID")], "FID"))
        )
        if any("kid" in m for r in runs for m in r.metrics):
            import plotly.graph_objects as go

            fig = go.Figure()
            for run in runs:
                pts = [
                    (m["kimg"], m["kid"][0])
                    for m in run.metrics
                    if isinstance(m.get("kid"), list) and m["kid"] and is_number(m["kid"][0])
                ]
                if pts:
                    fig.add_trace(
                        go.Scatter(
                            x=[p[0] for p in pts],
                            y=[p[1] for p in pts],
                            mode="lines+markers",
                            name=f"{run.name} KID",
                        )
                    )
            fig.update_layout(title="KID", xaxis_title="kimg", height=320, template="plotly_white")
            charts.append(("kid", fig))
    return charts


# ---------------------------------------------------------------------------- the page


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _table(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _machine_rows(m: dict[str, Any]) -> list[tuple[str, str]]:
    if not m:
        return [("machine", "not recorded (a run from before machine.json existed)")]
    # machine.json is only shown: a field of the wrong type shows as missing
    cpu = m.get("cpu") if isinstance(m.get("cpu"), dict) else {}
    rows = [
        (
            "CPU",
            f"{cpu.get('model')} ({cpu.get('cores')} cores, torch threads "
            f"{cpu.get('threads')}, dispatch {cpu.get('capability')})",
        ),
        ("memory", f"{m.get('memory_gib')} GiB"),
        (
            "versions",
            f"python {m.get('python')}, torch {m.get('torch')}, CUDA {m.get('cuda') or '-'}",
        ),
    ]
    gpus = m.get("gpus") if isinstance(m.get("gpus"), list) else []
    for g in gpus:
        g = g if isinstance(g, dict) else {}
        rows.append((f"GPU {g.get('index')}", f"{g.get('name')} ({g.get('memory_gib')} GiB)"))
    return rows


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; padding: 0 1em; max-width: 1100px;
       color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
.status { display: inline-block; padding: 0.1em 0.6em; border-radius: 0.6em; color: white; }
.finished { background: #2a7d2a; } .running { background: #1f5fa8; }
.stopped, .not-started { background: #a86a1f; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { text-align: left; padding: 0.15em 0.8em 0.15em 0; vertical-align: top; }
.grids { display: flex; gap: 1em; flex-wrap: wrap; }
.grids figure { margin: 0; } img.grid { image-rendering: pixelated; width: 384px; }
input[type=range] { width: 384px; }
pre { background: #f5f5f5; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""

SCRUB = """
function scrubber(id, grids) {
  const slider = document.getElementById(id + "-slider");
  const img = document.getElementById(id + "-img");
  const label = document.getElementById(id + "-label");
  function show(i) {
    img.src = grids[i][1];
    label.textContent = "tick " + (i + 1) + " of " + grids.length + ", " + grids[i][0] + " kimg";
  }
  slider.addEventListener("input", () => show(Number(slider.value)));
  document.addEventListener("keydown", (e) => {
    if (e.key !== "ArrowLeft" && e.key !== "ArrowRight") return;
    const v = Number(slider.value) + (e.key === "ArrowRight" ? 1 : -1);
    slider.value = Math.max(0, Math.min(grids.length - 1, v));
    show(Number(slider.value));
  });
  show(Number(slider.value));
}
"""


def _scrubber(run: Run, key: str) -> str:
    if not run.grids:
        return "<p>no sample grids yet</p>"
    data = [[round(n / 1000, 3), _data_uri(p)] for n, p in run.grids]
    last = len(data) - 1
    return (
        f'<figure><img class="grid" id="{key}-img" alt="fixed-noise grid"><figcaption>'
        f'<input type="range" id="{key}-slider" min="0" max="{last}" value="0">'
        f' <span id="{key}-label"></span> ({html.escape(run.name)})</figcaption></figure>'
        f"<script>scrubber({json.dumps(key)}, {json.dumps(data)});</script>"
    )


def _page(title: str, body: str, charts: list[tuple[str, Any]], tail: str = "") -> str:
    from plotly.offline import get_plotlyjs

    divs = "".join(
        f'<div class="chart" id="chart-{name}">'
        f"{fig.to_html(full_html=False, include_plotlyjs=False, div_id=f'plot-{name}')}</div>"
        for name, fig in charts
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
        f"</title><style>{STYLE}</style><script>{get_plotlyjs()}</script>"
        f"<script>{SCRUB}</script></head><body>{body}<h2>Charts</h2>{divs}{tail}"
        "</body></html>"
    )


def _events_table(run: Run) -> str:
    rows = [e for e in run.events if e.get("event") != "settings"]
    if not rows:
        return "<p>none</p>"
    return _table(
        [
            (
                f"{e.get('at_kimg', e.get('kimg', '?'))} kimg: {e['event']}",
                e.get("message")
                or json.dumps({k: v for k, v in e.items() if k not in ("event", "time")}),
            )
            for e in rows
        ]
    )


def build_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write RUN/report.html (or `out`) from the run folder's files; returns its path."""
    run = read_run(run_dir)
    out = Path(out) if out else RunDir(run.path).report
    last = run.stats[-1] if run.stats else {}
    settings = next((e for e in run.events if e.get("event") == "settings"), None)
    summary = [
        ("status", run.status),
        ("kimg", f"{last.get('kimg', 0)} of {run.config.get('train', {}).get('kimg')}"),
        ("ticks", str(len(run.stats))),
    ]
    if last:
        summary += [
            ("last losses", f"D {last['loss_d']:.3f}, G {last['loss_g']:.3f}"),
            ("last D(x), D(G(z))", f"{last['d_real']:.3f}, {last['d_fake']:.3f}"),
        ]
    if run.metrics:
        best = min(run.metrics, key=lambda m: m["fid"])
        summary.append(("best FID", f"{best['fid']:.2f} at {best['kimg']} kimg"))
    if settings and all(k in settings for k in ("precision", "channels_last", "how")):
        summary.append(
            (
                "precision, layout",
                f"{settings['precision']}, "
                f"{'channels-last' if settings['channels_last'] else 'NCHW'} "
                f"({settings['how']})",
            )
        )
    body = (
        f"<h1>dcgan run {html.escape(run.name)} "
        f"<span class='status {run.status.replace(' ', '-')}' id='status'>{run.status}"
        "</span></h1>"
        f"{_table(summary)}<h2>Fixed-noise samples (G-EMA), tick by tick</h2>"
        f"<div class='grids'>{_scrubber(run, 'run')}</div>"
    )
    tail = (
        f"<h2>Events</h2>{_events_table(run)}"
        f"<h2>Machine</h2>{_table(_machine_rows(run.machine))}"
        f"<h2>Config (resolved)</h2><pre>{html.escape(json.dumps(run.config, indent=2))}"
        f"</pre>"
    )
    atomic.write_text(out, _page(f"dcgan {run.name}", body, _charts([run]), tail))
    return out


def compare_runs(run_dirs: list[str], out: str | Path) -> tuple[Path, str]:
    """One page with the runs' curves overlaid and their last grids side by side; returns
    (path, a text table of last/best FID, img/s and kimg)."""
    if len(run_dirs) < 2:
        raise UserError("dcgan compare needs at least two run folders")
    runs = [read_run(r) for r in run_dirs]
    lines = [f"{'run':<28} {'status':<10} {'kimg':>9} {'img/s':>8} {'last FID':>9} {'best FID':>9}"]
    rows = []
    for r in runs:
        speeds = sorted(s["img_per_s"] for s in r.stats)
        rate = speeds[len(speeds) // 2] if speeds else float("nan")
        last_fid = r.metrics[-1]["fid"] if r.metrics else float("nan")
        best_fid = min((m["fid"] for m in r.metrics), default=float("nan"))
        kimg = r.stats[-1]["kimg"] if r.stats else 0.0
        lines.append(
            f"{r.name:<28} {r.status:<10} {kimg:>9.3f} {rate:>8.1f} "
            f"{last_fid:>9.2f} {best_fid:>9.2f}"
        )
        rows.append(
            (
                r.name,
                f"{r.status}, {kimg} kimg, median {rate:.0f} img/s, last FID "
                f"{last_fid:.2f}, best FID {best_fid:.2f}",
            )
        )
    grids = ""
    for r in runs:
        if r.grids:
            n, p = r.grids[-1]
            grids += (
                f"<figure><img class='grid' src='{_data_uri(p)}' alt='last grid of "
                f"{html.escape(r.name)}'><figcaption>{html.escape(r.name)}, "
                f"{n / 1000:.3f} kimg</figcaption></figure>"
            )
    body = (
        f"<h1>dcgan compare: {len(runs)} runs</h1>{_table(rows)}"
        f"<h2>Last fixed-noise grids</h2><div class='grids'>{grids}</div>"
    )
    path = Path(out)
    atomic.write_text(path, _page("dcgan compare", body, _charts(runs)))
    return path, "\n".join(lines)
