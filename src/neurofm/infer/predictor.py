"""Whole-scan inference: the run's preprocessing, sliding windows, mirror TTA, native space.

* segmentation: MONAI ``sliding_window_inference`` with Gaussian weighting, softmax
  averaged over mirror flips; optional largest connected component per class; the label
  map is put back on the reference scan's own grid (affine, shape, orientation);
* classification: logits of every window (and flip) averaged, then softmax;
* regression: the median over windows of the flip-averaged predictions.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.ndimage as ndi
import torch

from neurofm.data.sampling import stack_contrasts, window_slices
from neurofm.errors import ConfigError, ScanError
from neurofm.preprocess import transforms

FLIPS = [f for r in range(4) for f in itertools.combinations((2, 3, 4), r)]


def largest_component(labels: np.ndarray) -> np.ndarray:
    """Keep only the largest connected component of each foreground class."""
    out = np.zeros_like(labels)
    for c in np.unique(labels):
        if c == 0:
            continue
        comp, n = ndi.label(labels == c)
        if n == 0:
            continue
        sizes = np.bincount(comp.ravel())
        sizes[0] = 0
        out[comp == int(np.argmax(sizes))] = c
    return out


@dataclass
class CasePrediction:
    """One case's prediction. Arrays live on the store grid."""

    task: str
    probs: np.ndarray | None = None  # seg (K, X, Y, Z) / cls (K,)
    labels: np.ndarray | None = None  # seg (X, Y, Z)
    value: float | None = None  # reg
    #: per-case uncertainty: ``entropy`` (predictive entropy: seg averaged over the voxels of the prepared,
    #: head-cropped volume, cls of the class probabilities), ``tta_std`` (the spread over mirror flips:
    #: seg foreground probability, cls top-class probability, reg prediction in target units; 0 without TTA)
    #: for regression ``window_std`` (the spread over windows, in target units) and, for an ensemble,
    #: ``ensemble_std`` (the spread over its members: foreground probability, top-class probability, value)
    uncertainty: dict[str, float] | None = None


class OnnxModel(torch.nn.Module):
    """An exported graph on onnxruntime, called like the fine-tuned model: ``(x, present) -> logits``."""

    def __init__(self, path: str | Path, threads: int | None = None):
        super().__init__()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.path = str(path)
        self.session = ort.InferenceSession(self.path, opts, providers=["CPUExecutionProvider"])

    def forward(self, x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        feed = {"image": x.detach().float().cpu().numpy(), "present": present.detach().float().cpu().numpy()}
        return torch.from_numpy(self.session.run(None, feed)[0]).to(x.device)


class Predictor:
    """Applies a fine-tuned model (a :class:`~neurofm.models.downstream.DownstreamModel`).

    Args:
        model: the model, in eval mode.
        info: task description: ``task``, ``contrasts``, ``classes``, ``patch`` and, for
            regression, ``target_mean``/``target_std``.
        tta: average over the 8 mirror flips.
        overlap: window overlap in [0, 1) for segmentation; classification and regression
            tile the scan without overlap (every voxel is seen once; their outputs are pooled).
        lcc: keep the largest connected component per class (segmentation).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        info: dict[str, Any],
        *,
        device: str | torch.device = "cpu",
        tta: bool = True,
        overlap: float = 0.5,
        lcc: bool = False,
        sw_batch: int = 4,
    ):
        if not 0 <= overlap < 1:
            raise ConfigError(f"overlap should be in [0, 1), got {overlap}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.members = [self.model]  # more with :meth:`add_member` (an ensemble of fine-tuning seeds)
        self.info = info
        self.task = info["task"]
        self.contrasts = list(info["contrasts"])
        self.patch = int(info["patch"])  # cls/reg windows: the scale the head was trained at
        self.seg_patch = int(info.get("infer_patch") or self.patch)  # seg: fully convolutional, any multiple
        self.tta, self.overlap, self.lcc, self.sw_batch = tta, overlap, lcc, sw_batch

    @classmethod
    def from_run(cls, run: str | Path, **kwargs: Any) -> Predictor:
        from neurofm.models.registry import model_from_checkpoint

        model, info = model_from_checkpoint(run)
        task = info["run"].get("task_info")
        if task is None:
            raise ConfigError(f"{run}: not a fine-tuned run (pretrained runs have no task; use neurofm finetune)")
        pred = cls(model, task, **kwargs)
        pred.preprocessing = info["preprocessing"]
        return pred

    @classmethod
    def from_export(cls, folder: str | Path, **kwargs: Any) -> Predictor:
        """A predictor running an exported ONNX graph on onnxruntime (``neurofm export --format onnx``)."""
        from neurofm.utils import read_json

        meta_path = Path(folder) / "neurofm-export.json"
        if not meta_path.is_file():
            raise ConfigError(f"{folder}: not an exported model (no neurofm-export.json)")
        meta = read_json(meta_path)
        if meta.get("format") != "onnx":
            raise ConfigError(f"{folder}: holds a {meta.get('format')} export; --engine onnx runs an ONNX one")
        pred = cls(OnnxModel(Path(folder) / meta["file"]), meta["task_info"], **kwargs)
        pred.preprocessing = meta["preprocessing"]
        return pred

    def _stack(self, images: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        if not any(c in images for c in self.contrasts):
            raise ConfigError(f"none of the model's contrasts {self.contrasts} is given (got {sorted(images)})")
        x, present = stack_contrasts(images, self.contrasts)
        return torch.from_numpy(x)[None].to(self.device), torch.from_numpy(present)[None].to(self.device)

    def add_member(self, model: torch.nn.Module, info: dict[str, Any]) -> None:
        """Add another model of the same task, contrasts and classes (e.g. the same fine-tuning with another
        seed): predictions average the members and their spread becomes ``uncertainty['ensemble_std']``."""
        for key in ("task", "contrasts", "classes", "target"):
            if str(info.get(key)) != str(self.info.get(key)):
                raise ConfigError(f"ensemble members differ in {key}: {info.get(key)} vs {self.info.get(key)}")
        self.members.append(model.to(self.device).eval())

    @torch.no_grad()
    def predict(self, images: dict[str, np.ndarray]) -> CasePrediction:
        """Predict from preprocessed arrays (store grid), ``contrast -> (X, Y, Z)``."""
        x, present = self._stack(images)
        flips = FLIPS if self.tta else [()]
        parts = []
        for member in self.members:
            self.model = member
            parts.append(self._segment(x, present, flips) if self.task == "seg" else self._global(x, present, flips))
        self.model = self.members[0]
        return parts[0] if len(parts) == 1 else self._combine(parts)

    def _combine(self, parts: list[CasePrediction]) -> CasePrediction:
        """The ensemble's prediction: members averaged; their spread as ``ensemble_std``."""

        def mean_unc(key: str) -> float:
            return float(np.mean([p.uncertainty[key] for p in parts]))

        if self.task == "reg":
            values = np.array([p.value for p in parts])
            unc = {
                "tta_std": mean_unc("tta_std"),
                "window_std": mean_unc("window_std"),
                "ensemble_std": float(values.std()),
            }
            return CasePrediction("reg", value=float(values.mean()), uncertainty=unc)
        probs = np.mean([p.probs for p in parts], axis=0)
        entropy = -(probs * np.log(np.clip(probs, 1e-8, 1.0))).sum(0)
        if self.task == "cls":
            top = int(probs.argmax())
            spread = float(np.std([p.probs[top] for p in parts]))
            unc = {"entropy": float(entropy), "tta_std": mean_unc("tta_std"), "ensemble_std": spread}
            return CasePrediction("cls", probs=probs, uncertainty=unc)
        labels = probs.argmax(0).astype(np.uint8)
        if self.lcc:
            labels = largest_component(labels)
        spread = float(np.std([1.0 - p.probs[0] for p in parts], axis=0).mean())
        unc = {"entropy": float(entropy.mean()), "tta_std": mean_unc("tta_std"), "ensemble_std": spread}
        return CasePrediction("seg", probs=probs, labels=labels, uncertainty=unc)

    def _segment(self, x: torch.Tensor, present: torch.Tensor, flips) -> CasePrediction:
        from monai.inferers import sliding_window_inference

        bg = float(x.amin())

        def net(t: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.model(t, present.expand(t.shape[0], -1)), dim=1)

        probs, sq = None, None
        for f in flips:
            xi = torch.flip(x, f) if f else x
            p = sliding_window_inference(
                xi,
                (self.seg_patch,) * 3,
                self.sw_batch,
                net,
                overlap=self.overlap,
                mode="gaussian",
                padding_mode="constant",
                cval=bg,
            )
            p = torch.flip(p, f) if f else p
            fg = 1.0 - p[:, 0]
            probs = p if probs is None else probs + p
            sq = fg**2 if sq is None else sq + fg**2
        probs = (probs / len(flips))[0].float().cpu().numpy()
        labels = probs.argmax(0).astype(np.uint8)
        fg_mean = 1.0 - probs[0]
        fg_std = np.sqrt(np.clip(sq[0].float().cpu().numpy() / len(flips) - fg_mean**2, 0.0, None))
        entropy = -(probs * np.log(np.clip(probs, 1e-8, 1.0))).sum(0)
        unc = {"entropy": float(entropy.mean()), "tta_std": float(fg_std.mean())}  # over the (cropped) volume
        if self.lcc:
            labels = largest_component(labels)
        return CasePrediction("seg", probs=probs, labels=labels, uncertainty=unc)

    def _global(self, x: torch.Tensor, present: torch.Tensor, flips) -> CasePrediction:
        arr = x[0].cpu().numpy()
        arr = np.stack([transforms.pad_to(a, self.patch, float(a.min())) for a in arr])
        xs = torch.from_numpy(arr)[None].to(self.device)
        wins = window_slices(tuple(xs.shape[2:]), self.patch, 0.0)
        per_window = []
        for i in range(0, len(wins), self.sw_batch):
            batch = torch.cat([xs[(slice(None), slice(None), *w)] for w in wins[i : i + self.sw_batch]])
            pr = present.expand(batch.shape[0], -1)
            per_window.append(torch.stack([self.model(torch.flip(batch, f) if f else batch, pr) for f in flips]))
        outs = torch.cat(per_window, dim=1).float().cpu()  # (flips, windows, K)
        logits = outs.mean(0)  # (windows, K)
        temperature = float(self.info.get("temperature", 1.0))
        if self.task == "cls":
            probs = torch.softmax(logits.mean(0) / temperature, dim=0).numpy()
            per_flip = torch.softmax(outs.mean(1) / temperature, dim=1)[:, int(probs.argmax())]
            unc = {
                "entropy": float(-(probs * np.log(np.clip(probs, 1e-8, 1.0))).sum()),
                "tta_std": float(per_flip.std(unbiased=False)),
            }
            return CasePrediction("cls", probs=probs, uncertainty=unc)
        std, mean = self.info.get("target_std", 1.0), self.info.get("target_mean", 0.0)
        value = float(logits[:, 0].median()) * std + mean
        unc = {
            "tta_std": float(outs[:, :, 0].median(1).values.std(unbiased=False)) * std,
            "window_std": float(logits[:, 0].std(unbiased=False)) * std if len(logits) > 1 else 0.0,
        }
        return CasePrediction("reg", value=value, uncertainty=unc)

    # ------------------------------------------------------------ from NIfTI files
    def predict_files(
        self,
        files: dict[str, str | Path],
        out_dir: str | Path | None = None,
        case_id: str = "case",
        reference: str | None = None,
        mask_path: str | Path | None = None,
        prob_path: str | Path | None = None,
    ) -> dict[str, Any]:
        """Preprocess scans as the run's store was, predict, and (seg) write the mask on the
        reference scan's own grid: ``mask_path`` (default ``out_dir/<case_id>_seg.nii.gz``) and, with
        ``prob_path``, the foreground probabilities there (float32; 4D over the classes after background
        when there are several)."""
        from neurofm.io.nifti import load_scan, save_like
        from neurofm.preprocess.prepare import PrepareConfig, preprocess_scans

        prep = getattr(self, "preprocessing", None) or {}
        cfg = PrepareConfig.from_dict({k: v for k, v in prep.items() if k != "contrasts"})
        unknown = [c for c in files if c not in self.contrasts]
        if unknown:
            raise ConfigError(f"the model takes {self.contrasts}; got unknown contrast(s) {unknown}")
        scans = {c: load_scan(p) for c, p in files.items()}
        prepared = preprocess_scans(scans, cfg=cfg)
        if not prepared.images:
            raise ScanError(next(iter(files.values())), "no usable image")
        result = self.predict(prepared.images)
        row: dict[str, Any] = {
            "case": case_id,
            "contrasts": ",".join(c for c in self.contrasts if c in prepared.images),
        }
        if self.task == "seg":
            ref = reference or next(c for c in self.contrasts if c in files)
            meta = prepared.image_meta[ref]
            grid = (tuple(meta["native_shape"]), np.asarray(meta["native_affine"]))
            native = transforms.resample(result.labels, prepared.affine, grid, order=0)
            out = Path(mask_path) if mask_path else Path(out_dir or ".") / f"{case_id}_seg.nii.gz"
            save_like(out, native, files[ref], dtype=np.uint8)
            if prob_path is not None:
                fg = [transforms.resample(p, prepared.affine, grid, order=1) for p in result.probs[1:]]
                probs = fg[0] if len(fg) == 1 else np.stack(fg, axis=-1)
                save_like(prob_path, probs.astype(np.float32), files[ref], dtype=np.float32)
                row["probabilities"] = str(prob_path)
            vox = float(abs(np.linalg.det(grid[1][:3, :3])))
            row.update(mask=str(out), reference=ref, volume_mm3=float((native > 0).sum()) * vox)
        elif self.task == "cls":
            classes = self.info.get("classes", list(range(len(result.probs))))
            row["prediction"] = classes[int(np.argmax(result.probs))]
            row.update({f"p_{c}": float(p) for c, p in zip(classes, result.probs, strict=True)})
        else:
            row["prediction"] = result.value
        row.update({f"uncertainty_{k}": v for k, v in (result.uncertainty or {}).items()})
        return row
