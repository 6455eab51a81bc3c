"""Raw heads in: brain extraction (deepbet and neurofm's own), N4 bias correction, prepare and brain-extract."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from neurofm.errors import ConfigError, ScanError
from neurofm.io.nifti import Scan, load_scan
from neurofm.preprocess import PrepareConfig, brain, prepare, transforms
from neurofm.preprocess.bias import correct_bias


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def _session(tiny_store, sub="sub-001", ses="ses-1"):
    """A synthetic raw head's scans (contrast -> path) and the generator's brain mask."""
    bids = tiny_store.parent / "bids"
    anat = bids / sub / ses / "anat"
    files = {brain.contrast_of(p): p for p in sorted(anat.glob("*.nii.gz"))}
    truth = next((bids / "derivatives").glob(f"*/{sub}/{ses}/anat/*_desc-brain_mask.nii.gz"))
    return files, truth


def _truth_on(scan: Scan, truth_path) -> np.ndarray:
    gt = load_scan(truth_path, kind="label")
    return transforms.resample(gt.data[0].astype(np.float32), gt.affine, (scan.shape, scan.affine), order=1) > 0.5


def test_choice_of_extractor():
    s = Scan(np.zeros((1, 4, 4, 4), np.float32), np.eye(4))
    assert brain.choose({"T2w": s, "T1w": s}, "auto") == ("deepbet", "T1w")
    assert brain.choose({"T2w": s, "T1c": s}, "auto") == ("deepbet", "T1c")
    assert brain.choose({"FLAIR": s, "T2w": s}, "auto") == ("neurofm", "T2w")
    assert brain.choose({"T1w": s}, "neurofm") == ("neurofm", "T1w")
    with pytest.raises(ConfigError, match="one of auto, deepbet, neurofm, none"):
        brain.choose({"T1w": s}, "hdbet")
    with pytest.raises(ConfigError, match="brain extraction should be one of"):
        PrepareConfig(brain_extraction="bet")
    with pytest.raises(ConfigError, match="bias_correction"):
        PrepareConfig(bias_correction="n3")


@pytest.mark.parametrize("method", ["deepbet", "neurofm"])
def test_extractors_on_synthetic_heads_of_every_contrast(tiny_store, method):
    """Dice against the generator's brain mask on each scan's own grid (skull, scalp and neck in the scan)."""
    files, truth = _session(tiny_store)
    contrasts = ["T1w", "T1c"] if method == "deepbet" else sorted(files)  # deepbet reads T1-weighted heads
    for c in contrasts:
        if c not in files:
            continue
        scan = load_scan(files[c])
        found = brain.brain_mask({c: scan}, method)
        assert found.mask.shape == scan.shape and found.method == method and found.contrast == c
        assert _dice(found.mask, _truth_on(scan, truth)) >= 0.9, (c, method)
        assert 900 < found.icv_ml < 2200  # an adult intracranial volume


def test_an_extractor_refuses_what_is_no_head(tmp_path):
    rng = np.random.default_rng(0)
    box = np.zeros((1, 80, 90, 80), np.float32)
    box[0, 20:60, 20:70, 20:60] = 100 + rng.normal(0, 5, (40, 50, 40))
    with pytest.raises(ScanError, match=r"box.nii.gz: brain extraction \(neurofm\) is unsure"):
        brain.brain_mask({"T1w": Scan(box, np.diag([2.0, 2.0, 2.0, 1.0]), "box.nii.gz")}, "neurofm")
    empty = Scan(np.zeros((1, 60, 60, 60), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]), "empty.nii.gz")
    with pytest.raises(ScanError, match="empty.nii.gz"):
        brain.brain_mask({"FLAIR": empty}, "neurofm")


def test_prepare_extracts_the_brain_of_raw_heads_and_records_it(tiny_store, tmp_path):
    """Sessions without a mask: deepbet on the T1w; a session without T1w / T1c: neurofm's extractor on what it
    has. The crop then matches the one the generator's mask gives."""
    bids = tiny_store.parent / "bids"
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(bids / "dataset_description.json", raw)
    shutil.copytree(bids / "sub-001" / "ses-1", raw / "sub-001" / "ses-1")
    shutil.copytree(bids / "sub-002" / "ses-1", raw / "sub-002" / "ses-1")
    for p in (raw / "sub-002").rglob("*_T1w.nii.gz"):  # no T1-weighted scan in this session
        p.unlink()
    report = prepare(raw, tmp_path / "store", PrepareConfig(spacing=2.0), progress=False)
    assert report.ok, report.failures
    for key, method in (("sub-001_ses-1", "deepbet on T1w"), ("sub-002_ses-1", "neurofm on")):
        rec = json.loads((tmp_path / "store" / "records" / f"{key}.json").read_text())
        mask = rec["label_maps"]["brain"]
        assert mask["source"].startswith(f"extracted: {method}")
        ref = json.loads((tiny_store / "records" / f"{key}.json").read_text())  # prepared with the true mask
        if rec["reference"] == ref["reference"]:  # the same session grid: the crop within 6 voxels (12 mm;
            assert np.abs(np.subtract(rec["shape"], ref["shape"])).max() <= 6  # deepbet reaches 10 mm further down)
        truth_ml = float(np.asarray(nib.load(_session(tiny_store, *key.split("_"))[1]).dataobj).sum()) * 8 / 1000
        assert abs(mask["icv_ml"] - truth_ml) / truth_ml < 0.15  # deepbet: +10 % here (more brainstem)
        assert rec["volume_source"].startswith("tissue:")  # raw heads feed ssl3d's anatomy term


def test_n4_removes_a_known_bias_field():
    """A uniform sphere under a smooth multiplicative field: N4 brings the intensity spread inside down."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, 64)] * 3, indexing="ij")
    sphere = (x**2 + y**2 + z**2) < 0.7
    field = np.exp(0.35 * x + 0.2 * y * z)  # 0.7 .. 1.5
    data = np.where(sphere, 100.0, 0.0) * field + np.random.default_rng(0).normal(0, 1, x.shape)
    scan = Scan(data[None].astype(np.float32), np.diag([3.0, 3.0, 3.0, 1.0]), "phantom")
    out = correct_bias(scan, "n4")
    assert out.data.shape == scan.data.shape and np.allclose(out.affine, scan.affine)

    def cv(a: np.ndarray) -> float:
        v = a[0][sphere]
        return float(v.std() / v.mean())

    assert cv(out.data) < 0.4 * cv(scan.data)
    assert correct_bias(scan, "none") is scan


@pytest.mark.slow
def test_brain_extract_verb(tiny_store, tmp_path, run_cli):
    files, truth = _session(tiny_store)
    broken = tmp_path / "sub-009_T1w.nii.gz"
    broken.write_bytes(b"not a nifti")
    code, out, err = run_cli("brain-extract", files["T1w"], files["FLAIR"], broken, "--out", tmp_path / "bx",
                             "--brain", "--no-progress")  # fmt: skip
    assert code == 1  # one input failed; the others are done
    table = pd.read_csv(tmp_path / "bx" / "brain_extraction.csv")
    printed = " ".join((out + err).split())
    assert len(table) == 3 and table["error"].notna().sum() == 1 and "sub-009" in printed
    done = table[table["error"].isna()].set_index("contrast")
    assert done.loc["T1w", "method"] == "deepbet" and done.loc["FLAIR", "method"] == "neurofm"
    for c in ("T1w", "FLAIR"):
        mask_img = nib.load(done.loc[c, "mask"])
        src = nib.load(files[c])
        assert mask_img.shape == src.shape and np.allclose(mask_img.affine, src.affine)
        mask = np.asarray(mask_img.dataobj) > 0
        assert _dice(mask, _truth_on(load_scan(files[c]), truth)) >= 0.9
        extracted = np.asarray(nib.load(done.loc[c, "brain"]).dataobj)
        assert not extracted[~mask].any() and extracted[mask].any()
