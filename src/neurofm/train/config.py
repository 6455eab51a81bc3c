"""Run configuration: typed dataclasses, named presets, dotted overrides.

Precedence: preset -> YAML file -> ``--set key=value`` flags. The resolved config is saved
in the run folder (``run.json``) and is enough to rebuild the run.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from neurofm.errors import ConfigError
from neurofm.objectives import ObjectiveConfig, objective_config


@dataclass
class ModelSpec:
    """A registered model name and the keyword arguments that build it."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """What the loader feeds the objective.

    Attributes:
        mode: ``pair`` (two contrasts of one session, same crop), ``scan`` (one scan with
            subject metadata) or ``stack`` (all of ``contrasts`` as channels, missing ones
            zero-filled and flagged).
        patch: cubic crop size in voxels.
        contrasts: contrasts used (None: all in the store); the channel order for ``stack``.
        steps_per_epoch: optimiser steps per epoch (across all devices).
        fit: ``crop`` a random patch, or ``resize`` the whole volume to the patch (stack mode).
        intensity: ``zscore`` (as stored) or ``minmax`` (each channel to [0, 1], as LaMIM).
    """

    mode: str = "pair"
    patch: int = 128
    batch_size: int = 2
    num_workers: int = 4
    contrasts: list[str] | None = None
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
        if self.mode not in ("pair", "scan", "stack"):
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


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule (per step, expressed in epochs)."""

    name: str = "adamw"  # adamw | adam | sgd
    lr: float = 1e-4
    weight_decay: float = 0.01
    momentum: float = 0.99
    nesterov: bool = True
    schedule: str = "warmup_cosine"  # warmup_cosine | poly | constant
    warmup_epochs: float = 5.0
    warmup_start_factor: float = 1e-3
    poly_exponent: float = 0.9
    grad_clip: float = 1.0
    epochs: int = 100

    def __post_init__(self) -> None:
        if self.name not in ("adamw", "adam", "sgd"):
            raise ConfigError(f"optim.name should be adamw, adam or sgd, got {self.name!r}")
        if self.schedule not in ("warmup_cosine", "poly", "constant"):
            raise ConfigError(f"optim.schedule should be warmup_cosine, poly or constant, got {self.schedule!r}")
        if not self.lr > 0 or self.epochs < 1:
            raise ConfigError(f"optim.lr should be > 0 and optim.epochs >= 1, got {self.lr}, {self.epochs}")


@dataclass
class TrainerConfig:
    """Devices, precision and bookkeeping (Lightning Trainer settings)."""

    accelerator: str = "auto"  # auto | cpu | gpu
    devices: Any = "auto"  # number of devices per node, or "auto"
    num_nodes: int = 1
    precision: str = "auto"  # auto: bf16-mixed on GPUs that support it, else 32-true
    max_steps: int = -1  # > 0: stop after this many steps (overrides epochs x steps_per_epoch)
    checkpoint_every: int = 200  # steps
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    compile: bool = False


@dataclass
class RunConfig:
    """Everything a pretraining run needs besides the data store."""

    preset: str
    model: ModelSpec
    objective: ObjectiveConfig
    data: DataConfig
    optim: OptimConfig
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    extra: dict[str, Any] = field(default_factory=dict)  # values derived from the data (e.g. region names)

    @property
    def total_steps(self) -> int:
        if self.trainer.max_steps > 0:
            return self.trainer.max_steps
        return self.optim.epochs * self.data.steps_per_epoch

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        d = copy.deepcopy(d)
        try:
            return cls(
                preset=d["preset"],
                model=ModelSpec(**d["model"]),
                objective=objective_config(d["objective"]),
                data=_build(DataConfig, d.get("data", {}), "data"),
                optim=_build(OptimConfig, d.get("optim", {}), "optim"),
                trainer=_build(TrainerConfig, d.get("trainer", {}), "trainer"),
                extra=d.get("extra", {}),
            )
        except KeyError as e:
            raise ConfigError(f"run config is missing {e}") from None

    def override(self, assignments: list[str] | dict[str, Any]) -> RunConfig:
        """Apply ``section.key=value`` assignments (values parsed as YAML) and re-validate."""
        d = self.to_dict()
        items = assignments.items() if isinstance(assignments, dict) else (_split(a) for a in assignments)
        for key, value in items:
            _assign(d, key, value)
        return RunConfig.from_dict(d)


def _build(cls: type, d: dict[str, Any], section: str) -> Any:
    names = {f.name for f in fields(cls)}
    bad = sorted(set(d) - names)
    if bad:
        raise ConfigError(f"unknown {section} option(s) {bad}; valid: {sorted(names)}")
    return cls(**d)


def _split(assignment: str) -> tuple[str, Any]:
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value (e.g. optim.lr=3e-4), got {assignment!r}")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _assign(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = d
    for i, p in enumerate(parts[:-1]):
        if not isinstance(node, dict) or p not in node:
            raise ConfigError(f"unknown setting {dotted!r}: no section {'.'.join(parts[: i + 1])!r}")
        node = node[p]
    leaf = parts[-1]
    free = len(parts) >= 2 and parts[-2] in ("kwargs", "extra")  # model.kwargs.* accept new keys
    if not isinstance(node, dict) or (leaf not in node and not free):
        valid = sorted(node) if isinstance(node, dict) else []
        raise ConfigError(f"unknown setting {dotted!r}; valid keys here: {valid}")
    node[leaf] = _coerce(node.get(leaf), value, dotted)


def _coerce(old: Any, new: Any, dotted: str) -> Any:
    """Give a value the type of the setting it replaces (YAML reads ``3e-4`` as text)."""
    if isinstance(new, str) and isinstance(old, int | float) and not isinstance(old, bool):
        try:
            return float(new) if isinstance(old, float) or any(c in new for c in ".eE") else int(new)
        except ValueError:
            raise ConfigError(f"{dotted} should be a number, got {new!r}") from None
    if isinstance(old, float) and isinstance(new, int) and not isinstance(new, bool):
        return float(new)
    return new


def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    return data


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{'optim': {'lr': 1}}`` -> ``{'optim.lr': 1}`` (model.kwargs stay whole)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k not in ("kwargs", "extra"):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def as_plain(obj: Any) -> Any:
    return asdict(obj) if is_dataclass(obj) else obj
