"""Checkpoints of the canonical PyTorch DCGAN example (pytorch/examples, dcgan/main.py).

That script saves `netG.state_dict()` after every epoch as `netG_epoch_N.pth`. Its
generator is an `nn.Sequential` under the attribute `main` (64x64 images):

    main.0   ConvTranspose2d(nz, ngf*8, 4, 1, 0, bias=False)   nz x 1 x 1 -> 4 x 4
    main.1   BatchNorm2d(ngf*8), main.2 ReLU
    main.3   ConvTranspose2d(ngf*8, ngf*4, 4, 2, 1, bias=False) -> 8 x 8; main.4 BN, main.5 ReLU
    main.6   ConvTranspose2d(ngf*4, ngf*2, ...)                 -> 16 x 16; main.7, main.8
    main.9   ConvTranspose2d(ngf*2, ngf, ...)                   -> 32 x 32; main.10, main.11
    main.12  ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False)      -> nc x 64 x 64; main.13 Tanh

`dcgan.models.Generator(nz, ngf, nc, 64)` builds the same layers in the same order
under the same keys (`block_widths(ngf, 64)` is [8, 4, 2, 1] x ngf), and neither has
conv biases, so the mapping is the identity: the state_dict loads strictly as it is, and
the imported G computes the same function (tests/test_canonical.py compares the two
in eval mode). nz, ngf and nc are read off the weight shapes (main.0: (nz, 8 ngf, 4, 4);
main.12: (ngf, nc, 4, 4)); every other shape is then checked against them.

Accepted as well: the `module.` prefix of a model saved from nn.DataParallel, and files
from before PyTorch 0.4.1 without BatchNorm's `num_batches_tracked` (which eval mode
never reads). The file is read with `torch.load(weights_only=True)` and nothing else:
a pickle that would build any other object (and so could run code) is refused by the
unpickler before anything of it runs.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any

import torch

from dcgan import atomic, checkpoint, latent, models, pixels, pngs
from dcgan.errors import UserError

RESOLUTION = 64
UNKNOWN = "unknown"  # the data set of a checkpoint that does not say


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a saved state_dict, `module.` prefixes removed; one-line errors."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler's refusal, a damaged or foreign file
        text = str(e)
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        why = (
            f"it would call {refused.group(1)}"
            if refused
            else (text.splitlines() or [type(e).__name__])[0][:200]
        )
        raise UserError(
            f"{path}: not read: torch.load(weights_only=True) accepts only "
            f"tensors and plain containers ({why}); nothing in it was run"
        ) from None
    if isinstance(obj, dict) and obj.get("format") == "dcgan-state-1":
        raise UserError(f"{path} is a dcgan training state: load its run folder instead")
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        raise UserError(
            f"{path} does not hold a state_dict (a dict of named tensors, as "
            "torch.save(netG.state_dict(), ...) writes)"
        )
    if all(k.startswith("module.") for k in obj):  # saved from nn.DataParallel
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


def infer_shape(sd: dict[str, torch.Tensor], path: Path) -> tuple[int, int, int]:
    """(nz, ngf, nc) from the first and last transposed convolutions' weights."""
    if "main.11.weight" in sd and "main.12.weight" not in sd:
        raise UserError(
            f"{path} holds a discriminator's weights (netD); import the "
            "generator's file (netG_epoch_N.pth)"
        )
    first, last = sd.get("main.0.weight"), sd.get("main.12.weight")
    if first is None or last is None or first.dim() != 4 or last.dim() != 4:
        raise UserError(
            f"{path} is not a generator of the canonical PyTorch DCGAN example "
            "(no 4-d main.0.weight and main.12.weight)"
        )
    nz, ngf, nc = int(first.shape[0]), int(last.shape[0]), int(last.shape[1])
    if nc not in (1, 3):
        raise UserError(f"{path}: main.12.weight makes {nc} channels; dcgan takes 1 or 3")
    return nz, ngf, nc


def read(path: str | Path) -> tuple[models.Generator, dict[str, Any]]:
    """A canonical checkpoint -> (dcgan Generator in eval mode, snapshot metadata)."""
    path = Path(path)
    sd = read_state_dict(path)
    nz, ngf, nc = infer_shape(sd, path)
    g = models.Generator(nz, ngf, nc, RESOLUTION)
    want = g.state_dict()
    for key, tensor in want.items():  # the missing num_batches_tracked: eval never reads it
        if key.endswith("num_batches_tracked") and key not in sd:
            sd[key] = torch.zeros_like(tensor)
    missing, extra = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing or extra:
        raise UserError(
            f"{path} is not the canonical 64x64 generator for nz {nz}, ngf {ngf}, "
            f"nc {nc}: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    for key, tensor in want.items():
        if sd[key].shape != tensor.shape:
            raise UserError(
                f"{path}: {key} has shape {tuple(sd[key].shape)}, expected "
                f"{tuple(tensor.shape)} for nz {nz}, ngf {ngf}, nc {nc}"
            )
    g.load_state_dict(sd)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    meta = {
        "nz": nz,
        "ngf": ngf,
        "nc": nc,
        "resolution": RESOLUTION,
        "g_dropout": 0.0,
        "dataset": UNKNOWN,
        "kimg": 0.0,
        "imported_from": path.name,
        "sha256": digest,
    }
    return g.eval(), meta


def import_run(path: str | Path, out: str | Path, dataset: str = UNKNOWN) -> Path:
    """Write a canonical checkpoint as a run folder `out`: the snapshot (with the metadata
    `dcgan.checkpoint.load_generator` needs), the config of the paper's recipe at the
    checkpoint's shape (the `dcgan64` preset), one fixed-noise grid, and an `imported`
    event naming the file and its SHA-256. `dcgan sample`, `eval`, `export` and `report`
    then read it like any run; there is nothing to resume (no training state)."""
    from dcgan.config import from_preset
    from dcgan.rundir import RunDir
    from dcgan.train import N_FIXED

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not empty: give a new folder")
    g, meta = read(path)
    meta["dataset"] = dataset
    cfg = from_preset(
        "dcgan64",
        {"nz": meta["nz"], "ngf": meta["ngf"], "channels": meta["nc"], "dataset": dataset},
    )
    run = RunDir(out)
    # the grid a run shows at every tick: N_FIXED latents of the config's seed
    z = torch.randn(N_FIXED, meta["nz"], generator=torch.Generator().manual_seed(cfg.train.seed))
    grid = pngs.grid_png(pixels.to_uint8(latent.decode(g, z)).numpy())
    atomic.write_text(run.config, cfg.to_json() + "\n")
    checkpoint.save_generator(g, meta, run.snapshot)
    atomic.write_bytes(run.grid(0), grid)
    event = {
        "event": "imported",
        "kimg": 0.0,
        "from": str(Path(path).resolve()),
        "sha256": meta["sha256"],
        "nz": meta["nz"],
        "ngf": meta["ngf"],
        "nc": meta["nc"],
        "time": time.time(),
    }
    atomic.write_text(run.events, json.dumps(event) + "\n")
    return out
