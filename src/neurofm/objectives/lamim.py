"""LaMIM: restore multi-contrast stacks from two independently corrupted views.

Each view drops holes independently per channel (contrast), filled with 0; the ViT
autoencoder restores the stack. r = L1(restore(view1), original) over present contrasts;
c = contrastive loss (temperature 0.05) between the two views' flattened restorations;
total = r + w_contrastive * c * r, as in MONAI's self-supervised tutorial.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from monai.losses import ContrastiveLoss
from torch import nn

from neurofm.data.config import DataConfig
from neurofm.data.pretrain import DataNeeds
from neurofm.errors import ConfigError
from neurofm.objectives.masking import coarse_dropout, holes_for_fraction


@dataclass
class LaMIMConfig:
    kind: str = "lamim"
    hole: int = 16
    holes: int | None = (
        None  # None: as many as cover ``hole_fraction`` of the patch (the paper: 86 of 16^3, 6000 of 4^3)
    )
    hole_fraction: float = 0.4
    temperature: float = 0.05
    w_contrastive: float = 1.0

    data_mode: ClassVar[str] = "stack"

    def __post_init__(self) -> None:
        if self.hole < 1 or (self.holes is not None and self.holes < 1):
            raise ConfigError(f"objective.hole and objective.holes should be >= 1, got {self.hole}, {self.holes}")
        if not self.temperature > 0:
            raise ConfigError(f"objective.temperature should be > 0, got {self.temperature}")
        if not 0 < self.hole_fraction < 1:
            raise ConfigError(f"objective.hole_fraction should be in (0, 1), got {self.hole_fraction}")

    def data_needs(self) -> DataNeeds:
        return DataNeeds()

    def model_kwargs(self, kwargs: dict[str, Any], data: DataConfig, extra: dict[str, Any]) -> dict[str, Any]:
        """One input and one output channel per contrast of the stack; the ViT's cube is the patch."""
        kw = dict(kwargs)
        kw.setdefault("in_channels", len(data.contrasts or []) or 4)
        kw.setdefault("out_channels", kw["in_channels"])
        if kw.get("img_size", data.patch) != data.patch:
            raise ConfigError(f"model img_size {kw['img_size']} differs from data.patch {data.patch}")
        kw["img_size"] = data.patch
        return kw

    def holes_for(self, spatial: tuple[int, int, int]) -> int:
        return self.holes if self.holes is not None else holes_for_fraction(spatial, self.hole, self.hole_fraction)

    def example_batch(self, batch: int, patch: int, extra: dict[str, Any], device: Any = "cpu") -> dict[str, Any]:
        """Random inputs of the shapes the loader gives (benchmarks, tests)."""
        c = int(extra.get("channels", 4))
        return {
            "x": torch.rand(batch, c, patch, patch, patch, device=device),
            "present": torch.ones(batch, c, dtype=torch.bool, device=device),
        }


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
        holes = cfg.holes_for(tuple(x.shape[2:]))
        v1, _ = coarse_dropout(x, cfg.hole, holes)
        v2, _ = coarse_dropout(x, cfg.hole, holes)
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
