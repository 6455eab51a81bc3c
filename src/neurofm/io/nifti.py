"""Read and write NIfTI scans as ``(C, X, Y, Z)`` float32 arrays with their 4x4 affine.

Every check that can refuse a scan lives here, so that a bad file becomes one
:class:`~neurofm.errors.ScanError` with its path and a one-line reason, whatever the
caller (``prepare``, ``predict``, tests).
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from neurofm.errors import ScanError
from neurofm.utils import atomic_write

NIFTI_SUFFIXES = (".nii", ".nii.gz")
MAX_DIM = 2048  # voxels along one axis; larger is a corrupt header, not a brain scan
MAX_VOXELS = 1024**3
MIN_DIM = 4  # fewer voxels than this along an axis cannot be resampled or cropped
MAX_SPACING_MM = 50.0


def is_nifti(path: str | Path) -> bool:
    name = str(path).lower()
    return name.endswith(NIFTI_SUFFIXES)


@dataclass
class Scan:
    """A scan in memory.

    Attributes:
        data: ``(C, X, Y, Z)`` float32 voxel values (C = 1 for a file with one volume).
        affine: ``(4, 4)`` float64 voxel-to-world (RAS+ millimetres) matrix.
        path: where it was read from ("" when built in memory).
    """

    data: np.ndarray
    affine: np.ndarray
    path: str = ""

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape[1:])  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.sqrt((self.affine[:3, :3] ** 2).sum(0)))  # type: ignore[return-value]

    @property
    def orientation(self) -> str:
        return "".join(nib.aff2axcodes(self.affine))

    def to_nifti(self, channel: int = 0) -> nib.Nifti1Image:
        return nib.Nifti1Image(np.asarray(self.data[channel]), self.affine)


def check_affine(affine: np.ndarray, path: str | Path) -> None:
    """Refuse a voxel-to-world matrix that is not finite, singular or absurd."""
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ScanError(path, "affine is not a finite 4x4 matrix")
    rot = affine[:3, :3]
    spacing = np.sqrt((rot**2).sum(0))
    if np.any(spacing < 1e-3):
        raise ScanError(path, f"singular affine (voxel size {_fmt(spacing)} mm)")
    # Relative determinant: ~0 means the voxel axes are (nearly) parallel.
    if abs(np.linalg.det(rot)) / np.prod(spacing) < 1e-3:
        raise ScanError(path, "singular affine (voxel axes are parallel)")
    if np.any(spacing > MAX_SPACING_MM):
        raise ScanError(path, f"absurd voxel size {_fmt(spacing)} mm (max {MAX_SPACING_MM:g})")


def _fmt(v: np.ndarray) -> str:
    return "x".join(f"{x:.3g}" for x in v)


def _open(path: Path) -> nib.Nifti1Image:
    if not path.exists():
        raise ScanError(path, "file does not exist")
    if not path.is_file():
        raise ScanError(path, "not a file")
    if not is_nifti(path):
        raise ScanError(path, "not a NIfTI file (expected .nii or .nii.gz)")
    if path.stat().st_size == 0:
        raise ScanError(path, "empty file")
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises many types for garbage input
        raise ScanError(path, f"not a readable NIfTI image ({type(e).__name__}: {_short(e)})") from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise ScanError(path, f"not a NIfTI image ({type(img).__name__})")
    return img


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return text[:160]


def load_scan(path: str | Path, *, kind: str = "image") -> Scan:
    """Read a NIfTI file.

    Args:
        path: ``.nii`` or ``.nii.gz``; 3D, or 4D with a single volume.
        kind: ``"image"`` (float intensities) or ``"label"`` (integer-valued label map).

    Returns:
        A :class:`Scan` with ``data`` of shape ``(1, X, Y, Z)``.

    Raises:
        ScanError: for anything that is not a usable scan; the message says why.
    """
    if kind not in ("image", "label"):
        raise ValueError(f"kind should be 'image' or 'label', got {kind!r}")
    path = Path(path)
    img = _open(path)
    shape = tuple(int(s) for s in img.shape)
    # Trailing singleton axes (X, Y, Z, 1[, 1]) are one volume stored as 4D/5D.
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        what = {1: "1D", 2: "2D"}.get(len(shape), f"{len(shape)}D")
        extra = f" with {shape[3]} volumes" if len(shape) == 4 else ""
        raise ScanError(path, f"{what} data{extra} (shape {img.shape}); neurofm reads one 3D volume per file")
    if any(s < MIN_DIM for s in shape):
        raise ScanError(path, f"too small: shape {shape} (at least {MIN_DIM} voxels per axis)")
    if any(s > MAX_DIM for s in shape) or int(np.prod(shape)) > MAX_VOXELS:
        raise ScanError(path, f"absurd dimensions {shape} (max {MAX_DIM} per axis)")
    affine = np.asarray(img.affine, dtype=np.float64)
    check_affine(affine, path)
    if np.iscomplexobj(np.empty(0, dtype=img.get_data_dtype())):
        raise ScanError(path, "complex-valued data")
    try:
        data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    except MemoryError:
        raise ScanError(path, f"does not fit in memory (shape {shape})") from None
    except (OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile, Exception) as e:
        raise ScanError(path, f"truncated or corrupt data ({type(e).__name__}: {_short(e)})") from None
    bad = ~np.isfinite(data)
    if bad.any():
        raise ScanError(path, f"{int(bad.sum())} NaN/Inf voxels")
    if kind == "label":
        if not np.array_equal(data, np.round(data)):
            raise ScanError(path, "label map has non-integer values")
        if data.min() < 0:
            raise ScanError(path, "label map has negative values")
    elif float(data.max()) == float(data.min()):
        raise ScanError(path, f"image is constant (every voxel = {float(data.min()):g})")
    # nibabel hands back Fortran-ordered arrays; resampling C-ordered data is ~5x faster.
    return Scan(data=np.ascontiguousarray(data[None]), affine=affine, path=str(path))


def save_scan(
    path: str | Path,
    data: np.ndarray,
    affine: np.ndarray,
    *,
    dtype: np.dtype | type | None = None,
    header: nib.Nifti1Header | None = None,
) -> Path:
    """Write a 3D array (or ``(1, X, Y, Z)``) as NIfTI, atomically.

    The file appears complete or not at all: it is written next to its destination and
    renamed. Both sform and qform are set from ``affine`` (code 1, scanner).
    """
    path = Path(path)
    arr = np.asarray(data)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise ValueError(f"save_scan expects a 3D volume, got shape {arr.shape}")
    if dtype is not None:
        arr = arr.astype(dtype)
    img = nib.Nifti1Image(arr, np.asarray(affine, dtype=np.float64), header=header)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    return _save_atomic(img, path)


def save_like(path: str | Path, data: np.ndarray, reference: str | Path, dtype: np.dtype | type = np.uint8) -> Path:
    """Write ``data`` (on the reference scan's grid) with the reference's header geometry, atomically.

    The sform/qform codes and matrices are copied, so the output's affine, shape and
    orientation are exactly the reference's and it overlays it in any viewer.
    """
    ref = nib.load(str(reference))
    arr = np.asarray(data)
    if arr.shape[:3] != tuple(ref.shape[:3]):  # a 4th axis (classes) may follow the grid
        raise ValueError(f"data shape {arr.shape} differs from the reference grid {ref.shape[:3]}")
    hdr = ref.header.copy()
    hdr.set_data_shape(arr.shape)
    hdr.set_data_dtype(dtype)
    hdr.set_slope_inter(1.0, 0.0)
    img = nib.Nifti1Image(arr.astype(dtype), ref.affine, header=hdr)
    sform, scode = ref.header.get_sform(coded=True)
    qform, qcode = ref.header.get_qform(coded=True)
    if scode:
        img.set_sform(sform, int(scode))
    if qcode:
        img.set_qform(qform, int(qcode))
    return _save_atomic(img, path)


def _save_atomic(img: nib.Nifti1Image, path: str | Path) -> Path:
    """Save next to the destination and rename: the file appears complete or not at all."""
    suffix = ".nii.gz" if str(path).endswith(".gz") else ".nii"
    return atomic_write(path, lambda tmp: nib.save(img, tmp), suffix=suffix)
