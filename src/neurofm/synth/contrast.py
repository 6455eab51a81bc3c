"""Tissue-based intensity models, scanner sites, and acquisition (bias, resolution, noise, orientation)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nibabel import orientations as ornt

from neurofm.preprocess import transforms

CONTRASTS = ("T1w", "T1c", "T2w", "FLAIR", "PDw")
TISSUES = ("csf", "gm", "wm", "necrosis", "enhancing", "oedema", "infarct", "wmh")

#: Mean intensity of each tissue per contrast (relative units). Orderings follow clinical
#: appearance: WM > GM > CSF on T1w, reversed on T2w, CSF dark on FLAIR, enhancing
#: tumour rim bright only on T1c, oedema / infarct / WMH bright on T2w and FLAIR.
MEANS: dict[str, dict[str, float]] = {
    "T1w": {
        "csf": 0.30,
        "gm": 0.62,
        "wm": 0.88,
        "necrosis": 0.28,
        "enhancing": 0.58,
        "oedema": 0.52,
        "infarct": 0.40,
        "wmh": 0.70,
    },
    "T1c": {
        "csf": 0.32,
        "gm": 0.64,
        "wm": 0.88,
        "necrosis": 0.28,
        "enhancing": 0.60,
        "oedema": 0.54,
        "infarct": 0.44,
        "wmh": 0.70,
    },
    "T2w": {
        "csf": 1.00,
        "gm": 0.62,
        "wm": 0.46,
        "necrosis": 0.95,
        "enhancing": 0.70,
        "oedema": 0.86,
        "infarct": 0.90,
        "wmh": 0.80,
    },
    "FLAIR": {
        "csf": 0.10,
        "gm": 0.72,
        "wm": 0.55,
        "necrosis": 0.50,
        "enhancing": 0.82,
        "oedema": 0.96,
        "infarct": 0.92,
        "wmh": 0.95,
    },
    "PDw": {
        "csf": 0.90,
        "gm": 0.82,
        "wm": 0.68,
        "necrosis": 0.90,
        "enhancing": 0.80,
        "oedema": 0.88,
        "infarct": 0.88,
        "wmh": 0.85,
    },
}
#: Outside the brain (scalp, fat, skull, eyes) the template's own T1/T2 are mixed per contrast.
NONBRAIN = {
    "T1w": (1.0, 0.0),
    "T1c": (1.08, 0.0),
    "T2w": (0.25, 0.75),
    "FLAIR": (0.55, 0.35),
    "PDw": (0.5, 0.45),
}


@dataclass(frozen=True)
class Site:
    """A scanner/protocol: gains, noise, bias, voxel sizes and stored orientation per contrast."""

    index: int
    gain: float  # scanner units for a relative intensity of 1
    noise: float  # Rician noise sigma, relative to WM
    bias: float  # bias field strength (log amplitude)
    jitter: float  # per-site perturbation of the tissue means
    voxel: dict[str, tuple[float, float, float]]  # mm per contrast, along R, A, S
    orientation: dict[str, str]  # axis codes the file is stored in, per contrast


_SITE_TABLE = [
    # isotropic research protocol, stored RAS
    dict(gain=1000, noise=0.02, bias=0.10, voxel={}, orientation={}),
    # clinical: sagittal 3D T1 (stored PIR), thick axial T2/FLAIR/PD, LPS (DICOM convention)
    dict(
        gain=620,
        noise=0.035,
        bias=0.25,
        voxel={"T2w": (0.9, 0.9, 3.0), "FLAIR": (0.9, 0.9, 4.0), "PDw": (0.9, 0.9, 3.0)},
        orientation={"T1w": "PIR", "T1c": "PIR", "T2w": "LPS", "FLAIR": "LPS", "PDw": "LPS"},
    ),
    # older scanner: 1.2 mm, 5 mm FLAIR, LAS (radiological)
    dict(
        gain=1800,
        noise=0.05,
        bias=0.35,
        voxel={
            "T1w": (1.2, 1.2, 1.2),
            "T1c": (1.2, 1.2, 1.2),
            "T2w": (1.0, 1.0, 4.0),
            "FLAIR": (1.0, 1.0, 5.0),
            "PDw": (1.0, 1.0, 4.0),
        },
        orientation={c: "LAS" for c in CONTRASTS},
    ),
]


def make_site(index: int, seed: int) -> Site:
    """Sites 0-2 are fixed archetypes; later ones are drawn from the seed."""
    rng = np.random.default_rng([seed, 7919, index])
    if index < len(_SITE_TABLE):
        d = _SITE_TABLE[index]
        jitter = 0.03 * index
    else:
        thick = float(rng.choice([1.0, 3.0, 4.0, 5.0]))
        d = dict(
            gain=float(rng.uniform(400, 2500)),
            noise=float(rng.uniform(0.015, 0.06)),
            bias=float(rng.uniform(0.05, 0.4)),
            voxel={c: (1.0, 1.0, thick) for c in ("T2w", "FLAIR", "PDw")},
            orientation={c: str(rng.choice(["RAS", "LPS", "LAS", "PIR", "ASL"])) for c in CONTRASTS},
        )
        jitter = float(rng.uniform(0.02, 0.08))
    return Site(
        index=index,
        gain=d["gain"],
        noise=d["noise"],
        bias=d["bias"],
        jitter=jitter,
        voxel={c: d["voxel"].get(c, (1.0, 1.0, 1.0)) for c in CONTRASTS},
        orientation={c: d["orientation"].get(c, "RAS") for c in CONTRASTS},
    )


def tissue_means(contrast: str, site: Site, rng: np.random.Generator, subject_jitter: float = 0.03) -> dict[str, float]:
    """The means of :data:`MEANS` perturbed per site and per subject (orderings are kept)."""
    site_rng = np.random.default_rng([site.index, 31, CONTRASTS.index(contrast)])
    out = {}
    for t, m in MEANS[contrast].items():
        f = 1.0 + site.jitter * site_rng.normal() + subject_jitter * rng.normal()
        out[t] = m * float(np.clip(f, 0.85, 1.15))
    return out


def bias_field(shape: tuple[int, int, int], strength: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth multiplicative field: exp of a random 2nd-order polynomial in x, y, z."""
    axes = [np.linspace(-1, 1, s, dtype=np.float32) for s in shape]
    field = np.zeros(shape, np.float32)
    for i in range(3):
        for j in range(3 - i):
            for k in range(3 - i - j):
                if i + j + k == 0:
                    continue
                c = strength * rng.normal() / (i + j + k)
                field += (
                    c * (axes[0][:, None, None] ** i) * (axes[1][None, :, None] ** j) * (axes[2][None, None, :] ** k)
                )
    return np.exp(field)


def acquisition_grid(work_shape, work_affine, voxel_mm) -> transforms.Grid:
    """The grid a scan is acquired on: the work grid's field of view at the protocol's voxel size."""
    return transforms.target_grid(work_shape, work_affine, voxel_mm)


def acquire(
    image: np.ndarray, work_affine: np.ndarray, grid: transforms.Grid, noise_sigma: float, rng: np.random.Generator
) -> np.ndarray:
    """Partial-volume blur and resampling to the acquisition grid, then Rician noise."""
    data = transforms.resample(image, work_affine, grid, order=1)
    if noise_sigma > 0:
        re = data + rng.normal(0, noise_sigma, data.shape).astype(np.float32)
        im = rng.normal(0, noise_sigma, data.shape).astype(np.float32)
        data = np.sqrt(re**2 + im**2)
    return data


def to_orientation(data: np.ndarray, affine: np.ndarray, codes: str) -> tuple[np.ndarray, np.ndarray]:
    """Store an RAS array in another axis order/direction (same world positions)."""
    if codes == "RAS":
        return data, affine
    tr = ornt.ornt_transform(ornt.axcodes2ornt("RAS"), ornt.axcodes2ornt(tuple(codes)))
    out = ornt.apply_orientation(data, tr)
    return np.ascontiguousarray(out), affine @ ornt.inv_ornt_aff(tr, data.shape)
