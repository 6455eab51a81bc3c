"""Inference without PyTorch: sliding windows (MONAI's window grid and Gaussian blending, in numpy),
softmax, and an onnxruntime session.

``sliding_window`` follows MONAI's ``sliding_window_inference`` (the window grid, a Gaussian
importance map with sigma = patch / 8 floored at its minimum, constant padding of inputs smaller
than a window split evenly before and after), so that the PyTorch-free ONNX engine and neurofm's
brain extractor agree with the PyTorch engine to float precision; tests hold them to MONAI's.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def window_slices(shape: tuple[int, ...], patch: int, overlap: float) -> list[tuple[slice, ...]]:
    """Sliding windows of ``patch^3`` covering ``shape``, ``overlap`` in [0, 1): MONAI's dense grid (starts
    every ``int(patch * (1 - overlap))`` voxels, the last one moved back to end at the edge; a dimension no
    larger than the patch gets one window), written out here so that inference needs no PyTorch."""
    starts = []
    for size in shape:
        p = min(patch, size)
        step = size if p == size else max(1, int(patch * (1 - overlap)))
        n = next((i for i in range(-(-size // step)) if i * step + p >= size), 0) + 1
        starts.append([i * step - max(i * step + p - size, 0) for i in range(n)])
    return [
        tuple(slice(a, a + min(patch, size)) for a, size in zip(corner, shape, strict=True))
        for corner in itertools.product(*starts)
    ]


def gaussian_importance(patch: tuple[int, ...], sigma_scale: float = 0.125) -> np.ndarray:
    """MONAI's Gaussian window weight: a product of 1D Gaussians (sigma = ``sigma_scale`` x size), floored at
    its minimum (at least 1e-3) so that no voxel gets zero weight."""
    w = np.ones((), np.float32)
    for size in patch:
        x = np.arange(-(size - 1) / 2.0, (size - 1) / 2.0 + 1, dtype=np.float32)
        g = np.exp(x**2 / (-2 * (size * sigma_scale) ** 2)).astype(np.float32)
        w = w[..., None] * g
    return np.maximum(w, max(float(w.min()), 1e-3)).astype(np.float32)


def sliding_window(
    x: np.ndarray, patch: int, net: Callable[[np.ndarray], np.ndarray], *, batch: int = 4, overlap: float = 0.5,
    cval: float = 0.0,
) -> np.ndarray:  # fmt: skip
    """Apply ``net`` (``(B, C, *patch) -> (B, K, *patch)``) over ``x`` ``(1, C, X, Y, Z)`` in overlapping
    windows blended with a Gaussian weight: ``(1, K, X, Y, Z)``. Inputs smaller than a window are padded
    with ``cval`` (evenly before and after) and the output cropped back."""
    shape = x.shape[2:]
    pads = [(max(patch - s, 0) // 2, max(patch - s, 0) - max(patch - s, 0) // 2) for s in shape]
    if any(sum(p) for p in pads):
        x = np.pad(x, [(0, 0), (0, 0), *pads], constant_values=cval)
    wins = window_slices(tuple(x.shape[2:]), patch, overlap)
    weight = gaussian_importance((patch,) * 3)
    out: np.ndarray | None = None
    norm = np.zeros(x.shape[2:], np.float32)
    for i in range(0, len(wins), batch):
        group = wins[i : i + batch]
        pred = net(np.concatenate([x[(slice(None), slice(None), *w)] for w in group]))
        if out is None:
            out = np.zeros((1, pred.shape[1], *x.shape[2:]), np.float32)
        for w, p in zip(group, pred, strict=True):
            out[(0, slice(None), *w)] += p * weight
            norm[w] += weight
    assert out is not None
    out /= norm
    crop = tuple(slice(a, a + s) for (a, _), s in zip(pads, shape, strict=True))
    return out[(slice(None), slice(None), *crop)]


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def onnx_session(path: str | Path, threads: int | None = None) -> Any:
    """An onnxruntime session on the CPU (``threads``: intra-op threads, default onnxruntime's)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
