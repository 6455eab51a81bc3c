from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from helpers import write_nifti
from neurofm.infer.predictor import Predictor, largest_component
from neurofm.preprocess import transforms


class BrightIsLesion(nn.Module):
    """An oracle 'model': lesion where the (z-scored) T1w is bright. It lets the test check
    the geometry of preprocessing, sliding windows and the return to native space exactly."""

    def forward(self, x, present):
        t = x[:, :1] - 2.5
        return torch.cat([-t, t], dim=1) * 10


def _head_with_lesion(shape, spacing, centre_mm, radius_mm):
    """Head-like volume (RAS, voxel sizes ``spacing``) with a bright sphere; returns (data, affine, truth)."""
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = [-(s - 1) * v / 2 for s, v in zip(shape, spacing, strict=True)]
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    xyz = ijk * np.asarray(spacing) + aff[:3, 3]
    head = (np.linalg.norm(xyz / np.array([60, 70, 55]), axis=-1) < 1).astype(np.float32)
    lesion = np.linalg.norm(xyz - np.asarray(centre_mm), axis=-1) < radius_mm
    rng = np.random.default_rng(0)
    data = head * 100 + lesion * 400 + rng.normal(0, 2, shape).astype(np.float32)
    return data.astype(np.float32), aff, lesion


def test_lps_anisotropic_input_gives_a_mask_on_its_own_grid(tmp_path):
    data, aff, truth = _head_with_lesion((128, 150, 40), (1.0, 1.0, 3.0), (20.0, -15.0, 10.0), 12.0)
    # store it LPS (x and y flipped), as DICOM converters often do
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = data.shape[0] - 1, data.shape[1] - 1
    lps, lps_aff = np.ascontiguousarray(data[::-1, ::-1]), aff @ flip
    truth_lps = truth[::-1, ::-1]
    path = write_nifti(tmp_path / "sub-01_T1w.nii.gz", lps, lps_aff)
    info = {"task": "seg", "contrasts": ["T1w"], "classes": [0, 1], "patch": 64}
    pred = Predictor(BrightIsLesion(), info, tta=True, overlap=0.25)
    pred.preprocessing = {"spacing": 1.0, "margin": 4, "normalize": "zscore", "orientation": "RAS"}
    row = pred.predict_files({"T1w": str(path)}, tmp_path / "out", case_id="sub-01")
    out = nib.load(row["mask"])
    src = nib.load(str(path))
    assert out.shape == src.shape
    assert np.array_equal(out.affine, src.affine)
    assert nib.aff2axcodes(out.affine) == ("L", "P", "S")
    mask = np.asarray(out.dataobj) > 0
    dice = 2 * (mask & truth_lps).sum() / (mask.sum() + truth_lps.sum())
    assert dice > 0.85, dice
    assert row["volume_mm3"] == pytest.approx(truth.sum() * 3.0, rel=0.2)


def test_missing_contrast_at_inference():
    info = {"task": "seg", "contrasts": ["T1w", "FLAIR"], "classes": [0, 1], "patch": 32}
    pred = Predictor(BrightIsLesion(), info, tta=False)
    vol = np.zeros((40, 40, 40), np.float32)
    vol[10:20, 10:20, 10:20] = 5.0
    full = pred.predict({"T1w": vol, "FLAIR": vol * 0})
    only_t1 = pred.predict({"T1w": vol})
    assert np.array_equal(full.labels, only_t1.labels) and only_t1.labels[15, 15, 15] == 1
    with pytest.raises(Exception, match="none of the model's contrasts"):
        pred.predict({"T2w": vol})


class MeanIntensity(nn.Module):
    def forward(self, x, present):
        m = x.mean(dim=(1, 2, 3, 4))
        return torch.stack([-m, m], dim=1)


class MeanValue(nn.Module):
    def forward(self, x, present):
        return x.mean(dim=(1, 2, 3, 4))[:, None]


def test_classification_averages_windows_and_regression_takes_the_median():
    vol = np.zeros((64, 32, 32), np.float32)
    vol[:32] = 1.0  # one window bright, the other dark
    cls = Predictor(MeanIntensity(), {"task": "cls", "contrasts": ["T1w"], "classes": [0, 1], "patch": 32}, tta=False)
    p = cls.predict({"T1w": vol}).probs
    assert p == pytest.approx(torch.softmax(torch.tensor([-0.5, 0.5]), 0).numpy(), abs=1e-5)
    vol3 = np.concatenate([vol, np.full((32, 32, 32), 9.0, np.float32)])  # windows of mean 1, 0, 9
    reg = Predictor(
        MeanValue(),
        {"task": "reg", "contrasts": ["T1w"], "patch": 32, "target_mean": 50.0, "target_std": 10.0},
        tta=False,
    )
    assert reg.predict({"T1w": vol3}).value == pytest.approx(50.0 + 10.0 * 1.0)


def test_largest_component_per_class():
    lab = np.zeros((20, 20, 20), np.uint8)
    lab[2:8, 2:8, 2:8] = 1
    lab[12:14, 12:14, 12:14] = 1
    lab[15:19, 2:6, 2:6] = 2
    out = largest_component(lab)
    assert out[5, 5, 5] == 1 and out[13, 13, 13] == 0 and out[16, 3, 3] == 2


@pytest.mark.slow
def test_cli_predict_on_a_dataset_folder(store_4mm, pretrained_4mm, tmp_path, run_cli):
    from neurofm.tasks.finetune import finetune
    from neurofm.train.config import FinetuneConfig

    cfg = FinetuneConfig(
        task="cls",
        target="healthy",
        source=str(pretrained_4mm),
        contrasts=["T1w", "FLAIR"],
        shots=3,
        steps=3,
        patch=32,
        num_workers=0,
        bootstrap=20,
        tta=False,
    )
    finetune(store_4mm, tmp_path / "ft", cfg, progress=False)
    # a BIDS dataset of two of the store's subjects (each raw head's brain is extracted: seconds per session)
    bids = tmp_path / "bids"
    bids.mkdir()
    shutil.copy(store_4mm.parent / "bids" / "dataset_description.json", bids)
    for sub in ("sub-001", "sub-002"):
        shutil.copytree(store_4mm.parent / "bids" / sub, bids / sub)
    code, _, err = run_cli(
        "predict", tmp_path / "ft", str(bids), "--out", tmp_path / "pred", "--no-tta", "--no-progress"
    )
    assert code == 0, err
    table = pd.read_csv(tmp_path / "pred" / "predictions.tsv", sep="\t")  # a BIDS dataset: a BIDS derivative
    assert len(table) == 4 and set(table["prediction"]) <= {0, 1}  # two subjects, two sessions each
    assert (tmp_path / "pred" / "dataset_description.json").is_file()
    assert np.allclose(table["p_0"] + table["p_1"], 1.0)
    seg = tmp_path / "seg"
    cfg = FinetuneConfig(
        task="seg",
        target="lesion",
        source=str(pretrained_4mm),
        contrasts=["T1w", "FLAIR"],
        shots=3,
        steps=2,
        patch=32,
        num_workers=0,
        bootstrap=20,
        tta=False,
    )
    finetune(store_4mm, seg, cfg, progress=False)
    t1 = next(bids.glob("sub-001/ses-1/anat/*_T1w.nii.gz"))
    code, _, err = run_cli("predict", seg, f"T1w={t1}", "--out", tmp_path / "p2", "--no-tta")
    assert code == 0, err
    mask = nib.load(tmp_path / "p2" / "sub-001_ses-1_seg.nii.gz")
    assert mask.shape == nib.load(t1).shape and np.array_equal(mask.affine, nib.load(t1).affine)
    # an ensemble of the same run twice: the same mask, no spread between its members
    code, _, err = run_cli("predict", seg, f"T1w={t1}", "--out", tmp_path / "p3", "--no-tta", "--ensemble", str(seg))
    assert code == 0, err
    row = pd.read_csv(tmp_path / "p3" / "predictions.csv").iloc[0]
    assert row["uncertainty_ensemble_std"] == 0.0
    assert np.array_equal(nib.load(tmp_path / "p3" / "sub-001_ses-1_seg.nii.gz").get_fdata(), mask.get_fdata())


def test_world_geometry_helper_round_trip():
    data, aff, _ = _head_with_lesion((30, 30, 10), (1.0, 1.0, 3.0), (0, 0, 0), 5)
    grid = transforms.target_grid(data.shape, aff, 1.0)
    up = transforms.resample(data, aff, grid)
    back = transforms.resample(up, grid[1], (data.shape, aff), anti_alias=False)
    assert np.abs(back - data)[2:-2, 2:-2, 1:-1].mean() < 5.0
