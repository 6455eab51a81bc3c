"""Whole-scan prediction without PyTorch: numpy, scipy, nibabel and onnxruntime only.

Everything a prediction needs after the network is shared by both engines and lives here:
the run's preprocessing (``neurofm.preprocess``, itself torch-free), the mirror flips, the
pooling of cls/reg windows, ensembles, uncertainty and writing the mask on the input's own
grid (:class:`PredictorBase`). :class:`OnnxPredictor` runs an exported graph
(``neurofm export --format onnx``) on onnxruntime with a numpy sliding window
(``neurofm.preprocess.windows``), so a site with neither PyTorch nor MONAI installed can apply a model::

    pip install --no-deps neurofm && pip install -r requirements/runtime.txt
    neurofm predict EXPORT_DIR T1w=head.nii.gz --engine onnx --out preds/

The numpy sliding window follows MONAI's ``sliding_window_inference`` (window grid, Gaussian
importance map with sigma = patch / 8 and its floor, constant padding of inputs smaller than a
window split evenly before and after) so the two engines agree to float precision; a test holds
them to it. The PyTorch engine (:mod:`neurofm.infer.predictor`) keeps MONAI's own.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.ndimage as ndi

from neurofm.data.sampling import stack_contrasts
from neurofm.errors import ConfigError, ScanError
from neurofm.preprocess import transforms
from neurofm.preprocess.windows import onnx_session, sliding_window, softmax, window_slices

#: the 8 mirror flips of a ``(B, C, X, Y, Z)`` batch (axes to flip; ``()`` is the identity)
FLIPS = [f for r in range(4) for f in itertools.combinations((2, 3, 4), r)]

#: ``(image (B, C, X, Y, Z), present (B, C)) -> logits`` as float32 arrays
Net = Callable[[np.ndarray, np.ndarray], np.ndarray]


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


def global_windows(x: np.ndarray, patch: int, whole: int = 0, shape: list[int] | None = None) -> np.ndarray:
    """The windows a cls/reg model reads of one scan ``(1, C, X, Y, Z)``: padded to at least ``patch`` and
    tiled without overlap, ``(W, C, patch, patch, patch)`` (the last window of an axis ends at its edge);
    or, with ``whole`` > 0, the whole scan as one window, padded evenly to a multiple of ``whole`` (and to at
    least ``shape``: the fixed size a model trained on whole scans saw them at)."""
    if whole > 0:
        least = shape or [0] * 3
        target = [-(-max(n, m) // whole) * whole for n, m in zip(x.shape[2:], least, strict=True)]
        return np.stack([transforms.pad_to_shape(a, target, float(a.min())) for a in x[0]])[None]
    xs = np.stack([transforms.pad_to(a, patch, float(a.min())) for a in x[0]])
    return np.stack([xs[(slice(None), *w)] for w in window_slices(tuple(xs.shape[1:]), patch, 0.0)])


def entropy(probs: np.ndarray, axis: int = 0) -> np.ndarray:
    return -(probs * np.log(np.clip(probs, 1e-8, 1.0))).sum(axis)


def flip(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    return np.flip(x, axes) if axes else x


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


class PredictorBase:
    """What both engines share (see module docstring); a subclass gives the network's call (:meth:`_net`)
    and may replace the segmentation window loop (:meth:`_segment`).

    Args:
        members: the network(s), averaged as an ensemble when more than one.
        info: task description: ``task``, ``contrasts``, ``classes``, ``patch`` and, for
            regression, ``target_mean``/``target_std``; cls may carry a ``temperature``.
        tta: average over the 8 mirror flips.
        overlap: window overlap in [0, 1) for segmentation; classification and regression
            tile the scan without overlap (every voxel is seen once; their outputs are pooled).
        lcc: keep the largest connected component per class (segmentation).
    """

    def __init__(
        self, members: list[Any], info: dict[str, Any], *, tta: bool = True, overlap: float = 0.5, lcc: bool = False,
        sw_batch: int = 4,
    ):  # fmt: skip
        if not 0 <= overlap < 1:
            raise ConfigError(f"overlap should be in [0, 1), got {overlap}")
        self.members = list(members)
        self.member = self.members[0]  # the one being applied
        self.info = info
        self.task = info["task"]
        self.contrasts = list(info["contrasts"])
        self.patch = int(info["patch"])  # cls/reg windows: the scale the head was trained at
        self.seg_patch = int(info.get("infer_patch") or self.patch)  # seg: fully convolutional, any multiple
        self.tta, self.overlap, self.lcc, self.sw_batch = tta, overlap, lcc, sw_batch
        self.preprocessing: dict[str, Any] = {}

    # ------------------------------------------------------------ the engine's part
    def _net(self, x: np.ndarray, present: np.ndarray) -> np.ndarray:
        """The current member on a batch: ``(B, C, *patch)``, ``(B, C)`` -> logits, float32 arrays."""
        raise NotImplementedError

    def _segment_probs(self, x: np.ndarray, present: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
        """Softmax probabilities ``(1, K, X, Y, Z)`` of one mirror flip over the whole volume."""

        def net(t: np.ndarray) -> np.ndarray:
            return softmax(self._net(t, np.broadcast_to(present, (len(t), present.shape[1]))), axis=1)

        xi = np.ascontiguousarray(flip(x, axes))
        p = sliding_window(xi, self.seg_patch, net, batch=self.sw_batch, overlap=self.overlap, cval=float(x.min()))
        return flip(p, axes)

    # ------------------------------------------------------------ shared
    def check_member(self, info: dict[str, Any]) -> None:
        for key in ("task", "contrasts", "classes", "target"):
            if str(info.get(key)) != str(self.info.get(key)):
                raise ConfigError(f"ensemble members differ in {key}: {info.get(key)} vs {self.info.get(key)}")

    def _stack(self, images: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        if not any(c in images for c in self.contrasts):
            raise ConfigError(f"none of the model's contrasts {self.contrasts} is given (got {sorted(images)})")
        x, present = stack_contrasts(images, self.contrasts)
        return x[None], present[None].astype(np.float32)

    def predict(self, images: dict[str, np.ndarray]) -> CasePrediction:
        """Predict from preprocessed arrays (store grid), ``contrast -> (X, Y, Z)``."""
        x, present = self._stack(images)
        flips = FLIPS if self.tta else [()]
        parts = []
        for member in self.members:
            self.member = member
            parts.append(self._segment(x, present, flips) if self.task == "seg" else self._global(x, present, flips))
        self.member = self.members[0]
        return parts[0] if len(parts) == 1 else self._combine(parts)

    def _segment(self, x: np.ndarray, present: np.ndarray, flips) -> CasePrediction:
        probs, sq = None, None
        for f in flips:
            p = self._segment_probs(x, present, f)[0]
            fg = 1.0 - p[0]
            probs = p if probs is None else probs + p
            sq = fg**2 if sq is None else sq + fg**2
        assert probs is not None and sq is not None
        probs = (probs / len(flips)).astype(np.float32)
        labels = probs.argmax(0).astype(np.uint8)
        fg_mean = 1.0 - probs[0]
        fg_std = np.sqrt(np.clip(sq / len(flips) - fg_mean**2, 0.0, None))
        unc = {"entropy": float(entropy(probs).mean()), "tta_std": float(fg_std.mean())}  # over the (cropped) volume
        if self.lcc:
            labels = largest_component(labels)
        return CasePrediction("seg", probs=probs, labels=labels, uncertainty=unc)

    def _global(self, x: np.ndarray, present: np.ndarray, flips) -> CasePrediction:
        wins = global_windows(x, self.patch, int(self.info.get("whole_scan", 0)), self.info.get("whole_shape"))
        per_window = []
        for i in range(0, len(wins), self.sw_batch):
            batch = wins[i : i + self.sw_batch]
            pr = np.broadcast_to(present, (len(batch), present.shape[1]))
            per_window.append(np.stack([self._net(np.ascontiguousarray(flip(batch, f)), pr) for f in flips]))
        outs = np.concatenate(per_window, axis=1).astype(np.float64)  # (flips, windows, K)
        logits = outs.mean(0)  # (windows, K)
        temperature = float(self.info.get("temperature", 1.0))
        if self.task == "cls":
            probs = softmax(logits.mean(0) / temperature, axis=0)
            per_flip = softmax(outs.mean(1) / temperature, axis=1)[:, int(probs.argmax())]
            unc = {"entropy": float(entropy(probs)), "tta_std": float(per_flip.std())}
            return CasePrediction("cls", probs=probs.astype(np.float32), uncertainty=unc)
        std, mean = self.info.get("target_std", 1.0), self.info.get("target_mean", 0.0)
        value = float(_median(logits[:, 0])) * std + mean
        unc = {
            "tta_std": float(np.std([_median(o) for o in outs[:, :, 0]])) * std,
            "window_std": float(logits[:, 0].std()) * std if len(logits) > 1 else 0.0,
        }
        return CasePrediction("reg", value=value, uncertainty=unc)

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
        ent = entropy(probs)
        if self.task == "cls":
            top = int(probs.argmax())
            spread = float(np.std([p.probs[top] for p in parts]))
            unc = {"entropy": float(ent), "tta_std": mean_unc("tta_std"), "ensemble_std": spread}
            return CasePrediction("cls", probs=probs, uncertainty=unc)
        labels = probs.argmax(0).astype(np.uint8)
        if self.lcc:
            labels = largest_component(labels)
        spread = float(np.std([1.0 - p.probs[0] for p in parts], axis=0).mean())
        unc = {"entropy": float(ent.mean()), "tta_std": mean_unc("tta_std"), "ensemble_std": spread}
        return CasePrediction("seg", probs=probs, labels=labels, uncertainty=unc)

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

        prep = self.preprocessing or {}
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
            "brain_mask": prepared.label_meta.get("brain", {}).get("source", "none"),
        }
        failed = [f["reason"] for f in prepared.failures if f.get("name") == "brain"]
        if failed:  # predicted without a mask (the head's foreground), as the row says
            row["brain_mask"] = f"none ({failed[0]})"
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


def _median(v: np.ndarray) -> float:
    """The lower median (as ``torch.median``): an element of ``v``, not the mean of the two middle ones."""
    s = np.sort(np.asarray(v).ravel())
    return float(s[(len(s) - 1) // 2])


class OnnxPredictor(PredictorBase):
    """An exported model (``neurofm export --format onnx``) on onnxruntime; no PyTorch needed."""

    def __init__(self, folder: str | Path, *, threads: int | None = None, **kwargs: Any):
        from neurofm.utils import read_json

        meta_path = Path(folder) / "neurofm-export.json"
        if not meta_path.is_file():
            raise ConfigError(f"{folder}: not an exported model (no neurofm-export.json)")
        meta = read_json(meta_path)
        if meta.get("format") != "onnx":
            raise ConfigError(f"{folder}: holds a {meta.get('format')} export; --engine onnx runs an ONNX one")
        super().__init__([onnx_session(Path(folder) / meta["file"], threads)], meta["task_info"], **kwargs)
        self.preprocessing = meta["preprocessing"]
        self.meta = meta

    def add_export(self, folder: str | Path, threads: int | None = None) -> None:
        """Another exported model of the same task (an ensemble of fine-tuning seeds)."""
        other = OnnxPredictor(folder, threads=threads)
        self.check_member(other.info)
        self.members.append(other.members[0])

    def _net(self, x: np.ndarray, present: np.ndarray) -> np.ndarray:
        feed = {"image": np.ascontiguousarray(x, np.float32), "present": np.ascontiguousarray(present, np.float32)}
        return self.member.run(None, feed)[0]
