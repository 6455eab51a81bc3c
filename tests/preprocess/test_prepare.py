from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from helpers import blob_volume, lps_version, write_nifti
from neurofm.errors import ConfigError, StoreError
from neurofm.preprocess import PrepareConfig, prepare, transforms
from neurofm.preprocess.prepare import parse_shard
from neurofm.store import Store


@pytest.fixture
def real_bids(tmp_path, anatomical):
    """A BIDS tree of real scans: the nibabel T1, a 'T2' stored LPS at another resolution, a lesion mask."""
    img = nib.load(str(anatomical))
    data = img.get_fdata().astype(np.float32)
    root = tmp_path / "bids"
    for sub in ("01", "02", "03"):
        write_nifti(root / f"sub-{sub}/ses-1/anat/sub-{sub}_ses-1_T1w.nii.gz", data, img.affine)
    # sub-01: a second contrast, inverted intensities, flipped axes (LPS) and 4 mm voxels.
    lps, lps_aff = lps_version(data.max() - data, img.affine)
    coarse = lps[::2, ::2, ::2]
    write_nifti(root / "sub-01/ses-1/anat/sub-01_ses-1_T2w.nii.gz", coarse, lps_aff @ np.diag([2.0, 2, 2, 1]))
    lesion = np.zeros(data.shape, np.uint8)
    lesion[12:18, 20:26, 10:14] = 1
    write_nifti(root / "derivatives/x/sub-03/ses-1/anat/sub-03_ses-1_label-lesion_mask.nii.gz", lesion, img.affine)
    (root / "participants.tsv").write_text("participant_id\tage\nsub-01\t30\nsub-02\t40\nsub-03\t50\n")
    return root


def test_prepare_real_bids_and_geometry_round_trips(real_bids, tmp_path, anatomical):
    report = prepare(real_bids, tmp_path / "store", PrepareConfig(spacing=1.0), progress=False)
    assert report.ok, report.failures
    assert report.prepared == 3
    store = Store(tmp_path / "store")
    assert len(store.manifest) == 4
    rec = store.record("sub-01_ses-1")
    assert rec["reference"] == "T1w"
    assert rec["images"]["T2w"]["resampled_to_reference"] is True
    assert rec["images"]["T2w"]["native_orientation"] == "RPS"  # LAS with x and y flipped
    assert rec["labels"]["age"] == 30
    aff = store.affine("sub-02_ses-1")
    assert "".join(nib.aff2axcodes(aff)) == "RAS"
    np.testing.assert_allclose(np.sqrt((aff[:3, :3] ** 2).sum(0)), 1.0)

    # Put the stored T1 back on its native grid: it must equal the original scan.
    t1 = store.read("sub-02_ses-1", "T1w")
    meta = store.record("sub-02_ses-1")["images"]["T1w"]
    native = transforms.resample(
        t1, aff, (tuple(meta["native_shape"]), np.asarray(meta["native_affine"])), anti_alias=False
    )
    native = native * meta["std"] + meta["mean"]
    original = nib.load(str(anatomical)).get_fdata()
    np.testing.assert_allclose(native, original, atol=1e-2 * original.max())

    # The lesion mask is on the same grid and keeps its volume (8 mm^3 voxels -> 1 mm^3).
    les = store.read("sub-03_ses-1", "lesion")
    assert les.shape == store.shape("sub-03_ses-1")
    assert les.sum() == pytest.approx(6 * 6 * 4 * 8, rel=0.35)


def test_crop_from_store_equals_slice_of_whole(real_bids, tmp_path):
    prepare(real_bids, tmp_path / "store", progress=False)
    store = Store(tmp_path / "store")
    whole = store.read("sub-01_ses-1", "T2w")
    box = (slice(5, 37), slice(11, 40), slice(3, 30))
    np.testing.assert_array_equal(store.read("sub-01_ses-1", "T2w", box), whole[box])
    fg = whole != 0
    assert abs(whole[fg].mean()) < 0.2  # z-scored within the foreground


def test_broken_files_are_reported_and_the_rest_is_prepared(tmp_path, run_cli):
    root = tmp_path / "bids"
    good = blob_volume((30, 30, 30))
    for sub in ("01", "02", "03", "04", "05", "06", "07", "08"):
        write_nifti(root / f"sub-{sub}/anat/sub-{sub}_T1w.nii.gz", good)
    write_nifti(root / "sub-01/anat/sub-01_FLAIR.nii.gz", good)
    raw = (root / "sub-01/anat/sub-01_T1w.nii.gz").read_bytes()
    (root / "sub-02/anat/sub-02_FLAIR.nii.gz").write_bytes(raw[: len(raw) // 3])  # truncated
    (root / "sub-03/anat/sub-03_FLAIR.nii.gz").write_bytes(b"not an image at all")
    nan = good.copy()
    nan[3, 3, 3] = np.nan
    write_nifti(root / "sub-04/anat/sub-04_FLAIR.nii.gz", nan)
    write_nifti(root / "sub-05/anat/sub-05_FLAIR.nii.gz", good[..., 0])  # 2D
    write_nifti(root / "sub-06/anat/sub-06_FLAIR.nii.gz", np.stack([good] * 2, -1))  # 4D, two volumes
    far = np.eye(4)
    far[:3, 3] = 500  # another contrast that does not overlap the reference
    write_nifti(root / "sub-07/anat/sub-07_FLAIR.nii.gz", good, far)
    (root / "sub-08/anat/sub-08_T1w.nii.gz").write_bytes(b"\x1f\x8b garbage")  # the only image: session fails

    code, out, err = run_cli("prepare", root, tmp_path / "store", "--no-progress")
    assert code == 1
    store = Store(tmp_path / "store")
    fails = pd.read_csv(tmp_path / "store" / "failures.csv")
    assert len(fails) == 7
    by_subject = dict(zip(fails["subject"], fails["reason"], strict=True))
    assert "truncated" in by_subject["sub-02"] or "readable" in by_subject["sub-02"]
    assert "not a readable NIfTI" in by_subject["sub-03"]
    assert "NaN/Inf" in by_subject["sub-04"]
    assert "2D" in by_subject["sub-05"]
    assert "2 volumes" in by_subject["sub-06"]
    assert "field of view" in by_subject["sub-07"]
    assert all(str(root) in p for p in fails["path"])
    # Every good file was prepared: 7 T1w (sub-08's is the bad one) and sub-01's FLAIR.
    assert sorted(store.manifest["contrast"]) == ["FLAIR"] + ["T1w"] * 7
    assert "Traceback" not in out + err
    assert "7 scans could not be used" in err


def test_rerun_skips_finished_sessions_and_redoes_changed_ones(real_bids, tmp_path):
    out = tmp_path / "store"
    first = prepare(real_bids, out, progress=False)
    assert first.prepared == 3
    again = prepare(real_bids, out, progress=False)
    assert (again.prepared, again.skipped) == (0, 3)
    f = real_bids / "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    third = prepare(real_bids, out, progress=False)
    assert (third.prepared, third.skipped) == (1, 2)
    with pytest.raises(StoreError, match="other settings"):
        prepare(real_bids, out, PrepareConfig(spacing=2.0), progress=False)


def test_shards_partition_the_sessions(tmp_path):
    root = tmp_path / "bids"
    for i in range(12):
        write_nifti(root / f"sub-{i:02d}/anat/sub-{i:02d}_T1w.nii.gz", blob_volume((16, 16, 16), seed=i))
    out = tmp_path / "store"
    counts = [prepare(root, out, shard=f"{i}/3", progress=False).total for i in range(3)]
    assert sum(counts) == 12 and all(c > 0 for c in counts)
    assert len(Store(out).manifest) == 12
    with pytest.raises(ConfigError):
        parse_shard("3/3")


def test_two_workers_give_the_same_bytes_as_one(real_bids, tmp_path):
    prepare(real_bids, tmp_path / "a", workers=1, progress=False)
    prepare(real_bids, tmp_path / "b", workers=2, progress=False)
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    for key in a.keys:
        for name in a.record(key)["images"]:
            np.testing.assert_array_equal(a.read(key, name), b.read(key, name))


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="spacing"):
        PrepareConfig(spacing=0)
    with pytest.raises(ConfigError, match="normalize"):
        PrepareConfig(normalize="minmax")
