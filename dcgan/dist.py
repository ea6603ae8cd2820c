"""DistributedDataParallel set-up from torchrun's environment.

`torchrun --nproc-per-node N -m dcgan train ...` starts N processes with RANK,
LOCAL_RANK and WORLD_SIZE set; without them training runs in one process.
gloo on the CPU, NCCL on CUDA. Only rank 0 writes files.

BatchNorm: D sees the real batch and then the fake batch before one backward.
DDP's default `broadcast_buffers=True` rewrites the BN running statistics at
every forward, which autograd then reports as an in-place modification, so we
pass `broadcast_buffers=False` (each rank keeps its own running statistics;
rank 0's are saved) or, with `--sync-bn`, replace BatchNorm by SyncBatchNorm so
batch statistics are computed over the global batch.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP


@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: torch.device) -> tuple[DistEnv, torch.device]:
    """Join the process group if torchrun started us; returns (env, this rank's device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv(), device
    env = DistEnv(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world)
    if device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        store = _attempt_store(world)
        if store is None:
            tdist.init_process_group(backend)
        else:
            tdist.init_process_group(backend, store=store, rank=env.rank, world_size=world)
    return env, device


def _attempt_store(world_size: int) -> tdist.Store | None:
    """torchrun's own key-value store, with keys scoped to this restart attempt.

    torchrun (dynamic rendezvous) shares one TCPStore across all restarts of the
    workers, and `init_process_group("gloo")` would publish each rank's address
    under the same keys in every attempt. After a restart a rank can then read
    a dead peer's address from the previous attempt before the peer overwrites
    it, and gloo fails with "Connection refused". A prefix per attempt
    (TORCHELASTIC_RESTART_COUNT) keeps every attempt's keys apart. Returns None
    when torchrun does not share its store (plain env:// rendezvous is fine)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    agent = tdist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False
    )
    return tdist.PrefixStore(f"dcgan/attempt_{attempt}", agent)


def wrap(module: nn.Module, env: DistEnv, device: torch.device) -> nn.Module:
    """DDP around module (identity in one process); see the module docstring for buffers."""
    if not env.enabled:
        return module
    ids = [device.index] if device.type == "cuda" else None
    return DDP(module, device_ids=ids, broadcast_buffers=False)


def all_reduce_mean(values: dict[str, torch.Tensor], env: DistEnv) -> dict[str, torch.Tensor]:
    """Average device scalars over ranks in one collective."""
    if not env.enabled:
        return values
    keys = sorted(values)
    stacked = torch.stack([values[k].float() for k in keys])
    tdist.all_reduce(stacked)
    stacked /= env.world_size
    return dict(zip(keys, stacked, strict=True))


def weights_in_sync(modules: list[nn.Module], env: DistEnv) -> bool:
    """True when every rank holds bit-identical parameters (compared by a float64 digest
    that weighs each element by its position, so swapped values differ too)."""
    if not env.enabled:
        return True
    digests = []
    for m in modules:
        for p in m.parameters():
            flat = p.detach().double().flatten()
            pos = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64)
            digests.append(torch.stack([flat.sum(), (flat * pos).sum()]))
    mine = torch.cat(digests)
    lo, hi = mine.clone(), mine.clone()
    tdist.all_reduce(lo, op=tdist.ReduceOp.MIN)
    tdist.all_reduce(hi, op=tdist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))


def cleanup(env: DistEnv) -> None:
    """Leave the process group together: a rank that tears gloo down while another is
    still in its last collective was seen to abort ("terminate called without an
    active exception") about one run in four."""
    if env.enabled and tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


def restarted_by_torchrun() -> bool:
    """True in a process that torchrun relaunched after a failure (--max-restarts)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def injected_fault(nimg: int, env: DistEnv) -> None:
    """Test hook for the restart path: DCGAN_FAULT_RANK=R DCGAN_FAULT_NIMG=N makes rank R
    die (exit status 1, no clean-up) once it has passed N images, in the first attempt only."""
    rank, at = os.environ.get("DCGAN_FAULT_RANK"), os.environ.get("DCGAN_FAULT_NIMG")
    if rank is None or at is None or restarted_by_torchrun():
        return
    if env.rank == int(rank) and nimg >= int(at):
        print(f"rank {env.rank}: injected fault at {nimg} images", file=sys.stderr, flush=True)
        os._exit(1)
