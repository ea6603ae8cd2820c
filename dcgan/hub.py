"""Generators in the Hugging Face Hub model layout: a folder a model repository can hold.

`write_folder` (`G.save_pretrained(DIR)`, `dcgan export RUN --format hf --out DIR`) writes

- `model.safetensors`: G's weights with the snapshot metadata in its header, exactly
  the format of a run's `generator.safetensors`, so `dcgan.load(DIR)` gives back the
  same tensors bit for bit (and any safetensors reader can open it);
- `config.json`: the architecture (nz, ngf, nc, resolution), the data set and kimg,
  the training config of the run and the FIDs measured during training;
- `README.md`: the model card, with the YAML header the Hub reads (library, tags);
- `samples.png`: 64 samples (seed 0), shown by the card.

The FIDs come from the run's `metrics.jsonl` (`--eval-every`): the best one, and the
one of the exported snapshot when one was measured at its kimg, each with n (the run's
`eval_n`), the features' name and the reference (the training set). A folder saved from
a generator that was itself loaded from such a folder carries its facts over.

`download("hf://OWNER/NAME[@REVISION]")` fetches such a folder with huggingface_hub's
`snapshot_download` (the Hub's own client, with its cache and token handling); the
package is optional: `pip install huggingface_hub`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from dcgan import __version__, atomic, checkpoint, latent, pngs
from dcgan.config import Config
from dcgan.errors import UserError
from dcgan.rundir import RunDir
from dcgan.runlog import read_stats

MODEL = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"
GRID = "samples.png"
FILES = (MODEL, CONFIG, CARD, GRID)
MODEL_TYPE = "dcgan-generator"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # missing, not UTF-8, not JSON
        return None
    return data if isinstance(data, dict) else None


def _fid(row: dict[str, Any], n: Any, dataset: str) -> dict[str, Any]:
    return {
        "fid": row["fid"],
        "kimg": row["kimg"],
        "n": n,
        "features": row.get("features"),
        "reference": f"{dataset} training set",
    }


def provenance(origin: Path | None, meta: dict[str, Any]) -> dict[str, Any]:
    """{"training_config": ..., "fid": {"best": ..., "snapshot": ...}} of the folder a
    generator came from: a run folder, or a folder in this layout (its own facts)."""
    facts: dict[str, Any] = {"training_config": None, "fid": {"best": None, "snapshot": None}}
    if origin is None:
        return facts
    config = _read_json(origin / CONFIG) or {}
    if config.get("model_type") == MODEL_TYPE:  # a folder written here: carry its facts over
        facts["training_config"] = config.get("training_config")
        fid = config.get("fid")
        facts["fid"] = fid if isinstance(fid, dict) else facts["fid"]
        return facts
    try:
        Config.from_dict(config)
    except UserError:
        return facts  # not a run folder's config (or a damaged one): nothing to tell
    if not {"data", "model", "train"} <= set(config):
        return facts  # a partial config: the card says nothing of training
    facts["training_config"] = config
    rows = [
        r
        for r in read_stats(RunDir(origin).metrics)
        if isinstance(r.get("fid"), (int, float)) and math.isfinite(r["fid"])
    ]
    if rows:
        n = config["train"].get("eval_n")
        dataset = str(config["data"].get("dataset", meta.get("dataset", "")))
        facts["fid"]["best"] = _fid(min(rows, key=lambda r: r["fid"]), n, dataset)
        here = [r for r in rows if abs(r["kimg"] - float(meta.get("kimg", -1))) < 5e-4]
        if here:
            facts["fid"]["snapshot"] = _fid(here[-1], n, dataset)
    return facts


def _card(meta: dict[str, Any], facts: dict[str, Any], parameters: int) -> str:
    """The model card: YAML front matter for the Hub, then what the generator is."""
    r, nc, dataset = meta["resolution"], meta["nc"], meta.get("dataset") or "an unrecorded set"
    channels = "1 channel (grey)" if nc == 1 else f"{nc} channels (RGB)"
    if meta.get("imported_from"):
        origin = (
            f"Imported from `{meta['imported_from']}`, a checkpoint of the canonical "
            "PyTorch DCGAN example (pytorch/examples, dcgan/main.py); its training length "
            "was not recorded. Data set: " + str(dataset) + "."
        )
    else:
        origin = (
            f"Trained with the `dcgan` package on {dataset} for {meta['kimg']:g} kimg "
            "(thousands of real images shown to the discriminator); the weights are the "
            "run's generator snapshot (its moving average, G-EMA, unless the run set "
            "ema_kimg to 0)."
        )
    lines = [
        "---",
        "library_name: dcgan",
        "pipeline_tag: unconditional-image-generation",
        "tags:",
        "- dcgan",
        "- gan",
        "- unconditional-image-generation",
        "- pytorch",
        "---",
        "",
        f"# DCGAN generator: {dataset}, {r}x{r}, {channels}",
        "",
        f"A DCGAN generator (Radford, Metz & Chintala 2015): z ~ N(0, I) of size "
        f"{meta['nz']} -> images {nc} x {r} x {r} in [-1, 1]; ngf {meta['ngf']}, "
        f"{parameters:,} parameters. {origin}",
        "",
        f"![64 samples, latents of seed 0]({GRID})",
        "",
        "## Use",
        "",
        "```python",
        "import dcgan",
        "",
        'G = dcgan.load("hf://OWNER/NAME")  # or the path of a copy of this folder',
        f"images = G.sample(16, seed=0)  # uint8 (16, {nc}, {r}, {r}): `dcgan sample --seed 0`",
        "```",
        "",
        f"`{MODEL}` holds the weights (keys `main.N.*` of an `nn.Sequential`, as in the "
        "canonical PyTorch example) and, in its header, the shape; it loads without running "
        "code.",
        "",
        "## Evaluation",
        "",
    ]
    fid = facts.get("fid") or {}
    measured = [
        (what, fid.get(key))
        for what, key in (("best during training", "best"), ("this snapshot", "snapshot"))
        if fid.get(key)
    ]
    if measured:
        lines += ["| | FID | at kimg | n | features | reference |", "|---|---|---|---|---|---|"]
        lines += [
            f"| {what} | {m['fid']:.2f} | {m['kimg']:g} | {m['n']} | `{m['features']}` | "
            f"{m['reference']} |"
            for what, m in measured
        ]
        lines += [
            "",
            "FID depends on n, on the feature network and on the reference set: "
            "compare only numbers computed with the same three.",
        ]
    else:
        lines += [
            "No FID was measured during training (`dcgan train --eval-every KIMG` "
            "records one); `dcgan eval` measures one."
        ]
    if facts.get("training_config"):
        lines += [
            "",
            "## Training config",
            "",
            "```json",
            json.dumps(facts["training_config"], indent=2, sort_keys=True),
            "```",
        ]
    return "\n".join(lines) + "\n"


def write_folder(
    g: torch.nn.Module, meta: dict[str, Any], out: Path, origin: Path | None = None
) -> Path:
    """Write G (eval mode) and `meta` in the Hub layout to the folder `out`; returns it."""
    from dcgan.generator import uint8_batches
    from dcgan.models import count_parameters

    out = Path(out)
    if out.is_file():
        raise UserError(f"--out {out} is a file: give a folder for the Hub layout")
    run = RunDir(out)
    if any(p.exists() for p in (run.snapshot, run.checkpoint, run.stats)):
        raise UserError(f"--out {out} is a run folder: give another folder for the Hub layout")
    facts = provenance(origin, meta)
    config = {
        "model_type": MODEL_TYPE,
        "library_name": "dcgan",
        "dcgan_version": __version__,
        **{k: meta[k] for k in ("nz", "ngf", "nc", "resolution", "g_dropout")},
        "dataset": meta.get("dataset"),
        "kimg": meta.get("kimg"),
        "input": f"z float32 (N, {meta['nz']}), standard normal",
        "output": f"images float32 (N, {meta['nc']}, {meta['resolution']}, "
        f"{meta['resolution']}) in [-1, 1]",
        **facts,
    }
    samples = torch.cat(list(uint8_batches(g, latent.latent_bank(64, int(meta["nz"]), 0))))
    checkpoint.save_generator(g, meta, out / MODEL)
    atomic.write_text(out / CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")
    atomic.write_bytes(out / GRID, pngs.grid_png(samples.numpy()))
    atomic.write_text(out / CARD, _card(meta, facts, count_parameters(g)))
    return out


def download(uri: str) -> Path:
    """hf://OWNER/NAME[@REVISION] -> a local folder in this layout (the Hub's cache)."""
    repo, _, revision = uri.removeprefix("hf://").partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise UserError(f"{uri}: expected hf://OWNER/NAME or hf://OWNER/NAME@REVISION")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(
            f"loading {uri} needs the Hub client: pip install huggingface_hub "
            "(or download the folder and load its path)"
        ) from None
    try:
        folder = snapshot_download(
            repo_id=repo, revision=revision or None, allow_patterns=[MODEL, CONFIG, CARD]
        )
    except Exception as e:  # the client's errors: network, unknown repository, no access
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot download {uri}: {first}") from e
    return Path(folder)
