"""Export a run's generator for inference without this package: TorchScript or ONNX.

What is exported is the snapshot's G (the EMA weights) in eval mode with every
BatchNorm folded into the transposed convolution before it, so the graph is a
plain chain ConvTranspose2d(+bias) -> ReLU -> ... -> ConvTranspose2d(+bias) -> Tanh.
In eval mode BatchNorm is a per-channel affine map, y = s * x + (beta - s * mean)
with s = gamma / sqrt(var + eps); folding it removes one pass over every
activation and leaves nothing train-mode-specific for a consumer to get wrong.

The exported graph takes z of shape (N, nz, 1, 1) float32 (standard normal, as
in training) and returns images (N, nc, R, R) float32 in [-1, 1]. N is free
(a dynamic axis) unless batch_dynamic=False.

ONNX goes through the TorchScript-based exporter (`dynamo=False`, opset 17):
the torch.export-based default needs the extra `onnxscript` package, and here it
took ~90 s against ~1 s for this five-layer chain, giving the same numbers.
`torch.jit` and that exporter are deprecated upstream but still work in torch
2.13; their deprecation warnings are silenced because choosing them is deliberate.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dcgan import atomic
from dcgan.checkpoint import load_generator, snapshot_path
from dcgan.errors import UserError
from dcgan.models import Generator
from dcgan.rundir import BEST, CHECKPOINT, SNAPSHOT

FORMATS = ("torchscript", "onnx", "hf")  # hf: a folder, dcgan.hub
ONNX_OPSET = 17  # run by onnxruntime >= 1.13; the TorchScript exporter writes up to 20
CHECK_TOLERANCE = 1e-4  # an export whose outputs differ more than this from eager is refused


def fold_batchnorm(g: Generator | nn.Sequential) -> nn.Sequential:
    """G (eval semantics) -> an equivalent nn.Sequential without BatchNorm or Dropout.

    Each BatchNorm2d is folded into the ConvTranspose2d before it. A transposed
    conv's weight is (in, out, k, k): output channel o is weight[:, o], so the
    BatchNorm scale s (out,) multiplies along dim 1, and the new bias is
    s * (bias - running_mean) + beta. The arithmetic runs in float64 and is
    rounded once to the original dtype. Dropout is the identity in eval mode.
    """
    layers = list(g.main if isinstance(g, Generator) else g)
    out: list[nn.Module] = []
    for layer in layers:
        if isinstance(layer, nn.Dropout):
            continue
        if isinstance(layer, nn.BatchNorm2d):
            conv = out[-1] if out else None
            if not isinstance(conv, nn.ConvTranspose2d) or conv.groups != 1:
                raise ValueError(
                    "a BatchNorm2d must follow an ungrouped ConvTranspose2d "
                    f"to be folded, found it after {type(conv).__name__}"
                )
            if layer.running_mean is None or layer.running_var is None:
                raise ValueError("BatchNorm2d without running statistics cannot be folded")
            out[-1] = _fold(conv, layer)
            continue
        out.append(copy.deepcopy(layer))
    return nn.Sequential(*out).eval()


@torch.no_grad()
def _fold(conv: nn.ConvTranspose2d, bn: nn.BatchNorm2d) -> nn.ConvTranspose2d:
    w = conv.weight.double()  # (in, out, k, k)
    mean, var = bn.running_mean.double(), bn.running_var.double()  # (out,)
    gamma = bn.weight.double() if bn.affine else torch.ones_like(mean)
    beta = bn.bias.double() if bn.affine else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)  # (out,)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(mean)
    folded = nn.ConvTranspose2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.output_padding,
        1,
        True,
        conv.dilation,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    folded.weight.copy_(w * scale.view(1, -1, 1, 1))
    folded.bias.copy_(scale * (bias - mean) + beta)
    return folded


@contextlib.contextmanager
def _deliberate():
    """Silence the upstream deprecation warnings of torch.jit and of the TorchScript-based
    ONNX exporter, which this module uses on purpose (see the module doc)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


def save_graph(
    seq: nn.Sequential, nz: int, fmt: str, out: Path, batch_dynamic: bool, meta: dict[str, Any]
) -> None:
    """Write the folded chain `seq` (CPU, eval) in `fmt` to `out`, with `meta` attached."""
    info = json.dumps(
        {
            **meta,
            "input": f"z float32 (N, {nz}, 1, 1)",
            "output": "images float32 (N, nc, R, R) in [-1, 1]",
        },
        sort_keys=True,
    )
    example = torch.zeros(1, nz, 1, 1)  # (N, nz, 1, 1)
    if fmt == "torchscript":
        with _deliberate():
            # script, not trace: no shape is baked in, every batch size works
            torch.jit.save(torch.jit.script(seq), str(out), _extra_files={"dcgan.json": info})
        return
    onnx = _require("onnx")
    axes = {"z": {0: "batch"}, "images": {0: "batch"}} if batch_dynamic else None
    with _deliberate():
        torch.onnx.export(
            seq,
            (example,),
            str(out),
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=["z"],
            output_names=["images"],
            dynamic_axes=axes,
        )
    model = onnx.load(str(out))
    entry = model.metadata_props.add()
    entry.key, entry.value = "dcgan", info
    onnx.checker.check_model(model)
    onnx.save(model, str(out))


def _require(name: str):
    """Import onnx / onnxruntime, or tell the user how to install them."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise UserError(
            f"ONNX export needs {name}: pip install 'dcgan[export]' (onnx, onnxruntime)"
        ) from None


class OrtGenerator:
    """An onnxruntime session called like the torch generator: tensor in, tensor out
    (through numpy on the host, as a user without torch would call it)."""

    def __init__(self, session) -> None:
        self.session = session
        self.providers: list[str] = session.get_providers()

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        z_np = z.detach().cpu().numpy()  # (N, nz, 1, 1) float32
        return torch.from_numpy(self.session.run(None, {"z": z_np})[0])


def load_exported(
    path: str | Path, device: str = "cpu", fmt: str | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable z (N, nz, 1, 1) tensor -> images tensor for an exported file.

    `fmt` says how to read it; without it the suffix does (.onnx, else TorchScript).
    For tests and the benchmark; users need no dcgan to run an export (README.md, "Export").
    """
    path = Path(path)
    if fmt is None:
        fmt = "onnx" if path.suffix == ".onnx" else "torchscript"
    if fmt == "onnx":
        ort = _require("onnxruntime")

        providers = ["CPUExecutionProvider"]
        if str(device).startswith("cuda") and (
            "CUDAExecutionProvider" in ort.get_available_providers()
        ):
            providers.insert(0, "CUDAExecutionProvider")
        return OrtGenerator(ort.InferenceSession(str(path), providers=providers))
    with _deliberate():
        return torch.jit.load(str(path), map_location=device)


def _check(g: Generator, path: Path, n: int, fmt: str) -> float:
    """Largest |exported - eager| over n latents; a UserError if above CHECK_TOLERANCE."""
    z = torch.randn(n, g.nz, 1, 1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = g(z)
        got = load_exported(path, fmt=fmt)(z)
    err = (got - want).abs().max().item()
    if not err <= CHECK_TOLERANCE:
        raise UserError(
            f"the exported {fmt} generator differs from the eager one by "
            f"{err:.2e} (more than {CHECK_TOLERANCE:g}); nothing was written"
        )
    return err


def export_generator(run_or_snapshot: str, fmt: str, out: str, batch_dynamic: bool = True) -> Path:
    """Write a run's (or snapshot file's) G-EMA as TorchScript or ONNX to `out`, or with
    fmt "hf" as a Hugging Face Hub folder `out` (dcgan.hub: weights unfolded, model card).

    The file takes z (N, nz, 1, 1) float32 and returns images (N, nc, R, R) in
    [-1, 1]; metadata (nz, nc, resolution, kimg, data set) travels inside it
    (TorchScript: the extra file dcgan.json; ONNX: metadata_props["dcgan"]).
    batch_dynamic only affects ONNX (False fixes N = 1); TorchScript is scripted
    and takes any N. The export is run once against the eager G before returning.
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}: choose torchscript, onnx or hf")
    if fmt == "hf":  # the weights as they are, in a folder a Hub model repository holds
        from dcgan.generator import load

        return load(run_or_snapshot, "cpu").save_pretrained(out)
    if fmt == "onnx":
        _require("onnx")
    path = Path(out)
    if path.is_dir():
        raise UserError(
            f"--out {path} is a folder: give a file name such as "
            f"generator.{'onnx' if fmt == 'onnx' else 'pt'}"
        )
    snapshot = snapshot_path(run_or_snapshot)
    own = {snapshot.resolve()} | {
        (snapshot.parent / name).resolve() for name in (SNAPSHOT, CHECKPOINT, BEST)
    }
    if path.resolve() in own:
        raise UserError(
            f"--out {path} would overwrite the run's own {path.name}: choose another file name"
        )
    g, meta = load_generator(snapshot, "cpu")  # eval mode

    def write_and_verify(tmp: str) -> None:
        # the format decides how the file is written and read back, whatever its suffix;
        # without onnxruntime an ONNX file is kept unchecked (onnx's checker still ran)
        save_graph(fold_batchnorm(g), g.nz, fmt, Path(tmp), batch_dynamic, meta)
        if fmt == "torchscript" or importlib.util.find_spec("onnxruntime") is not None:
            _check(g, Path(tmp), 3 if batch_dynamic else 1, fmt)

    # written beside the target and renamed only once verified: a failed export leaves
    # no file behind, and an old file at `out` stays whole
    atomic.write(path, write_and_verify)
    return path
