"""Seeds and epoch sampling that make training a pure function of (seed, epoch, step, rank).

Both applications resume exactly from an epoch-end checkpoint without storing sampler or data
RNG state, because everything random is re-derived from a few integers:

* `derive_seed` -- one seed per (seed, stream, ...) tuple, from NumPy's `SeedSequence` (its
  hashing keeps nearby tuples independent, unlike ``seed * K + epoch``);
* `seed_everything` -- Lightning's (Python, NumPy, torch), without its log line;
* `EpochSampler` -- the data order of an epoch, sharded across DDP ranks, which can also reseed
  the DataLoader's generator (worker seeds) and the global RNGs (augmentations, dropout) at the
  start of every epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.utilities.seed import seed_everything as _lightning_seed_everything
from torch.utils.data import Sampler

# streams of `derive_seed`: what a derived seed is for (fixed numbers: changing one changes training)
GLOBAL_STREAM, ORDER_STREAM, LOADER_STREAM, STEP_STREAM = 0, 1, 2, 3


def derive_seed(seed: int, epoch: int, stream: int = GLOBAL_STREAM, *more: int) -> int:
    """A 32-bit seed that depends only on (seed, epoch, stream, *more); trailing zeros in ``more`` are dropped.

    Dropping them keeps rank 0's seeds those of a single-process run (``more = (rank,)``).
    """
    extra = list(more)
    while extra and extra[-1] == 0:
        extra.pop()
    return int(np.random.SeedSequence([seed, epoch, stream, *extra]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (Lightning's ``seed_everything``, quietly)."""
    _lightning_seed_everything(seed, workers=False, verbose=False)


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class EpochSampler(Sampler[int]):
    """Data order that is a pure function of (seed, epoch), sharded across DDP ranks.

    Lightning calls `set_epoch` when an epoch starts, so a resumed run sees exactly the order an
    uninterrupted run would. Every rank draws the same permutation and takes every world-th index
    (padded by wrapping, so all ranks run the same number of batches, like PyTorch's
    ``DistributedSampler``); with one process the order is the whole permutation.

    Args:
        size (`int`): number of samples in the data set.
        seed (`int`): the run's seed.
        shuffle (`bool`, defaults to `True`): permute (training) or keep the data set's order
            (validation).
        reseed_global (`bool`, defaults to `False`): when the epoch's iteration starts, reseed
            Python/NumPy/torch from (seed, epoch, rank), which fixes every random augmentation and
            dropout draw of the epoch in the main process.

    ``generator`` is reseeded by `set_epoch`; pass it as the DataLoader's ``generator`` so that the
    worker seeds (drawn from it) are functions of (seed, epoch, rank) too.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True, reseed_global: bool = False) -> None:
        self.size, self.seed, self.shuffle, self.reseed_global, self.epoch = size, seed, shuffle, reseed_global, 0
        self.generator = torch.Generator()
        self._resume: tuple[int, int] | None = None
        self.set_epoch(0)

    def resume_at(self, epoch: int, done: int) -> None:
        """Leave out the first ``done`` indices of this rank's order when ``epoch`` is next iterated
        (once): a run stopped mid-epoch continues with the very samples it had not yet seen."""
        self._resume = (epoch, done)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.generator.manual_seed(derive_seed(self.seed, epoch, LOADER_STREAM, world()[0]))

    def __len__(self) -> int:
        return math.ceil(self.size / world()[1])

    def __iter__(self) -> Iterator[int]:
        rank, size = world()
        if self.reseed_global:
            seed_everything(derive_seed(self.seed, self.epoch, GLOBAL_STREAM, rank))
        if self.shuffle:
            order = np.random.default_rng(derive_seed(self.seed, self.epoch, ORDER_STREAM)).permutation(self.size)
        else:
            order = np.arange(self.size)
        total = len(self) * size
        if total > self.size:  # pad by wrapping so every rank gets the same number of samples
            order = np.concatenate([order, order[: total - self.size]])
        mine = order[rank::size]
        if self._resume is not None and self._resume[0] == self.epoch:
            mine, self._resume = mine[self._resume[1] :], None
        return iter(mine.tolist())


def step_seed(seed: int, epoch: int, batch_idx: int, rank: int = 0) -> int:
    """The seed of one training step's own draws (MoEFsDiC: timesteps, noise, label dropout)."""
    return derive_seed(seed, epoch, STEP_STREAM, batch_idx, rank)
