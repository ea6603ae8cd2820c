"""The README's "Python API" section is the executed example, and the example runs.

The section's code blocks must appear verbatim in examples/quickstart.py, which is run
here as a user runs it (in a fresh folder, on the real Fashion-MNIST), so the README
cannot drift from code that works.
"""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).parents[1]
EXAMPLE = ROOT / "examples" / "quickstart.py"
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def test_the_readme_python_api_section_is_the_example():
    blocks = re.findall(r"```python\n(.*?)```", readme_section("Python API"), re.S)
    assert blocks, "the Python API section has no python block"
    example = EXAMPLE.read_text()
    for block in blocks:
        assert block in example, f"README block not in {EXAMPLE.name}:\n{block}"
    assert len(blocks[0].strip().splitlines()) <= 14  # the quickstart stays about 10 lines


@pytest.mark.skipif(not FMNIST.is_file(), reason="Fashion-MNIST (dataset-fashion-mnist) missing")
def test_the_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    out = capsys.readouterr().out
    assert re.search(r"FID \d+\.\d", out), out
    with Image.open(tmp_path / "runs" / "quick" / "grid.png") as im:
        assert im.size == (8 * 34 + 2, 8 * 34 + 2)
    hf = tmp_path / "runs" / "quick-hf"
    assert {"model.safetensors", "config.json", "README.md"} <= {p.name for p in hf.iterdir()}
