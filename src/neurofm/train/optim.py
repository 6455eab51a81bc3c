"""Optimisers and learning-rate schedules of the recipes."""

from __future__ import annotations

import math

import torch

from neurofm.train.config import OptimConfig


def lr_factor(step: int, total: int, steps_per_epoch: int, cfg: OptimConfig) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based)."""
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "poly":
        return max(0.0, 1.0 - step / max(total, 1)) ** cfg.poly_exponent
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warm:
        return cfg.warmup_start_factor + (1.0 - cfg.warmup_start_factor) * step / warm
    t = (step - warm) / max(total - warm, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


def build_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
