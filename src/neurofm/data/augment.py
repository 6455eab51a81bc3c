"""Fine-tuning augmentation as nnU-Net's default training pipeline does it, with MONAI's transforms.

``augment="nnunet"`` (:class:`neurofm.data.finetune.FinetuneDataset`) adds to the mirror flips what nnU-Net v2's
trainer applies to every training patch, with its probabilities and ranges (``nnUNetTrainer.get_training_transforms``):

* rotation (each axis ±30°, probability 0.2) and isotropic scaling (0.7-1.4, probability 0.2), resampled by MONAI's
  :class:`~monai.transforms.Affine` from a larger read around the same centre, so that the patch does not show the
  corners a rotated crop would leave empty (bilinear for the image, nearest for the label); the read is as large as
  the draw needs (:meth:`NnUNetAugment.margins`), not the room any turn would;
* Gaussian noise (variance up to 0.1, probability 0.1), Gaussian blur (σ 0.5-1, probability 0.2, each channel
  with probability 0.5), brightness (×0.75-1.25, 0.15), contrast around the mean within the channel's range
  (×0.75-1.25, 0.15), simulated low resolution (zoom 0.5-1 down by nearest and back, 0.25, each channel 0.5), and
  gamma (0.7-1.5, statistics kept) on the inverted image (0.1) and on the image (0.3), per present contrast.

Elastic deformation stays off, as in nnU-Net's default. Every draw comes from the sample's own generator
(:func:`neurofm.data.loader.sample_rng`), so a sample is the same in any worker, and a resumed run sees what it
would have seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

AUGMENTS = ("none", "flips", "nnunet")


@dataclass(frozen=True)
class NnUNetAugment:
    """Probabilities and ranges (nnU-Net v2's defaults)."""

    rotate_p: float = 0.2
    rotate_deg: float = 30.0
    scale_p: float = 0.2
    scale: tuple[float, float] = (0.7, 1.4)
    noise_p: float = 0.1
    noise_var: float = 0.1
    blur_p: float = 0.2
    blur_channel_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    brightness_p: float = 0.15
    brightness: tuple[float, float] = (0.75, 1.25)
    contrast_p: float = 0.15
    contrast: tuple[float, float] = (0.75, 1.25)
    lowres_p: float = 0.25
    lowres_channel_p: float = 0.5
    lowres_zoom: tuple[float, float] = (0.5, 1.0)
    gamma_inverted_p: float = 0.1
    gamma_p: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)

    @staticmethod
    def margins(patch: int, transform: tuple[tuple[float, float, float], float]) -> tuple[int, int, int]:
        """Voxels to read beyond each side of a ``patch`` crop, per axis, so that this draw's turned and scaled
        patch (:func:`resample`) samples only what was read: the reach along an axis of the patch's corners, mapped
        by MONAI's affine, and the next voxel that linear interpolation reads. A draw near no turn and scale 1
        reads a voxel more than the crop; a cube turned any way and scaled by up to 1.4 would need
        half its diagonal, ``patch * (1.4 * sqrt(3) - 1) / 2``, which no draw within ±30° per axis reaches."""
        from monai.transforms.utils import create_rotate, create_scale

        angles, scale = transform
        a = (create_rotate(3, angles) @ create_scale(3, (scale,) * 3))[:3, :3]
        half = (patch - 1) / 2
        reach = np.abs(a).sum(axis=1) * half  # the farthest a patch corner lands from the centre, per axis
        m0, m1, m2 = (max(0, math.floor(r - half) + 1) for r in reach)  # the least m with half + m > r
        return m0, m1, m2

    def spatial(self, rng: np.random.Generator) -> tuple[tuple[float, float, float], float] | None:
        """The rotation (radians about each axis) and scale of one sample, or None when neither fires."""
        rot = rng.random() < self.rotate_p
        sc = rng.random() < self.scale_p
        if not (rot or sc):
            return None
        lim = math.radians(self.rotate_deg)
        a = rng.uniform(-lim, lim, 3) if rot else np.zeros(3)
        return (float(a[0]), float(a[1]), float(a[2])), float(rng.uniform(*self.scale)) if sc else 1.0

    def intensity(self, img: np.ndarray, present: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Noise, blur, brightness, contrast, low resolution and the two gammas (nnU-Net's order) on each present
        channel of ``img`` (C, X, Y, Z); a missing channel stays zero."""
        from monai.transforms import AdjustContrast, GaussianSmooth, Resize, ScaleIntensityFixedMean

        chans = np.flatnonzero(present)
        out = img.astype(np.float32, copy=True)
        if rng.random() < self.noise_p:
            std = math.sqrt(rng.uniform(0, self.noise_var))
            for c in chans:
                out[c] += rng.normal(0.0, std, out[c].shape).astype(np.float32)
        if rng.random() < self.blur_p:
            for c in chans:
                if rng.random() < self.blur_channel_p:
                    sigma = float(rng.uniform(*self.blur_sigma))
                    out[c] = np.asarray(GaussianSmooth(sigma)(out[c : c + 1]))[0]
        if rng.random() < self.brightness_p:
            for c in chans:
                out[c] *= np.float32(rng.uniform(*self.brightness))
        if rng.random() < self.contrast_p:
            for c in chans:
                factor = float(rng.uniform(*self.contrast)) - 1.0
                out[c] = np.asarray(ScaleIntensityFixedMean(factor, preserve_range=True)(out[c : c + 1]))[0]
        if rng.random() < self.lowres_p:
            shape = out.shape[1:]
            for c in chans:
                if rng.random() < self.lowres_channel_p:
                    small = [max(1, round(s * rng.uniform(*self.lowres_zoom))) for s in shape]
                    down = Resize(small, mode="nearest")(out[c : c + 1])
                    out[c] = np.asarray(Resize(shape, mode="trilinear")(down))[0]
        for p, invert in ((self.gamma_inverted_p, True), (self.gamma_p, False)):
            if rng.random() < p:
                for c in chans:
                    # as nnU-Net draws it: half the time below 1, half above
                    lo, hi = self.gamma
                    g = rng.uniform(lo, 1.0) if rng.random() < 0.5 and lo < 1 else rng.uniform(max(lo, 1.0), hi)
                    adjust = AdjustContrast(float(g), invert_image=invert, retain_stats=True)
                    out[c] = np.asarray(adjust(out[c : c + 1]))[0]
        return out


def widen(
    box: tuple[slice, ...], shape: tuple[int, ...], size: int | tuple[int, ...]
) -> tuple[tuple[slice, ...], list[tuple[int, int]]]:
    """The box of ``size`` (one size for every axis, or one per axis) with the same centre as ``box``, clipped to
    ``shape``, and the padding (before, after) per axis that makes what is read from it ``size`` again."""
    sizes = (size,) * len(box) if isinstance(size, int) else tuple(size)
    read, pads = [], []
    for b, s, n in zip(box, shape, sizes, strict=True):
        lo = (b.start + b.stop) // 2 - n // 2
        hi = lo + n
        read.append(slice(max(lo, 0), min(hi, s)))
        pads.append((max(-lo, 0), max(hi - s, 0)))
    return tuple(read), pads


def resample(
    img: np.ndarray, label: np.ndarray | None, transform: tuple[tuple[float, float, float], float], size: list[int]
) -> tuple[np.ndarray, np.ndarray | None]:
    """``img`` (C, X, Y, Z) and ``label`` (X, Y, Z) turned and scaled about their centre, the central ``size``
    kept (MONAI :class:`~monai.transforms.Affine`; bilinear / nearest, the border value beyond the edge)."""
    from monai.transforms import Affine

    angles, scale = transform
    affine = Affine(
        rotate_params=angles, scale_params=(scale,) * 3, spatial_size=size, padding_mode="border", image_only=True
    )
    out = np.asarray(affine(img, mode="bilinear"), dtype=np.float32)
    lab = None
    if label is not None:
        lab = np.rint(np.asarray(affine(label[None].astype(np.float32), mode="nearest"))[0]).astype(label.dtype)
    return out, lab
