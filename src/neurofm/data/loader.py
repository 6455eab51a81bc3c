"""DataLoaders for training: worker start method, pinning, prefetch."""

from __future__ import annotations

import multiprocessing as mp

import torch
from torch.utils.data import DataLoader, Dataset


def loader_context() -> str:
    """Worker start method: forkserver where available. A plain fork of a process that already runs
    threads (blosc2, OpenMP, progress bars) can copy a held lock into the worker and hang it."""
    return "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


def training_loader(ds: Dataset, batch_size: int, workers: int, prefetch: int = 4) -> DataLoader:
    """Shuffled batches, last partial batch dropped; workers persist across epochs."""
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        prefetch_factor=prefetch if workers > 0 else None,
        multiprocessing_context=loader_context() if workers > 0 else None,
    )
