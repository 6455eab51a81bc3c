"""The PyTorch-free runtime: numpy sliding windows equal to MONAI's, and predict --engine onnx with torch blocked."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers import sliding_window_inference

from neurofm.data.sampling import window_slices
from neurofm.infer.runtime import OnnxPredictor
from neurofm.models.exporters import export_run
from neurofm.preprocess.windows import gaussian_importance, sliding_window

from .test_export import _fine_tuned_run


@pytest.mark.parametrize("patch", [8, 16, 24])
def test_window_grid_and_weight_are_monai_s(patch):
    for shape in [(40, 40, 40), (17, 50, 33), (patch, patch, patch), (5, 70, 16)]:
        for overlap in (0.0, 0.25, 0.5, 0.8):
            step = [max(1, int(patch * (1 - overlap)))] * 3
            want = [tuple(s) for s in dense_patch_slices(shape, (patch,) * 3, step)]
            assert window_slices(shape, patch, overlap) == want
    want = compute_importance_map((patch,) * 3, mode="gaussian").numpy()
    assert np.abs(gaussian_importance((patch,) * 3) - want).max() <= 1e-6  # float32 rounding of a max-1 map


def test_numpy_sliding_window_matches_monai():
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(2, 3, 3, padding=1).eval()  # a network whose output depends on where the window is

    def torch_net(t):
        return torch.softmax(conv(t), dim=1)

    def numpy_net(a):
        with torch.no_grad():
            return torch_net(torch.from_numpy(a)).numpy()

    rng = np.random.default_rng(0)
    for shape, overlap in [((30, 41, 25), 0.5), ((12, 20, 9), 0.25), ((33, 33, 33), 0.0)]:
        x = rng.normal(size=(1, 2, *shape)).astype(np.float32)
        with torch.no_grad():
            want = sliding_window_inference(
                torch.from_numpy(x), (16,) * 3, 3, torch_net, overlap=overlap, mode="gaussian",
                padding_mode="constant", cval=float(x.min()),
            ).numpy()  # fmt: skip
        got = sliding_window(x, 16, numpy_net, batch=3, overlap=overlap, cval=float(x.min()))
        assert got.shape == want.shape == (1, 3, *shape)
        assert np.abs(got - want).max() <= 1e-5


def _export(tmp_path, task):
    _, run = _fine_tuned_run(tmp_path / task, "dual_latent_unet", task)
    return export_run(run, "onnx", tmp_path / f"{task}-onnx").parent


def _head(path, seed=0):
    rng = np.random.default_rng(seed)
    vol = rng.normal(100, 20, size=(30, 34, 28)).astype(np.float32)
    vol[:3] = vol[-3:] = 0  # some background
    nib.save(nib.Nifti1Image(vol, np.diag([2.0, 2.0, 2.0, 1.0])), path)
    return path


BLOCK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"torch", "monai", "lightning", "torchvision", "dynamic_network_architectures",
                                  "timm", "safetensors", "sklearn", "matplotlib", "pyarrow", "onnx", "tensorboard"}:
            raise ImportError("no " + name + " at this site")
sys.meta_path.insert(0, Block())
"""


def test_predict_with_the_onnx_engine_needs_no_pytorch(tmp_path):
    """A site without PyTorch (every import outside requirements/runtime.txt fails) predicts seg and cls from
    exports through the CLI, and gets what the PyTorch engine gives."""
    seg, cls = _export(tmp_path, "seg"), _export(tmp_path, "cls")
    t1, flair = _head(tmp_path / "t1.nii.gz", 0), _head(tmp_path / "flair.nii.gz", 1)
    script = BLOCK + textwrap.dedent(f"""
        from neurofm.cli import main
        import sys
        for model, out in (({str(seg)!r}, "seg"), ({str(cls)!r}, "cls")):
            sys.argv = ["neurofm", "predict", model, "T1w={t1}", "FLAIR={flair}", "--engine", "onnx",
                        "--out", {str(tmp_path)!r} + "/" + out, "--no-progress"]
            try:
                main()
            except SystemExit as e:
                assert not e.code, e.code
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "monai", "lightning"))
        assert not loaded, loaded
        print("torch-free ok")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "torch-free ok" in res.stdout, res.stderr[-3000:]
    mask = nib.load(tmp_path / "seg" / "t1_seg.nii.gz")
    assert mask.shape == (30, 34, 28) and np.allclose(mask.affine, nib.load(t1).affine)
    rows = json.loads(__import__("pandas").read_csv(tmp_path / "cls" / "predictions.csv").to_json(orient="records"))
    assert rows[0]["prediction"] in (0, 1) and abs(rows[0]["p_0"] + rows[0]["p_1"] - 1) < 1e-5
    # the PyTorch engine on the fine-tuned runs gives the same
    from neurofm.infer.inputs import load_predictor

    for task, folder in (("seg", seg), ("cls", cls)):
        torch_pred = load_predictor(tmp_path / task / "ft", "torch", tta=True)
        onnx_pred = load_predictor(folder, "onnx", tta=True)
        files = {"T1w": t1, "FLAIR": flair}
        a = torch_pred.predict_files(files, tmp_path / "a", case_id="c")
        b = onnx_pred.predict_files(files, tmp_path / "b", case_id="c")
        if task == "seg":
            ma, mb = nib.load(a["mask"]).get_fdata(), nib.load(b["mask"]).get_fdata()
            assert (ma == mb).mean() >= 0.999
        else:
            assert abs(a["p_1"] - b["p_1"]) <= 1e-4 and a["prediction"] == b["prediction"]
        assert abs(a["uncertainty_tta_std"] - b["uncertainty_tta_std"]) <= 1e-4


def test_onnx_ensemble_and_bad_folders(tmp_path, run_cli):
    seg = _export(tmp_path, "seg")
    vol = {c: np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32) for c in ("T1w", "FLAIR")}
    one = OnnxPredictor(seg, tta=False).predict(vol)
    pair = OnnxPredictor(seg, tta=False)
    pair.add_export(seg)
    two = pair.predict(vol)
    assert np.abs(one.probs - two.probs).max() <= 1e-6 and two.uncertainty["ensemble_std"] <= 1e-6
    cls = _export(tmp_path, "cls")
    with pytest.raises(Exception, match="ensemble members differ in task"):
        pair.add_export(cls)
    # an export run with the PyTorch engine, and a folder that is neither an export nor a run
    t1 = _head(tmp_path / "t1.nii.gz")
    code, _, err = run_cli("predict", seg, f"T1w={t1}", "--out", tmp_path / "p")
    assert code == 2 and "is an exported model; run it with --engine onnx" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli("predict", tmp_path / "empty", f"T1w={t1}", "--out", tmp_path / "p", "--engine", "onnx")
    assert code == 2 and "neither an exported model" in err and "Traceback" not in err
