"""The text `dcgan eval` prints for a result: what was compared, with which features,
then the rows of each metric that ran (each metric's own, from `dcgan.metric_registry`),
then the time. It reads a result dict only, so a saved --json file prints the same."""

from __future__ import annotations

from typing import Any

from dcgan.metric_registry import table_rows


def _side(s: dict[str, Any], n: int) -> str:
    if s["kind"] == "generator":
        return f"{s['spec']} (generator, {s.get('kimg') or 0:g} kimg, {n} samples)"
    return f"{s['spec']} ({s['split']}, {n} images)"


def format_table(result: dict[str, Any]) -> str:
    """A few human-readable lines: what was compared, with which features, then the metrics."""
    lines = [
        f"A: {_side(result['a'], result['n']['a'])}",
        f"B: {_side(result['b'], result['n']['b'])}",
        f"features: {result['features']}  at {result['resolution']}px, "
        f"{result['channels']} channel(s)",
    ]
    if "classifier_test_accuracy" in result:
        lines[-1] += f"  (classifier test accuracy {100 * result['classifier_test_accuracy']:.1f}%)"
    rows = table_rows(result)
    width = max((len(r[0]) for r in rows), default=0)
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    lines.append(f"time: {result['time']:.1f} s")
    return "\n".join(lines)
