"""The configs of the two training verbs, on the one config system of :mod:`neurofm.config`.

* :class:`Recipe` — a pretraining recipe (``neurofm pretrain``): backbone, objective, data,
  optimiser, trainer. The objective answers for the recipe what it implies elsewhere: the
  data mode, what the loader must provide, the pretext-head sizes.
* :class:`FinetuneConfig` — a fine-tuning run (``neurofm finetune``).

Both resolve preset -> YAML/JSON file -> ``--set`` and are saved into their run folder by
:meth:`~neurofm.config.Config.save`. The preset tables live in :mod:`neurofm.train.presets`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from neurofm.config import Config
from neurofm.data.config import DataConfig
from neurofm.data.pretrain import DataNeeds
from neurofm.errors import ConfigError
from neurofm.objectives import ObjectiveConfig, objective_config

#: how the cls/reg head's output layer starts (FinetuneConfig.head_init); ``probe``: LP-FT, a closed-form linear probe
#: beside the head and the head's output layer at zero (docs/finetuning.md)
HEAD_INITS = ("default", "zero", "probe")
PROBE_WINDOWS = ("whole", "tiles", "tiles-mean")  # what the closed-form probe reads of a scan
# --mode linear: fitted in closed form, by gradient steps, or not at all (zero-shot: the pretrained model's own health
# pretext classifier read as it is, for the label its pretraining pool gave it; no labelled case is used)
LINEAR_FITS = ("closed", "sgd", "zero-shot")
PROBE_FEATURES = ("all", "stages", "pretext", "pretext-logit")  # which fused features it weighs
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")


@dataclass
class ModelSpec:
    """A registered model name and the keyword arguments that build it."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


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
    checkpoint_every: int = 200  # steps (0: only at the end)
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    compile: bool = False
    # the layout of the network's weights and activations while it trains: contiguous, channels_last
    # (channels_last_3d) or auto (channels_last on a CPU when the first 3D convolution has fewer than 32 output
    # channels, where it measured 1.2-1.5x faster per step; contiguous otherwise: benchmarks/bench_memory_format.py)
    memory_format: str = "auto"

    def __post_init__(self) -> None:
        if self.memory_format not in MEMORY_FORMATS:
            raise ConfigError(f"trainer.memory_format should be one of {MEMORY_FORMATS}, got {self.memory_format!r}")


@dataclass
class Recipe(Config):
    """A pretraining recipe: everything a run needs besides the data store (``run.json`` of a run).

    ``data.mode`` is the objective's (``pair`` for fomo25, ``scan`` for ssl3d, ``stack`` for
    lamim); ``extra`` holds what was derived from the data (region names, store settings).
    """

    preset: str
    model: ModelSpec
    objective: ObjectiveConfig = field(metadata={"build": objective_config})
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    extra: dict[str, Any] = field(default_factory=dict)

    NAME_FIELD: ClassVar[str | None] = "preset"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        """As :meth:`Config.from_dict`; ``data.mode`` defaults to the objective's."""
        if "objective" not in d:
            raise ConfigError("run config is missing 'objective'")
        d = {**d, "data": {"mode": objective_config(d["objective"]).data_mode, **d.get("data", {})}}
        return super().from_dict(d)

    def __post_init__(self) -> None:
        want = self.objective.data_mode
        if self.data.mode != want:
            raise ConfigError(
                f"data.mode {self.data.mode!r} does not fit the {self.objective.kind} objective: it reads {want!r}"
            )

    @classmethod
    def preset_table(cls) -> dict[str, dict[str, Any]]:
        from neurofm.train.presets import PRESETS

        return PRESETS

    @property
    def total_steps(self) -> int:
        if self.trainer.max_steps > 0:
            return self.trainer.max_steps
        return self.optim.epochs * self.data.steps_per_epoch

    def data_needs(self) -> DataNeeds:
        return self.objective.data_needs()

    def model_kwargs(self, extra: dict[str, Any]) -> dict[str, Any]:
        """The backbone's arguments completed from the data (``extra``: region names, label values)."""
        return self.objective.model_kwargs(dict(self.model.kwargs), self.data, extra)


@dataclass
class FinetuneConfig(Config):
    """Settings of ``neurofm finetune`` (see its ``--help``).

    ``source``: a pretrained run folder, ``scratch`` (the architecture of ``arch`` trained from
    random weights, full mode) or ``random`` (``arch`` randomly initialised and frozen: the
    floor a pretrained encoder must beat, linear / frozen mode). ``arch``: a recipe name or a
    run folder whose backbone to use.

    In ``full`` mode from pretrained weights the head (or decoder) trains alone for the first
    ``head_warmup`` of the steps, then the encoder joins at ``lr x backbone_lr_scale``, warming up
    linearly over ``warmup_fraction`` of the steps; everything decays on a cosine.
    """

    task: str
    target: str
    preset: str = ""
    source: str = "scratch"  # a pretrained run folder, or "scratch"
    arch: str = "fomo25"  # preset whose backbone is used from scratch
    contrasts: list[str] | None = None
    mode: str = "full"
    shots: int | None = None
    folds: int = 0
    train_sites: list[str] | None = None
    test_sites: list[str] | None = None
    train_subjects: list[str] | None = None  # exactly these subjects for training (overrides --shots)
    test_fraction: float = 0.2
    positive_only: bool = False  # seg: only cases with foreground in the target label map
    seed: int = 0
    patch: int | None = None  # default: the pretraining patch
    infer_patch: int | None = None  # segmentation window at inference (default: the training patch)
    batch_size: int = 2
    steps: int = 300
    lr: float = 1e-3
    backbone_lr_scale: float = 1.0  # chosen by a measured sweep (docs/finetuning.md)
    head_warmup: float = 0.25
    warmup_fraction: float = 0.1
    weight_decay: float = 1e-4
    num_workers: int = 2
    fg_p: float = 0.33
    # seg: the cross-entropy weight of every foreground class against background's 1 (docs/finetuning.md)
    seg_fg_weight: float = 1.0
    # --mode linear: closed form (ridge / logistic, CV penalty), sgd, or zero-shot (cls: the head outputs the pretrained
    # health pretext classifier's logits of the case as they are, its classes mapped to the target's; needs
    # probe_features=pretext-logit and a target that is the pretraining run's data.health_label; docs/finetuning.md)
    linear_fit: str = "closed"
    linear_penalty: str = "1se"  # closed form: the cross-validated penalty, by the one-standard-error rule or the best
    # closed form: what the probe reads of each scan, the scan whole (one window) or patch-size windows tiled without
    # overlap, each window a row of the fit (tiles) or their features averaged into one row per scan (tiles-mean); the
    # predictor averages the windows' outputs (docs/finetuning.md)
    probe_windows: str = "whole"
    # closed form: which fused features the probe weighs, all (anatomy and contrast latents, stage means, presence
    # flags), stages (the encoder's stage means and the presence flags, no latents) or pretext (the pretrained health
    # head's pooled features and the presence flags: the model keeps that head, so the backbone must have one) or
    # pretext-logit (that head's classifier's logits of the case and the presence flags: its zero-shot reading,
    # calibrated on the labelled cases)
    probe_features: str = "all"
    head_pool: str = "mean"  # cls/reg: the learned pooling's reduction over space, mean or meanmax (docs/finetuning.md)
    head_pool_latent: bool = False  # cls/reg: the learned pooling also reads the anatomy latent map
    # cls/reg trained by steps: the head's output layer starts at PyTorch's default init (default) or at zero, so that
    # the untrained head is the constant predictor (zero), or at zero beside a linear layer fitted first in closed
    # form on the frozen start, so that training starts from the linear probe (probe, LP-FT; docs/finetuning.md)
    head_init: str = "default"
    contrast_dropout: float = 0.0  # leave out each present contrast of a training crop with this probability
    augment: str = "flips"  # training augmentation: flips, nnunet (nnU-Net's default pipeline) or none
    whole_scan: bool = False  # cls/reg trained by steps: on whole scans (padded to one size), not on crops
    tta: bool = True
    overlap: float = 0.5
    lcc: bool = False
    bootstrap: int = 1000
    calibration: float = 0.0  # cls: share of the training subjects held out to fit a temperature (0: none)
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(checkpoint_every=0, keep_checkpoints=1))

    NAME_FIELD: ClassVar[str | None] = "preset"

    @classmethod
    def preset_table(cls) -> dict[str, dict[str, Any]]:
        from neurofm.train.presets import FINETUNE_PRESETS

        return FINETUNE_PRESETS

    def __post_init__(self) -> None:
        if self.task not in ("seg", "cls", "reg"):
            raise ConfigError(f"--task should be seg, cls or reg, got {self.task!r}")
        if self.mode not in ("linear", "frozen", "full"):
            raise ConfigError(f"--mode should be linear, frozen or full, got {self.mode!r}")
        if self.task == "seg" and self.mode == "linear":
            raise ConfigError("a linear probe is defined for cls/reg; for segmentation use --mode frozen or full")
        if self.source == "scratch" and self.mode != "full":
            raise ConfigError(f"--mode {self.mode} freezes an encoder; from scratch only --mode full makes sense")
        if self.source == "random" and self.mode == "full":
            raise ConfigError("--from random is the frozen random-encoder floor: use --mode linear or frozen")
        if self.whole_scan and self.task == "seg":
            raise ConfigError("whole_scan is for cls/reg; segmentation trains on crops and reads scans by windows")
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ConfigError("--steps, --batch-size and --lr must be positive")
        from neurofm.models.downstream import POOLS

        if self.head_pool not in POOLS:
            raise ConfigError(f"--head-pool should be one of {POOLS}, got {self.head_pool!r}")
        if self.head_init not in HEAD_INITS:
            raise ConfigError(f"head_init should be one of {HEAD_INITS}, got {self.head_init!r}")
        if self.head_init == "probe" and (self.task == "seg" or self.mode == "linear"):
            raise ConfigError(
                "head_init=probe (LP-FT) starts a cls/reg head trained by steps (--mode frozen or full) from a "
                f"closed-form probe; got task {self.task!r}, mode {self.mode!r} (--mode linear is the probe alone)"
            )
        if self.linear_fit not in LINEAR_FITS or self.linear_penalty not in ("1se", "best"):
            raise ConfigError(
                f"linear_fit should be one of {LINEAR_FITS} and linear_penalty 1se or best, got {self.linear_fit!r}, "
                f"{self.linear_penalty!r}"
            )
        if self.linear_fit == "zero-shot" and (
            self.task != "cls" or self.mode != "linear" or self.probe_features != "pretext-logit"
        ):
            raise ConfigError(
                "linear_fit=zero-shot reads a pretrained health pretext classifier as it is: it takes --task cls, "
                f"--mode linear and probe_features=pretext-logit, got task {self.task!r}, mode {self.mode!r}, "
                f"probe_features {self.probe_features!r}"
            )
        if self.linear_fit == "zero-shot" and self.calibration > 0:
            raise ConfigError(
                "linear_fit=zero-shot reads no labelled case; calibration fits a temperature on labelled ones "
                f"(calibration={self.calibration}): leave it at 0"
            )
        if self.linear_fit == "zero-shot" and self.source in ("scratch", "random"):
            raise ConfigError(
                f"linear_fit=zero-shot reads a pretrained model's own pretext classifier; --from {self.source} has no "
                "trained one (name a pretrained run or shipped model)"
            )
        if self.probe_windows not in PROBE_WINDOWS or self.probe_features not in PROBE_FEATURES:
            raise ConfigError(
                f"probe_windows should be one of {PROBE_WINDOWS} and probe_features one of {PROBE_FEATURES}, got "
                f"{self.probe_windows!r}, {self.probe_features!r}"
            )
        if self.probe_features.startswith("pretext") and self.task == "seg":
            raise ConfigError(
                f"probe_features={self.probe_features} is for cls/reg: a segmentation decoder reads the encoder's maps"
            )
        if not self.seg_fg_weight > 0:
            raise ConfigError(f"seg_fg_weight should be > 0, got {self.seg_fg_weight}")
        if self.seg_fg_weight != 1.0 and self.task != "seg":
            raise ConfigError(
                f"seg_fg_weight weighs segmentation's cross-entropy; --task {self.task} has none (leave it at 1)"
            )
        from neurofm.data.augment import AUGMENTS

        if self.augment not in AUGMENTS:
            raise ConfigError(f"--augment should be one of {', '.join(AUGMENTS)}, got {self.augment!r}")
        if not 0 <= self.contrast_dropout < 1:
            raise ConfigError(f"contrast_dropout should be in [0, 1), got {self.contrast_dropout}")
        if not (0 <= self.head_warmup < 1 and 0 <= self.warmup_fraction <= 1):
            raise ConfigError(
                f"head_warmup should be in [0, 1) and warmup_fraction in [0, 1], got {self.head_warmup}, "
                f"{self.warmup_fraction}"
            )
