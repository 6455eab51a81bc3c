from __future__ import annotations

import hashlib
from dataclasses import replace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import scipy.ndimage as ndi

from neurofm.errors import ConfigError
from neurofm.io.manifest import discover
from neurofm.io.nifti import load_scan
from neurofm.preprocess import transforms
from neurofm.synth import SynthConfig, anatomy, synthesize
from neurofm.synth.contrast import MEANS
from neurofm.synth.generator import VENTRICLE_GROWTH_MM, contrast_image, plan_subjects, render_session
from neurofm.synth.template import CSF_LABEL, T1_MEANS, WM_LABEL, cerebra_regions, load_template

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """12 subjects x 2 sessions at 2 mm, every pathology and site."""
    out = tmp_path_factory.mktemp("synth") / "bids"
    synthesize(out, SynthConfig(subjects=12, sessions=2, seed=5, resolution=2, sites=3), workers=2, progress=False)
    return out


def _digest(root):
    return {
        str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_one_seed_gives_identical_bytes(tmp_path):
    """In the calling process or in workers, whatever BLAS threads the caller runs (the renderer sets its own: a
    product split over other threads changed some voxels' last bits, until 2026-12-07)."""
    from threadpoolctl import threadpool_limits

    cfg = SynthConfig(subjects=3, sessions=1, seed=11, resolution=2)
    with threadpool_limits(limits=3, user_api="blas"):  # not the workers' count, whether they run 1 or 2
        synthesize(tmp_path / "a", cfg, workers=1, progress=False)
    synthesize(tmp_path / "b", cfg, workers=2, progress=False)
    a, b = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert len(a) > 20 and a == b
    synthesize(tmp_path / "c", SynthConfig(subjects=3, sessions=1, seed=12, resolution=2), progress=False)
    c = _digest(tmp_path / "c")
    assert sum(a[k] != c.get(k) for k in a if k.endswith(".nii.gz")) > 10


def test_bids_layout_labels_and_discovery(dataset):
    m = discover(dataset)
    assert m.source == "bids"
    sessions = m.sessions()
    assert len(sessions) == 24
    assert all(set(s.images) == {"T1w", "T1c", "T2w", "FLAIR", "PDw"} for s in sessions)
    assert all({"brain", "lesion", "dseg"} <= set(s.label_maps) for s in sessions)
    assert all(s.volumes is not None and s.volumes["total intracranial"] > 0 for s in sessions)
    part = pd.read_csv(dataset / "participants.tsv", sep="\t")
    assert set(part["diagnosis"]) == {"healthy", "tumour", "infarct", "wmh"}
    assert set(part["site"]) == {"site-0", "site-1", "site-2"}
    tum = part[part.diagnosis == "tumour"]
    assert set(tum["molecular"]) <= {"mutant", "wildtype"}
    assert (part[part.diagnosis != "tumour"]["molecular"].isna()).all()  # written as n/a
    assert (part["healthy"] == (part["diagnosis"] == "healthy")).all()
    # a mix of orientations and voxel sizes, as real data
    orient = {load_scan(p).orientation for s in sessions[:12] for p in s.images.values()}
    assert len(orient) >= 3
    zooms = {tuple(np.round(load_scan(s.images["FLAIR"]).spacing, 1)) for s in sessions}
    assert any(max(z) >= 4 for z in zooms) and any(max(z) <= 2 for z in zooms)


def test_lesion_masks_lie_inside_the_brain(dataset):
    m = discover(dataset)
    n_lesion = 0
    for s in m.sessions():
        brain = load_scan(s.label_maps["brain"], kind="label").data[0] > 0
        lesion = load_scan(s.label_maps["lesion"], kind="label").data[0] > 0
        assert not (lesion & ~brain).any()
        healthy = s.labels["diagnosis"] == "healthy"
        assert lesion.any() != healthy, s.key
        n_lesion += lesion.any()
    assert n_lesion > 0


def test_tissue_orderings_per_contrast(dataset):
    regions = cerebra_regions()
    cortex = [r.label for r in regions if r.kind == "cortex"]
    vent = [r.label for r in regions if r.kind == "ventricle"]
    for s in discover(dataset).sessions()[::5]:
        dseg = load_scan(s.label_maps["dseg"], kind="label")
        lesion = load_scan(s.label_maps["lesion"], kind="label")
        means = {}
        for c, path in s.images.items():
            img = load_scan(path)
            grid = (img.shape, img.affine)
            lab = transforms.resample(dseg.data[0], dseg.affine, grid, order=0)
            les = transforms.resample(lesion.data[0], lesion.affine, grid, order=0) > 0
            v = img.data[0]
            means[c] = {
                t: float(v[np.isin(lab, ids) & ~les].mean())
                for t, ids in (("wm", [WM_LABEL]), ("gm", cortex), ("csf", vent))
            }
        t1, t2, fl = means["T1w"], means["T2w"], means["FLAIR"]
        assert t1["wm"] > t1["gm"] > t1["csf"], (s.key, t1)
        assert t2["csf"] > t2["gm"] > t2["wm"], (s.key, t2)
        assert fl["csf"] < 0.6 * min(fl["gm"], fl["wm"]), (s.key, fl)


def test_age_correlates_with_ventricle_volume(dataset):
    vol = pd.read_csv(dataset / "derivatives/neurofm-synth/volumes.csv")
    ages = []
    for _, row in vol.iterrows():
        ses = pd.read_csv(dataset / row["subject"] / f"{row['subject']}_sessions.tsv", sep="\t")
        ages.append(float(ses.set_index("session_id").loc[row["session"], "age"]))
    vent_cols = [c for c in vol.columns if "Ventricle" in c]
    ventricles = vol[vent_cols].sum(1) / vol["total intracranial"]
    rho = pd.Series(ages).corr(pd.Series(ventricles.values), method="spearman")
    assert rho > 0.6, rho


def test_ageing_shows_in_the_image_as_larger_ventricles_and_wider_sulci_without_folding():
    """One head rendered at 25 and at 85 years: ventricles and CSF grow by adult norms, and the growth is
    visible to a model at 4 mm, as darker voxels of a T1-like image (not only in the label volumes)."""
    template = load_template(2)
    plan = plan_subjects(SynthConfig(subjects=1, sessions=1, seed=5, pathology=()), template)[0]
    vent_labels = anatomy.ventricle_labels(template)

    def measure(age):
        r = render_session(replace(plan, age=age), 0, template)
        tiv = r.brain.sum()
        vent = np.isin(r.labels, vent_labels)
        t1 = sum(f * T1_MEANS[t] for f, t in zip(r.fractions, ("csf", "gm", "wm"), strict=True))
        t1_4mm, brain_4mm = ndi.zoom(t1, 0.5, order=1), ndi.zoom(r.brain, 0.5, order=1) > 0.5
        dark = (t1_4mm[brain_4mm] < (T1_MEANS["csf"] + T1_MEANS["gm"]) / 2).mean()
        return vent.sum() / tiv, (r.fractions[0] * ~vent).sum() / tiv, dark

    (v25, csf25, dark25), (v85, csf85, dark85) = measure(25.0), measure(85.0)
    assert 0.008 < v25 < 0.02 and v85 > 2 * v25, (v25, v85)
    assert 0.10 < csf25 < 0.18 and csf85 - csf25 > 0.08, (csf25, csf85)
    assert dark85 - dark25 > 0.08, (dark25, dark85)
    # the ventricles grow by a flow along a smooth field: no tissue folds over, even past 85 years
    coords, _ = anatomy.template_coords(template, plan.anatomy, np.zeros(3), np.zeros(3), 1.2 * VENTRICLE_GROWTH_MM, [])
    jac = np.stack([np.stack(np.gradient(c)) for c in coords])
    det = np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))
    assert det[template.brain > 0.5].min() > 0


def test_a_healthy_t1c_shows_normal_enhancement_that_a_t1w_lacks():
    """Without a lesion, T1c differs from T1w where gadolinium stays in the vessels: the venous sinuses,
    the cortical veins and the choroid plexus of the lateral ventricles come out brighter than white
    matter; the brain elsewhere keeps its T1w tissue contrast."""
    template = load_template(2)
    plan = plan_subjects(SynthConfig(subjects=1, sessions=1, seed=5, pathology=()), template)[0]
    r = render_session(plan, 0, template)
    t1w = contrast_image(r, "T1w", MEANS["T1w"], plan)
    t1c = contrast_image(r, "T1c", MEANS["T1w"], plan)  # the same tissue means: only the enhancement differs
    strong = r.vessels > 0.55
    plain = (r.vessels == 0) & (r.brain > 0.999)  # outside the brain T1c also mixes the head's T1 a little brighter
    assert np.allclose(t1c[plain], t1w[plain], atol=1e-3)
    assert (t1c[strong] > MEANS["T1w"]["wm"]).mean() > 0.9 and (t1w[strong] < MEANS["T1w"]["wm"]).mean() > 0.8
    lateral = [r_.label for r_ in template.regions if r_.name.endswith(" Lateral Ventricle")]
    choroid = np.isin(r.labels, lateral) & (r.vessels > 0)
    assert choroid.sum() > 20 and t1c[choroid].mean() > t1w[choroid].mean() + 0.4
    assert 0.005 < (r.vessels[r.brain > 0.5] > 0.25).mean() < 0.1  # a few per cent of the brain, not all of it


def test_sessions_of_a_subject_share_anatomy(dataset):
    vol = pd.read_csv(dataset / "derivatives/neurofm-synth/volumes.csv")
    regions = [r.name for r in cerebra_regions() if r.kind in ("cortex", "subcortical")]
    norm = vol[regions].div(vol["total intracranial"], axis=0)
    norm.index = pd.MultiIndex.from_frame(vol[["subject", "session"]])
    subjects = sorted(vol["subject"].unique())
    within = [np.linalg.norm(norm.loc[(s, "ses-1")] - norm.loc[(s, "ses-2")]) for s in subjects]
    across = [
        np.linalg.norm(norm.loc[(a, "ses-1")] - norm.loc[(b, "ses-1")]) for a in subjects for b in subjects if a < b
    ]
    assert np.median(within) < 0.5 * np.median(across)
    icv = vol.pivot(index="subject", columns="session", values="total intracranial")
    assert ((icv["ses-1"] - icv["ses-2"]).abs() / icv["ses-1"]).max() < 0.02


def test_template_fields_are_consistent():
    t = load_template(2)
    assert t.fractions.shape == (3, *t.shape)
    inside = t.brain > 0.99
    np.testing.assert_allclose(t.fractions[:, inside].sum(0), 1.0, atol=1e-4)
    assert set(np.unique(t.labels)) >= {0, WM_LABEL, CSF_LABEL}
    assert len(cerebra_regions()) == 102


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="pathology"):
        SynthConfig(pathology=("glioma",))
    with pytest.raises(ConfigError, match="resolution"):
        SynthConfig(resolution=3)
    with pytest.raises(ConfigError, match="T1w"):
        SynthConfig(contrasts=("T2w",))


def test_cli_synth_with_montage(tmp_path, run_cli):
    code, _, err = run_cli(
        "synth",
        tmp_path / "d",
        "--subjects",
        "2",
        "--pathology",
        "tumour",
        "--healthy-fraction",
        "0.5",
        "--montage",
        tmp_path / "m.png",
        "--no-progress",
    )
    assert code == 0, err
    assert (tmp_path / "m.png").stat().st_size > 10_000
    assert len(list((tmp_path / "d").glob("sub-*/ses-1/anat/*.nii.gz"))) == 10


def test_first_subject_renames_only(tmp_path, run_cli):
    """A pool numbered from 1001 has the same images as one numbered from 1, under names no demo subject has."""
    args = ["--subjects", "2", "--seed", "9", "--pathology", "", "--no-progress"]
    assert run_cli("synth", tmp_path / "a", *args)[0] == 0
    code, _, err = run_cli("synth", tmp_path / "b", *args, "--first-subject", "1001")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "b").glob("sub-*")) == ["sub-1001", "sub-1002"]
    for i in (1, 2):
        a = nib.load(tmp_path / "a" / f"sub-00{i}" / "ses-1" / "anat" / f"sub-00{i}_ses-1_T1w.nii.gz")
        b = nib.load(tmp_path / "b" / f"sub-100{i}" / "ses-1" / "anat" / f"sub-100{i}_ses-1_T1w.nii.gz")
        assert np.array_equal(a.get_fdata(), b.get_fdata()) and np.array_equal(a.affine, b.affine)
    code, _, err = run_cli("synth", tmp_path / "c", "--first-subject", "-1", "--no-progress")
    assert code != 0 and "first_subject" in err and "Traceback" not in err
