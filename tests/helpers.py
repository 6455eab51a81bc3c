"""Builders for tiny test volumes and dataset trees."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np


def blob_volume(shape=(40, 44, 36), center=None, radius=10.0, seed=0) -> np.ndarray:
    """A smooth 'head': an ellipsoid with tissue-like texture on a dark background."""
    rng = np.random.default_rng(seed)
    center = np.array(center if center is not None else [s / 2 for s in shape])
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    r = np.linalg.norm((grid - center) / np.array([1.0, 1.2, 0.9]), axis=-1)
    vol = np.clip(radius - r, 0, None) * 10 + 5 * (r < radius * 0.5)
    return (vol + rng.normal(0, 0.5, shape)).astype(np.float32)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None, dtype=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(
        np.asarray(data if dtype is None else data.astype(dtype)), np.eye(4) if affine is None else affine
    )
    nib.save(img, str(path))
    return path


def lps_version(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same image stored with the first two axes flipped (same world positions)."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3] = data.shape[0] - 1
    flip[1, 3] = data.shape[1] - 1
    return np.ascontiguousarray(data[::-1, ::-1]), affine @ flip
