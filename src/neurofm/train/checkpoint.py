"""Self-describing checkpoint folders, written atomically.

A run folder::

    run.json                 resolved run config (preset, model, objective, data, optim, trainer, extra)
    checkpoints/step-0000200/
        model.safetensors    weights (no pickle)
        model.json           registry name + kwargs: enough to rebuild the model
        transfer.json        stem keys, encoder prefixes, pretext heads, input channels
        preprocessing.json   store settings (spacing, orientation, normalisation) + contrasts
        run.json             the run config at that step
        meta.json            step, epoch, time, last losses (written last)
        state.ckpt           Lightning state for --resume (optimizer, schedulers, loops)
    checkpoints/last         name of the newest complete checkpoint
    logs/                    CSV and TensorBoard logs
    figures/                 reconstructions and curves

A checkpoint is assembled in ``checkpoints/.tmp-step-N`` and renamed into place, so a
killed run never leaves a half-written checkpoint where ``--resume`` looks.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file, save_model
from torch import nn

from neurofm.errors import CheckpointError
from neurofm.utils import atomic_write_text, read_json, to_jsonable, write_json

STATE = "state.ckpt"
WEIGHTS = "model.safetensors"


def unwrap(model: nn.Module) -> nn.Module:
    """The module behind ``torch.compile`` / DDP wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None or not isinstance(inner, nn.Module):
            return model
        model = inner


def save_weights(model: nn.Module, path: str | Path) -> None:
    """safetensors; tensors shared under two names (DNA aliases) are stored once."""
    save_model(unwrap(model), str(path))


def load_state(model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> list[str]:
    """Load ``state`` into ``model``, filling aliased names (same storage) from whichever was saved.

    Returns the missing keys (after aliasing) when ``strict`` is False.
    """
    own = model.state_dict()
    groups: dict[int, list[str]] = {}
    for k, v in own.items():
        groups.setdefault(v.data_ptr() if v.numel() else id(k), []).append(k)
    full = dict(state)
    for names in groups.values():
        have = [n for n in names if n in full]
        if have:
            for n in names:
                full.setdefault(n, full[have[0]])
    missing = [k for k in own if k not in full]
    unexpected = [k for k in full if k not in own]
    if strict and (missing or unexpected):
        raise CheckpointError(f"weights do not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    bad = [k for k in own if k in full and tuple(full[k].shape) != tuple(own[k].shape)]
    if bad:
        raise CheckpointError(
            f"shape mismatch for {bad[:4]}: checkpoint {[tuple(full[k].shape) for k in bad[:4]]} "
            f"vs model {[tuple(own[k].shape) for k in bad[:4]]}"
        )
    model.load_state_dict({k: v for k, v in full.items() if k in own}, strict=False)
    return missing


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: neurofm reads weights from .safetensors files only (no pickles)")
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such weights file") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def checkpoint_dir(run: str | Path) -> Path:
    return Path(run) / "checkpoints"


def is_complete(folder: Path) -> bool:
    return (folder / "meta.json").is_file() and (folder / WEIGHTS).is_file()


def latest_checkpoint(run: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run (None if there is none)."""
    ck = checkpoint_dir(run)
    if not ck.is_dir():
        return None
    pointer = ck / "last"
    if pointer.is_file():
        cand = ck / pointer.read_text().strip()
        if is_complete(cand):
            return cand
    done = sorted((p for p in ck.glob("step-*") if p.is_dir() and is_complete(p)), key=lambda p: p.name)
    return done[-1] if done else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder (its latest checkpoint) or a checkpoint folder -> the checkpoint folder."""
    path = Path(path)
    if is_complete(path):
        return path
    if (path / "run.json").is_file() or checkpoint_dir(path).is_dir():
        ck = latest_checkpoint(path)
        if ck is None:
            raise CheckpointError(f"{path}: run has no complete checkpoint yet")
        return ck
    raise CheckpointError(f"{path}: neither a run folder nor a checkpoint folder")


def write_checkpoint_files(folder: Path, model: nn.Module, run_cfg: dict[str, Any], meta: dict[str, Any]) -> None:
    """Weights and JSON descriptions of a model (everything but the resume state)."""
    from neurofm.models.registry import count_parameters, transfer_map

    m = unwrap(model)
    save_weights(m, folder / WEIGHTS)
    write_json(
        folder / "model.json",
        {"name": run_cfg["model"]["name"], "kwargs": m.config, "parameters": count_parameters(m)},
    )
    tmap = transfer_map(m)
    if run_cfg.get("transfer"):  # how a fine-tuned model took over its pretrained weights (stem adaptation)
        tmap["from_pretrained"] = run_cfg["transfer"]
    write_json(folder / "transfer.json", tmap)
    extra = run_cfg.get("extra", {})
    pre = dict(extra.get("preprocessing", {}))
    pre["contrasts"] = run_cfg.get("data", {}).get("contrasts")
    write_json(folder / "preprocessing.json", pre)
    write_json(folder / "run.json", run_cfg)
    write_json(folder / "meta.json", meta)


class RunCheckpoint(Callback):
    """Periodic, atomic, self-describing checkpoints (see module docstring)."""

    def __init__(self, run_dir: str | Path, run_cfg: dict[str, Any], every_n_steps: int, keep: int = 2):
        self.run_dir = Path(run_dir)
        self.run_cfg = run_cfg
        self.every = max(1, int(every_n_steps))
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
        if step > 0 and step % self.every == 0 and step != self.last_saved:
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
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(ck)
            atomic_write_text(ck / "last", name + "\n")
            done = sorted(p for p in ck.glob("step-*") if p.is_dir())
            for old in done[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        trainer.strategy.barrier("neurofm-ckpt-end")
        return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def build_model_from_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint folder (or a run's latest) and load its weights."""
    from neurofm.models.registry import create_model

    folder = resolve_checkpoint(path)
    spec = read_json(folder / "model.json")
    model = create_model(spec["name"], **spec["kwargs"])
    load_state(model, load_weights(folder / WEIGHTS))
    info = {
        "folder": str(folder),
        "model": spec,
        "run": read_json(folder / "run.json") if (folder / "run.json").is_file() else {},
        "transfer": read_json(folder / "transfer.json") if (folder / "transfer.json").is_file() else {},
        "preprocessing": read_json(folder / "preprocessing.json") if (folder / "preprocessing.json").is_file() else {},
        "meta": read_json(folder / "meta.json"),
    }
    return model, info


def describe_run(run: str | Path) -> str:
    """The model card of a run: recipe, parameters, data, steps, losses."""
    run = Path(run)
    cfg = read_json(run / "run.json") if (run / "run.json").is_file() else {}
    ck = latest_checkpoint(run)
    lines = [f"run: {run}"]
    if cfg:
        from neurofm.train.presets import PRESET_HELP

        base = cfg["preset"].removesuffix("-tiny")
        lines.append(f"recipe: {cfg['preset']} — {PRESET_HELP.get(base, '')}")
        obj = {k: v for k, v in cfg["objective"].items() if k != "kind"}
        lines.append(f"objective: {cfg['objective']['kind']} {json.dumps(obj)}")
        lines.append(f"model: {cfg['model']['name']} {json.dumps(cfg['model']['kwargs'])}")
        extra = cfg.get("extra", {})
        d = cfg["data"]
        lines.append(
            f"data: {extra.get('store', '?')} ({extra.get('sessions', '?')} sessions), mode {d['mode']}, "
            f"patch {d['patch']}^3, batch {d['batch_size']}, contrasts {d['contrasts'] or 'all'}"
        )
        o = cfg["optim"]
        steps = cfg["trainer"].get("max_steps", -1)
        budget = f"{steps} steps" if steps and steps > 0 else f"{o['epochs']} epochs x {d['steps_per_epoch']} steps"
        lines.append(f"optimiser: {o['name']} lr {o['lr']} ({o['schedule']}), {budget}")
    if ck is None:
        lines.append("checkpoints: none yet")
    else:
        spec = read_json(ck / "model.json")
        meta = read_json(ck / "meta.json")
        lines.append(f"parameters: {spec.get('parameters', 0):,}")
        lines.append(f"latest checkpoint: {ck.name} (step {meta['step']}, epoch {meta['epoch']}, {meta['time']})")
        if meta.get("losses"):
            lines.append("losses: " + ", ".join(f"{k} {v:.4g}" for k, v in meta["losses"].items()))
    return "\n".join(lines)
