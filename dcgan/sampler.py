"""Batches for training: an endless, resumable, rank-sharded stream of [-1, 1] images.

Two ways to serve the same stream. `Batches` holds the whole uint8 array on the
training device; each batch is gathered from it by index and converted there, so the
host does no per-step work. `HostServedBatches` leaves the array where it is (a
memory map of the image store, on the host) and a thread gathers each batch's rows
ahead of the step, pinned on CUDA, for an asynchronous copy: for arrays that do not
fit the device. Both serve the same images in the same order with the same flips,
so a run, its resume and its shards do not depend on the path (`--data-on`, `choose`).
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dcgan.config import CHOICES, one_of
from dcgan.errors import UserError
from dcgan.pixels import from_uint8

PREFETCH = 2  # batches gathered ahead of the step on the host path
THREAD_NAME = "dcgan-batches"
_POLL_S = 0.05  # how often a waiting thread looks at its stop flag


def epoch_order(
    n: int, epoch: int, seed: int, rank: int, world_size: int, batch: int
) -> torch.Tensor:
    """This rank's image indices for `epoch`: int64 (batches * batch,) on the CPU.

    The epoch's permutation is drawn from `torch.Generator().manual_seed(seed + epoch)`
    (never from the global RNG, so the flips' stream is untouched); this rank takes every
    world_size-th entry of it from `rank` on, and whole batches of those."""
    per_rank = n // world_size
    g = torch.Generator().manual_seed(seed + epoch)
    perm = torch.randperm(n, generator=g)
    mine = perm[: per_rank * world_size][rank::world_size]
    return mine[: per_rank // batch * batch]


def _is_uint8(dtype: torch.dtype | np.dtype) -> bool:
    return dtype == torch.uint8 if isinstance(dtype, torch.dtype) else dtype == np.uint8


class BatchStream:
    """What both paths share: the epoch and position, the shard rule, the flips and the
    state a checkpoint keeps. A subclass says where a batch's uint8 rows come from.

    Epoch e visits `epoch_order(N, e, ...)` in batches of `batch`; the incomplete last
    batch is dropped. Each rank uses N // world_size images per epoch, so all ranks run
    the same number of steps. Flips draw from the default torch RNG of the device, so
    saving that RNG state with `state_dict()` makes a resume exact.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        dtype: torch.dtype | np.dtype,
        batch: int,
        device: torch.device,
        flip: bool,
        seed: int,
        rank: int,
        world_size: int,
    ) -> None:
        if not _is_uint8(dtype) or len(shape) != 4:
            raise ValueError(f"expected uint8 images (N, C, R, R), got {dtype} {tuple(shape)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.device = device
        self.batch = int(batch)
        self.flip = flip
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.n = shape[0]
        self.per_rank = self.n // world_size  # images of one rank in one epoch
        if self.batch <= 0 or self.per_rank < self.batch:
            raise UserError(
                f"{self.n} images cannot fill one batch of {batch} on each of {world_size} "
                f"process(es): use a smaller batch or more images"
            )
        self.batches_per_epoch = self.per_rank // self.batch
        self.epoch = 0
        self.position = 0  # batches already served in this epoch

    def _indices(self, epoch: int) -> torch.Tensor:
        """This rank's image indices for `epoch`: int64 (batches_per_epoch * batch,), CPU."""
        return epoch_order(self.n, epoch, self.seed, self.rank, self.world_size, self.batch)

    def _rows(self) -> torch.Tensor:
        """uint8 (B, C, R, R) on the device: the images of batch (epoch, position)."""
        raise NotImplementedError

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> torch.Tensor:
        """float32 (B, C, R, R) in [-1, 1] on the device."""
        x = from_uint8(self._rows())  # (B, C, R, R) in [-1, 1]
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

    def close(self) -> None:
        """Release what serving holds beyond the array (the host path's thread)."""


class Batches(BatchStream):
    """Endless stream of training batches served from a uint8 array held on `device`."""

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
        # checked before the (possibly large) copy to the device
        super().__init__(
            tuple(images.shape), images.dtype, batch, images.device, flip, seed, rank, world_size
        )
        self.images = images.to(device)  # uint8 (N, C, R, R), moved once
        self.device = self.images.device
        self._order: torch.Tensor | None = None  # this rank's indices for self._order_epoch
        self._order_epoch = -1

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        """This rank's image indices for `epoch`, on the device."""
        mine = self._indices(epoch)
        if self.device.type == "cuda":
            # Pinned + non_blocking: the copy is queued, the host does not wait for the GPU.
            return mine.pin_memory().to(self.device, non_blocking=True)
        return mine.to(self.device)

    def _rows(self) -> torch.Tensor:
        if self._order_epoch != self.epoch:
            self._order = self._epoch_order(self.epoch)
            self._order_epoch = self.epoch
        start = self.position * self.batch
        idx = self._order[start : start + self.batch]  # (B,)
        return self.images.index_select(0, idx)


# The prefetch thread runs no parallel torch op (randperm, a large copy). While a thread
# that has run one is alive, fmnist32's CPU steps were measured 40% slower, and as fast
# as ever once it ended (docs/benchmarks.md, "Host-served batches"): its OpenMP team
# stays, and with more OpenMP threads than cores libgomp stops its workers spinning
# between the many small parallel regions of a step. So the consumer draws the orders,
# and numpy copies the rows.


def gather(images: np.ndarray, idx: np.ndarray, pin: bool) -> torch.Tensor:
    """Rows `idx` (B,) of a uint8 (N, C, R, R) array -> a new uint8 (B, C, R, R) tensor on
    the host, in page-locked memory when `pin`.

    Plain fancy indexing, in the batch's order: reading the rows in ascending order and
    putting them back was measured slower on a memory map, warm or cold (docs/benchmarks.md,
    "Host-served batches"); the reads cost the same and the reordering is extra."""
    rows = np.asarray(images[idx])  # (B, C, R, R): a new array, not a view of the map
    if not pin:
        return torch.from_numpy(rows)
    out = torch.empty(rows.shape, dtype=torch.uint8, pin_memory=True)
    out.numpy()[...] = rows  # numpy's copy, not torch's (see above)
    return out


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Put `item`, waiting while the queue is full; False once `stop` is set."""
    while not stop.is_set():
        try:
            q.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _take(q: queue.Queue, stop: threading.Event) -> Any:
    """The next item, waiting while the queue is empty; None once `stop` is set."""
    while not stop.is_set():
        try:
            return q.get(timeout=_POLL_S)
        except queue.Empty:
            continue
    return None


def _gather_ahead(
    images: np.ndarray,
    orders: queue.Queue,
    batch: int,
    epoch: int,
    position: int,
    pin: bool,
    out: queue.Queue,
    stop: threading.Event,
) -> None:
    """The prefetch thread: (epoch, position, rows) of every batch from (epoch, position)
    on, in order, into `out` until `stop`; an error is handed over in its place, for `next`
    to raise. Each epoch's order (int64 numpy) comes from `orders`, one per epoch.

    It holds no reference to its stream (only to the array, the queues and the flag), so a
    dropped stream is collected and its `__del__` stops the thread."""
    try:
        while (order := _take(orders, stop)) is not None:
            for p in range(position, len(order) // batch):
                rows = gather(images, order[p * batch : (p + 1) * batch], pin)
                if not _put(out, (epoch, p, rows), stop):
                    return
            epoch, position = epoch + 1, 0
    except Exception as e:  # handed to the consumer, whose `next` raises it
        _put(out, e, stop)


class _Prefetcher:
    """One thread gathering batches ahead into a queue of depth PREFETCH, from (epoch,
    position) on; `order(e)` hands it epoch e's order, epoch after epoch."""

    def __init__(
        self, images: np.ndarray, batch: int, epoch: int, position: int, pin: bool
    ) -> None:
        self.orders: queue.Queue = queue.Queue()  # int64 numpy (batches_per_epoch * batch,)
        self.queue: queue.Queue = queue.Queue(maxsize=PREFETCH)
        self.stop = threading.Event()
        self.sent = epoch - 1  # the last epoch whose order the thread has
        self.thread = threading.Thread(
            target=_gather_ahead,
            args=(images, self.orders, batch, epoch, position, pin, self.queue, self.stop),
            name=THREAD_NAME,
            daemon=True,  # never keeps the interpreter alive
        )
        self.thread.start()
        _LIVE.add(self)

    def order(self, epoch: int, indices: torch.Tensor) -> None:
        assert epoch == self.sent + 1, (epoch, self.sent)  # epochs in turn, none skipped
        self.orders.put(indices.numpy())
        self.sent = epoch

    def get(self) -> tuple[int, int, torch.Tensor]:
        while True:
            try:
                item = self.queue.get(timeout=1.0)
            except queue.Empty:
                if not self.thread.is_alive():
                    raise RuntimeError("the batch prefetch thread stopped") from None
                continue
            if isinstance(item, BaseException):
                raise item
            return item

    def close(self, wait: bool = True) -> None:
        self.stop.set()
        if wait and self.thread is not threading.current_thread():
            self.thread.join(timeout=30)  # at most one gather and one poll


# Prefetchers still running: stopped and joined at interpreter exit (before finalisation,
# so no thread is inside numpy or torch while the interpreter tears them down).
_LIVE: weakref.WeakSet[_Prefetcher] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for p in list(_LIVE):
        p.close()


class HostServedBatches(BatchStream):
    """The same stream as `Batches`, from a uint8 array left on the host: a read-only
    memory map is read as it is, never copied whole. A thread gathers the next PREFETCH
    batches' rows (pinned on CUDA); `next` copies one to the device (non-blocking on
    CUDA) and converts and flips it there exactly as `Batches` does. The thread only
    reads the array; the epochs' orders and the flips' RNG draws stay in `next`."""

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
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()  # a view of a CPU tensor, not a copy
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # as Batches' tensor.to names it
            device = torch.device("cuda", torch.cuda.current_device())
        super().__init__(images.shape, images.dtype, batch, device, flip, seed, rank, world_size)
        self.images = images  # uint8 (N, C, R, R) where the caller keeps it: read, never copied
        self._pin = device.type == "cuda"
        self._ahead: _Prefetcher | None = None  # started by the first `next` after a (re)load

    def _rows(self) -> torch.Tensor:
        if self._ahead is None:
            self._ahead = _Prefetcher(self.images, self.batch, self.epoch, self.position, self._pin)
        # This epoch's order and the next: the thread gathers across the boundary. (With
        # fewer batches per epoch than PREFETCH it waits for later ones; they come here.)
        for e in range(self._ahead.sent + 1, self.epoch + 2):
            self._ahead.order(e, self._indices(e))
        epoch, position, rows = self._ahead.get()
        # the thread serves every batch in order from where it started
        assert (epoch, position) == (self.epoch, self.position), (epoch, position)
        return rows.to(self.device, non_blocking=True)

    def load_state_dict(self, state: dict[str, int]) -> None:
        super().load_state_dict(state)
        self.close()  # what the thread gathered ahead belongs to the old position

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.close()
            self._ahead = None

    def __del__(self) -> None:
        ahead = getattr(self, "_ahead", None)  # __init__ may have failed before it
        if ahead is not None:
            ahead.close(wait=False)  # the thread sees its flag within _POLL_S


@dataclass(frozen=True)
class Serving:
    """Where the training array lives (`--data-on`), and why."""

    on: str  # "device" or "host"
    why: str

    def line(self) -> str:
        where = "on the device" if self.on == "device" else "served from the host"
        return f"data: {where} ({self.why})"

    def as_dict(self) -> dict[str, str]:
        return {"data_on": self.on, "data_on_why": self.why}


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:,.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:,.1f} MB"


def choose(data_on: str, nbytes: int, device: torch.device, free_bytes: int) -> Serving:
    """`--data-on` resolved for an array of `nbytes` and `free_bytes` free on `device`.

    `auto` keeps the array on the device while it takes at most half of the free memory
    there: the networks, their activations and the allocator's slack need the rest. On
    the CPU "the device" is a copy in memory, and the host path reads the store's memory
    map as it is."""
    if data_on not in CHOICES["data_on"]:
        raise UserError(f"data_on must be one of {one_of(CHOICES['data_on'])}, got {data_on}")
    if data_on != "auto":
        return Serving(data_on, f"--data-on {data_on}")
    fits = nbytes <= free_bytes // 2
    why = (
        f"the array's {_size(nbytes)} {'fit in' if fits else 'exceed'} half of the "
        f"{_size(free_bytes)} free on {device}"
    )
    return Serving("device" if fits else "host", why)


def serve(
    images: np.ndarray | torch.Tensor,
    batch: int,
    device: torch.device | str,
    on: str,
    **kwargs: Any,
) -> BatchStream:
    """The stream of `Serving.on`: `Batches` ("device") or `HostServedBatches` ("host")."""
    kind = {"device": Batches, "host": HostServedBatches}[on]
    return kind(images, batch, device, **kwargs)
