"""Property-based fuzz of every file a command reads back: a run folder's files and the
cache's, damaged the ways files get damaged (cut short, bit rot, another encoding, edited
JSON with wrong types, missing or extra keys, huge numbers), then every reading command
run on them. Each must work or end in one line: never a traceback."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import dcgan
from dcgan.cli import main

TINY = [
    "--dataset",
    "fake",
    "--resolution",
    "32",
    "--channels",
    "1",
    "--ngf",
    "8",
    "--ndf",
    "8",
    "--nz",
    "16",
    "--batch",
    "16",
    "--tick-kimg",
    "0.016",
    "--checkpoint-ticks",
    "1",
    "--precision",
    "fp32",
    "--channels-last",
    "on",
    "--quiet",
]
RUN_FILES = (
    "config.json",
    "stats.jsonl",
    "metrics.jsonl",
    "events.jsonl",
    "machine.json",
    "checkpoint.pt",
    "generator.safetensors",
    "d_init.safetensors",
    ".lock",
    "samples/fakes000000032.png",
)
EXAMPLES = int(os.environ.get("DCGAN_FUZZ_EXAMPLES", "40"))

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False)
    | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def damage(draw, data: bytes, name: str) -> bytes:
    """A damaged copy of a file's bytes."""
    is_json = name.endswith((".json", ".jsonl"))
    kind = draw(
        st.sampled_from(
            ["cut", "flip", "junk", "empty", "latin1"] + (["json"] * 4 if is_json else [])
        )
    )
    if kind == "cut":
        return data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    if kind == "flip":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            if out:
                out[draw(st.integers(0, len(out) - 1))] ^= 1 << draw(st.integers(0, 7))
        return bytes(out)
    if kind == "junk":
        return draw(st.binary(max_size=64))
    if kind == "empty":
        return b""
    if kind == "latin1":
        return "é".encode("latin-1") + data  # not UTF-8
    return edit_json(draw, data, name.endswith(".jsonl"))


def edit_json(draw, data: bytes, lines_file: bool) -> bytes:
    """Change one value, drop or add a key, in one object of a JSON or JSON-lines file."""
    text = data.decode()
    lines = (text.splitlines() if lines_file else [text]) or ["{}"]
    i = draw(st.integers(0, len(lines) - 1))
    obj = json.loads(lines[i])
    target = obj
    while isinstance(target, dict) and target and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(target)))
        if not isinstance(target[key], dict):
            break
        target = target[key]
    how = draw(st.sampled_from(["set", "drop", "add", "replace"]))
    if how == "replace" or not isinstance(target, dict):
        obj = draw(json_values)
    elif how == "set" and target:
        target[draw(st.sampled_from(sorted(target)))] = draw(json_values)
    elif how == "drop" and target:
        del target[draw(st.sampled_from(sorted(target)))]
    else:
        target[draw(st.text(max_size=6))] = draw(json_values)
    lines[i] = json.dumps(obj)
    return ("\n".join(lines) + "\n").encode()


def run_cli(capsys, argv) -> int:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code in (0, 2), (argv, err[-3000:])
    assert "Traceback" not in err, (argv, err[-3000:])
    if code == 2:
        last = err.rstrip("\n").split("\n")[-1]
        assert last.startswith("dcgan: error:"), (argv, err[-3000:])
    return code


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A real short run (with a metrics row of the real format), and a folder source whose
    image cache and content manifest exist, in a cache of its own."""
    root = tmp_path_factory.mktemp("fuzz")
    before = os.environ.get("DCGAN_CACHE")
    os.environ["DCGAN_CACHE"] = str(root / "cache")
    try:
        run = root / "run"
        assert main(["train", *TINY, "--kimg", "0.032", "--out", str(run)]) == 0
        (run / "metrics.jsonl").write_text(
            json.dumps(
                {
                    "kimg": 0.032,
                    "fid": 123.4,
                    "fid_n": 64,
                    "features": "domain",
                    "best": True,
                    "time": 1.0,
                }
            )
            + "\n"
        )
        (run / ".lock").write_text("999999 elsewhere 1.0\n")
        images = root / "images"
        images.mkdir()
        rng = np.random.default_rng(0)
        for i in range(20):
            Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(
                images / f"{i}.png"
            )
        assert (
            main(
                [
                    "data",
                    "info",
                    str(images),
                    "--resolution",
                    "32",
                    "--preview",
                    str(root / "p.png"),
                ]
            )
            == 0
        )
    finally:
        os.environ["DCGAN_CACHE"] = before or ""
    return root


def fresh_copy(pristine: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    work = tmp_path / f"w{len(list(tmp_path.iterdir()))}"
    shutil.copytree(pristine / "run", work / "run")
    shutil.copytree(pristine / "cache", work / "cache")
    return work / "run", work / "cache", pristine / "images"


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(st.sampled_from(RUN_FILES), st.data())
def test_a_damaged_run_folder_file_never_tracebacks(
    pristine, tmp_path, capsys, monkeypatch, name, data
):
    run, cache, _ = fresh_copy(pristine, tmp_path)
    monkeypatch.setenv("DCGAN_CACHE", str(cache))
    path = run / name
    original = path.read_bytes()
    path.write_bytes(data.draw(damage(original, name), label="content"))
    out = run.parent
    run_cli(capsys, ["report", run, "--out", out / "r.html"])
    run_cli(capsys, ["compare", run, run, "--out", out / "c.html"])
    run_cli(capsys, ["sample", run, "--n", 4, "--out", out / "s.png", "--device", "cpu"])
    run_cli(capsys, ["export", run, "--format", "hf", "--out", out / "hf"])
    run_cli(capsys, ["train", "--resume", run, "--kimg", 0.032, "--device", "cpu", "--quiet"])
    try:  # the Python API: the same one-line errors, as UserError
        r = dcgan.Run(run)
        r.config, r.stats, r.metrics, r.best_fid, r.status  # noqa: B018 - reading is the test
    except dcgan.UserError:
        pass


def _cache_files(cache: Path) -> list[str]:
    return sorted(
        str(p.relative_to(cache))
        for p in cache.rglob("*")
        if p.is_file()
        and (
            p.name.startswith("images-")
            or p.parent.name == "digests"
            or p.name.startswith("calibration")
        )
    )


@settings(
    max_examples=max(EXAMPLES // 2, 10),
    deadline=None,
    derandomize=True,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(st.data())
def test_a_damaged_cache_file_never_tracebacks(pristine, tmp_path, capsys, monkeypatch, data):
    run, cache, images = fresh_copy(pristine, tmp_path)
    monkeypatch.setenv("DCGAN_CACHE", str(cache))
    name = data.draw(st.sampled_from(_cache_files(cache)), label="file")
    path = cache / name
    path.write_bytes(data.draw(damage(path.read_bytes(), name), label="content"))
    code = run_cli(
        capsys, ["data", "info", images, "--resolution", "32", "--preview", run.parent / "p.png"]
    )
    assert code == 0  # a damaged cache file is rebuilt, never fatal
