from __future__ import annotations

import numpy as np
import pytest

from neurofm.preprocess.tissue import (
    CLASSES,
    ICV_KEY,
    choose_contrast,
    octant_names,
    tissue_classes,
    tissue_volumes,
)


def phantom(seed: int = 0, shape=(40, 40, 40)):
    """Concentric WM core, GM shell, CSF shell; T1-like intensities with noise; truth per class."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(float)
    r = np.sqrt(((grid - (np.array(shape)[:, None, None, None] - 1) / 2) ** 2).sum(0))
    truth = np.zeros(shape, np.uint8)
    truth[r < 16] = 1  # CSF
    truth[r < 13] = 2  # GM
    truth[r < 9] = 3  # WM
    level = np.array([0.0, 0.2, 0.6, 1.0])[truth]
    t1 = level + rng.normal(0, 0.05, shape)
    return t1, truth


def test_phantom_classes_and_volumes_known_answer():
    t1, truth = phantom()
    brain = truth > 0
    assert (tissue_classes(t1, brain, "T1w") == truth).mean() > 0.99
    # T2-like: the same tissues with the intensity order reversed give the same classes
    assert (tissue_classes(-t1, brain, "T2w") == truth).mean() > 0.99
    spacing = np.diag([1.5, 1.5, 2.0, 1.0])
    vol = tissue_volumes(t1, brain, spacing, "T1w")
    voxel = 1.5 * 1.5 * 2.0
    assert vol[ICV_KEY] == pytest.approx(brain.sum() * voxel)
    for c, tissue in enumerate(CLASSES, start=1):
        total = sum(v for k, v in vol.items() if k.endswith(" " + tissue))
        assert total == pytest.approx((truth == c).sum() * voxel, rel=0.02), tissue
    assert set(vol) == {ICV_KEY} | {f"{o} {t}" for o in octant_names() for t in CLASSES}
    # a symmetric phantom has (nearly) the same WM in every octant
    wm = np.array([vol[f"{o} WM"] for o in octant_names()])
    assert wm.std() / wm.mean() < 0.15


def test_octants_follow_ras_axes():
    # WM turned into GM on the right (x high in RAS) and at the back (y low): those octants lose WM
    t1, truth = phantom()
    brain = truth > 0
    t1[22:][truth[22:] == 3] = 0.6
    t1[:, :17][truth[:, :17] == 3] = 0.6
    vol = tissue_volumes(t1, brain, np.eye(4), "T1w")

    def wm(side: str) -> float:
        return sum(v for k, v in vol.items() if k.endswith(" WM") and side in k.split())

    assert wm("right") < 0.6 * wm("left")
    assert wm("posterior") < 0.6 * wm("anterior")
    assert wm("superior") == pytest.approx(wm("inferior"), rel=0.1)


def test_bad_inputs():
    t1, truth = phantom()
    assert tissue_volumes(t1, np.zeros_like(truth), np.eye(4), "T1w") is None
    with pytest.raises(ValueError, match="FLAIR"):
        tissue_classes(t1, truth > 0, "FLAIR")
    with pytest.raises(ValueError, match="shape"):
        tissue_classes(t1, (truth > 0)[:-1], "T1w")
    flat = tissue_classes(np.ones_like(t1), truth > 0, "T1w")  # no contrast: nothing to classify
    assert not flat.any()
    assert choose_contrast(["FLAIR", "T2w", "T1c"]) == "T1c"
    assert choose_contrast(["FLAIR"]) is None


def test_synthetic_anatomy_tissues_are_found(tiny_store):
    # neurofm synth renders CerebrA-labelled cerebral WM (103) and CSF (104) from tissue fractions
    from neurofm.store import Store
    from neurofm.synth.template import CSF_LABEL, WM_LABEL

    store = Store(tiny_store)
    key = next(k for k in store.keys if {"T1w", "T2w"} <= set(store.record(k)["images"]))
    brain = store.read(key, "brain") > 0
    dseg = store.read(key, "dseg")
    for contrast in ("T1w", "T2w"):
        cls = tissue_classes(store.read(key, contrast), brain, contrast)
        assert (cls[(dseg == WM_LABEL) & brain] == 3).mean() > 0.7, contrast
        assert (cls[(dseg == CSF_LABEL) & brain] == 1).mean() > 0.6, contrast


def test_prepare_falls_back_to_tissue_volumes_that_ssl3d_can_use(tmp_path):
    # a dataset with brain masks but neither a volumes.csv nor dseg label maps
    from neurofm.data.config import DataConfig
    from neurofm.data.pretrain import DataNeeds, build_index
    from neurofm.preprocess import PrepareConfig, prepare
    from neurofm.store import Store
    from neurofm.synth import SynthConfig, synthesize

    bids = tmp_path / "bids"
    synthesize(bids, SynthConfig(subjects=2, sessions=1, seed=3, resolution=2, pathology=()), workers=1, progress=False)
    removed = [f for f in (bids / "derivatives").rglob("*") if "dseg" in f.name or f.name == "volumes.csv"]
    assert removed
    for f in removed:
        f.unlink()
    prepare(bids, tmp_path / "store", PrepareConfig(spacing=3.0), workers=1, progress=False)
    store = Store(tmp_path / "store")
    for key in store.keys:
        rec = store.record(key)
        assert rec["volume_source"] == "tissue:T1w"
        vol = rec["volumes"]
        tissue = sum(v for k, v in vol.items() if k != ICV_KEY)
        assert tissue == pytest.approx(vol[ICV_KEY])  # every brain voxel gets one class
        assert 0.7e6 < vol[ICV_KEY] < 2.5e6  # an adult brain, in mm^3
    extra: dict = {}
    idx = build_index(store, DataConfig(mode="scan"), extra, DataNeeds(volumes=True))
    assert idx.has_volumes.all() and len(extra["regions"]) == 24


def test_skull_stripped_scans_get_a_derived_brain_mask_and_tissue_volumes(tmp_path):
    import nibabel as nib

    from neurofm.preprocess import PrepareConfig, prepare
    from neurofm.store import Store
    from neurofm.synth import SynthConfig, synthesize

    bids = tmp_path / "bids"
    synthesize(bids, SynthConfig(subjects=1, sessions=1, seed=4, resolution=2, pathology=()), workers=1, progress=False)
    anat = next((bids / "sub-001").rglob("anat"))
    mask_file = next((bids / "derivatives").rglob("*desc-brain_mask.nii.gz"))
    mask = nib.load(mask_file)
    true_icv = float(np.asarray(mask.dataobj).astype(bool).sum() * abs(np.linalg.det(mask.affine[:3, :3])))
    # brain-extract the T1w (on the mask's grid), keep only it, and drop every derivative
    t1_file = next(f for f in anat.iterdir() if f.name.endswith("_T1w.nii.gz") and "ce-" not in f.name)
    t1 = nib.load(t1_file)
    assert np.allclose(t1.affine, mask.affine) and t1.shape == mask.shape
    stripped = np.asarray(t1.dataobj, np.float32) * (np.asarray(mask.dataobj) > 0)
    for f in anat.iterdir():
        f.unlink()
    nib.save(nib.Nifti1Image(stripped, t1.affine), t1_file)
    for f in [f for f in (bids / "derivatives").rglob("*") if f.is_file() and f.suffix != ".json"]:
        f.unlink()

    cfg = PrepareConfig(spacing=2.0, brain_extraction="none")
    prepare(bids, tmp_path / "plain", cfg, workers=1, progress=False)
    rec = Store(tmp_path / "plain").record(Store(tmp_path / "plain").keys[0])
    assert rec["volumes"] is None and "brain" not in rec["label_maps"]
    # by default the scan is brain-extracted (deepbet takes a stripped T1w as well)
    prepare(bids, tmp_path / "auto", PrepareConfig(spacing=2.0), workers=1, progress=False)
    rec = Store(tmp_path / "auto").record(Store(tmp_path / "auto").keys[0])
    assert rec["label_maps"]["brain"]["source"] == "extracted: deepbet on T1w"
    assert rec["volumes"][ICV_KEY] == pytest.approx(true_icv, rel=0.15)

    prepare(bids, tmp_path / "ss", PrepareConfig(spacing=2.0, skull_stripped=True), workers=1, progress=False)
    store = Store(tmp_path / "ss")
    rec = store.record(store.keys[0])
    assert rec["label_maps"]["brain"]["source"].startswith("derived")
    assert rec["volume_source"] == "tissue:T1w"
    assert rec["volumes"][ICV_KEY] == pytest.approx(true_icv, rel=0.05)


def test_skull_stripped_flag_on_a_scan_with_background_is_reported(tmp_path):
    from helpers import blob_volume, write_nifti
    from neurofm.preprocess import PrepareConfig, prepare
    from neurofm.store import Store

    rng = np.random.default_rng(0)
    head = blob_volume() + rng.normal(5, 1, blob_volume().shape).astype(np.float32)  # noisy, no zero background
    write_nifti(tmp_path / "bids/sub-01/anat/sub-01_T1w.nii.gz", head)
    prepare(tmp_path / "bids", tmp_path / "s", PrepareConfig(skull_stripped=True), workers=1, progress=False)
    store = Store(tmp_path / "s")
    assert store.keys  # the session is still prepared...
    assert "no zero background" in store.failures().to_string()  # ...and the problem is on record
    assert "brain" not in store.record(store.keys[0])["label_maps"]
