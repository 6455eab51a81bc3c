"""neurofm's own tissue segmentation: regional volumes when a dataset brings none.

ssl3d anchors its anatomy channels to a subject's regional-volume vector. The preferred
sources are a SynthSeg / FastSurfer ``volumes.csv`` or a ``dseg`` label map; for a dataset
that has neither, ``prepare`` falls back to this module, which needs a brain mask (or
skull-stripped scans):

1. a three-class Gaussian mixture (scikit-learn) on the intensities of one contrast inside
   the brain — T1w / T1c order the classes CSF < GM < WM, T2w / PDw the reverse (FLAIR,
   whose GM/WM contrast is weak and whose lesions are bright, is not used);
2. each voxel goes to its most probable class, and volumes are counted per class in each
   octant of the brain around its centre of mass (left/right x anterior/posterior x
   superior/inferior, in RAS), so the vector carries asymmetry and regional atrophy too;
3. the brain mask's volume is the intracranial volume that the vector is normalised by.

That gives 24 regions + ICV: coarser than SynthSeg's 101 regions, but it follows head
size, atrophy (CSF up, GM down) and lesions well enough to anchor the anatomy channels.
"""

from __future__ import annotations

import numpy as np

TISSUE_CONTRASTS = {"T1w": "ascending", "T1c": "ascending", "T2w": "descending", "PDw": "descending"}
CLASSES = ("CSF", "GM", "WM")
ICV_KEY = "intracranial volume"
MAX_FIT_VOXELS = 50_000  # a 1-D mixture of three is well determined by far fewer


def choose_contrast(available: list[str] | tuple[str, ...]) -> str | None:
    """The contrast to segment: the first of T1w, T1c, T2w, PDw present, else None."""
    return next((c for c in TISSUE_CONTRASTS if c in available), None)


def tissue_classes(image: np.ndarray, brain: np.ndarray, contrast: str, seed: int = 0) -> np.ndarray:
    """Per-voxel class (0 background, 1 CSF, 2 GM, 3 WM) inside ``brain`` from one contrast's intensities."""
    from sklearn.mixture import GaussianMixture

    if contrast not in TISSUE_CONTRASTS:
        raise ValueError(f"tissue classes need one of {list(TISSUE_CONTRASTS)}, got {contrast!r}")
    brain = np.asarray(brain, bool)
    if image.shape != brain.shape:
        raise ValueError(f"image {image.shape} and brain mask {brain.shape} differ in shape")
    values = image[brain].astype(np.float64)
    out = np.zeros(image.shape, np.uint8)
    if values.size < 30 or not np.isfinite(values).all() or values.std() == 0:
        return out
    rng = np.random.default_rng(seed)
    fit = values if values.size <= MAX_FIT_VOXELS else rng.choice(values, MAX_FIT_VOXELS, replace=False)
    start = np.percentile(fit, [15, 50, 85]).reshape(-1, 1)
    gmm = GaussianMixture(3, covariance_type="full", means_init=start, random_state=seed, max_iter=200)
    gmm.fit(fit.reshape(-1, 1))
    by_mean = np.argsort(gmm.means_.ravel())  # component indices, darkest first
    if TISSUE_CONTRASTS[contrast] == "descending":
        by_mean = by_mean[::-1]
    rank = np.empty(3, np.uint8)
    rank[by_mean] = np.arange(1, 4, dtype=np.uint8)  # component -> 1 CSF, 2 GM, 3 WM
    out[brain] = rank[gmm.predict(values.reshape(-1, 1))]
    return out


def octant_names() -> list[str]:
    return [
        f"{lr} {ap} {si}"
        for lr in ("left", "right")
        for ap in ("posterior", "anterior")
        for si in ("inferior", "superior")
    ]


def tissue_volumes(
    image: np.ndarray, brain: np.ndarray, affine: np.ndarray, contrast: str, seed: int = 0
) -> dict[str, float] | None:
    """Volumes (mm^3) of CSF / GM / WM per brain octant plus the intracranial volume, for an RAS image.

    Returns None when the brain mask is empty.
    """
    brain = np.asarray(brain, bool)
    if not brain.any():
        return None
    classes = tissue_classes(image, brain, contrast, seed=seed)
    voxel = float(abs(np.linalg.det(np.asarray(affine)[:3, :3])))
    centre = np.array(np.nonzero(brain)).mean(1)
    # octant index: bit 2 right (x up in RAS), bit 1 anterior (y), bit 0 superior (z)
    grids = np.indices(brain.shape, sparse=True)
    octant = sum((grids[a] >= centre[a]).astype(np.uint8) << (2 - a) for a in range(3))
    counts = np.bincount((octant * 4 + classes).ravel(), minlength=32).reshape(8, 4)
    out = {ICV_KEY: float(brain.sum()) * voxel}
    for k, name in enumerate(octant_names()):
        for c, tissue in enumerate(CLASSES, start=1):
            out[f"{name} {tissue}"] = float(counts[k, c]) * voxel
    return out
