"""Whole-scan inference with PyTorch: the run's preprocessing, sliding windows, mirror TTA, native space.

* segmentation: MONAI ``sliding_window_inference`` with Gaussian weighting on the model's
  device, softmax averaged over mirror flips; optional largest connected component per class;
  the label map is put back on the reference scan's own grid (affine, shape, orientation);
* classification: logits of every window (and flip) averaged, then softmax;
* regression: the median over windows of the flip-averaged predictions.

Everything but the network's call is shared with the PyTorch-free ONNX engine
(:mod:`neurofm.infer.runtime`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from neurofm.errors import ConfigError
from neurofm.infer.runtime import FLIPS, CasePrediction, OnnxPredictor, PredictorBase, largest_component

__all__ = ["FLIPS", "CasePrediction", "OnnxPredictor", "Predictor", "largest_component"]


class Predictor(PredictorBase):
    """Applies a fine-tuned model (a :class:`~neurofm.models.downstream.DownstreamModel`) with PyTorch.

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
        self.device = torch.device(device)
        super().__init__([model.to(self.device).eval()], info, tta=tta, overlap=overlap, lcc=lcc, sw_batch=sw_batch)

    @property
    def model(self) -> torch.nn.Module:
        return self.members[0]

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

    def add_member(self, model: torch.nn.Module, info: dict[str, Any]) -> None:
        """Add another model of the same task, contrasts and classes (e.g. the same fine-tuning with another
        seed): predictions average the members and their spread becomes ``uncertainty['ensemble_std']``."""
        self.check_member(info)
        self.members.append(model.to(self.device).eval())

    @torch.no_grad()
    def predict(self, images: dict[str, np.ndarray]) -> CasePrediction:
        return super().predict(images)

    def _net(self, x: np.ndarray, present: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(self.device)
        p = torch.from_numpy(np.array(present, np.float32)).to(self.device)  # a copy: broadcast views are read-only
        return self.member(t, p).float().cpu().numpy()

    def _segment_probs(self, x: np.ndarray, present: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
        from monai.inferers import sliding_window_inference

        pr = torch.from_numpy(present).to(self.device)

        def net(t: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.member(t, pr.expand(t.shape[0], -1)), dim=1)

        xi = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        xi = torch.flip(xi, axes) if axes else xi
        p = sliding_window_inference(
            xi,
            (self.seg_patch,) * 3,
            self.sw_batch,
            net,
            overlap=self.overlap,
            mode="gaussian",
            padding_mode="constant",
            cval=float(x.min()),
        )
        p = torch.flip(p, axes) if axes else p
        return p.float().cpu().numpy()
