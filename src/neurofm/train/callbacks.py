"""The Lightning callback that writes a run's periodic, atomic, self-describing checkpoints."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from neurofm.data.loader import EpochSampler
from neurofm.io.checkpoint import STATE, checkpoint_dir, publish_checkpoint, write_checkpoint_files
from neurofm.utils import to_jsonable


class RunCheckpoint(Callback):
    """Periodic, atomic, self-describing checkpoints (the folder layout: :mod:`neurofm.io.checkpoint`)."""

    def __init__(self, run_dir: str | Path, run_cfg: dict[str, Any], every_n_steps: int, keep: int = 2):
        self.run_dir = Path(run_dir)
        self.run_cfg = run_cfg
        self.every = int(every_n_steps)  # 0: only at the end
        self.keep = max(1, int(keep))
        self.last_saved = -1
        self.last_terms: dict[str, float] = {}

    @property
    def state_key(self) -> str:
        return "RunCheckpoint"

    def state_dict(self) -> dict[str, Any]:
        return {"last_saved": self.last_saved}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_saved = int(state.get("last_saved", -1))

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            for stale in checkpoint_dir(self.run_dir).glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        terms = getattr(pl_module, "last_terms", None)
        if terms:
            self.last_terms = {k: float(v) for k, v in terms.items()}
        step = trainer.global_step
        if self.every > 0 and step > 0 and step % self.every == 0 and step != self.last_saved:
            self.save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self.last_saved:
            self.save(trainer, pl_module)

    def save(self, trainer, pl_module) -> Path:
        step = trainer.global_step
        name = f"step-{step:07d}"
        ck = checkpoint_dir(self.run_dir)
        tmp, final = ck / f".tmp-{name}", ck / name
        if trainer.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.last_saved = step  # before the state is captured, so a resumed run does not save it again
        trainer.strategy.barrier("neurofm-ckpt-start")
        trainer.save_checkpoint(tmp / STATE, weights_only=False)  # all ranks take part; rank 0 writes
        if trainer.is_global_zero:
            meta = {
                "step": step,
                "epoch": trainer.current_epoch,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "losses": self.last_terms,
                "world_size": trainer.world_size,
            }
            write_checkpoint_files(tmp, pl_module.model, self.run_cfg, to_jsonable(meta))
            publish_checkpoint(tmp, final, keep=self.keep)
        trainer.strategy.barrier("neurofm-ckpt-end")
        return final


class ExactResume(Callback):
    """Makes a resumed run train as the uninterrupted one would have.

    Each step's own randomness (masks, latent noise, swap choices) is drawn after the global generators are
    seeded from (run seed, rank, step), not carried over from the previous step, so it does not depend on
    when the process started; and the loader's sampler position (epoch, samples trained on in it) travels
    in every checkpoint, so a run stopped inside an epoch continues that epoch's permutation. The samples
    themselves are functions of their index (:func:`neurofm.data.loader.sample_rng`). Put it before
    :class:`RunCheckpoint` in the callback list: the position it records must be the step's own when the
    checkpoint is written."""

    def __init__(self, seed: int, sampler: EpochSampler, batch_size: int):
        self.seed, self.sampler, self.batch_size = int(seed), sampler, int(batch_size)
        self.position = {"epoch": 0, "samples": 0}

    @property
    def state_key(self) -> str:
        return "ExactResume"

    def state_dict(self) -> dict[str, Any]:
        return dict(self.position)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = {"epoch": int(state.get("epoch", 0)), "samples": int(state.get("samples", 0))}
        self.sampler.resume(self.position["epoch"], self.position["samples"])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        mixed = np.random.SeedSequence([self.seed % 2**32, trainer.global_rank, trainer.global_step])
        torch.manual_seed(int(mixed.generate_state(1)[0]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # samples of this epoch trained on, on all ranks together (the sampler numbers them before sharding)
        self.position = {
            "epoch": trainer.current_epoch,
            "samples": (batch_idx + 1) * self.batch_size * trainer.world_size,
        }


class Preemption(Callback):
    """SIGTERM / SIGUSR1 (SLURM's preemption, ``scancel``, the time limit's warning) stop training cleanly.

    Used as ``with preempt.handling(): trainer.fit(...)``. The handler only notes the signal; at the
    end of the current step ``saver`` writes a checkpoint at that step and the trainer stops (under
    DDP every rank stops at the same step). Lightning's own SIGTERM handler is replaced once
    training starts (a signal before that ends the fit with Lightning's ``SIGTERMException``).
    ``--resume`` continues from the checkpoint. Under SLURM a SIGUSR1 (``#SBATCH --signal=USR1@120``)
    also requeues the job with ``scontrol requeue`` when ``requeue`` is on.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self, saver: RunCheckpoint, requeue: bool = True):
        self.saver = saver
        self.requeue = requeue
        self.signum: int | None = None
        self.step: int | None = None

    def _note(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def _listen(self) -> dict[int, Any]:
        """Put this callback's handler on the signals (main thread only); returns the handlers it replaced."""
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return {}
        sigs = [getattr(signal, name) for name in self.SIGNALS if hasattr(signal, name)]
        return {sig: signal.signal(sig, self._note) for sig in sigs}

    @contextmanager
    def handling(self) -> Iterator[None]:
        import signal

        from lightning.pytorch.utilities.exceptions import SIGTERMException

        previous = self._listen()
        try:
            yield
        except SIGTERMException:
            if self.step is None:  # stopped before a checkpoint at the current step was written
                raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self.step is not None and self.requeue and self.signum == getattr(signal, "SIGUSR1", None):
            requeue_slurm_job()

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning has by now put its own SIGTERM handler in front of ours; it would end the fit at the next
        # step boundary, possibly before this callback has written the checkpoint. Ours alone decides.
        self._listen()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stop = trainer.strategy.reduce_boolean_decision(self.signum is not None, all=False)
        if not stop or self.step is not None:
            return
        if self.saver.last_saved != trainer.global_step:
            self.saver.save(trainer, pl_module)
        self.step = trainer.global_step
        trainer.should_stop = True

    def stopped(self) -> str | None:
        """The signal's name when training stopped on one."""
        import signal

        return signal.Signals(self.signum).name if self.step is not None and self.signum else None


def requeue_slurm_job() -> bool:
    """``scontrol requeue $SLURM_JOB_ID`` when running under SLURM (array tasks by their own id)."""
    import os
    import subprocess

    job = os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID")
    job_id = (
        f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        if job
        else os.environ.get("SLURM_JOB_ID")
    )
    if not job_id:
        return False
    try:
        return subprocess.run(["scontrol", "requeue", job_id], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
