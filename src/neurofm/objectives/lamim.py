"""LaMIM: restore multi-contrast stacks from two independently corrupted views.

Each view drops holes independently per channel (contrast), filled with 0; the ViT
autoencoder restores the stack. r = L1(restore(view1), original) over present contrasts;
c = contrastive loss (temperature 0.05) between the two views' flattened restorations;
total = r + w_contrastive * c * r, as in MONAI's self-supervised tutorial.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from monai.losses import ContrastiveLoss
from torch import nn

from neurofm.errors import ConfigError
from neurofm.objectives.masking import coarse_dropout


@dataclass
class LaMIMConfig:
    kind: str = "lamim"
    hole: int = 16
    holes: int = 86  # ~40 % of a 96^3 stack (6000 for 4^3 holes)
    temperature: float = 0.05
    w_contrastive: float = 1.0

    def __post_init__(self) -> None:
        if self.hole < 1 or self.holes < 1:
            raise ConfigError(f"objective.hole and objective.holes should be >= 1, got {self.hole}, {self.holes}")
        if not self.temperature > 0:
            raise ConfigError(f"objective.temperature should be > 0, got {self.temperature}")


class LaMIMLoss(nn.Module):
    def __init__(self, cfg: LaMIMConfig):
        super().__init__()
        self.cfg = cfg
        self.contrastive = ContrastiveLoss(temperature=cfg.temperature)

    def forward(self, model: nn.Module, batch: dict[str, Any], progress: float = 0.0):
        """Args:
        batch: ``x`` (B, C, X, Y, Z) stacks, missing contrasts zero-filled; ``present`` (B, C) bool.
        """
        cfg = self.cfg
        x = batch["x"]
        present = batch.get("present", torch.ones(x.shape[:2], dtype=torch.bool, device=x.device))
        v1, m1 = coarse_dropout(x, cfg.hole, cfg.holes)
        v2, _ = coarse_dropout(x, cfg.hole, cfg.holes)
        r = model(torch.cat([v1, v2]))
        r1, r2 = r.chunk(2)
        w = present.float()[:, :, None, None, None].expand_as(x)
        terms = {"l1": ((r1 - x).abs() * w).sum() / w.sum().clamp_min(1.0)}
        total = terms["l1"]
        if cfg.w_contrastive > 0 and x.shape[0] > 1:
            terms["contrastive"] = self.contrastive(r1.flatten(1), r2.flatten(1))
            total = total + cfg.w_contrastive * terms["contrastive"] * terms["l1"]
        out = {"input": x[:, :1], "masked": v1[:, :1], "reconstruction": r1[:, :1]}
        return total, {k: v.detach() for k, v in terms.items()}, out
