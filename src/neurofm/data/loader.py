"""DataLoaders for training: worker start method, pinning, prefetch."""

from __future__ import annotations

import functools
import multiprocessing as mp
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

# what a loader's worker imports to unpickle its dataset (torch, MONAI, blosc2 and neurofm's data modules)
WORKER_MODULES = ["neurofm.data.pretrain", "neurofm.data.finetune"]


def loader_context() -> str:
    """Worker start method: forkserver where available. A plain fork of a process that already runs
    threads (blosc2, OpenMP, progress bars) can copy a held lock into the worker and hang it.

    The fork server imports :data:`WORKER_MODULES` once, so each later worker is a fork of a process that
    has them: without it every DataLoader's worker imported torch and neurofm again (2.2 s per loader on
    a 2-core CPU, 0.1 s with it after the first; a run of many short fine-tunes, like the demo's, starts
    one loader per fine-tune). The setting applies when the fork server starts; later calls change nothing."""
    if "forkserver" not in mp.get_all_start_methods():
        return "spawn"
    mp.get_context("forkserver").set_forkserver_preload(WORKER_MODULES)
    return "forkserver"


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The random generator of sample ``index`` of a run seeded ``seed``: a sample's crop, augmentation and
    contrast choice depend on these two numbers only, not on the worker, the process or whether the run was
    resumed."""
    return np.random.default_rng([int(seed) % 2**32, int(index)])


@functools.lru_cache(maxsize=4)
def _cycle(seed: int, cycle: int, n: int) -> np.ndarray:
    return np.random.default_rng([int(seed) % 2**32, int(cycle), int(n), 1]).permutation(n)


def sample_item(seed: int, index: int, n: int) -> int:
    """Which of ``n`` items (sessions, scans, labelled cases) sample ``index`` of a run seeded ``seed`` reads.

    Every ``n`` consecutive sample indices (a cycle) read each item once, in an order drawn from ``(seed, cycle)``.
    So a run reads the whole pool once per ``n`` samples, however its epoch's length compares with ``n``, and the
    choice depends on the two numbers only, as :func:`sample_rng`'s draws do (a resumed run reads the same items).
    An epoch of :class:`EpochSampler` is a block of consecutive indices, so it reads a random subset of the items
    when it is shorter than the pool. (Until 2026-12-06 the item was the sample's position within its epoch,
    modulo ``n``: an epoch shorter than the pool read only its first items, the same ones every epoch.)"""
    if n < 1:
        raise ValueError("no items to sample from")
    return int(_cycle(seed, index // n, n)[index % n])


class EpochSampler(Sampler[int]):
    """Shuffled sample indices numbered across epochs: epoch ``e`` yields ``e * length`` plus a permutation of
    ``range(length)`` drawn from ``(seed, e)``, so no two samples of a run share an index (and, through
    :func:`sample_rng`, their random draws). Lightning calls :meth:`set_epoch` at every epoch (through its
    distributed wrapper too); :meth:`resume` leaves out the samples of an epoch that a run trained on before
    it stopped, so that a run resumed inside an epoch continues the same permutation."""

    def __init__(self, length: int, seed: int):
        self.length, self.seed = int(length), int(seed)
        self.epoch = 0
        self._skip: tuple[int, int] | None = None  # (epoch, samples already trained on in it)

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def resume(self, epoch: int, samples: int) -> None:
        self._skip = (int(epoch), int(samples))

    def __iter__(self) -> Iterator[int]:
        perm = np.random.default_rng([self.seed % 2**32, self.epoch]).permutation(self.length)
        start = 0
        if self._skip is not None and self._skip[0] == self.epoch:
            start, self._skip = min(self._skip[1], self.length), None
        return iter((self.epoch * self.length + perm[start:]).tolist())


def training_loader(ds: Dataset, batch_size: int, workers: int, seed: int, prefetch: int = 4) -> DataLoader:
    """Shuffled batches (:class:`EpochSampler`), last partial batch dropped; workers persist across epochs."""
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=EpochSampler(len(ds), seed),  # type: ignore[arg-type]
        num_workers=workers,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        prefetch_factor=prefetch if workers > 0 else None,
        multiprocessing_context=loader_context() if workers > 0 else None,
    )
