"""What the pretraining loader feeds an objective (one section of a recipe)."""

from __future__ import annotations

from dataclasses import dataclass

from neurofm.errors import ConfigError

DATA_MODES = ("pair", "scan", "stack")


@dataclass
class DataConfig:
    """What the loader feeds the objective.

    Attributes:
        mode: ``pair`` (two contrasts of one session, same crop), ``scan`` (one scan with
            subject metadata) or ``stack`` (all of ``contrasts`` as channels, missing ones
            zero-filled and flagged). The recipe's objective decides it.
        patch: cubic crop size in voxels.
        contrasts: contrasts used (None: all in the store); the channel order for ``stack``.
        exclude_subjects: subjects never sampled (e.g. every fine-tuning subject, so the
            pretraining pool stays disjoint from them).
        steps_per_epoch: optimiser steps per epoch (across all devices).
        fit: ``crop`` a random patch, or ``resize`` the whole volume to the patch (stack mode).
        intensity: ``zscore`` (as stored) or ``minmax`` (each channel to [0, 1], as LaMIM).
    """

    mode: str = "pair"
    patch: int = 128
    batch_size: int = 2
    num_workers: int = 4
    contrasts: list[str] | None = None
    exclude_subjects: list[str] | None = None
    steps_per_epoch: int = 250
    fit: str = "crop"
    intensity: str = "zscore"
    augment: bool = True
    flip_p: float = 0.5
    affine_p: float = 0.2
    rotate_deg: float = 10.0
    scale: float = 0.1
    gamma_p: float = 0.3
    noise_p: float = 0.1
    health_label: str = "healthy"

    def __post_init__(self) -> None:
        if self.mode not in DATA_MODES:
            raise ConfigError(f"data.mode should be pair, scan or stack, got {self.mode!r}")
        if self.fit not in ("crop", "resize"):
            raise ConfigError(f"data.fit should be crop or resize, got {self.fit!r}")
        if self.intensity not in ("zscore", "minmax"):
            raise ConfigError(f"data.intensity should be zscore or minmax, got {self.intensity!r}")
        if self.patch < 8 or self.batch_size < 1 or self.steps_per_epoch < 1 or self.num_workers < 0:
            raise ConfigError(
                f"data.patch >= 8, batch_size >= 1, steps_per_epoch >= 1, num_workers >= 0 needed; got "
                f"{self.patch}, {self.batch_size}, {self.steps_per_epoch}, {self.num_workers}"
            )
