"""Data-parallel training under ``torchrun``: one process per device, same entry point as a single-process run.

``torchrun`` (``python -m torch.distributed.run``) sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``;
:func:`setup_distributed` reads them and initialises the default process group (``nccl`` on CUDA, ``gloo`` on CPU).
Without those variables (or with ``WORLD_SIZE=1``) everything here is a no-op and the run is single-process.
Multi-node runs need a run directory on a file system shared by all nodes (every rank reads the checkpoint on resume;
only rank 0 writes).

Why not ``ignite.distributed``: this is a thin layer over ``torch.distributed`` passed to the trainer as an explicit
value (a single-process run is a plain ``DistContext()``, no global state), and it joins a process group the caller
already created without destroying it afterwards, where ``idist.initialize`` refuses an existing group and
``idist.finalize`` destroys it. ignite's helpers would replace a few one-line calls and add none of this.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class DistContext:
    """Where this process sits in the job. ``owns_group``: this process created the group and must destroy it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def gather_objects(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.is_distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def mean(self, value: float, device: torch.device) -> float:
        """The mean of a scalar over all ranks (a collective: every rank must call it)."""
        if not self.is_distributed:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def shutdown(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def setup_distributed(device_type: str) -> DistContext:
    """Join the ``torchrun`` job described by the environment, or return a single-process context."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size <= 1:
        return DistContext()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=False)
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, init_method="env://")
    return DistContext(rank, world_size, local_rank, owns_group=True)


def derived_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (e.g. ``(seed, rank)``, ``(seed, epoch)``), stable across platforms."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)
