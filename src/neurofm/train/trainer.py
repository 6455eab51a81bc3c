"""The Lightning Trainer factory: the same call runs on a CPU, one GPU, or many GPUs and nodes.

``devices``/``num_nodes`` select DDP, and Lightning picks up torchrun and SLURM
environments by itself.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from neurofm.train.config import TrainerConfig


def resolve_precision(tc: TrainerConfig) -> str:
    """``auto``: bf16 mixed precision on GPUs that support it, fp32 elsewhere (bf16 is slow on CPUs)."""
    if tc.precision != "auto":
        return tc.precision
    if uses_gpu(tc) and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def memory_format(tc: TrainerConfig, model: torch.nn.Module, device: torch.device) -> torch.memory_format:
    """The layout a network trains in (``tc.memory_format``). ``auto``: ``channels_last_3d`` on a CPU when the
    network's first 3D convolution has fewer than 32 output channels, contiguous otherwise. A training step of the
    tiny models (8 channels) ran 1.20-1.46x faster in channels-last on the CPU measured; with 32, fomo25 at paper size
    ran 1.07x and the ResEnc-L peer 0.82x (slower), so auto leaves them contiguous. GPUs were not measured
    (``benchmarks/bench_memory_format.py``, docs/benchmarks.md)."""
    if tc.memory_format == "channels_last":
        return torch.channels_last_3d
    if tc.memory_format == "contiguous" or device.type != "cpu":
        return torch.contiguous_format
    first = next((m for m in model.modules() if isinstance(m, torch.nn.Conv3d)), None)
    return torch.channels_last_3d if first is not None and first.out_channels < 32 else torch.contiguous_format


def uses_gpu(tc: TrainerConfig) -> bool:
    """Whether :func:`build_trainer` puts a run made with ``tc`` on a GPU."""
    return tc.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def layout_name(tc: TrainerConfig, model: torch.nn.Module) -> str:
    """The layout :func:`memory_format` gives ``model`` on the device of ``tc`` (``channels_last`` or ``contiguous``):
    what a run's ``run.json`` records beside its thread count, as both move the numbers at float rounding."""
    fmt = memory_format(tc, model, torch.device("cuda" if uses_gpu(tc) else "cpu"))
    return "channels_last" if fmt == torch.channels_last_3d else "contiguous"


class MemoryLayout(L.Callback):
    """Trains the module in the layout :func:`memory_format` picks and returns it to contiguous when fit ends, so
    that evaluation, saved weights and export see the usual layout. The layout is set at ``setup``, before the
    optimiser, DDP's wrapper and a resumed checkpoint's weights meet the parameters."""

    def __init__(self, tc: TrainerConfig) -> None:
        self.tc = tc

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            pl_module.to(memory_format=memory_format(self.tc, pl_module, trainer.strategy.root_device))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.to(memory_format=torch.contiguous_format)


def quiet_lightning() -> None:
    """Keep Lightning's warnings, drop its banners and tips (neurofm prints its own summary)."""
    import logging
    import warnings

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*Consider setting `persistent_workers=True`.*")
    # our loaders draw random crops: resuming mid-epoch loses nothing a fresh draw would not give
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")


class StepLines(L.Callback):
    """Progress for logs that are not a terminal: about 20 lines per run, each with the step, the mean
    loss since the previous line, the speed and the time left."""

    def __init__(self, max_steps: int, lines: int = 20, stream: Any = None) -> None:
        self.max_steps = max(1, int(max_steps))
        self.every = max(1, self.max_steps // max(1, lines))
        self.stream = stream
        self._sum: torch.Tensor | None = None  # kept on the device: no GPU sync on steps that print nothing
        self._n = 0
        self._t0 = self._last_step = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0, self._last_step = time.time(), trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self._sum = loss.detach() if self._sum is None else self._sum + loss.detach()
            self._n += 1
        step = trainer.global_step
        if not trainer.is_global_zero or (step % self.every and step < self.max_steps):
            return
        elapsed = time.time() - self._t0
        rate = (step - self._last_step) / elapsed if elapsed > 0 else 0.0
        left = (self.max_steps - step) / rate if rate > 0 else float("nan")
        mean = float(self._sum) / self._n if self._n else float("nan")
        self._sum, self._n = None, 0
        print(
            f"step {step}/{self.max_steps}  loss {mean:.4g}  {rate:.2f} steps/s  {left / 60:.1f} min left",
            file=self.stream or sys.stderr,
            flush=True,
        )


def build_trainer(
    tc: TrainerConfig,
    run_dir: Path,
    max_steps: int,
    grad_clip: float = 0.0,
    callbacks: list | None = None,
    progress: bool | None = None,
    loggers: bool = True,
    progress_lines: int = 20,
) -> L.Trainer:
    """A Lightning Trainer writing logs under ``run_dir/logs``; devices, precision and DDP from ``tc``."""
    from lightning.pytorch.callbacks import LearningRateMonitor, RichProgressBar
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    quiet_lightning()
    if progress is None:
        progress = sys.stderr.isatty()
    devices = tc.devices
    accel = tc.accelerator
    if accel == "auto" and not torch.cuda.is_available():
        accel = "cpu"
    if accel == "cpu" and devices == "auto":
        devices = 1
    multi = tc.num_nodes > 1 or (isinstance(devices, int) and devices > 1) or os.environ.get("WORLD_SIZE", "1") != "1"
    if devices == "auto" and torch.cuda.device_count() > 1:
        multi = True
    strategy = "ddp" if multi else "auto"
    cbs = [MemoryLayout(tc), *(callbacks or [])]
    bar = progress and sys.stderr.isatty()
    if bar:
        cbs.append(RichProgressBar())
    elif progress:  # a log file (batch job, CI, `| tee`): one plain line now and then instead of a bar
        cbs.append(StepLines(max_steps, lines=progress_lines))
    logger: Any = False
    if loggers:
        logs = run_dir / "logs"
        # versioned folders: a resumed run adds version_N+1 instead of overwriting the earlier logs
        logger = [CSVLogger(logs, name="csv"), TensorBoardLogger(logs, name="tensorboard")]
        cbs.append(LearningRateMonitor(logging_interval="step"))
    return L.Trainer(
        accelerator=accel,
        devices=devices,
        num_nodes=tc.num_nodes,
        strategy=strategy,
        precision=resolve_precision(tc),
        max_epochs=-1,
        max_steps=max_steps,
        gradient_clip_val=grad_clip if grad_clip > 0 else None,
        callbacks=cbs,
        logger=logger,
        log_every_n_steps=max(1, min(tc.log_every, max_steps)),
        enable_progress_bar=bar,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=str(run_dir),
        use_distributed_sampler=True,
        num_sanity_val_steps=0,
    )
