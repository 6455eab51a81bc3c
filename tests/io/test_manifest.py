from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import blob_volume, write_nifti
from neurofm.errors import ManifestError
from neurofm.io.manifest import canonical_contrast, discover, parse_bids_name


def _touch(path):
    return write_nifti(path, blob_volume((8, 8, 8)))


@pytest.fixture
def bids(tmp_path):
    root = tmp_path / "bids"
    for sub, ses in [("01", "1"), ("01", "2"), ("02", "1")]:
        anat = root / f"sub-{sub}" / f"ses-{ses}" / "anat"
        _touch(anat / f"sub-{sub}_ses-{ses}_T1w.nii.gz")
        _touch(anat / f"sub-{sub}_ses-{ses}_FLAIR.nii.gz")
    _touch(root / "sub-01/ses-1/anat/sub-01_ses-1_ce-gadolinium_T1w.nii.gz")
    _touch(root / "sub-01/ses-1/anat/sub-01_ses-1_defacemask.nii.gz")  # not an image we use
    (root / "participants.tsv").write_text("participant_id\tage\tdiagnosis\nsub-01\t61\ttumour\nsub-02\tn/a\thealthy\n")
    (root / "sub-01" / "sub-01_sessions.tsv").write_text("session_id\tage\nses-1\t61\nses-2\t63\n")
    der = root / "derivatives" / "neurofm"
    _touch(der / "sub-01/ses-1/anat/sub-01_ses-1_desc-brain_mask.nii.gz")
    _touch(der / "sub-01/ses-1/anat/sub-01_ses-1_label-lesion_mask.nii.gz")
    _touch(der / "sub-02/ses-1/anat/sub-02_ses-1_dseg.nii.gz")
    # SynthSeg writes the image path in the subject column.
    (der / "volumes.csv").write_text(
        "subject,total intracranial,left hippocampus\n"
        "/data/sub-01_ses-1_T1w.nii.gz,1500000,4000\n/data/sub-02_ses-1_T1w.nii.gz,1400000,3500\n"
    )
    return root


def test_bids_discovery(bids):
    m = discover(bids)
    assert m.source == "bids"
    imgs = m.images
    assert len(imgs) == 7
    s1 = imgs[(imgs.subject == "sub-01") & (imgs.session == "ses-1")]
    assert sorted(s1["name"]) == ["FLAIR", "T1c", "T1w"]
    assert any("defacemask" in p for p in m.ignored)
    sessions = {s.key: s for s in m.sessions()}
    assert set(sessions) == {"sub-01_ses-1", "sub-01_ses-2", "sub-02_ses-1"}
    s = sessions["sub-01_ses-1"]
    assert set(s.label_maps) == {"brain", "lesion"}
    assert s.labels["diagnosis"] == "tumour"
    assert sessions["sub-01_ses-2"].labels["age"] == 63  # sessions.tsv overrides participants.tsv
    assert np.isnan(m.table[m.table.subject == "sub-02"]["age"].iloc[0])
    assert s.volumes == {"total intracranial": 1500000.0, "left hippocampus": 4000.0}
    assert sessions["sub-01_ses-2"].volumes is None
    assert set(sessions["sub-02_ses-1"].label_maps) == {"dseg"}


def test_bids_duplicates_are_an_error_unless_asked(bids):
    _touch(bids / "sub-02/ses-1/anat/sub-02_ses-1_run-2_T1w.nii.gz")
    with pytest.raises(ManifestError, match="duplicate scans"):
        discover(bids)
    m = discover(bids, duplicates="first")
    t1 = m.images[(m.images.subject == "sub-02") & (m.images.name == "T1w")]
    assert len(t1) == 1


def test_nnunet_discovery(tmp_path):
    root = tmp_path / "Dataset001_Mening"
    (root / "imagesTr").mkdir(parents=True)
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "T1", "1": "FLAIR"},
                "labels": {"background": 0, "tumour": 1},
                "file_ending": ".nii.gz",
            }
        )
    )
    for case in ("case_001", "case_002"):
        _touch(root / "imagesTr" / f"{case}_0000.nii.gz")
        _touch(root / "imagesTr" / f"{case}_0001.nii.gz")
        _touch(root / "labelsTr" / f"{case}.nii.gz")
    m = discover(root)
    assert m.source == "nnunet"
    sessions = m.sessions()
    assert [s.subject for s in sessions] == ["case_001", "case_002"]
    assert set(sessions[0].images) == {"T1w", "FLAIR"}
    assert set(sessions[0].label_maps) == {"seg"}


def test_nnunet_unknown_channel_is_an_error(tmp_path):
    root = tmp_path / "ds"
    (root / "dataset.json").parent.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1"}}))
    _touch(root / "imagesTr" / "c1_0003.nii.gz")
    with pytest.raises(ManifestError, match="channel 0003"):
        discover(root)


def test_csv_manifest_with_relative_paths_and_labels(tmp_path):
    _touch(tmp_path / "scans" / "a_t1.nii.gz")
    _touch(tmp_path / "scans" / "a_flair.nii.gz")
    _touch(tmp_path / "scans" / "b_t1.nii.gz")
    (tmp_path / "list.csv").write_text(
        "subject,contrast,path,age,infarct\n"
        "A,t1,scans/a_t1.nii.gz,70,1\nA,flair,scans/a_flair.nii.gz,70,1\nB,T1w,scans/b_t1.nii.gz,55,0\n"
    )
    m = discover(tmp_path / "list.csv")
    assert m.label_columns == ["age", "infarct"]
    sessions = m.sessions()
    assert set(sessions[0].images) == {"T1w", "FLAIR"}
    assert sessions[1].labels == {"age": 55, "infarct": 0}
    assert all(p.startswith(str(tmp_path)) for p in m.table["path"])


def test_csv_missing_files_and_columns_are_errors(tmp_path):
    (tmp_path / "m.tsv").write_text("subject\tpath\nA\tnope.nii.gz\n")
    with pytest.raises(ManifestError, match="not found"):
        discover(tmp_path / "m.tsv")
    (tmp_path / "m2.csv").write_text("id,file\nA,x.nii\n")
    with pytest.raises(ManifestError, match="'subject'"):
        discover(tmp_path / "m2.csv")


def test_csv_duplicates_are_an_error(tmp_path):
    _touch(tmp_path / "a.nii.gz")
    _touch(tmp_path / "b.nii.gz")
    (tmp_path / "m.csv").write_text("subject,contrast,path\nA,T1w,a.nii.gz\nA,t1,b.nii.gz\n")
    with pytest.raises(ManifestError, match="duplicate"):
        discover(tmp_path / "m.csv")


def test_unrecognised_folder_is_an_error(tmp_path):
    (tmp_path / "random").mkdir()
    with pytest.raises(ManifestError, match="not a dataset neurofm recognises"):
        discover(tmp_path / "random")


def test_names():
    assert parse_bids_name("sub-01_ses-2_ce-gd_run-1_T1w.nii.gz") == (
        {"sub": "01", "ses": "2", "ce": "gd", "run": "1"},
        "T1w",
    )
    assert canonical_contrast("t1ce") == "T1c"
    assert canonical_contrast("Flair") == "FLAIR"
    assert canonical_contrast("DIR") == "DIR"
