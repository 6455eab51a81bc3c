"""Where crops and windows go, and how the contrasts of a case become one array."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from neurofm.preprocess.windows import window_slices

__all__ = ["box_around", "random_box", "stack_contrasts", "window_slices"]


def random_box(shape: tuple[int, ...], patch: int, rng: np.random.Generator) -> tuple[slice, ...]:
    """A random ``patch^3`` box inside ``shape`` (the whole axis where it is shorter)."""
    return tuple(slice(s0 := int(rng.integers(0, max(s - patch, 0) + 1)), min(s0 + patch, s)) for s in shape)


def box_around(centre: Sequence[int], shape: tuple[int, ...], patch: int) -> tuple[slice, ...]:
    """The ``patch^3`` box centred on a voxel, shifted to lie inside ``shape``."""
    return tuple(
        slice(s0 := int(np.clip(c - patch // 2, 0, max(s - patch, 0))), min(s0 + patch, s))
        for c, s in zip(centre, shape, strict=True)
    )


def stack_contrasts(images: Mapping[str, np.ndarray | None], order: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(C, X, Y, Z)`` float32 in ``order``, a missing contrast zero-filled, and the ``(C,)`` presence flags.

    Raises:
        ValueError: when none of ``order`` is present.
    """
    present = np.array([images.get(c) is not None for c in order])
    if not present.any():
        raise ValueError(f"none of the contrasts {list(order)} is present")
    ref = next(np.asarray(images[c]) for c, ok in zip(order, present, strict=True) if ok)
    stack = np.stack(
        [
            np.asarray(images[c], np.float32) if ok else np.zeros(ref.shape, np.float32)
            for c, ok in zip(order, present, strict=True)
        ]
    )
    return stack, present
