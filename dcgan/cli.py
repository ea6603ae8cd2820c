"""The `dcgan` command line: train, sample, eval, bench, transfer, tune, info, report,
compare, export, import, data.

Every config field is also a flag (`--d-lr 1e-4` sets train.d_lr). Mistakes a
user can fix end in one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dcgan import atomic
from dcgan.config import (
    CHOICES,
    FEATURES,
    PRESETS,
    TRISTATE,
    field_index,
    from_preset,
    one_of,
)
from dcgan.errors import UserError


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per config field; values stay strings here and are coerced strictly
    by dcgan.config, so a wrong type gets the config's own message."""
    for name, (section, f) in field_index().items():
        flag = "--" + name.replace("_", "-")
        default = f.default
        help_ = f"{section}.{name} (default {default!r})"
        if name in CHOICES:
            help_ = f"{section}.{name}: {one_of(CHOICES[name])} (default {default!r})"
        if f.type is bool or name in TRISTATE:
            p.add_argument(
                flag, dest=f"cfg_{name}", nargs="?", const="true", metavar="BOOL", help=help_
            )
        else:
            p.add_argument(flag, dest=f"cfg_{name}", metavar=f.type.__name__.upper(), help=help_)
    p.add_argument(
        "--lr",
        dest="lr_both",
        metavar="FLOAT",
        help="learning rate of both networks (sets --g-lr and --d-lr)",
    )


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    o = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    if args.lr_both is not None:
        o.setdefault("g_lr", args.lr_both)
        o.setdefault("d_lr", args.lr_both)
    return o


def cmd_train(args: argparse.Namespace) -> int:
    from dcgan import launch
    from dcgan.rundir import RunDir

    # the run-folder logic (resume, torchrun restarts, the lock) is dcgan.launch's, which
    # dcgan.train() calls too
    if args.resume and (args.preset or args.config):
        raise UserError(
            "--resume continues the run with its own config: leave out "
            f"{'--preset' if args.preset else '--config'}"
        )
    if args.preset and args.config:
        raise UserError("give --preset or --config, not both (flags override either)")
    p = launch.plan(
        args.preset or "fmnist32",
        _overrides(args),
        config=args.config,
        out=args.out,
        resume=args.resume,
        force=args.force,
    )
    if args.dry_run:
        print(p.cfg.to_json())
        return 0
    last = launch.execute(p, progress=not args.quiet)
    out = p.out
    state = "stopped early; continue with --resume " + str(out) if last.get("stopped") else ("done")
    run = RunDir(out)
    files = [
        (
            run.grid(0).parent.name + "/fakesNNNNNNNNN.png",
            "fixed-noise grid per tick (G-EMA; NNNNNNNNN = images)",
        ),
        (run.losses.name, "loss and D-output curves"),
        (run.stats.name, "one JSON line per tick"),
        (run.snapshot.name, "G-EMA snapshot (dcgan sample / eval)"),
        (run.checkpoint.name, "full training state (--resume)"),
        (run.config.name, "resolved config"),
    ]
    print(
        f"{state} at {last.get('kimg', 0)} kimg. In {out}:\n"
        + "\n".join(f"  {name:<27}{what}" for name, what in files),
        file=sys.stderr,
    )
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from dcgan import latent
    from dcgan.api import save_grid
    from dcgan.generator import load

    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    g = load(args.run, args.device)  # a run, a snapshot, a Hub folder or a canonical .pth
    meta, nz = g.meta, g.meta["nz"]
    if args.out_dir:
        from dcgan.pngs import write_samples

        if args.interpolate or args.arithmetic:
            raise UserError(
                "--out-dir writes plain samples: leave out --interpolate and "
                "--arithmetic (or write their grid with --out)"
            )
        write_samples(g, args.n, args.out_dir, args.seed, args.truncation, progress=not args.quiet)
        print(
            f"wrote {args.n} PNG files ({meta['resolution']}px, {meta['kimg']} kimg, seed "
            f"{args.seed}) to {args.out_dir}"
        )
        return 0
    if args.interpolate:
        images = latent.interpolation_grid(
            g, nz, args.interpolate, args.steps, args.seed, args.truncation
        )
        nrow, what = args.steps, f"{args.interpolate} interpolations of {args.steps} steps"
    elif args.arithmetic:
        a, b, c = latent.parse_arithmetic(args.arithmetic, args.n)
        bank = latent.latent_bank(args.n, nz, args.seed, args.truncation)
        images = latent.vector_arithmetic(g, bank, a, b, c)
        nrow, what = latent.ARITHMETIC_NROW, "mean A, mean B, mean C, A - B + C, neighbours"
    else:
        images = g.sample(args.n, args.seed, args.truncation)  # the latents of latent_bank
        nrow, what = 0, f"{args.n} samples (index i at row i // columns, row-major)"
    path = save_grid(images, args.out, nrow)
    print(f"wrote {what} ({meta['resolution']}px, {meta['kimg']} kimg) to {path}")
    return 0


def _load_source(args: argparse.Namespace):
    """The source of `dcgan data info` / `data build`, converted (or read) by the store."""
    from dcgan.data import load_images

    return load_images(
        args.source,
        args.resolution,
        args.channels,
        split=args.split,
        workers=args.workers,
        max_images=args.max_images,
    )


def cmd_data_info(args: argparse.Namespace) -> int:
    from dcgan.data import cache_root
    from dcgan.runlog import save_grid

    data = _load_source(args)
    n, c, r, _ = data.images.shape
    preview = (
        Path(args.preview)
        if args.preview
        else (cache_root() / "previews" / f"{Path(data.source).name}-{data.split}-{r}px-{c}ch.png")
    )
    save_grid(data.images[:64], preview)  # reads 64 images of the map
    labels = "none" if data.labels is None else f"{len(set(data.labels.tolist()))} classes"
    print(
        f"source:  {data.source} ({data.split})\nimages:  {n}\nshape:   {c} x {r} x {r} "
        f"uint8\nlabels:  {labels}\nskipped: {data.skipped}\nfile:    {data.path or 'none'}"
        f"\npreview: {preview}"
    )
    return 0


def cmd_data_build(args: argparse.Namespace) -> int:
    import time

    t0 = time.perf_counter()
    data = _load_source(args)
    seconds = time.perf_counter() - t0
    n, c, r, _ = data.images.shape
    what = f"{n} images ({c} x {r} x {r} uint8, {data.images.nbytes / 1e6:.1f} MB)"
    if not data.path:  # fake: made on each use, never cached
        print(f"{what}: {data.source} is made on each use, never cached")
    elif data.converted:
        print(f"built {what} in {seconds:.1f} s -> {data.path}")
    else:
        print(f"already built: {what} -> {data.path}")
    if data.skipped:
        print(f"skipped {data.skipped} unreadable file(s)")
    return 0


def _csv(text: str, kind=str) -> tuple:
    try:
        return tuple(kind(x) for x in text.split(",") if x)
    except ValueError as e:
        raise UserError(f"cannot read {text!r} as a comma-separated list: {e}") from e


def cmd_eval(args: argparse.Namespace) -> int:
    from dcgan.api import evaluate
    from dcgan.eval_table import format_table

    result = evaluate(
        args.a,
        args.b,
        _csv(args.metrics),
        args.features,
        args.n,
        device=args.device,
        json=args.json,
        progress=not args.quiet,
    )
    print(format_table(result))
    if args.json:
        print(f"wrote {args.json}")
    return 0


def cmd_transfer(args: argparse.Namespace) -> int:
    from dcgan.transfer import format_table, run_transfer

    labels = list(_csv(args.labels))  # counts or "all", checked by run_transfer
    result = run_transfer(
        args.run, labels, args.source, args.draws, args.device, progress=not args.quiet
    )
    print(format_table(result))
    if args.json:
        atomic.write_text(args.json, json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """The machine, and what `auto` resolves to here for a preset's model (and why)."""
    import torch

    from dcgan import calibrate, machine
    from dcgan.machine import resolve_device
    from dcgan.sources import LABELLED

    facts = machine.facts()
    cfg = from_preset(args.preset, _overrides(args))
    device = resolve_device(cfg.train.device)
    nc = cfg.data.channels or (1 if cfg.data.dataset in LABELLED else 3)
    choice = calibrate.resolve(cfg, nc, device, cfg.data.cache_dir)
    facts["auto"] = {
        "preset": args.preset,
        "device": str(device),
        **choice.as_dict(),
        "native_bf16_rule": machine.native_bf16(facts["cpu"]),
    }
    if args.json:
        print(json.dumps(facts, indent=1))
        return 0
    c = facts["cpu"]
    isa = ", ".join(k for k in ("avx2", "avx512", "avx512_bf16", "amx") if c[k]) or "none"
    mem = f"{facts['memory_gib']} GiB" if facts["memory_gib"] is not None else "unknown"
    print(
        f"CPU        {c['model']}: {c['cores']} cores, torch uses {c['threads']} threads\n"
        f"ISA        torch dispatch {c['capability']}; has {isa} "
        f"({machine.isa_label(c)})\n"
        f"memory     {mem}\n"
        f"versions   python {facts['python']}, torch {facts['torch']}, "
        f"CUDA {facts['cuda'] or '-'}, cuDNN {facts['cudnn'] or '-'}"
    )
    for g in facts["gpus"]:
        print(
            f"GPU {g['index']}      {g['name']}: {g['memory_gib']} GiB, compute "
            f"{g['capability']}, bf16 {'yes' if g['bf16'] else 'no'}"
        )
    if not facts["gpus"]:
        print("GPU        none (CUDA available: no)" if not torch.cuda.is_available() else "")
    if facts["auto"]["native_bf16_rule"]:
        why = "bf16 is a candidate: native bf16 instructions"
    elif c["avx512_bf16"] or c["amx"]:
        why = (
            f"bf16 is not a candidate: torch dispatches to {c['capability']} kernels here "
            "(ATEN_CPU_CAPABILITY or ONEDNN_MAX_CPU_ISA), so bf16 would be emulated"
        )
    else:
        why = "bf16 is not a candidate: no native bf16 instructions (it would be emulated)"
    if device.type == "cuda":
        why = "CUDA: bf16 where the GPU supports it, else fp16 with loss scalers"
    print(f"auto       {choice.line()}\n           for --preset {args.preset} on {device}; {why}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from dcgan import tune

    if args.summary:
        print(tune.summary(args.summary, args.storage))
        return 0
    if not args.out:
        raise UserError("dcgan tune needs --out STUDY_FOLDER (or --summary STUDY_FOLDER)")
    if args.trials < 1 or args.kimg <= 0 or args.eval_every <= 0:
        raise UserError("--trials must be >= 1, --kimg and --eval-every > 0")
    # --dataset / --resolution pin those fields like --fix; bad values: the config's message
    fixed, base = tune.base_config(args.preset, args.fix, args.dataset, args.resolution)
    space = tune.load_space(args.space, fixed, base)
    settings = tune.Settings(
        args.preset,
        args.trials,
        args.kimg,
        args.eval_features,
        args.eval_n,
        args.eval_every,
        args.pruner,
        args.seed,
        args.device,
    )
    tune.tune(
        args.out,
        settings,
        space,
        fixed,
        args.storage,
        not args.quiet,
        args.heartbeat,
        3 * args.heartbeat,
    )
    print(tune.summary(args.out, args.storage))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from dcgan.report import build_report

    path = build_report(args.run, args.out)
    print(f"wrote {path} (open it in a browser; it needs no network)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from dcgan.report import compare_runs

    path, table = compare_runs(args.runs, args.out)
    print(table)
    print(f"wrote {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from dcgan.export import export_generator

    path = export_generator(args.run, args.format, args.out)
    print(f"wrote {args.format} generator to {path}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from dcgan.canonical import import_run
    from dcgan.generator import load

    out = import_run(args.checkpoint, args.out, args.dataset)
    meta = load(out, "cpu").meta
    print(
        f"imported {args.checkpoint} (nz {meta['nz']}, ngf {meta['ngf']}, nc {meta['nc']}, "
        f"64px) as the run folder {out}: dcgan sample, eval, export and report read it"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dcgan", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train", help="train a DCGAN", description="Train a DCGAN. Every config field is a flag."
    )
    t.add_argument("--preset", help=f"one of {', '.join(PRESETS)} (default fmnist32)")
    t.add_argument(
        "--config",
        metavar="FILE.json",
        help="a config file (config.json of a run, dcgan tune's best.json) instead "
        "of --preset; flags given with it override it",
    )
    t.add_argument("--out", help="run folder (default runs/PRESET-DATE)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run (optionally --kimg TOTAL)")
    t.add_argument("--force", action="store_true", help="overwrite a run folder in use")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_config_flags(t)
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="write a grid of samples from a run's generator")
    s.add_argument(
        "run",
        help="run folder, generator.safetensors, a folder of dcgan export "
        "--format hf (or hf://OWNER/NAME), or a canonical example's netG_*.pth",
    )
    s.add_argument("--n", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="samples.png")
    s.add_argument(
        "--truncation",
        type=float,
        default=0.0,
        help="redraw latent entries with |z| above this (0: plain normal)",
    )
    s.add_argument(
        "--interpolate",
        type=int,
        default=0,
        metavar="K",
        help="K rows of spherical interpolation between pairs of latents",
    )
    s.add_argument("--steps", type=int, default=8, help="images per interpolation row")
    s.add_argument(
        "--arithmetic",
        metavar="A:B:C",
        help="vector arithmetic mean(A) - mean(B) + mean(C) on grid indices of the "
        "same --n and --seed, e.g. 3,10,22:5,9,40:1,2,8",
    )
    s.add_argument(
        "--out-dir",
        metavar="DIR",
        help="instead of a grid: one PNG per image, DIR/00000.png ... (lossless; "
        "the bytes dcgan eval scores), for clean-fid, torch-fidelity, pytorch-fid",
    )
    s.add_argument("--device", default="auto", help=DEVICE_HELP)
    s.add_argument("--quiet", action="store_true", help="no progress bar (--out-dir)")
    s.set_defaults(func=cmd_sample)

    from dcgan.bench import cli as bench_cli  # train|features|generator|engine, each its own

    bench_cli.add_parser(sub, DEVICE_HELP)

    from dcgan import metric_registry  # the metrics' names and help: one registry

    e = sub.add_parser(
        "eval",
        help=f"{','.join(metric_registry.REGISTRY)} between A and B",
        description="Compare two image sets. A and B are run folders, "
        "generator snapshots or data sources with a split "
        "(fashion-mnist:train, fashion-mnist:test, emoji, a folder).",
    )
    e.add_argument("a")
    e.add_argument("b")
    e.add_argument("--metrics", default="fid,kid,pr", help=metric_registry.help_text())
    e.add_argument("--features", default="inception", choices=FEATURES)
    e.add_argument("--n", type=int, default=10000, help="images per side")
    e.add_argument("--json", help="write the result as JSON")
    e.add_argument("--device", default="auto", help=DEVICE_HELP)
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_eval)

    tr = sub.add_parser("transfer", help="classify with the trained D's features")
    tr.add_argument("run", help="run folder (needs checkpoint.pt)")
    tr.add_argument("--labels", default="100,1000,all", help="labels per class, comma-separated")
    tr.add_argument("--source", help="labelled source (default: the run's data set)")
    tr.add_argument("--draws", type=int, default=3, help="label draws (mean and std)")
    tr.add_argument("--json", help="write the result as JSON")
    tr.add_argument("--device", default="auto", help=DEVICE_HELP)
    tr.add_argument("--quiet", action="store_true")
    tr.set_defaults(func=cmd_transfer)

    i = sub.add_parser(
        "info",
        help="the machine, and what auto settings resolve to here",
        description="CPU model and ISA level, memory, versions, GPUs, and the "
        "precision and memory format that `auto` picks for a preset's model "
        "(measured once, then cached).",
    )
    i.add_argument("--preset", default="fmnist32", help=f"one of {', '.join(PRESETS)}")
    i.add_argument("--json", action="store_true", help="print JSON instead")
    _add_config_flags(i)
    i.set_defaults(func=cmd_info)

    tu = sub.add_parser(
        "tune",
        help="hyper-parameter search with Optuna",
        description="Run an Optuna study whose trials are ordinary run folders "
        "under --out; FID of G-EMA is the objective. Start the same command on "
        "several machines with one --storage URL to share the study.",
    )
    tu.add_argument("--preset", default="fmnist32", help=f"one of {', '.join(PRESETS)}")
    tu.add_argument("--out", help="the study folder (trials, study.db, best.json, plots)")
    tu.add_argument("--trials", type=int, default=40, help="trials in the study, all workers")
    tu.add_argument("--kimg", type=float, default=60.0, help="length of each trial")
    tu.add_argument(
        "--eval-every",
        type=float,
        default=10.0,
        help="kimg between the FIDs reported to the pruner",
    )
    tu.add_argument("--eval-features", default="domain", choices=FEATURES)
    tu.add_argument("--eval-n", type=int, default=2000, help="images per FID")
    tu.add_argument("--pruner", default="median", choices=["median", "hyperband"])
    tu.add_argument("--space", metavar="FILE.json", help="replace or narrow the search space")
    tu.add_argument(
        "--fix",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="pin a config field (repeatable)",
    )
    tu.add_argument(
        "--dataset", help="the trials' data set, as dcgan train's --dataset (default: the preset's)"
    )
    tu.add_argument(
        "--resolution", help="the trials' resolution, 32, 64 or 128 (default: the preset's)"
    )
    tu.add_argument("--seed", type=int, default=0, help="the TPE sampler's seed")
    tu.add_argument(
        "--storage",
        help="an SQLAlchemy URL, e.g. postgresql://user@host/db "
        "(default: sqlite in the study folder)",
    )
    tu.add_argument("--summary", metavar="STUDY", help="print a study's results and exit")
    tu.add_argument(
        "--heartbeat",
        type=int,
        default=20,
        help="seconds between a worker's heartbeats (a dead worker's trial is "
        "retried after 3 of them)",
    )
    tu.add_argument("--device", default="auto", help=DEVICE_HELP)
    tu.add_argument("--quiet", action="store_true")
    tu.set_defaults(func=cmd_tune)

    rp = sub.add_parser(
        "report",
        help="one self-contained HTML page of a run",
        description="Write RUN/report.html: the fixed-noise grid of every "
        "tick behind a slider, loss / D-output / FID / speed charts, the "
        "config, the machine and the events. Works on a live run too.",
    )
    rp.add_argument("run", help="run folder")
    rp.add_argument("--out", help="where to write the page (default RUN/report.html)")
    rp.set_defaults(func=cmd_report)

    cp = sub.add_parser(
        "compare",
        help="several runs on one HTML page",
        description="Overlay the runs' curves, show their last grids side by "
        "side, and print a table of kimg, img/s and last / best FID.",
    )
    cp.add_argument("runs", nargs="+", help="two or more run folders")
    cp.add_argument("--out", default="compare.html", help="where to write the page")
    cp.set_defaults(func=cmd_compare)

    x = sub.add_parser(
        "export", help="export the generator (BatchNorm folded), or as a Hugging Face Hub folder"
    )
    x.add_argument("run", help="run folder or generator.safetensors")
    x.add_argument(
        "--format",
        required=True,
        choices=["torchscript", "onnx", "hf"],
        help="torchscript or onnx: one file; hf: a folder in the Hub model layout "
        "(model.safetensors, config.json, README.md model card, samples.png)",
    )
    x.add_argument("--out", required=True, help="the file (torchscript, onnx) or folder (hf)")
    x.set_defaults(func=cmd_export)

    im = sub.add_parser(
        "import",
        help="a checkpoint of the canonical PyTorch DCGAN example as a run folder",
        description="Read netG_epoch_N.pth of pytorch/examples' dcgan/main.py "
        "(weights only, torch.load(weights_only=True)), infer nz, ngf and nc, "
        "and write a run folder that dcgan sample, eval, export and report "
        "read.",
    )
    im.add_argument("checkpoint", help="the generator's state_dict (.pth)")
    im.add_argument("--out", required=True, help="the new run folder")
    im.add_argument(
        "--dataset",
        default="unknown",
        help="the data set it was trained on, recorded in the run (default unknown)",
    )
    im.set_defaults(func=cmd_import)

    d = sub.add_parser("data", help="inspect and convert data sources")
    dsub = d.add_subparsers(dest="data_command", required=True)
    info = dsub.add_parser("info", help="count, shape and a preview grid of a source")
    build = dsub.add_parser("build", help="convert a source into the cache ahead of training")
    for q in (info, build):
        q.add_argument(
            "source",
            help="fashion-mnist, mnist, emoji, fake, or a path (a folder, .zip, LMDB or .parquet)",
        )
        # a conversion takes minutes: build converts only the resolution asked for
        q.add_argument("--resolution", type=int, required=q is build, default=32)
        q.add_argument("--channels", type=int, default=0, help="1 or 3 (default: the source's)")
        q.add_argument("--split", default="train")
        q.add_argument(
            "--workers",
            type=int,
            default=0,
            help="processes decoding an image folder (default 0: every core)",
        )
        q.add_argument(
            "--max-images",
            type=int,
            default=0,
            help="the source's first N images only, cached apart (default 0: all)",
        )
    info.add_argument("--preview", help="where to write the preview grid")
    build.set_defaults(func=cmd_data_build)
    info.set_defaults(func=cmd_data_info)
    return p


DEVICE_HELP = "auto (CUDA when present, else the CPU), cpu, cuda or cuda:N"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# output files per subcommand, and whether each must be an image: checked before any work,
# so an hour of features is never lost to a bad path at the end
OUTPUT_FLAGS = {"json": False, "chart": True, "profile": False, "preview": True}
HTML_OUT = ("report", "compare")  # subcommands whose --out is an HTML page


def check_output_file(value: str, flag: str, image: bool = False) -> None:
    """A file we will write at the end: not a folder, an image suffix if it is an image,
    and a folder we may create and write. Nothing is created here, so a command that
    fails later leaves no empty folders behind (the writer creates them)."""
    path = Path(value)
    if value.endswith(os.sep) or path.is_dir():
        raise UserError(f"{flag} {value} is a folder: give a file name")
    if image and path.suffix.lower() not in IMAGE_SUFFIXES:
        raise UserError(
            f"{flag} {value}: give an image file name ending in .png (or "
            f"{', '.join(IMAGE_SUFFIXES[1:])})"
        )
    existing = path.absolute().parent
    while not existing.exists():  # the deepest folder that exists decides
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(
            f"{flag} {value}: cannot create the folder {path.parent} ({existing} is a file)"
        )
    if not os.access(existing, os.W_OK):
        raise UserError(f"{flag} {value}: the folder {existing} is not writable")


def check_outputs(args: argparse.Namespace) -> None:
    for name, image in OUTPUT_FLAGS.items():
        value = getattr(args, name, None)
        if isinstance(value, str) and value:
            check_output_file(value, "--" + name, image)
    if args.command == "sample":
        check_output_file(args.out, "--out", image=True)
    if args.command in HTML_OUT and args.out:
        check_output_file(args.out, "--out")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_outputs(args)
        if isinstance(getattr(args, "device", None), str):
            from dcgan.machine import resolve_device

            # one line for "gpu", "cudaX" or CUDA missing; "auto" becomes cuda or cpu
            args.device = str(resolve_device(args.device))
        return args.func(args)
    except UserError as e:
        print(f"dcgan: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system refused (permissions, disk full, missing folder)
        where = f": {e.filename}" if e.filename else ""
        print(f"dcgan: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside training (which saves and exits 0 on Ctrl-C)
        print("dcgan: interrupted", file=sys.stderr)
        return 130
