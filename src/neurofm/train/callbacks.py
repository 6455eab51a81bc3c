"""The Lightning callback that writes a run's periodic, atomic, self-describing checkpoints."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

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
