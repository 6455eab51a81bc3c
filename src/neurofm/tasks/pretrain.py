"""The pretraining LightningModule: a registered model, an objective, the optimiser of the recipe."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch

from neurofm.errors import NeurofmError
from neurofm.models.registry import create_model
from neurofm.objectives import build_objective
from neurofm.train.config import OptimConfig, RunConfig


class NonFiniteLossError(NeurofmError):
    """The loss became NaN or infinite: training stops, the last checkpoint stays intact."""


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


class PretrainModule(L.LightningModule):
    """Runs one recipe: ``loss, terms, outputs = objective(model, batch, progress)``."""

    def __init__(self, cfg: RunConfig):
        super().__init__()
        self.cfg = cfg
        self.model = create_model(cfg.model.name, **cfg.model.kwargs)
        self.objective = build_objective(cfg.objective)
        self.last_terms: dict[str, torch.Tensor] = {}

    def configure_model(self) -> None:
        if self.cfg.trainer.compile and not hasattr(self.model, "_orig_mod"):
            self.model = torch.compile(self.model)

    @property
    def steps_per_epoch(self) -> int:
        world = self.trainer.world_size if self._trainer is not None else 1
        return max(1, self.cfg.data.steps_per_epoch // world)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        progress = self.global_step / self.steps_per_epoch  # epochs, as a float
        loss, terms, _ = self.objective(self.model, batch, progress)
        if not torch.isfinite(loss):
            loss = loss.detach()
            bad = {k: float(v) for k, v in terms.items()}
            raise NonFiniteLossError(
                f"loss became {loss.item()} at step {self.global_step} (terms: {bad}). Training stopped; the last "
                f"checkpoint is intact. Lower the learning rate (--set optim.lr=...) or check the data."
            )
        bsz = next(v for v in batch.values() if torch.is_tensor(v)).shape[0]
        self.log("loss", loss, prog_bar=True, batch_size=bsz)
        self.log_dict({f"loss/{k}": v for k, v in terms.items()}, batch_size=bsz)
        self.last_terms = {"loss": loss.detach(), **terms}
        return loss

    def configure_optimizers(self):
        opt = build_optimizer(self.model.parameters(), self.cfg.optim)
        spe = self.steps_per_epoch
        total = self.cfg.trainer.max_steps if self.cfg.trainer.max_steps > 0 else self.cfg.optim.epochs * spe
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, spe, self.cfg.optim))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
