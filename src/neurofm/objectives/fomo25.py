"""fomo25: dual-latent VAE with cross-contrast swapping (and, with its terms off, plain MAE).

Loss = w_rec (rec_a + rec_b) + w_swap (swap_ab + swap_ba) + w_kl(t) sum KL
       + w_align (1 - cos(zs_a, zs_b)) + w_repel cos(zc_a, zc_b)

* rec: SmoothL1 (beta 0.1) over the volume, or MSE on masked voxels only.
* swap_ab decodes ``[mean(zs_a, zs_b), zc_b]`` and compares it with ``x_b``: anatomy of
  both scans rendered in b's contrast. (The challenge's public code compares it with
  ``x_a``, which fights the contrast term; this is the intended target.)
* KL weight ramps linearly from 0 to ``w_kl`` over ``kl_warmup_epochs``.
* The cosine terms use the latent means (flattened per sample).
* A session with one scan contributes only its reconstruction and KL.
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
from neurofm.objectives.masking import block_mask


@dataclass
class Fomo25Config:
    kind: str = "fomo25"
    block: int = 4
    mask_ratio: float = 0.6
    rec_loss: str = "smooth_l1"  # smooth_l1 (whole volume) | masked_mse
    smooth_l1_beta: float = 0.1
    w_rec: float = 3.0
    w_swap: float = 1.0
    w_kl: float = 1e-3
    kl_warmup_epochs: float = 10.0
    w_align: float = 0.5
    w_repel: float = 0.5
    variational: bool = True

    data_mode: ClassVar[str] = "pair"

    def data_needs(self) -> DataNeeds:
        return DataNeeds()

    def model_kwargs(self, kwargs: dict[str, Any], data: DataConfig, extra: dict[str, Any]) -> dict[str, Any]:
        return dict(kwargs)

    def example_batch(self, batch: int, patch: int, extra: dict[str, Any], device: Any = "cpu") -> dict[str, Any]:
        """Random inputs of the shapes the loader gives (benchmarks, tests)."""
        return {
            "x_a": torch.randn(batch, 1, patch, patch, patch, device=device),
            "x_b": torch.randn(batch, 1, patch, patch, patch, device=device),
            "pair_valid": torch.ones(batch, dtype=torch.bool, device=device),
        }

    def __post_init__(self) -> None:
        if self.rec_loss not in ("smooth_l1", "masked_mse"):
            raise ConfigError(f"objective.rec_loss should be smooth_l1 or masked_mse, got {self.rec_loss!r}")
        for name in ("w_rec", "w_swap", "w_kl", "w_align", "w_repel"):
            if getattr(self, name) < 0:
                raise ConfigError(f"objective.{name} should be >= 0, got {getattr(self, name)}")


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) averaged over latent elements: ``(B,)``."""
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).flatten(1).mean(1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of flattened samples: ``(B,)``."""
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1, eps=1e-6)


def _wmean(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (v * w).sum() / w.sum().clamp_min(1.0)


class Fomo25Loss(nn.Module):
    """Scores a :class:`~neurofm.models.dual_latent.DualLatentUNet` on a batch of scan pairs."""

    def __init__(self, cfg: Fomo25Config):
        super().__init__()
        self.cfg = cfg

    def reconstruction(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Per-sample reconstruction loss ``(B,)``; ``mask`` (True = hidden) selects voxels for masked_mse."""
        if self.cfg.rec_loss == "masked_mse" and mask is not None:
            m = mask.float()
            return ((pred - target) ** 2 * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1.0)
        if self.cfg.rec_loss == "masked_mse":
            return ((pred - target) ** 2).flatten(1).mean(1)
        return F.smooth_l1_loss(pred, target, beta=self.cfg.smooth_l1_beta, reduction="none").flatten(1).mean(1)

    def swap_terms(self, model: nn.Module, zs_a, zs_b, zc_a, zc_b, x_a, x_b):
        """Cross-contrast swap: ``[mean(zs_a, zs_b), zc_b]`` -> ``x_b`` and ``[.., zc_a]`` -> ``x_a``.

        Returns:
            per-sample losses ``(swap_ab, swap_ba)`` and the two predictions.
        """
        zs = 0.5 * (zs_a + zs_b)
        pred = model.decode(torch.cat([zs, zs]), torch.cat([zc_b, zc_a]))
        pred_ab, pred_ba = pred.chunk(2)
        return (
            self.reconstruction(pred_ab, x_b, None),
            self.reconstruction(pred_ba, x_a, None),
            pred_ab,
            pred_ba,
        )

    def forward(self, model: nn.Module, batch: dict[str, Any], progress: float = 0.0):
        """Args:
            model: a dual-latent model (``forward_features`` + ``decode``).
            batch: ``x_a``, ``x_b`` ``(B, 1, X, Y, Z)``; ``pair_valid`` ``(B,)`` bool.
            progress: training progress in epochs (drives the KL warm-up).

        Returns:
            (total loss, dict of detached terms, dict of tensors for figures)
        """
        cfg = self.cfg
        x_a, x_b = batch["x_a"], batch["x_b"]
        valid = batch.get("pair_valid", torch.ones(x_a.shape[0], dtype=torch.bool, device=x_a.device)).float()
        bsz = x_a.shape[0]
        masks = block_mask(2 * bsz, tuple(x_a.shape[2:]), cfg.block, cfg.mask_ratio, device=x_a.device)
        x = torch.cat([x_a, x_b])
        lat = model.forward_features(x.masked_fill(masks, 0.0)).latents
        mu_s, lv_s, mu_c, lv_c = lat["mu_s"], lat["logvar_s"], lat["mu_c"], lat["logvar_c"]
        if cfg.variational and self.training:
            z_s = mu_s + torch.randn_like(mu_s) * (0.5 * lv_s).exp()
            z_c = mu_c + torch.randn_like(mu_c) * (0.5 * lv_c).exp()
        else:
            z_s, z_c = mu_s, mu_c
        rec = model.decode(z_s, z_c)
        rec_all = self.reconstruction(rec, x, masks)
        w = torch.cat([torch.ones_like(valid), valid])  # the b scan exists only for valid pairs
        terms: dict[str, torch.Tensor] = {}
        terms["rec"] = _wmean(rec_all[:bsz], torch.ones_like(valid)) + _wmean(rec_all[bsz:], valid)
        total = cfg.w_rec * terms["rec"]
        out = {"input": x_a, "masked": x_a.masked_fill(masks[:bsz], 0.0), "reconstruction": rec[:bsz]}
        zs_a, zs_b = z_s.chunk(2)
        zc_a, zc_b = z_c.chunk(2)
        if cfg.w_swap > 0:
            s_ab, s_ba, pred_ab, _ = self.swap_terms(model, zs_a, zs_b, zc_a, zc_b, x_a, x_b)
            terms["swap"] = _wmean(s_ab, valid) + _wmean(s_ba, valid)
            total = total + cfg.w_swap * terms["swap"]
            out.update(swap=pred_ab, target_b=x_b)
        if cfg.w_kl > 0 and cfg.variational:
            kl = kl_divergence(mu_s, lv_s) + kl_divergence(mu_c, lv_c)
            terms["kl"] = _wmean(kl, w)
            weight = cfg.w_kl * min(1.0, progress / cfg.kl_warmup_epochs) if cfg.kl_warmup_epochs > 0 else cfg.w_kl
            terms["kl_weight"] = torch.tensor(weight)
            total = total + weight * terms["kl"]
        mus_a, mus_b = mu_s.chunk(2)
        muc_a, muc_b = mu_c.chunk(2)
        if cfg.w_align > 0:
            terms["align"] = _wmean(1.0 - cosine(mus_a, mus_b), valid)
            total = total + cfg.w_align * terms["align"]
        if cfg.w_repel > 0:
            terms["repel"] = _wmean(cosine(muc_a, muc_b), valid)
            total = total + cfg.w_repel * terms["repel"]
        return total, {k: v.detach() for k, v in terms.items()}, out
