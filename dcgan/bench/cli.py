"""`dcgan bench train|features|generator|engine`: the bench's command line.

One subcommand per table, each with only its own flags; `dcgan bench` with no
subcommand is `dcgan bench train`. The flags that chose a table before the
subcommands existed (`--features`, `--generator`, `--engine`) still work for this
release as deprecated aliases of their subcommand: `BenchParser` reads them as the
subcommand, and the command prints a one-line note on stderr once its flags have been
checked, so that a mistake still ends in one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dcgan import atomic
from dcgan.errors import UserError

MODES = ("train", "features", "generator", "engine")
ALIASES = {"--features": "features", "--generator": "generator", "--engine": "engine"}


def bench_argv(argv: list[str]) -> tuple[list[str], str]:
    """`dcgan bench ARGS` -> (the arguments with their subcommand first, the old flag that
    named it or ""). No subcommand means train; an old flag becomes its subcommand."""
    if argv and argv[0] in (*MODES, "-h", "--help"):
        return argv, ""
    old = list(dict.fromkeys(a for a in argv if a in ALIASES))
    if len(old) > 1:
        raise UserError(
            f"{' and '.join(old)} name different benches: give one subcommand ({', '.join(MODES)})"
        )
    if not old:
        return ["train", *argv], ""
    return [ALIASES[old[0]], *(a for a in argv if a != old[0])], old[0]


class BenchParser(argparse.ArgumentParser):
    """`dcgan bench`'s parser: the arguments go through `bench_argv` first."""

    def parse_known_args(
        self,
        args: Sequence[str] | None = None,
        namespace: argparse.Namespace | None = None,
    ) -> tuple[argparse.Namespace, list[str]]:
        try:
            args, alias = bench_argv(list(sys.argv[1:] if args is None else args))
        except UserError as e:
            self.error(str(e))
        ns, extras = super().parse_known_args(args, namespace)
        ns.bench_alias = alias
        return ns, extras


def add_parser(sub: Any, device_help: str) -> argparse.ArgumentParser:
    """Add `bench` and its subcommands to the `dcgan` sub-parsers `sub`."""
    b = sub.add_parser(
        "bench",
        help="throughput tables: train steps (default), feature "
        "extractors, the generator, dcgan.engine",
        description="Throughput tables, timed in turns. `dcgan bench` alone is "
        "`dcgan bench train`. The flags --features, --generator and --engine "
        "still name their subcommand (deprecated).",
    )
    # argparse makes each sub-parser of the top parser's class; bench's reads its old flags
    b.__class__ = BenchParser
    modes = b.add_subparsers(
        dest="bench_command", required=True, parser_class=argparse.ArgumentParser
    )

    def mode(name: str, help_: str, description: str) -> argparse.ArgumentParser:
        m = modes.add_parser(name, help=help_, description=description)
        m.add_argument("--device", default="auto", help=device_help)
        return m

    t = mode(
        "train",
        "train-step throughput: reference vs optimisations (the default)",
        "Measure train-step images/s of the canonical reference, each optimisation "
        "alone and the default configuration.",
    )
    t.add_argument("--batch", default="64,128", help="comma-separated batch sizes")
    t.add_argument("--resolution", default="64,32", help="comma-separated resolutions")
    t.add_argument("--data", default="synthetic,real", help="synthetic and/or real")
    t.add_argument("--dataset", default="emoji", help="the real data set (RGB)")
    t.add_argument("--rows", default="", help="only these rows (default: all)")
    _add_timing(t, windows_help="timed windows (median taken)", steps_help="steps per timed window")
    t.add_argument("--peak-tflops", type=float, help="device peak, for the fraction column")
    t.add_argument(
        "--profile",
        metavar="TRACE.json",
        help="instead: torch.profiler over --steps default steps (first --batch, "
        "--resolution and --data); prints the top operators, writes a Chrome trace",
    )
    t.add_argument("--json", help="write rows as JSON")
    t.add_argument("--chart", help="write a bar chart PNG")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=bench_train)

    f = mode(
        "features",
        "feature extractors' images/s (Inception, domain classifier)",
        "Images/s of the extractors `dcgan eval` uses: the TorchScript Inception (NCHW "
        "and channels-last input), the eager BN-folded one, the domain classifier; "
        "Fashion-MNIST test images, 32x32.",
    )
    f.add_argument("--batch", type=int, default=64, help="images per call")
    f.add_argument("--windows", type=int, default=5, help="timed windows (median taken)")
    f.add_argument("--steps", type=int, default=3, help="calls per timed window")
    f.add_argument("--json", help="write rows as JSON")
    f.add_argument("--quiet", action="store_true")
    f.set_defaults(func=bench_features)

    g = mode(
        "generator",
        "generator-only images/s (eager, compiled, exported)",
        "Inference images/s of G: eager, torch.compile, TorchScript and ONNX Runtime.",
    )
    g.add_argument("--run", help="a run folder (default: the canonical 64px G)")
    g.add_argument(
        "--batch",
        "--gen-batch",
        dest="gen_batch",
        default="1,256",
        metavar="BATCH",
        help="comma-separated batch sizes (--gen-batch: the old spelling)",
    )
    g.add_argument("--json", help="write rows as JSON")
    g.add_argument("--quiet", action="store_true")
    g.set_defaults(func=bench_generator)

    e = mode(
        "engine",
        "dcgan.engine (native, unfold) vs torch autograd step",
        "The same DCGAN step in dcgan.engine (both kernels) and torch autograd, in one "
        "run; then seed 003's denoiser.",
    )
    e.add_argument("--batch", default="64,128", help="comma-separated batch sizes")
    e.add_argument("--resolution", default="64,32", help="comma-separated resolutions")
    _add_timing(
        e,
        windows_help="timed windows",
        steps_help="steps per window (steps timed: windows x steps)",
    )
    e.add_argument(
        "--denoise-epochs",
        type=int,
        default=2,
        help="also time seed 003's denoiser for this many epochs (0: skip)",
    )
    e.add_argument("--json", help="write rows as JSON")
    e.set_defaults(func=bench_engine)
    return b


def _add_timing(p: argparse.ArgumentParser, windows_help: str, steps_help: str) -> None:
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--windows", type=int, default=5, help=windows_help)
    p.add_argument("--steps", type=int, default=3, help=steps_help)


def _csv(text: str, kind: type = str) -> tuple:
    try:
        return tuple(kind(x) for x in text.split(",") if x)
    except ValueError as e:
        raise UserError(f"cannot read {text!r} as a comma-separated list: {e}") from e


def check_bench_args(args: argparse.Namespace) -> None:
    """Everything a bench needs, before anything is timed; then the note of an old flag."""
    from dcgan import sources

    for flag, low in (("windows", 1), ("steps", 1), ("warmup", 0), ("denoise_epochs", 0)):
        value = getattr(args, flag, low)  # each subcommand has some of these
        if value < low:
            raise UserError(f"--{flag.replace('_', '-')} must be >= {low}, got {value}")
    if args.bench_command == "train":
        kinds = _csv(args.data)
        if set(kinds) - {"real", "synthetic"}:
            raise UserError(f"--data takes real and/or synthetic, got {args.data!r}")
        if "real" in kinds and args.dataset == "emoji" and not Path(sources.EMOJI_FONT).is_file():
            raise UserError(
                f"the real-data rows need the emoji font {sources.EMOJI_FONT}: "
                "run `make data` (Debian fonts-noto-color-emoji) or pass --data "
                "synthetic"
            )
    if getattr(args, "bench_alias", ""):
        print(
            f"dcgan: note: `dcgan bench {args.bench_alias}` is deprecated: use `dcgan bench "
            f"{args.bench_command}`",
            file=sys.stderr,
        )


def _write_rows(rows: list[dict[str, Any]], path: str | None) -> None:
    if path:
        atomic.write_text(path, json.dumps(rows, indent=1) + "\n")


def bench_train(args: argparse.Namespace) -> int:
    """The train-step table (or, with --profile, the default step under torch.profiler)."""
    from dcgan.bench import train as bench

    check_bench_args(args)
    if args.profile:
        print(
            bench.profile_default(
                args.device,
                _csv(args.batch, int)[0],
                _csv(args.resolution, int)[0],
                _csv(args.data)[0],
                args.dataset,
                args.warmup,
                args.steps,
                Path(args.profile),
            )
        )
        print(f"wrote {args.profile}")
        return 0
    rows = bench.run_bench(
        args.device,
        batches=_csv(args.batch, int),
        resolutions=_csv(args.resolution, int),
        data_kinds=_csv(args.data),
        dataset=args.dataset,
        names=_csv(args.rows),
        warmup=args.warmup,
        windows=args.windows,
        steps=args.steps,
        peak_tflops=args.peak_tflops,
        progress=not args.quiet,
    )
    print(bench.format_table(rows))
    if args.json:
        bench.write_json(rows, Path(args.json), "dcgan bench " + " ".join(sys.argv[2:]))
        print(f"wrote {args.json}")
    if args.chart:
        bench.save_chart(rows, Path(args.chart))
        print(f"wrote {args.chart}")
    return 0


def bench_features(args: argparse.Namespace) -> int:
    """Images/s of the feature extractors of `dcgan eval`."""
    from dcgan.bench import features

    check_bench_args(args)
    rows = features.time_extractors(
        args.device, args.batch, args.windows, args.steps, not args.quiet
    )
    print(features.format_table(rows))
    _write_rows(rows, args.json)
    return 0


def bench_generator(args: argparse.Namespace) -> int:
    """Generator-only images/s: eager, compiled, TorchScript, ONNX at batch 1 and 256."""
    from dcgan.bench import generator
    from dcgan.machine import resolve_device

    check_bench_args(args)
    rows = generator.time_generator(
        args.run,
        batches=_csv(args.gen_batch, int),
        device=str(resolve_device(args.device)),
        progress=not args.quiet,
    )
    print(generator.format_table(rows))
    _write_rows(rows, args.json)
    return 0


def bench_engine(args: argparse.Namespace) -> int:
    """dcgan.engine (both kernels) vs torch autograd on the same DCGAN step, same run."""
    from dcgan.bench import engine
    from dcgan.machine import resolve_device

    check_bench_args(args)
    device = str(resolve_device(args.device))
    rows = engine.step_rows(
        _csv(args.resolution, int),
        _csv(args.batch, int),
        args.windows * args.steps,
        args.warmup,
        device,
    )
    if args.denoise_epochs:
        rows += engine.denoiser_rows(args.denoise_epochs, device)
    print(engine.format_table(rows))
    _write_rows(rows, args.json)
    return 0
