"""Plain masked image modelling on one scan: nnssl's MAE pretraining of Primus and ResEnc.

75 % of ``block^3`` cubes are set to 0 and the network reconstructs the scan; the loss is the
MSE on the hidden voxels. With ``block`` equal to a transformer's patch size the hidden cubes
are whole tokens (nnssl's Primus MAE drops those tokens inside the encoder and fills them
with a mask token; here they enter as zeros, as in SparK-style convolutional MAE).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from neurofm.data.config import DataConfig
from neurofm.data.pretrain import DataNeeds
from neurofm.objectives.masking import masked_reconstruction


@dataclass
class MAEConfig:
    kind: str = "mae"
    block: int = 16
    mask_ratio: float = 0.75

    data_mode: ClassVar[str] = "scan"

    def data_needs(self) -> DataNeeds:
        return DataNeeds()

    def model_kwargs(self, kwargs: dict[str, Any], data: DataConfig, extra: dict[str, Any]) -> dict[str, Any]:
        return dict(kwargs)

    def example_batch(self, batch: int, patch: int, extra: dict[str, Any], device: Any = "cpu") -> dict[str, Any]:
        return {"x": torch.randn(batch, 1, patch, patch, patch, device=device)}


class MAELoss(nn.Module):
    def __init__(self, cfg: MAEConfig):
        super().__init__()
        self.cfg = cfg

    def forward(self, model: nn.Module, batch: dict[str, Any], progress: float = 0.0):
        """``batch["x"]`` ``(B, 1, X, Y, Z)`` -> (loss, terms, images for the figures)."""
        x = batch["x"]
        mse, pred, mask = masked_reconstruction(model, x, self.cfg.block, self.cfg.mask_ratio)
        out = {"input": x, "masked": x.masked_fill(mask, 0.0), "reconstruction": pred["reconstruction"]}
        return mse, {"mae": mse.detach()}, out
