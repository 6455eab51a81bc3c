"""ssl3d: anatomy-anchored MAE on ResEnc-L (and, with its heads off, plain MAE).

Loss = w_mae MSE(masked voxels) + w_anatomy (1 - cos(projection, v)) + w_health CE
       [+ w_dense CE(dense labels)]

* 75 % of 16^3 blocks are set to 0; the decoder reconstructs, scored on masked voxels.
* v is the subject's regional-volume vector divided by intracranial volume, then
  standardised per region over the training set (otherwise every subject's vector is
  nearly parallel and the cosine carries no information); identical for every scan of a
  subject. Samples without volumes are skipped for this term.
* The health classifier sees the mean of the health channels; unknown labels (-1) are ignored.
* ``heads_input``: what the anatomy, health and dense heads read. ``masked`` (default): the bottleneck of the
  masked crop, the one forward pass the reconstruction uses (SPEC 1b splits that bottleneck). ``clean``: a second
  encoder pass on the unmasked crop, so a lesion the mask hides still reaches the health classifier; the
  reconstruction is unchanged. It costs one more encoder pass per step.
* Dense variant: a 1x1x1 head on the anatomy channels predicts the label map (upsampled
  to the patch), for every contrast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from neurofm.data.config import DataConfig
from neurofm.data.pretrain import DataNeeds
from neurofm.errors import ConfigError
from neurofm.objectives.fomo25 import known_ce
from neurofm.objectives.masking import masked_reconstruction


@dataclass
class SSL3DConfig:
    kind: str = "ssl3d"
    block: int = 16
    mask_ratio: float = 0.75
    w_mae: float = 1.0
    w_anatomy: float = 0.1
    w_health: float = 0.1
    w_dense: float = 0.0
    heads_input: str = "masked"

    data_mode: ClassVar[str] = "scan"

    def __post_init__(self) -> None:
        for name in ("w_mae", "w_anatomy", "w_health", "w_dense"):
            if getattr(self, name) < 0:
                raise ConfigError(f"objective.{name} should be >= 0, got {getattr(self, name)}")
        if self.heads_input not in ("masked", "clean"):
            raise ConfigError(f"objective.heads_input should be 'masked' or 'clean', got {self.heads_input!r}")

    def data_needs(self) -> DataNeeds:
        return DataNeeds(volumes=self.w_anatomy > 0, dense=self.w_dense > 0)

    def model_kwargs(self, kwargs: dict[str, Any], data: DataConfig, extra: dict[str, Any]) -> dict[str, Any]:
        """The pretext heads sized from the data: one anatomy output per region, two health classes, dense labels."""
        return {
            **kwargs,
            "anatomy_outputs": len(extra["regions"]) if self.w_anatomy > 0 else 0,
            "health_classes": 2 if self.w_health > 0 else 0,
            "dense_classes": len(extra["dense_labels"]) if self.w_dense > 0 else 0,
        }

    def example_batch(self, batch: int, patch: int, extra: dict[str, Any], device: Any = "cpu") -> dict[str, Any]:
        """Random inputs of the shapes the loader gives (benchmarks, tests)."""
        out = {
            "x": torch.randn(batch, 1, patch, patch, patch, device=device),
            "volumes": torch.randn(batch, len(extra.get("regions", ())), device=device),
            "has_volumes": torch.ones(batch, dtype=torch.bool, device=device),
            "health": torch.ones(batch, dtype=torch.long, device=device),
        }
        if self.w_dense > 0:
            k = len(extra["dense_labels"])
            out["dseg"] = torch.randint(0, k, (batch, patch, patch, patch), device=device)
        return out


class SSL3DLoss(nn.Module):
    def __init__(self, cfg: SSL3DConfig):
        super().__init__()
        self.cfg = cfg

    def forward(self, model: nn.Module, batch: dict[str, Any], progress: float = 0.0):
        """Args:
        batch: ``x`` (B, 1, X, Y, Z); ``volumes`` (B, D) and ``has_volumes`` (B,);
            ``health`` (B,) long (-1 unknown); ``dseg`` (B, X, Y, Z) long for the dense variant.
        """
        cfg = self.cfg
        x = batch["x"]
        mse, pred, mask = masked_reconstruction(model, x, cfg.block, cfg.mask_ratio)
        rec = pred["reconstruction"]
        if cfg.heads_input == "clean" and (cfg.w_anatomy > 0 or cfg.w_health > 0 or cfg.w_dense > 0):
            pred = {**model.forward_pretext(x, reconstruct=False), "reconstruction": rec}
        terms = {"mae": mse}
        total = cfg.w_mae * terms["mae"]
        if cfg.w_anatomy > 0 and pred["anatomy"] is not None:
            proj = pred["anatomy"]
            has = batch["has_volumes"].float()
            cos = F.cosine_similarity(proj, batch["volumes"].to(proj.dtype), dim=1, eps=1e-6)
            terms["anatomy"] = ((1.0 - cos) * has).sum() / has.sum().clamp_min(1.0)
            total = total + cfg.w_anatomy * terms["anatomy"]
        if cfg.w_health > 0 and pred["health"] is not None:
            # averaged over the known labels; 0, with every parameter kept in the graph, when none is (no host sync)
            terms["health"] = known_ce(pred["health"], batch["health"].long())
            total = total + cfg.w_health * terms["health"]
        if cfg.w_dense > 0:
            if pred["dense"] is None:
                raise ConfigError("objective.w_dense > 0 needs a model built with dense_classes > 0")
            logits = F.interpolate(pred["dense"], size=x.shape[2:], mode="trilinear")
            terms["dense"] = F.cross_entropy(logits, batch["dseg"].long(), ignore_index=-1)
            total = total + cfg.w_dense * terms["dense"]
        out = {"input": x, "masked": x.masked_fill(mask, 0.0), "reconstruction": rec}
        return total, {k: v.detach() for k, v in terms.items()}, out
