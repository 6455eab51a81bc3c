"""Pretraining: the LightningModule of a recipe, and ``pretrain()`` (``neurofm pretrain``).

The module runs ``loss, terms, outputs = objective(model, batch, progress)``; the model
predicts, the objective scores. ``pretrain()`` resolves the recipe, completes it from the
store, and hands the pieces to Lightning.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch

from neurofm.data.pretrain import SessionIndex, build_index, pretrain_loader
from neurofm.errors import ConfigError, NeurofmError, NonFiniteLossError, Preempted
from neurofm.faults import FolderLock, OutOfMemory, process_rank
from neurofm.io.checkpoint import STATE, checkpoint_step, latest_checkpoint
from neurofm.models.registry import create_model
from neurofm.objectives import build_objective
from neurofm.store import Store
from neurofm.train.callbacks import ExactResume, Preemption, RunCheckpoint
from neurofm.train.config import Recipe
from neurofm.train.memory import is_oom, oom_error, probe
from neurofm.train.optim import build_optimizer, lr_factor
from neurofm.train.trainer import build_trainer, layout_name
from neurofm.utils import code_fingerprint, machine, read_json


class PretrainModule(L.LightningModule):
    """Runs one recipe: ``loss, terms, outputs = objective(model, batch, progress)``."""

    def __init__(self, cfg: Recipe):
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

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the objective's running estimates (fomo25: statistics, the critic's bank and fit) are not in the state
        # dict; without them a resumed run would estimate them again and leave the uninterrupted run's path
        if hasattr(self.objective, "running_state"):
            checkpoint["objective_state"] = self.objective.running_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("objective_state")
        if state is not None and hasattr(self.objective, "load_running_state"):
            self.objective.load_running_state(state)

    def configure_optimizers(self):
        opt = build_optimizer(self.model.parameters(), self.cfg.optim)
        spe = self.steps_per_epoch
        total = self.cfg.trainer.max_steps if self.cfg.trainer.max_steps > 0 else self.cfg.optim.epochs * spe
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, spe, self.cfg.optim))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def prepare_data(cfg: Recipe, store_root: str | Path) -> tuple[Recipe, SessionIndex]:
    """Check the store against the recipe and complete the recipe from the data: what the loader
    derived (region names, dense labels, store settings) in ``extra``, the model's data-sized heads."""
    store = Store(store_root)
    extra = dict(cfg.extra)
    index = build_index(store, cfg.data, extra, cfg.data_needs())
    extra["store"] = str(Path(store_root).resolve())
    extra["preprocessing"] = store.config
    extra["sessions"] = len(index.keys)
    extra["subjects"] = len({str(store.record(k).get("subject")) for k in index.keys})
    d = cfg.to_dict()
    d["model"]["kwargs"] = cfg.model_kwargs(extra)
    d["extra"] = extra
    return Recipe.from_dict(d), index


def pretrain(
    data: str | Path | None,
    out: str | Path,
    preset: str | None = None,
    *,
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    resume: bool = False,
    progress: bool | None = None,
    callbacks: list | None = None,
) -> Path:
    """Pretrain a recipe on a store; returns the run folder.

    With ``resume=True`` the run's saved config is used (``overrides`` may still extend it,
    e.g. ``trainer.max_steps``) and training continues from the newest complete checkpoint.
    ``run.json`` records the code that trains (``code``, :func:`~neurofm.utils.code_fingerprint`) and its
    number of CPU threads (``threads``) and processor (``machine``, :func:`~neurofm.utils.machine`); a run resumed
    under other code, on other threads or on another machine keeps each earlier record in ``code_history`` with
    the step it had reached.
    """
    run = Path(out)
    ckpt_path = None
    code_history: list[dict[str, Any]] = []
    if resume:
        if not (run / "run.json").is_file():
            raise NeurofmError(f"{run}: nothing to resume (no run.json); start without --resume")
        saved = read_json(run / "run.json")
        saved.pop("neurofm_version", None)
        before = saved.pop("code", None)
        before_threads = saved.pop("threads", None)
        before_machine = saved.pop("machine", None)
        saved.pop("layout", None)  # derived again from the settings below when the run is saved
        code_history = list(saved.pop("code_history", []))
        cfg = Recipe.resolve(overrides=overrides, base=saved)
        data = data or saved["extra"]["store"]
        ck = latest_checkpoint(run)
        ckpt_path = str(ck / STATE) if ck is not None else None
        now = (code_fingerprint(), torch.get_num_threads(), machine())
        if (before, before_threads, before_machine) != now:
            # the steps so far were made by other code, on another number of CPU threads or on another machine:
            # say which, and up to where
            step = checkpoint_step(ck) if ck is not None else 0
            code_history.append(
                {"code": before, "threads": before_threads, "machine": before_machine, "until_step": step}
            )
    else:
        if (run / "run.json").is_file() and latest_checkpoint(run) is not None:
            raise NeurofmError(f"{run} already holds a run; use --resume to continue it, or another --out")
        cfg = Recipe.resolve(preset, config, overrides)
    if data is None:
        raise ConfigError("give the store to train on (--data STORE)")
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    cfg, index = prepare_data(cfg, data)
    run.mkdir(parents=True, exist_ok=True)
    from neurofm import __version__

    lock = FolderLock(run / ".lock", "pretrain") if process_rank() == 0 else None
    if lock is not None:
        lock.acquire()
    try:
        history = {"code_history": code_history} if code_history else {}
        module = PretrainModule(cfg)
        run_dict = cfg.save(
            run / "run.json",
            neurofm_version=__version__,
            code=code_fingerprint(),
            threads=torch.get_num_threads(),
            machine=machine(),
            layout=layout_name(cfg.trainer, module.model),
            **history,
        )
        saver = RunCheckpoint(run, run_dict, cfg.trainer.checkpoint_every, cfg.trainer.keep_checkpoints)
        preempt = Preemption(saver)
        loader = pretrain_loader(data, index, cfg.data, cfg.data_needs(), cfg.trainer.seed, report_dir=run)
        exact = ExactResume(cfg.trainer.seed, loader.sampler, cfg.data.batch_size)
        callbacks = [exact, saver, preempt, *(callbacks or [])]
        trainer = build_trainer(cfg.trainer, run, cfg.total_steps, cfg.optim.grad_clip, callbacks, progress=progress)
        try:
            # Our own checkpoints hold only tensors and plain containers: load them without unpickling code.
            with preempt.handling():
                trainer.fit(module, loader, ckpt_path=ckpt_path, weights_only=True)
        except Exception as e:
            if not is_oom(e):
                raise
            raise _oom(module, cfg, index) from None
    finally:
        if lock is not None:
            lock.release()
    if preempt.stopped():
        raise Preempted(
            f"stopped by {preempt.stopped()} at step {preempt.step}; a checkpoint at that step is in {run}. "
            f"Continue with: neurofm pretrain --out {run} --resume",
            preempt.signum or 15,
        )
    if trainer.is_global_zero:
        try:
            from neurofm.tasks.figures import reconstruction_figure

            reconstruction_figure(module, data, index, run / "figures" / "reconstructions.png")
        except Exception as e:  # a figure must never lose a finished run
            print(f"warning: could not draw the reconstruction figure: {e}", file=sys.stderr)
    return run


def _oom(module: PretrainModule, cfg: Recipe, index: SessionIndex) -> OutOfMemory:
    """The out-of-memory error of a pretraining run, with the largest batch and patch that fit."""
    model, objective = module.model, module.objective
    device = next(model.parameters()).device

    def try_step(b: int, p: int) -> None:
        model.zero_grad(set_to_none=True)
        batch = cfg.objective.example_batch(b, p, index.extra, device=device)
        loss, _, _ = objective(model, batch, 0.0)
        loss.backward()
        model.zero_grad(set_to_none=True)

    fixed = getattr(model, "fixed_size", None) is not None
    fits = probe(try_step, cfg.data.batch_size, cfg.data.patch, int(getattr(model, "downsampling", 16)), fixed, device)
    return oom_error(
        "pretraining", cfg.data.batch_size, cfg.data.patch, device, fits, "--set data.batch_size", "--set data.patch"
    )
