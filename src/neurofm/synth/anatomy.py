"""Subject anatomy: smooth deformation, head size, pose, ageing, and lesions.

Everything is a function of template coordinates, so that one subject's sessions share
their anatomy exactly and differ only by pose, age-related change and acquisition.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.ndimage as ndi

from neurofm.synth.template import CSF_LABEL, WM_LABEL, Template

COARSE = 4  # the warp is computed on every 4th voxel and interpolated: it is smooth by construction


def rotation(angles_deg: np.ndarray) -> np.ndarray:
    """Rotation matrix from three angles (degrees) about x, y, z."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass
class Lesion:
    """One lesion in template world coordinates (mm).

    kind: ``tumour``, ``infarct`` or ``wmh``.
    """

    kind: str
    center: np.ndarray  # (3,) mm
    radius: float  # mm
    shape_dirs: np.ndarray  # (4, 3) unit vectors: lobulation directions
    shape_amps: np.ndarray  # (4,) lobulation amplitudes
    growth: float = 0.0  # relative radius growth per year (tumours)
    core: float = 0.45  # necrotic core radius, fraction of the radius (tumours)
    oedema: float = 1.9  # oedema extent, multiple of the radius (tumours)
    mass_effect: float = 0.0  # mm of outward push at the tumour's edge


@dataclass
class AnatomyPlan:
    """Random draws that fix a subject's anatomy (shared by all its sessions)."""

    scale: np.ndarray  # (3,) head size per axis
    rotation_deg: np.ndarray  # (3,) orientation of the head within the template
    control: np.ndarray  # (3, cx, cy, cz) control-point displacements (mm)
    lesions: list[Lesion] = field(default_factory=list)


def coarse_grid(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(int(np.ceil(s / COARSE)) + 1 for s in shape)  # type: ignore[return-value]


def draw_anatomy(rng: np.random.Generator, template: Template, sex: str, deformation_mm: float = 2.5) -> AnatomyPlan:
    """Head size (larger on average for males), orientation and a smooth random deformation."""
    base = 1.0 if sex == "F" else 1.05
    scale = base * rng.normal(1.0, 0.035, 3).clip(0.9, 1.1) * 0.93  # MNI brains are ~7 % larger than average
    ctrl_shape = (3, 6, 7, 6)  # control points ~35 mm apart over the head
    return AnatomyPlan(
        scale=scale,
        rotation_deg=rng.normal(0, 3.0, 3),
        control=rng.normal(0, deformation_mm, ctrl_shape),
    )


def _ventricle_pull(template: Template) -> tuple[np.ndarray, ...]:
    """A unit-max vector field (3 arrays on the template grid) pointing into the ventricles.

    Sampling along it enlarges the ventricles: the backbone of age-related atrophy.
    """
    if "pull" in template.cache:
        return template.cache["pull"]
    vent = np.isin(template.labels, ventricle_labels(template)).astype(np.float32)
    smooth = ndi.gaussian_filter(vent, 6.0 / template.spacing)
    grads = np.gradient(smooth)
    mag = np.sqrt(sum(g**2 for g in grads)).max()
    template.cache["pull"] = tuple((g / max(mag, 1e-8)).astype(np.float32) for g in grads)
    return template.cache["pull"]


def enhancing_vessels(template: Template) -> np.ndarray:
    """The share of each template voxel that normal enhancing structures fill on a contrast-enhanced T1.

    Gadolinium stays in the vessels where the blood-brain barrier holds, so a normal T1c shows bright
    venous sinuses, cortical veins and choroid plexus where a T1w shows dark CSF, dura or grey fluid.
    Placed on the MNI-aligned template (x = 0 is the midline, y grows forward, z upward):

    * choroid plexus: the back 40 % of each lateral ventricle (the atrium, where its glomus lies), 0.6;
    * superior sagittal sinus: outside the brain, 1-7 mm from it, within 5 mm of the midline, above
      z = 0, 0.8; transverse sinuses: 1-6 mm outside the brain, behind y = -65 mm, at the level of the
      tentorium (z from -25 to -5 mm), 10-55 mm from the midline, 0.8;
    * cortical veins: a fixed sparse pattern (a fifth of the voxels) in the CSF of the sulci and within
      3 mm outside the brain, 0.5.

    Sampled through each subject's deformation like every other template field (cached).
    """
    if "vessels" in template.cache:
        return template.cache["vessels"]
    ijk = np.indices(template.shape, dtype=np.float32)
    x, y, z = (np.tensordot(template.affine[a, :3], ijk, axes=1) + template.affine[a, 3] for a in range(3))
    brain = template.brain > 0.5
    outside_mm = ndi.distance_transform_edt(~brain) * template.spacing
    out = np.zeros(template.shape, np.float32)
    lateral = [r.label for r in template.regions if r.kind == "ventricle" and r.name.endswith(" Lateral Ventricle")]
    for lab in lateral:
        v = template.labels == lab
        if v.any():
            back = y <= np.quantile(y[v], 0.4)
            out[v & back] = 0.6
    ring = (outside_mm >= 1) & (outside_mm <= 7)
    out[ring & (np.abs(x) <= 5) & (z > 0)] = 0.8
    out[
        (outside_mm >= 1) & (outside_mm <= 6) & (y < -65) & (z > -25) & (z < -5) & (np.abs(x) > 10) & (np.abs(x) < 55)
    ] = 0.8
    noise = ndi.gaussian_filter(np.random.default_rng(2009).standard_normal(template.shape), 1.0)
    sulci = (template.labels == CSF_LABEL) | (~brain & (outside_mm <= 3))
    veins = sulci & (noise > np.quantile(noise[sulci], 0.8)) if sulci.any() else sulci
    out[veins] = np.maximum(out[veins], 0.5)
    template.cache["vessels"] = out
    return out


def ventricle_labels(template: Template) -> list[int]:
    return [r.label for r in template.regions if r.kind == "ventricle"]


def cortex_labels(template: Template) -> list[int]:
    return [r.label for r in template.regions if r.kind == "cortex"]


def template_coords(
    template: Template,
    plan: AnatomyPlan,
    pose_rot_deg: np.ndarray,
    pose_shift_mm: np.ndarray,
    atrophy: float,
    lesions: list[tuple[Lesion, float]],
) -> tuple[np.ndarray, np.ndarray]:
    """For every voxel of the output grid, where to sample the template.

    The output grid is the template grid; a voxel's world position ``x`` is mapped to
    subject coordinates (session pose removed), then to template coordinates (head size
    and orientation removed, smooth deformation and ventricle-driven atrophy added, and
    the tumour's mass effect). Computed on a coarse grid and interpolated.

    Returns:
        ``(tissue, lesion)`` coordinates, each ``(3, X, Y, Z)`` in template voxel units:
        tissue is sampled with the mass effect, lesions are evaluated without it.
    """
    shape = template.shape
    cshape = coarse_grid(shape)
    idx = np.stack(np.meshgrid(*[np.arange(c) * COARSE for c in cshape], indexing="ij")).reshape(3, -1).astype(float)
    world = template.affine[:3, :3] @ idx + template.affine[:3, 3:4]
    center = template.affine[:3, :3] @ (np.array(shape)[:, None] / 2.0) + template.affine[:3, 3:4]
    # session pose: the head sits differently in the scanner at every visit
    pose = rotation(pose_rot_deg)
    subj = pose.T @ (world - center - pose_shift_mm[:, None]) + center
    # subject anatomy: head size and orientation, then the smooth deformation
    head = rotation(plan.rotation_deg)
    tmpl = (head.T @ (subj - center)) / plan.scale[:, None] + center
    disp = np.stack([ndi.zoom(c, np.array(cshape) / np.array(c.shape), order=3, mode="nearest") for c in plan.control])
    tmpl = tmpl + disp.reshape(3, -1)
    inv = np.linalg.inv(template.affine)
    vox = inv[:3, :3] @ tmpl + inv[:3, 3:4]
    if atrophy > 0:
        pull = _ventricle_pull(template)
        # displacement toward the ventricles, up to `atrophy` mm at the ventricle walls, taken as a flow along
        # the field in steps of half a voxel: one step of several voxels would fold the tissue around them
        steps = max(1, int(np.ceil(2 * atrophy / template.spacing)))
        for _ in range(steps):
            vox = vox + np.stack([ndi.map_coordinates(g, vox, order=1, mode="nearest") for g in pull]) * (
                atrophy / template.spacing / steps
            )
    lesion_vox = vox
    for les, radius in lesions:
        if les.mass_effect <= 0:
            continue
        c = inv[:3, :3] @ les.center + inv[:3, 3]
        d = vox - c[:, None]
        r = np.sqrt((d**2).sum(0)) * template.spacing
        # tissue near the tumour comes from closer to its centre: it appears pushed outward
        push = les.mass_effect * np.exp(-((r / (1.5 * radius)) ** 2)) / np.maximum(r, 1e-3)
        vox = vox - d * np.clip(push, 0, 0.9)[None]  # a new array: lesion_vox keeps the unpushed one

    tissue = _upsample(vox.reshape(3, *cshape), shape)
    lesion = tissue if lesion_vox is vox else _upsample(lesion_vox.reshape(3, *cshape), shape)
    return tissue, lesion


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Linear interpolation weights from coarse samples at 0, COARSE, 2*COARSE, ... to every voxel."""
    pos = np.arange(n_out) / COARSE
    lo = np.clip(np.floor(pos).astype(int), 0, n_in - 2)
    w = pos - lo
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), lo] = 1 - w
    m[np.arange(n_out), lo + 1] = w
    return m


def _upsample(coarse: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """(3, cx, cy, cz) -> (3, X, Y, Z), separably (three small matrix products)."""
    mx, my, mz = (_interp_matrix(s, c) for s, c in zip(shape, coarse.shape[1:], strict=True))
    a = np.einsum("xi,cijk->cxjk", mx, coarse.astype(np.float32))
    a = np.einsum("yj,cxjk->cxyk", my, a)
    return np.einsum("zk,cxyk->cxyz", mz, a, optimize=True)


def lesion_field(les: Lesion, coords_mm: np.ndarray, radius: float) -> np.ndarray:
    """Normalised distance ``d / R(direction)`` from the lesion centre (1 at its edge)."""
    d = coords_mm - les.center.reshape(3, *([1] * (coords_mm.ndim - 1)))
    r = np.sqrt((d**2).sum(0))
    u = d / np.maximum(r, 1e-6)
    lob = 1.0 + sum(
        a * np.tensordot(v, u, axes=(0, 0)) ** 2 for v, a in zip(les.shape_dirs, les.shape_amps, strict=True)
    )
    return r / (radius * lob)


def candidate_centers(template: Template, kind: str) -> np.ndarray:
    """Template voxel indices where a lesion of this kind may be centred."""
    key = f"candidates-{kind}"
    if key not in template.cache:
        template.cache[key] = _candidates(template, kind)
    return template.cache[key]


def _candidates(template: Template, kind: str) -> np.ndarray:
    depth = ndi.distance_transform_edt(template.brain > 0.5) * template.spacing
    wm = template.labels == WM_LABEL
    vent = np.isin(template.labels, ventricle_labels(template))
    if kind == "tumour":
        ok = wm & (depth > 22)
    elif kind == "infarct":
        ok = np.isin(template.labels, cortex_labels(template)) & (depth > 4) & (depth < 12)
    elif kind == "wmh":
        near_vent = ndi.distance_transform_edt(~vent) * template.spacing < 12
        ok = wm & (depth > 10) & near_vent
    else:
        raise ValueError(f"unknown lesion kind {kind!r}")
    return np.argwhere(ok)[:: 7 if template.spacing == 1 else 1]


def draw_lesions(rng: np.random.Generator, template: Template, kind: str, age: float) -> list[Lesion]:
    """Lesions of one kind, with sizes and counts that look like the pathology."""
    cands = candidate_centers(template, kind)

    def at(i: int) -> np.ndarray:
        v = cands[i]
        return template.affine[:3, :3] @ v + template.affine[:3, 3]

    def dirs(n: int) -> np.ndarray:
        v = rng.normal(size=(n, 3))
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    if kind == "tumour":
        radius = float(rng.uniform(9, 18))
        return [
            Lesion(
                "tumour",
                at(int(rng.integers(len(cands)))),
                radius,
                dirs(4),
                rng.uniform(0, 0.35, 4),
                growth=float(rng.uniform(0.05, 0.25)),
                core=float(rng.uniform(0.3, 0.6)),
                oedema=float(rng.uniform(1.6, 2.4)),
                mass_effect=0.35 * radius,
            )
        ]
    if kind == "infarct":
        return [
            Lesion(
                "infarct",
                at(int(rng.integers(len(cands)))),
                float(rng.uniform(8, 18)),
                dirs(4),
                rng.uniform(0.1, 0.6, 4),
            )
        ]
    if kind == "wmh":
        n = int(rng.integers(4, 10) + max(0.0, age - 50) / 4)
        return [
            Lesion(
                "wmh",
                at(int(rng.integers(len(cands)))),
                float(rng.uniform(2.0, 5.0)),
                dirs(4),
                rng.uniform(0.0, 0.8, 4),
            )
            for _ in range(n)
        ]
    raise ValueError(f"unknown lesion kind {kind!r}")
