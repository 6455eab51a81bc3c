"""Out of memory during training: one line that names the batch and patch in use and what fits.

When a step runs out of memory (CUDA, or a host allocation torch could not make), the run stops
and :func:`probe` tries one forward and backward pass at smaller sizes on the same device: first
the batch halved down to 1 at the same patch, then smaller patches (multiples of the network's
downsampling) at batch 1. The first that fits goes into the message.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch

from neurofm.faults import OutOfMemory, exception_chain

_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory", "failed to allocate")


def is_oom(e: BaseException) -> bool:
    """Whether ``e`` (or what caused it) is an allocation that did not fit."""
    return any(
        isinstance(x, (torch.OutOfMemoryError, MemoryError))
        or (isinstance(x, RuntimeError) and any(w in str(x).lower() for w in _WORDS))
        for x in exception_chain(e)
    )


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def candidates(batch: int, patch: int, step: int, fixed: bool, smallest: int = 16) -> list[tuple[int, int]]:
    """(batch, patch) to try, largest first: the batch halved at the same patch, then smaller patches at batch 1."""
    out = []
    b = batch // 2
    while b >= 1:
        out.append((b, patch))
        b //= 2
    if not fixed:
        for frac in (0.75, 0.5, 0.25):
            p = int(patch * frac) // step * step
            if p >= max(smallest, step) and p < patch and (1, p) not in out:
                out.append((1, p))
    return out


def probe(
    try_step: Callable[[int, int], None],
    batch: int,
    patch: int,
    step: int,
    fixed: bool,
    device: torch.device,
) -> tuple[int, int] | None:
    """The largest (batch, patch) for which ``try_step(batch, patch)`` (a forward and backward pass) fits."""
    for b, p in candidates(batch, patch, step, fixed):
        _free(device)
        try:
            try_step(b, p)
            return b, p
        except BaseException as e:  # noqa: BLE001 - only memory errors are expected; others re-raise
            if not is_oom(e):
                raise
    return None


def oom_error(
    what: str,
    batch: int,
    patch: int,
    device: torch.device,
    fits: tuple[int, int] | None,
    batch_key: str,
    patch_key: str,
) -> OutOfMemory:
    where = str(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        where += f" ({total / 2**30:.0f} GB)"
    if fits is None:
        hint = "nothing down to batch 1 at a 16^3 patch fits: use a smaller model or a larger device"
    else:
        b, p = fits
        sets = [f"{batch_key}={b}"] + ([f"{patch_key}={p}"] if p != patch else [])
        hint = f"batch {b} at patch {p}^3 fits: {' '.join(sets)}"
    return OutOfMemory(f"{what} ran out of memory at batch {batch}, patch {patch}^3 on {where}; {hint}")
