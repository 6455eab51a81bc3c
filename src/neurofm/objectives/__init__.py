"""Pretraining objectives: the model predicts, the objective scores.

Each objective is a config dataclass (every loss weight is a switch: 0 removes the term)
and an ``nn.Module`` called as ``loss(model, batch, progress) -> (total, terms, outputs)``.
The config is the recipe's voice on everything the objective implies elsewhere: its
``data_mode`` (pair / scan / stack), ``data_needs()`` (regional volumes, label maps),
``model_kwargs(kwargs, data, extra)`` (pretext heads sized from the data) and
``example_batch(...)`` (inputs of the loader's shapes, for benchmarks and tests).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from neurofm.config import build
from neurofm.errors import ConfigError
from neurofm.objectives.fomo25 import Fomo25Config, Fomo25Loss
from neurofm.objectives.lamim import LaMIMConfig, LaMIMLoss
from neurofm.objectives.mae import MAEConfig, MAELoss
from neurofm.objectives.ssl3d import SSL3DConfig, SSL3DLoss

OBJECTIVES: dict[str, tuple[type, type]] = {
    "fomo25": (Fomo25Config, Fomo25Loss),
    "ssl3d": (SSL3DConfig, SSL3DLoss),
    "lamim": (LaMIMConfig, LaMIMLoss),
    "mae": (MAEConfig, MAELoss),
}

ObjectiveConfig = Fomo25Config | SSL3DConfig | LaMIMConfig | MAEConfig


def objective_config(d: dict[str, Any] | ObjectiveConfig) -> ObjectiveConfig:
    """Build the config dataclass of ``d['kind']``; unknown keys are an error that lists the valid ones."""
    if not isinstance(d, dict):
        return d
    kind = d.get("kind")
    if kind not in OBJECTIVES:
        raise ConfigError(f"unknown objective kind {kind!r}; choose from {list(OBJECTIVES)}")
    return build(OBJECTIVES[kind][0], d, "objective")


def build_objective(cfg: ObjectiveConfig | dict[str, Any]) -> nn.Module:
    cfg = objective_config(cfg)
    return OBJECTIVES[cfg.kind][1](cfg)


__all__ = ["OBJECTIVES", "ObjectiveConfig", "build_objective", "objective_config"]
