"""Deterministic, offline preprocessing transforms on 3D arrays with an affine.

All functions take and return plain ``(X, Y, Z)`` numpy arrays plus 4x4 voxel-to-world
affines, so they can be checked against known answers. World coordinates are RAS+ mm.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi
from nibabel import orientations as ornt
from nibabel.processing import vox2out_vox

Grid = tuple[tuple[int, int, int], np.ndarray]  # (shape, affine)


def reorient_ras(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip/permute axes so that they point (as closely as possible) to R, A, S.

    Exact (no interpolation): voxel values are only moved. Oblique rotations remain in
    the affine and are handled by :func:`resample`.
    """
    o = ornt.io_orientation(affine)
    if np.array_equal(o, [[0, 1], [1, 1], [2, 1]]):
        return data, affine
    out = ornt.apply_orientation(data, o)
    new_affine = affine @ ornt.inv_ornt_aff(o, data.shape[:3])
    return np.ascontiguousarray(out), new_affine


def target_grid(shape: tuple[int, ...], affine: np.ndarray, spacing: float | tuple[float, ...]) -> Grid:
    """An axis-aligned RAS grid with the given voxel size covering the input's field of view."""
    sp = np.broadcast_to(np.asarray(spacing, dtype=float), (3,))
    out_shape, out_affine = vox2out_vox((tuple(shape[:3]), affine), tuple(sp))
    return tuple(int(s) for s in out_shape), np.asarray(out_affine, dtype=float)  # type: ignore[return-value]


def same_grid(a: Grid, b: Grid, atol: float = 1e-4) -> bool:
    return tuple(a[0]) == tuple(b[0]) and np.allclose(a[1], b[1], atol=atol)


def resample(
    data: np.ndarray,
    affine: np.ndarray,
    grid: Grid,
    *,
    order: int = 1,
    anti_alias: bool | None = None,
) -> np.ndarray:
    """Sample ``data`` (voxel-to-world ``affine``) on ``grid`` by world coordinates.

    Args:
        data: ``(X, Y, Z)`` array.
        affine: its 4x4 voxel-to-world matrix.
        grid: ``(shape, affine)`` of the output.
        order: 1 (linear) for images, 0 (nearest) for label maps.
        anti_alias: Gaussian pre-filter when the output is coarser than the input
            (default: on for ``order > 0``), so downsampling does not alias.

    Returns:
        ``(X', Y', Z')`` float32 (images) or the input dtype (labels); voxels outside the
        input's field of view are 0.
    """
    out_shape, out_affine = grid
    # Maps output voxel indices to input voxel indices.
    mapping = np.linalg.inv(affine) @ out_affine
    lin, offset = mapping[:3, :3], mapping[:3, 3]
    if tuple(data.shape) == tuple(out_shape) and np.allclose(mapping, np.eye(4), atol=1e-6):
        return data.copy()
    src = data
    if anti_alias is None:
        anti_alias = order > 0
    if anti_alias:
        # Output voxel size measured in input voxels, per input axis.
        # sigma = 0.5 * sqrt(f^2 - 1) for a downsampling factor f: the blur that takes a
        # resolution of 1 input voxel to f (Gaussian widths add in quadrature).
        step = np.abs(lin).max(axis=1)
        sigma = 0.5 * np.sqrt(np.clip(step**2 - 1.0, 0.0, None))
        if np.any(sigma > 0.25):  # below ~10% downsampling aliasing is negligible
            src = ndi.gaussian_filter(data.astype(np.float32), sigma=sigma, mode="nearest")
    diagonal = np.allclose(lin, np.diag(np.diag(lin)), atol=1e-8)
    matrix = np.diag(lin) if diagonal else lin  # a 1-D matrix takes scipy's faster zoom path
    out_dtype = np.float32 if order > 0 else data.dtype
    return ndi.affine_transform(
        src,
        matrix,
        offset=offset,
        output_shape=tuple(out_shape),
        order=order,
        mode="constant",
        cval=0.0,
        output=out_dtype,
        prefilter=False,
    )


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the cut that maximises the between-class variance."""
    hist, edges = np.histogram(values, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(float)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


def foreground_mask(data: np.ndarray) -> np.ndarray:
    """Head/brain foreground of one image.

    Skull-stripped or pre-masked images (many exact zeros) use ``data != 0``. Otherwise
    the image is lightly smoothed, thresholded at Otsu's level, and the largest
    connected component is kept with its holes filled. The mask serves the crop box and
    the normalisation statistics, so it is computed at half resolution (8x less work).
    """
    nonzero = data != 0
    if nonzero.mean() < 0.9:
        small = nonzero[::2, ::2, ::2]
    else:
        smooth = ndi.gaussian_filter(data[::2, ::2, ::2].astype(np.float32), 0.5)
        small = smooth > otsu_threshold(smooth.ravel())
    small = largest_filled(small)
    full = small.repeat(2, 0).repeat(2, 1).repeat(2, 2)[: data.shape[0], : data.shape[1], : data.shape[2]]
    if nonzero.mean() < 0.9:
        full &= nonzero
    return full


def nonzero_mask(data: np.ndarray, rel: float = 0.01) -> np.ndarray:
    """The brain of a skull-stripped image: voxels whose magnitude exceeds ``rel`` of the 99th percentile
    of the non-zero magnitudes (so interpolation and anti-alias blur at the mask's edge do not count),
    largest connected component, holes filled. Empty when the image is all zeros."""
    mag = np.abs(data)
    values = mag[mag > 0]
    if values.size == 0:
        return np.zeros(data.shape, bool)
    return largest_filled(mag > rel * float(np.percentile(values, 99)))


def largest_filled(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of a binary mask, its holes filled."""
    labels, n = ndi.label(mask)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(np.argmax(sizes))
    return ndi.binary_fill_holes(mask)


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, slice, slice]:
    """The smallest box holding ``mask``, grown by ``margin`` voxels and clipped to the array."""
    if not mask.any():
        return tuple(slice(0, s) for s in mask.shape)  # type: ignore[return-value]
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        box.append(slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)  # type: ignore[return-value]


def crop_affine(affine: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    """The affine of ``data[box]``: the origin moves to the box's first voxel."""
    shift = np.eye(4)
    shift[:3, 3] = [s.start or 0 for s in box[:3]]
    return affine @ shift


def zscore(data: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, float, float]:
    """``(x - mean) / std`` with mean and std taken within ``mask``.

    Returns:
        The normalised float32 array and the (mean, std) used.

    Raises:
        ValueError: if the mask is empty or the image is constant inside it.
    """
    vals = data[mask]
    if vals.size == 0:
        raise ValueError("empty foreground")
    mean = float(vals.mean(dtype=np.float64))
    std = float(vals.std(dtype=np.float64))
    if not std > 1e-8 * max(1.0, abs(mean)):
        raise ValueError(f"constant inside the foreground (value {mean:g})")
    return ((data - mean) / std).astype(np.float32), mean, std


def pad_to(x: np.ndarray, patch: int, value: float) -> np.ndarray:
    """Centre-pad the last three axes of ``x`` up to ``patch`` (axes already that long are left alone)."""
    return pad_to_shape(x, (patch, patch, patch), value)


def pad_to_shape(x: np.ndarray, shape: tuple[int, ...] | list[int], value: float) -> np.ndarray:
    """Centre-pad the last three axes of ``x`` up to ``shape`` (axes already that long are left alone)."""
    pads = [(0, 0)] * (x.ndim - 3)
    for s, want in zip(x.shape[-3:], shape, strict=True):
        extra = max(int(want) - s, 0)
        pads.append((extra // 2, extra - extra // 2))
    return np.pad(x, pads, constant_values=value) if any(p[1] or p[0] for p in pads) else x


def minmax(x: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] between the 0.5th and 99.5th percentiles (LaMIM scales every channel to [0, 1])."""
    lo, hi = np.percentile(x, [0.5, 99.5])
    return np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)
