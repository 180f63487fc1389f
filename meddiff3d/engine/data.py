"""A restorable stream of training batches: the data order is a pure function of ``(seed, micro-batch number)``.

Each data epoch ``e`` draws its own permutation of the dataset from ``(seed, e)``; under data parallelism the
permutation is cut into ``world_size`` interleaved shards (the tail that does not divide evenly is dropped, so every
rank sees the same number of batches). Micro-batch ``m`` of the run is batch ``m % batches_per_epoch`` of epoch
``m // batches_per_epoch``, so a resumed run asks for micro-batch ``iteration * grad_accum`` and gets exactly the batch
the uninterrupted run would have seen next, without loading the skipped ones (the sampler starts mid-permutation).

Every per-epoch ``DataLoader`` gets its own seeded ``torch.Generator``: worker seeds are deterministic and the global
torch RNG (used by the objective for noise and timesteps) is never touched by data loading.

Not restorable: random augmentations whose state lives in the transforms themselves (MONAI ``Randomizable``
transforms keep a private ``RandomState``) and data that comes from an iterable without a length (an
``IterableDataset``): such streams restart from their beginning on resume and a warning is logged.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

from meddiff3d.engine.distributed import derived_seed
from meddiff3d.errors import InputError

logger = logging.getLogger("meddiff3d.engine")


class _IndexList(Sampler[int]):
    def __init__(self, indices: Sequence[int]) -> None:
        self.indices = list(indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _default_collate() -> Callable:
    from monai.data import list_data_collate

    return list_data_collate


class BatchStream:
    """An endless, seeded, shardable sequence of batches over a map-style dataset.

    Args:
        data: a map-style dataset (anything with ``__len__`` and ``__getitem__``, e.g. a list of dicts or a MONAI
            ``Dataset``) or a ``DataLoader`` over one, whose batch size, collate function and workers are reused
            (its own sampler / shuffle setting is replaced). An unsized iterable is accepted but not restorable.
        batch_size: micro-batch size per rank (ignored when ``data`` is a ``DataLoader``).
        seed: seeds the per-epoch permutations.
        shuffle: ``False`` keeps the dataset order in every epoch.
    """

    def __init__(
        self,
        data: Any,
        batch_size: int = 1,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        num_workers: int = 0,
        collate_fn: Callable | None = None,
        pin_memory: bool = False,
    ) -> None:
        self.seed, self.rank, self.world_size, self.shuffle = int(seed), int(rank), int(world_size), bool(shuffle)
        self.loader_kwargs: dict = {"num_workers": num_workers, "pin_memory": pin_memory}
        if isinstance(data, DataLoader):
            self.loader_kwargs.update(
                num_workers=data.num_workers,
                pin_memory=data.pin_memory,
                worker_init_fn=data.worker_init_fn,
                timeout=data.timeout,
            )
            collate_fn = collate_fn or data.collate_fn
            batch_size = data.batch_size or 1
            self.iterable = data if isinstance(data.dataset, IterableDataset) else None
            data = data.dataset
        else:
            self.iterable = data if not hasattr(data, "__getitem__") or isinstance(data, IterableDataset) else None
        self.dataset = data
        self.batch_size = int(batch_size)
        self.collate_fn = collate_fn or _default_collate()
        if self.iterable is None:
            per_rank = len(data) // self.world_size
            if per_rank < self.batch_size:
                raise InputError(
                    f"the training data has {len(data)} items: too few for a batch of {self.batch_size} per rank "
                    f"on {self.world_size} rank(s); lower the batch size or add data"
                )

    @property
    def restorable(self) -> bool:
        return self.iterable is None

    @property
    def batches_per_epoch(self) -> int | None:
        if not self.restorable:
            return None
        return (len(self.dataset) // self.world_size) // self.batch_size

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's dataset indices for data epoch ``epoch`` (0-based), before batching."""
        n = len(self.dataset)
        if self.shuffle:
            gen = torch.Generator().manual_seed(derived_seed(self.seed, epoch, 0xDA7A))
            order = torch.randperm(n, generator=gen).tolist()
        else:
            order = list(range(n))
        usable = (n // self.world_size) * self.world_size
        return order[:usable][self.rank :: self.world_size]

    def iter_from(self, micro_batch: int) -> Iterator[Any]:
        """Batches from micro-batch number ``micro_batch`` (0-based, counted over the whole run) onwards, forever."""
        if not self.restorable:
            yield from self._iter_unsized(micro_batch)
            return
        per_epoch = self.batches_per_epoch
        epoch, offset = divmod(int(micro_batch), per_epoch)
        while True:
            indices = self.epoch_indices(epoch)[offset * self.batch_size : per_epoch * self.batch_size]
            gen = torch.Generator().manual_seed(derived_seed(self.seed, epoch, self.rank, 0x10AD))
            loader = DataLoader(
                self.dataset,
                batch_size=self.batch_size,
                sampler=_IndexList(indices),
                drop_last=True,
                collate_fn=self.collate_fn,
                generator=gen,
                **self.loader_kwargs,
            )
            yield from loader
            epoch, offset = epoch + 1, 0

    def _iter_unsized(self, micro_batch: int) -> Iterator[Any]:
        if micro_batch:
            logger.warning(
                "training data without a length (%s) cannot be restored to micro-batch %d; it restarts from its "
                "beginning, so the resumed run will differ from an uninterrupted one",
                type(self.iterable).__name__,
                micro_batch,
            )
        source: Iterable = self.iterable
        if not isinstance(source, DataLoader):
            source = DataLoader(source, batch_size=self.batch_size, collate_fn=self.collate_fn, **self.loader_kwargs)
        while True:
            empty = True
            for batch in source:
                empty = False
                yield batch
            if empty:
                raise InputError(f"the training data ({type(self.iterable).__name__}) yielded no batches")


class StepBatches:
    """What the ignite engine iterates: each item is the list of ``grad_accum`` micro-batches of one optimiser step.

    ``position()`` is read when ignite (re)creates the iterator, i.e. at the start of a run or a resume, and returns
    the number of optimiser steps already taken.
    """

    def __init__(self, stream: BatchStream, grad_accum: int, position: Callable[[], int]) -> None:
        self.stream, self.grad_accum, self.position = stream, int(grad_accum), position

    def __iter__(self) -> Iterator[list]:
        batches = self.stream.iter_from(self.position() * self.grad_accum)
        while True:
            yield [next(batches) for _ in range(self.grad_accum)]

    def steps_per_epoch(self) -> int | None:
        per_epoch = self.stream.batches_per_epoch
        return None if per_epoch is None else max(1, per_epoch // self.grad_accum)
