"""Saving and loading: the full training state and the small generator snapshot.

- `checkpoint.pt`: everything needed to continue exactly (G, D, G-EMA, both
  optimisers, scalers, progress, RNG states, data position, resolved config).
  Only tensors, numbers, strings, lists and dicts, so it loads with
  `torch.load(weights_only=True)`; written to a temporary file, flushed, then
  renamed over the old one, so a crash mid-write leaves the previous file whole.
  The state is serialised once, its SHA-256 stored beside the bytes, and both
  checked on load: a truncated or bit-flipped file is reported, never half-used.
- `generator.safetensors`: the G-EMA weights plus the model config as string
  metadata. safetensors cannot carry code, so a downloaded snapshot is safe.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from dcgan import atomic
from dcgan.errors import UserError
from dcgan.models import Generator
from dcgan.rundir import SNAPSHOT


def save_state(state: dict[str, Any], path: str | Path) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    wrapped = {
        "format": "dcgan-state-1",
        "sha256": hashlib.sha256(payload).hexdigest(),
        "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8),
    }
    atomic.write(Path(path), lambda tmp: torch.save(wrapped, tmp))


def load_state(path: str | Path) -> dict[str, Any]:
    """Load and verify a training state; any damage or foreign content is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no training state at {path}")
    try:
        wrapped = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused (would run code) or a damaged file
        first = (str(e).splitlines() or [type(e).__name__])[0]  # str(e) may be empty
        raise UserError(f"cannot load training state {path}: {first}") from e
    if not isinstance(wrapped, dict) or wrapped.get("format") != "dcgan-state-1":
        raise UserError(f"{path} is not a dcgan training state")
    payload = wrapped["payload"].numpy().tobytes()
    if hashlib.sha256(payload).hexdigest() != wrapped["sha256"]:
        raise UserError(f"{path} is damaged (checksum mismatch); not loaded")
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


def save_generator(g: Generator, meta: dict[str, Any], path: str | Path) -> None:
    """Write G's weights (CPU, contiguous) and `meta` (JSON values) as a safetensors file."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in g.state_dict().items()}
    header = {"dcgan": json.dumps(meta, sort_keys=True)}
    atomic.write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=header))


def save_state_dict(module: torch.nn.Module, path: str | Path) -> None:
    """A module's state_dict (CPU, contiguous) as safetensors, written atomically."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    atomic.write(Path(path), lambda tmp: save_file(tensors, tmp))


def snapshot_path(path: str | Path) -> Path:
    """A run folder or a snapshot file -> the snapshot file."""
    path = Path(path)
    if path.is_dir():
        path = path / SNAPSHOT
    if not path.is_file():
        raise UserError(
            f"no generator snapshot at {path} (expected a run folder or a {SNAPSHOT} file)"
        )
    return path


# the snapshot metadata every reader relies on, and its JSON type
_META_INTS = ("nz", "ngf", "nc", "resolution")
_META_NUMBERS = ("g_dropout", "kimg")


def _check_meta(path: Path, meta: object) -> None:
    """Metadata of the right JSON types, so that no reader fails later on a "100" or a
    null: a snapshot is a file a user may have edited or received from anyone."""
    if not isinstance(meta, dict):
        raise UserError(f"{path} does not hold a dcgan generator: its metadata is not an object")
    for key in (*_META_INTS, *_META_NUMBERS):
        value = meta.get(key)
        want_int = key in _META_INTS
        ok = (
            (isinstance(value, int) if want_int else isinstance(value, (int, float)))
            and (not isinstance(value, bool))
            and (value > 0 if want_int else value >= 0)
        )
        if not ok:
            kind = "a positive integer" if want_int else "a number >= 0"
            raise UserError(
                f"{path} does not hold a dcgan generator: metadata {key} must be "
                f"{kind}, got {value!r}"
            )


def load_generator(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[Generator, dict[str, Any]]:
    """Load a snapshot (or a run folder's) into an eval-mode Generator; returns (G, meta).

    meta holds at least nz, ngf, nc, resolution, g_dropout, kimg and dataset.
    """
    path = snapshot_path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["dcgan"])
        tensors = load_file(str(path))
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as e:
        raise UserError(f"{path} is not a dcgan generator snapshot: {e}") from e
    _check_meta(path, meta)
    try:
        g = Generator(
            meta["nz"], meta["ngf"], meta["nc"], meta["resolution"], float(meta["g_dropout"])
        )
        g.load_state_dict(tensors)
    except (KeyError, TypeError, ValueError, RuntimeError, AssertionError) as e:
        # a safetensors file of the right format whose metadata or weights are not a
        # dcgan G's (missing keys, other shapes): one line, not a traceback
        what = (
            f"missing metadata {e}"
            if isinstance(e, KeyError)
            else (str(e).splitlines() or [type(e).__name__])[0]
        )
        raise UserError(f"{path} does not hold a dcgan generator: {what}") from e
    return g.to(device).eval(), meta
