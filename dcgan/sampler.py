"""Batches for training: an endless, resumable, rank-sharded stream of [-1, 1] images.

The whole uint8 array lives on the training device; each batch is gathered from it by
index and converted there, so the host does no per-step work.
"""

from __future__ import annotations

import numpy as np
import torch

from dcgan.errors import UserError
from dcgan.pixels import from_uint8


class Batches:
    """Endless stream of training batches served from a uint8 array held on `device`.

    Epoch e visits a permutation drawn from `torch.Generator().manual_seed(seed + e)`; this
    rank takes every world_size-th entry of it from `rank` on, in batches of `batch`; the
    incomplete last batch is dropped. Each rank uses N // world_size images per epoch, so
    all ranks run the same number of steps. Flips draw from the default torch RNG of the
    device, so saving that RNG state with `state_dict()` makes a resume exact.
    """

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        batch: int,
        device: torch.device | str = "cpu",
        flip: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if isinstance(images, np.ndarray):
            if not images.flags.writeable:  # torch.from_numpy warns on read-only arrays
                images = images.copy()
            images = torch.from_numpy(np.ascontiguousarray(images))
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"expected uint8 images (N, C, R, R), got {images.dtype} {tuple(images.shape)}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.images = images.to(device)  # uint8 (N, C, R, R), moved once
        self.device = self.images.device
        self.batch = int(batch)
        self.flip = flip
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        n = self.images.shape[0]
        self.per_rank = n // world_size  # images of one rank in one epoch
        if self.batch <= 0 or self.per_rank < self.batch:
            raise UserError(
                f"{n} images cannot fill one batch of {batch} on each of {world_size} "
                f"process(es): use a smaller batch or more images"
            )
        self.batches_per_epoch = self.per_rank // self.batch
        self.epoch = 0
        self.position = 0  # batches already served in this epoch
        self._order: torch.Tensor | None = None  # this rank's indices for self._order_epoch
        self._order_epoch = -1

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        """This rank's image indices for `epoch`: int64 (batches_per_epoch * batch,)."""
        g = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(self.images.shape[0], generator=g)
        mine = perm[: self.per_rank * self.world_size][self.rank :: self.world_size]
        mine = mine[: self.batches_per_epoch * self.batch]
        if self.device.type == "cuda":
            # Pinned + non_blocking: the copy is queued, the host does not wait for the GPU.
            return mine.pin_memory().to(self.device, non_blocking=True)
        return mine.to(self.device)

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> torch.Tensor:
        """float32 (B, C, R, R) in [-1, 1] on the device."""
        if self._order_epoch != self.epoch:
            self._order = self._epoch_order(self.epoch)
            self._order_epoch = self.epoch
        start = self.position * self.batch
        idx = self._order[start : start + self.batch]  # (B,)
        x = from_uint8(self.images.index_select(0, idx))  # (B, C, R, R) in [-1, 1]
        if self.flip:
            # Mirror each image along W with probability 1/2 (no host sync: a device mask).
            mask = torch.rand(self.batch, device=self.device) < 0.5  # (B,)
            x = torch.where(mask[:, None, None, None], x.flip(3), x)
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
        return x

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.batches_per_epoch:
            raise UserError(
                f"data position epoch {epoch}, batch {position} does not fit "
                f"{self.batches_per_epoch} batches per epoch: was the batch size, world size "
                "or dataset changed since the checkpoint?"
            )
        self.epoch, self.position = epoch, position
