"""The code's layout as docs/code.md states it: data flows one way, and the page names every
module that exists (and none that does not)."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dcgan"

# The layers, first to last, as docs/code.md lists them. A module imports only modules of
# its own layer or of earlier ones.
LAYERS = [
    (
        "foundations",
        {"errors", "config", "machine", "pixels", "atomic", "dist", "content", "cache_key"},
    ),
    ("data", {"sources", "data", "sampler"}),
    ("networks", {"models", "memory", "augment", "losses", "latent", "inception", "engine"}),
    ("step", {"training_stats", "step", "calibrate"}),
    ("run folder", {"runlog", "rundir", "checkpoint", "tblog"}),
    ("loop", {"train", "report", "launch"}),
    ("trained generators", {"generator", "canonical", "hub", "pngs"}),
    (
        "evaluation",
        {
            "metrics",
            "metric_registry",
            "eval_table",
            "classifier",
            "features",
            "feature_cache",
            "evaluate",
        },
    ),
    ("uses of a run", {"export", "transfer", "tune", "api"}),
    ("commands", {"cli", "__main__", "__init__", "bench", "gpu_check"}),
]
# The one import against the flow: the loop measures FID with evaluation's FidTracker
# (--eval-every), imported inside the function that needs it.
EXCEPTIONS = {("train", "evaluate")}


def top_name(module: str) -> str:
    """dcgan.engine.conv -> engine; dcgan.bench.cli -> bench; dcgan.data -> data."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer_of(name: str) -> int:
    for i, (_, names) in enumerate(LAYERS):
        if name in names:
            return i
    raise AssertionError(f"dcgan/{name} is in no layer of tests/test_layout.py")


def imports(path: Path) -> set[str]:
    """The dcgan modules a file imports, anywhere in it (module level or in a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dcgan"):
            if node.module == "dcgan":  # from dcgan import atomic, runlog
                found |= {f"dcgan.{a.name}" for a in node.names if a.name != "__version__"}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("dcgan")}
    return found


def modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        rel = p.relative_to(ROOT).with_suffix("")
        out[".".join(rel.parts)] = p
    return out


def test_data_flows_one_way():
    wrong = []
    for module, path in modules().items():
        here = top_name(module)
        for dep in imports(path):
            there = top_name(dep)
            if there == here or (here, there) in EXCEPTIONS:
                continue
            if layer_of(there) > layer_of(here):
                wrong.append(
                    f"{module} imports {dep} (layer {LAYERS[layer_of(there)][0]!r} "
                    f"comes after {LAYERS[layer_of(here)][0]!r})"
                )
    assert not wrong, "\n".join(sorted(wrong))


def test_the_layout_page_names_every_module_and_only_those():
    page = (ROOT / "docs" / "code.md").read_text()
    named = set(re.findall(r"`([a-z_]+(?:\.py|/))`", page))
    actual = {p.name for p in PACKAGE.glob("*.py")} | {
        p.name + "/" for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()
    }
    assert not (actual - named - {"__init__.py", "__main__.py"}), (
        f"docs/code.md does not name {sorted(actual - named)}"
    )
    assert not (named - actual), (
        f"docs/code.md names modules that do not exist: {sorted(named - actual)}"
    )
    for _, names in LAYERS:  # and every layer's modules are in the page in the test's order
        assert all(
            f"`{n}.py`" in page or f"`{n}/`" in page for n in names - {"__main__", "__init__"}
        ), names
