"""The generator a user holds: what `dcgan.load` returns, and where it reads it from.

`Generator` is `dcgan.models.Generator` (so `G(z)` is the plain module call) plus the
snapshot's metadata (`meta`: nz, ngf, nc, resolution, kimg, data set) and what one does
with a trained G from Python: the latents of `dcgan sample` (`z`), images as bytes
(`sample`), as Pillow images (`to_pil`), and the Hugging Face Hub layout
(`save_pretrained`).

`read` finds a generator in any of the forms it travels as:

- a run folder (its G-EMA snapshot `generator.safetensors`) or a `.safetensors` snapshot;
- a folder in the Hub layout (`save_pretrained`, `dcgan export --format hf`), or
  `hf://OWNER/NAME[@REVISION]` downloaded with huggingface_hub when it is installed;
- a checkpoint of the canonical PyTorch example (`netG_epoch_24.pth`, dcgan.canonical).

Only weights are read (safetensors, or torch.load(weights_only=True)): no file can run code.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dcgan import latent, memory, models, pixels
from dcgan.errors import UserError
from dcgan.rundir import SNAPSHOT

CHECKPOINT_SUFFIXES = (".pth", ".pt")  # torch.save files: the canonical example's checkpoints
HF_SCHEME = "hf://"


class Generator(models.Generator):
    """A trained DCGAN generator with its metadata; make one with `dcgan.load`.

    It is a `torch.nn.Module` in eval mode: `G(z)` maps latents (N, nz) to images
    (N, nc, R, R) in [-1, 1]. `G.meta` holds nz, ngf, nc, resolution, g_dropout, kimg
    and dataset, as the snapshot recorded them.

    >>> import dcgan
    >>> G = dcgan.load("runs/fm")                      # doctest: +SKIP
    >>> G.meta["resolution"], G.meta["kimg"]           # doctest: +SKIP
    (32, 150.0)
    """

    def __init__(self, meta: dict[str, Any], origin: Path | None = None) -> None:
        super().__init__(
            int(meta["nz"]),
            int(meta["ngf"]),
            int(meta["nc"]),
            int(meta["resolution"]),
            float(meta["g_dropout"]),
        )
        self.meta = dict(meta)
        # the folder it was read from (a run folder or a Hub-layout folder): save_pretrained
        # takes the training config and the measured FIDs for the model card from there
        self.origin = origin

    @classmethod
    def wrap(
        cls, g: models.Generator, meta: dict[str, Any], origin: Path | None = None
    ) -> Generator:
        """A Generator holding g's weights (copied exactly), in eval mode on g's device."""
        device = next(g.parameters()).device
        out = cls(meta, origin)
        out.load_state_dict(g.state_dict())
        return out.to(device).eval()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def z(self, n: int, seed: int = 0, truncation: float | None = None) -> torch.Tensor:
        """The latents (n, nz) of `dcgan sample --n n --seed seed`, on the CPU, in grid order.

        truncation redraws entries with |z| above it (the truncation trick); None or 0: none.

        >>> z = G.z(4, seed=1)                         # doctest: +SKIP
        >>> x = G(z.to(G.device))  # floats (4, nc, R, R) in [-1, 1]  # doctest: +SKIP
        """
        if n < 1:
            raise UserError(f"n must be >= 1, got {n}")
        return latent.latent_bank(n, self.nz, seed, truncation)

    def sample(
        self,
        n: int,
        seed: int = 0,
        truncation: float | None = None,
        classes: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """n images as uint8 (n, nc, R, R) on the CPU: exactly the pixels of
        `dcgan sample RUN --n n --seed seed` (the same latents, the same rounding), and
        of `dcgan sample --out-dir`'s PNG files.

        `classes` is for class-conditional generators; a DCGAN is unconditional, so it
        must be None.

        >>> images = G.sample(16, seed=0)              # doctest: +SKIP
        >>> images.dtype, tuple(images.shape)          # doctest: +SKIP
        (torch.uint8, (16, 1, 32, 32))
        """
        if classes is not None:
            raise UserError(
                "this generator is unconditional (trained without labels): classes must be None"
            )
        memory.check_fits(
            memory.sample_bytes(n, self.nz, self.nc, self.resolution),
            torch.device("cpu"),
            f"{n:,} samples",
            "ask for fewer, or write them as files in batches (dcgan sample --out-dir)",
        )
        return torch.cat(list(uint8_batches(self, self.z(n, seed, truncation))))

    def to_pil(self, images: torch.Tensor | np.ndarray) -> list[Image.Image]:
        """Images (N, nc, R, R), uint8 or floats in [-1, 1], as N Pillow images
        (mode "L" for one channel, "RGB" for three).

        >>> G.to_pil(G.sample(2))[0].save("first.png")  # doctest: +SKIP
        """
        return to_pil(images)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write this generator as a folder in the Hugging Face Hub model layout:
        `model.safetensors`, `config.json`, a `README.md` model card (training config,
        data set, kimg, the FIDs measured during training) and `samples.png`. `dcgan.load`
        reads the folder back bit-exactly; upload it as a model repository.

        >>> G.save_pretrained("exported/fm")           # doctest: +SKIP
        PosixPath('exported/fm')
        """
        from dcgan import hub

        return hub.write_folder(self, self.meta, Path(folder), self.origin)


def to_pil(images: torch.Tensor | np.ndarray) -> list[Image.Image]:
    """(N, C, R, R) uint8, or floats in [-1, 1] -> N Pillow images ("L" or "RGB")."""
    if isinstance(images, torch.Tensor):
        images = (images if images.dtype == torch.uint8 else pixels.to_uint8(images)).cpu()
        images = images.numpy()
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise UserError(
            f"to_pil takes images (N, 1 or 3, R, R) as uint8 or floats, got "
            f"{images.dtype} {tuple(images.shape)}"
        )
    return [Image.fromarray(im[0] if im.shape[0] == 1 else im.transpose(1, 2, 0)) for im in images]


def uint8_batches(g: torch.nn.Module, z: torch.Tensor, batch: int = 256) -> Iterator[torch.Tensor]:
    """Latents (N, nz) -> uint8 images (b, C, R, R) on the CPU, `batch` at a time.

    The batches are `latent.decode`'s (the same forward passes as `dcgan sample` and
    `dcgan eval`), and only one batch of floats is held at a time, so N may be 50,000.
    """
    for i in range(0, z.shape[0], batch):
        yield pixels.to_uint8(latent.decode(g, z[i : i + batch], batch))


def is_generator_path(path: Path) -> bool:
    """Whether `path` names something `read` takes (and not a data folder or file)."""
    from dcgan.hub import MODEL

    if path.is_file():
        return path.suffix in (".safetensors", *CHECKPOINT_SUFFIXES)
    return path.is_dir() and ((path / SNAPSHOT).is_file() or (path / MODEL).is_file())


def read(spec: str | Path) -> tuple[models.Generator, dict[str, Any], Path]:
    """(G on the CPU in eval mode, its metadata, the file read) for any form `load` takes."""
    from dcgan import canonical, checkpoint, hub

    text = str(spec)
    if text.startswith(HF_SCHEME):
        file = hub.download(text) / hub.MODEL
    else:
        path = Path(spec).expanduser()
        if path.is_file() and path.suffix in CHECKPOINT_SUFFIXES:
            g, meta = canonical.read(path)
            return g.eval(), meta, path
        if path.is_dir() and not (path / SNAPSHOT).is_file() and (path / hub.MODEL).is_file():
            file = path / hub.MODEL
        else:
            file = checkpoint.snapshot_path(path)  # a run folder or a snapshot file
    g, meta = checkpoint.load_generator(file, "cpu")
    return g, meta, file


def load(path_or_run: str | Path, device: str = "auto") -> Generator:
    """Load a trained generator: the G-EMA snapshot of a run folder, a `.safetensors`
    snapshot, a folder written by `save_pretrained` / `dcgan export --format hf`,
    `hf://OWNER/NAME[@REVISION]` (needs `pip install huggingface_hub`), or a
    `netG_epoch_N.pth` of the canonical PyTorch DCGAN example.

    device: "auto" (CUDA when present, else the CPU), "cpu", "cuda" or "cuda:N".

    >>> import dcgan
    >>> G = dcgan.load("runs/fm")                      # doctest: +SKIP
    >>> G = dcgan.load("netG_epoch_24.pth", device="cpu")  # doctest: +SKIP
    """
    from dcgan.machine import resolve_device

    where = resolve_device(device)  # a bad device name: one line, before any reading
    g, meta, file = read(path_or_run)
    # a checkpoint of the canonical example says nothing more about itself; a snapshot's
    # folder may (a run's config and metrics, a Hub folder's card facts)
    origin = None if file.suffix in CHECKPOINT_SUFFIXES else file.parent
    return Generator.wrap(g, meta, origin).to(where)
