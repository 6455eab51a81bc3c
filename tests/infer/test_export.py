"""Deployment: ONNX / TorchScript export with parity, the onnxruntime engine, BIDS derivatives."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
import torch

from neurofm.io.checkpoint import write_run_folder
from neurofm.models.downstream import DownstreamModel
from neurofm.models.exporters import EXPORT_JSON, example_input

BACKBONES = {
    "dual_latent_unet": ({"features": [4, 8, 16], "latent": 8}, 16),
    "resenc_unet": ({"features": [4, 8, 16], "blocks": [1, 1, 1]}, 16),
    "vit_autoenc": ({"size": "tiny", "img_size": 16, "patch_size": 4, "in_channels": 2}, 16),
    "primus": ({"size": "tiny", "img_size": 16}, 16),
}
CASES = [(b, t) for b in BACKBONES for t in ("seg", "cls", "reg")]  # every backbone, every task


def _fine_tuned_run(tmp_path, backbone: str, task: str):
    kwargs, _ = BACKBONES[backbone]
    n_out = {"seg": 3, "cls": 2, "reg": 1}[task]
    torch.manual_seed(0)
    model = DownstreamModel({"name": backbone, "kwargs": kwargs}, task, n_out, ["T1w", "FLAIR"]).eval()
    if task != "seg":
        model.feature_mean.normal_()
        model.feature_std.uniform_(0.5, 2.0)
    info = {"task": task, "target": "lesion", "contrasts": ["T1w", "FLAIR"], "classes": list(range(n_out)),
            "patch": 16, "target_mean": 50.0, "target_std": 10.0}  # fmt: skip
    cfg = {"model": {"name": "downstream"}, "data": {"contrasts": ["T1w", "FLAIR"], "patch": 16}, "task_info": info}
    cfg["extra"] = {"preprocessing": {"spacing": 2.0, "normalize": "zscore", "orientation": "RAS"}}
    run = write_run_folder(tmp_path / "ft", model, cfg, {"step": 1, "epoch": 0})
    return model, run


@pytest.mark.parametrize(("backbone", "task"), CASES)
def test_export_onnx_and_torchscript_match_pytorch(backbone, task, tmp_path, run_cli):
    model, run = _fine_tuned_run(tmp_path, backbone, task)
    for fmt in ("onnx", "torchscript"):
        code, _, err = run_cli("export", run, "--format", fmt, "--out", tmp_path / fmt)
        assert code == 0, err
        meta = json.loads((tmp_path / fmt / EXPORT_JSON).read_text())
        assert meta["parity_max_abs_logit"] <= 1e-4 and meta["task_info"]["task"] == task
        assert meta["preprocessing"]["spacing"] == 2.0
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"))
    assert json.loads({p.key: p.value for p in graph.metadata_props}["neurofm"])["format"] == "onnx"
    assert not [n for n in graph.graph.node if n.op_type == "Dropout"]  # exported in eval mode
    sess = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    scripted = torch.jit.load(str(tmp_path / "torchscript" / "model.pt"))
    fixed = getattr(model.backbone, "fixed_size", None)
    # another batch size, and (where the backbone allows) another spatial size than the export's example
    image, present = example_input(model, batch=3, size=fixed or 32)
    present[0, 0] = 0.0  # T1w missing in the first case
    with torch.no_grad():
        want = model(image, present > 0.5).numpy()
        got_ts = scripted(image, present).numpy()
    got = sess.run(None, {"image": image.numpy(), "present": present.numpy()})[0]
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4 and np.abs(got_ts - want).max() <= 1e-4
    if task == "seg":
        assert np.array_equal(got.argmax(1), want.argmax(1))
    # a missing contrast's content never matters, in the graph as in PyTorch
    other = image.clone()
    other[0, 0] = torch.randn_like(other[0, 0]) * 5
    again = sess.run(None, {"image": other.numpy(), "present": present.numpy()})[0]
    assert np.abs(again[0] - got[0]).max() <= 1e-4


def test_export_refuses_a_pretrained_run(tmp_path, run_cli):
    from neurofm.models.registry import create_model

    model = create_model("dual_latent_unet", features=[4, 8, 16], latent=8)
    run = write_run_folder(tmp_path / "pre", model, {"model": {"name": "dual_latent_unet"}}, {"step": 1})
    code, _, err = run_cli("export", run, "--format", "onnx", "--out", tmp_path / "x")
    assert code == 2 and "fine-tuned model" in err and "Traceback" not in err


@pytest.mark.slow
def test_bids_derivatives_round_trip_with_the_onnx_engine(store_4mm, pretrained_4mm, tmp_path, run_cli):
    from neurofm.io.manifest import discover_bids
    from neurofm.tasks.finetune import finetune
    from neurofm.train.config import FinetuneConfig

    cfg = FinetuneConfig(task="seg", target="lesion", source=str(pretrained_4mm), contrasts=["T1w", "FLAIR"],
                         shots=3, steps=2, patch=32, num_workers=0, bootstrap=20, tta=False)  # fmt: skip
    finetune(store_4mm, tmp_path / "ft", cfg, progress=False)
    raw = tmp_path / "raw"  # two subjects' first sessions, images only (no label derivatives)
    src = store_4mm.parent / "bids"
    raw.mkdir()
    shutil.copy(src / "dataset_description.json", raw / "dataset_description.json")
    for sub in ("sub-001", "sub-002"):
        shutil.copytree(src / sub / "ses-1", raw / sub / "ses-1")
    bad = next(p for p in (raw / "sub-002").rglob("*_T1w.nii.gz") if "_ce-" not in p.name)
    bad.write_bytes(b"not a nifti")
    args = ["predict", tmp_path / "ft", raw, "--no-tta", "--no-progress", "--engine", "onnx", "--probabilities"]
    code, _, err = run_cli(*args)
    assert code == 0, err
    out = raw / "derivatives" / "neurofm-ft"
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "neurofm"
    table = pd.read_csv(out / "predictions.tsv", sep="\t")
    assert len(table) == 2 and set(table["participant_id"]) == {"sub-001", "sub-002"}
    failed = table[table["error"].notna()]
    assert set(failed["participant_id"]) == {"sub-002"} and "sub-002" in failed["error"].iloc[0]
    # the raw heads were brain-extracted as the run's store was prepared (its default: auto)
    assert table.loc[table["error"].isna(), "brain_mask"].str.startswith("extracted: deepbet on T1w").all()
    masks = sorted(out.rglob("*_desc-lesion_mask.nii.gz"))
    assert len(masks) == len(table) - len(failed)
    for m in masks:  # on the reference scan's own grid, with a sidecar naming its sources
        ses_dir = m.parent.relative_to(out)
        ref = next(p for p in (raw / ses_dir).glob("*_T1w.nii.gz") if "_ce-" not in p.name)
        assert nib.load(m).shape == nib.load(ref).shape and np.allclose(nib.load(m).affine, nib.load(ref).affine)
        side = json.loads(m.with_name(m.name.replace(".nii.gz", ".json")).read_text())
        assert side["Sources"] and side["Model"].endswith("ft")
        assert (m.parent / m.name.replace("_mask", "_probseg")).is_file()
    # the project's own discovery reads the derivative back (and leaves predictions out of training labels)
    assert "lesion" not in set(discover_bids(raw).table["name"])
    back = discover_bids(raw, predictions=True).table
    assert len(back[(back["role"] == "label") & (back["name"] == "lesion")]) == len(masks)
    # the torch engine gives the same probabilities (a 2-step model sits near ties, so a voxel or two of
    # the argmax may flip with float rounding: the masks are compared by agreement)
    code, _, err = run_cli(*args[:-3], "--probabilities", "--out", tmp_path / "t")
    assert code == 0, err
    for m in masks:
        twin = tmp_path / "t" / m.relative_to(out)
        prob = m.parent / m.name.replace("_mask", "_probseg")
        p_onnx, p_torch = nib.load(prob).get_fdata(), nib.load(tmp_path / "t" / prob.relative_to(out)).get_fdata()
        assert np.abs(p_onnx - p_torch).max() <= 1e-4
        assert (nib.load(m).get_fdata() == nib.load(twin).get_fdata()).mean() >= 0.999
    # a re-run skips the finished sessions and retries the failed one
    stamps = {m: m.stat().st_mtime_ns for m in masks}
    shutil.copy(next(p for p in (src / "sub-002" / "ses-1").rglob("*_T1w.nii.gz") if "_ce-" not in p.name), bad)
    code, _, err = run_cli(*args)
    assert code == 0, err
    assert all(m.stat().st_mtime_ns == t for m, t in stamps.items())
    table = pd.read_csv(out / "predictions.tsv", sep="\t")
    assert "error" not in table or table["error"].isna().all()
    assert len(sorted(out.rglob("*_desc-lesion_mask.nii.gz"))) == 2
