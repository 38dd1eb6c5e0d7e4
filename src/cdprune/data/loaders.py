"""Reproducible subsets and seeded data loaders."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torch.utils.data import Subset as _TorchSubset

from ..errors import ConfigError

logger = logging.getLogger(__name__)


class Subset(_TorchSubset):
    """A torch ``Subset`` that keeps ``.classes`` and exposes the chosen ``.targets``."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]):
        super().__init__(dataset, list(indices))
        self.classes: list[str] = list(getattr(dataset, "classes", []))
        parent_targets = getattr(dataset, "targets", None)
        self.targets: list[int] = ([int(parent_targets[i]) for i in self.indices]
                                   if parent_targets is not None else [])


def subset(dataset: Dataset, n: int, seed: int = 0) -> Subset:
    """A reproducible random subset of ``n`` items (indices kept in ascending order).

    Used to sample training images for the activation statistics. Asking for more items
    than the dataset has returns all of them (with a warning in the log).
    """
    total = len(dataset)  # type: ignore[arg-type]
    if n <= 0:
        raise ConfigError(f"subset size must be positive, got {n}")
    if n >= total:
        if n > total:
            logger.warning("subset of %d requested from %d items; using all of them", n, total)
        return Subset(dataset, range(total))
    g = torch.Generator().manual_seed(seed)
    picked = torch.randperm(total, generator=g)[:n].sort().values
    return Subset(dataset, picked.tolist())


def _seed_worker(worker_id: int) -> None:
    """Seed Python's and numpy's RNGs in a loader worker from its torch seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


class SeededLoader(DataLoader):
    """A DataLoader whose augmentation is reproducible also without worker processes.

    Worker processes get their torch seed from the loader's generator (PyTorch does this).
    With ``num_workers=0`` the transforms run in the main process; this loader then draws a
    seed from its generator each epoch and runs the transforms on a private RNG stream,
    swapped in around each batch, so augmentation does not depend on (nor disturb) the
    caller's global RNG.
    """

    def __iter__(self) -> Iterator[Any]:
        batches = super().__iter__()
        if self.num_workers > 0:
            return batches
        return self._private_rng(batches)

    def _private_rng(self, batches: Iterator[Any]) -> Iterator[Any]:
        seed = int(torch.empty((), dtype=torch.int64).random_(generator=self.generator).item())
        private = torch.Generator().manual_seed(seed).get_state()
        while True:
            outer = torch.get_rng_state()
            torch.set_rng_state(private)
            try:
                batch = next(batches)
            except StopIteration:
                return
            finally:
                private = torch.get_rng_state()
                torch.set_rng_state(outer)
            yield batch


def build_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, workers: int = 0,
                 seed: int = 0, drop_last: bool = False, distributed: bool = False,
                 deterministic: bool = True, pin_memory: bool = False) -> SeededLoader:
    """A DataLoader whose order and augmentation are fixed by ``seed``.

    Args:
        dataset: any map-style dataset.
        batch_size: images per batch (per process when distributed).
        shuffle: shuffle every epoch.
        workers: loader worker processes.
        seed: seed of the shuffling and augmentation streams.
        drop_last: drop the last incomplete batch.
        distributed: split the data over the processes of the initialised process group
            with a seeded ``DistributedSampler``; call ``loader.sampler.set_epoch(epoch)``
            each epoch to reshuffle.
        deterministic: ``False`` seeds from fresh entropy instead of ``seed``.
        pin_memory: pin batches for faster host-to-GPU copies.
    """
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size}")
    if workers < 0:
        raise ConfigError(f"workers must be >= 0, got {workers}")
    if not deterministic:
        seed = int.from_bytes(os.urandom(8), "little") >> 2
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if distributed:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise ConfigError("distributed=True needs an initialised torch.distributed "
                              "process group (launch with torchrun)")
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed)
    return SeededLoader(dataset, batch_size=batch_size,
                        shuffle=shuffle if sampler is None else False, sampler=sampler,
                        num_workers=workers, generator=generator, worker_init_fn=_seed_worker,
                        drop_last=drop_last, pin_memory=pin_memory)
