"""Weights and self-describing checkpoint folders, read and written atomically, nothing unpickled.

A run folder::

    run.json                 resolved config (a pretraining recipe, or a fine-tuning run)
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

A checkpoint is assembled in ``checkpoints/.tmp-step-N`` and renamed into place (see
:func:`publish_checkpoint`), so a killed run never leaves a half-written checkpoint where
``--resume`` looks. The model is asked for its description through its transfer contract
(``config``, ``transfer_map()``), so this module needs no model class.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from neurofm.errors import CheckpointError
from neurofm.utils import atomic_write_text, read_json, write_json

STATE = "state.ckpt"
WEIGHTS = "model.safetensors"


def unwrap(model: nn.Module) -> nn.Module:
    """The module behind ``torch.compile`` / DDP wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None or not isinstance(inner, nn.Module):
            return model
        model = inner


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def save_weights(model: nn.Module, path: str | Path) -> None:
    """safetensors; a tensor shared under several names (DNA's decoder also holds the encoder, as
    ``decoder.encoder.*``; a stem conv is also ``all_modules.0``) is stored once, under its first
    name in the model's own order (``encoder.*``), which :func:`load_state` fills the others from."""
    state = unwrap(model).state_dict()
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out = {}
    for k, v in state.items():
        ident = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.numel() else (id(v), 0, ())
        if ident in seen:
            continue
        seen.add(ident)
        out[k] = v.detach().contiguous()
    save_file(out, str(path))


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


def _numpy_globals() -> list[Any]:
    """numpy's constructors of plain values (scalars, dtypes, arrays), under numpy 2's and numpy 1's names.

    nnU-Net-family trainers log ``np.mean(...)`` values and keep numpy arrays in their plans,
    so their checkpoints hold these; none of them runs code: an array of objects holds objects
    that the same restricted unpickler rebuilt.
    """
    import numpy as np
    from numpy._core import multiarray

    out: list[Any] = [np.dtype, np.ndarray, multiarray.scalar, multiarray._reconstruct]
    out += [
        (multiarray.scalar, "numpy.core.multiarray.scalar"),
        (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
    ]
    out += [c for c in vars(np.dtypes).values() if isinstance(c, type) and issubclass(c, np.dtype)]
    return out


def _unsafe_globals(path: Path) -> list[str]:
    """The callables a pickle names that :func:`safe_load` does not allow (read, never run)."""
    import pickletools

    allowed = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__name__}" for g in _numpy_globals()}
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint: scan the raw pickle's opcodes
        names, strings = [], []
        try:
            with open(path, "rb") as fh:
                for op, arg, _ in pickletools.genops(fh):
                    if op.name == "GLOBAL":
                        names.append(str(arg).replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        names.append(f"{strings[-2]}.{strings[-1]}")
                    elif isinstance(arg, str):
                        strings.append(arg)
        except Exception:
            pass
    return [n for n in dict.fromkeys(names) if n not in allowed and not n.startswith(("torch.", "collections."))]


def safe_load(path: str | Path) -> Any:
    """``torch.load`` of another tool's file that never runs code from it (``weights_only``).

    Loads tensors, plain containers, ``torch.device`` and numpy scalars, dtypes and arrays (what
    nnssl's and nnU-Net's trainers write); refuses anything else that a pickle would call.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        name = re.search(r"GLOBAL ([\w.]+)", str(e))
        called = [name.group(1)] if name else _unsafe_globals(path)
        what = f" (it calls {', '.join(called[:3])})" if called else ""
        raise CheckpointError(
            f"{path}: refused: the file holds executable pickle content{what}; "
            "only tensors and plain containers are loaded"
        ) from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None


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


# ---------------------------------------------------------------------------- the folder layout
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


def checkpoint_step(folder: Path) -> int:
    return int(folder.name.split("-")[1])


def resolve_run(path: str | Path) -> Path:
    """The folder of a run: ``path`` itself, or the model of that name that ships with neurofm
    (:mod:`neurofm.pretrained`)."""
    from neurofm.pretrained import shipped_path

    if not Path(path).exists() and shipped_path(str(path)) is not None:
        return shipped_path(str(path))
    return Path(path)


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder (its latest checkpoint), a checkpoint folder, or the name of a model that ships with
    neurofm -> the checkpoint folder."""
    from neurofm.pretrained import shipped

    path = resolve_run(path)
    if is_complete(path):
        return path
    if (path / "run.json").is_file() or checkpoint_dir(path).is_dir():
        ck = latest_checkpoint(path)
        if ck is None:
            raise CheckpointError(f"{path}: run has no complete checkpoint yet")
        return ck
    names = ", ".join(shipped()) or "none"
    raise CheckpointError(f"{path}: neither a run folder nor a checkpoint folder (models that ship: {names})")


def write_checkpoint_files(folder: Path, model: nn.Module, run_cfg: dict[str, Any], meta: dict[str, Any]) -> None:
    """Weights and JSON descriptions of a model (everything but the resume state)."""
    m = unwrap(model)
    save_weights(m, folder / WEIGHTS)
    write_json(
        folder / "model.json", {"name": run_cfg["model"]["name"], "kwargs": m.config, "parameters": count_parameters(m)}
    )
    tmap = m.transfer_map()
    if run_cfg.get("transfer"):  # how a fine-tuned model took over its pretrained weights (stem adaptation)
        tmap["from_pretrained"] = run_cfg["transfer"]
    extra = run_cfg.get("extra", {})
    if extra.get("source_keys"):  # an imported run: the source plan's stem / encoder / input-projection keys
        tmap["source_keys"] = extra["source_keys"]
    write_json(folder / "transfer.json", tmap)
    pre = dict(extra.get("preprocessing", {}))
    pre["contrasts"] = run_cfg.get("data", {}).get("contrasts")
    write_json(folder / "preprocessing.json", pre)
    write_json(folder / "run.json", run_cfg)
    write_json(folder / "meta.json", meta)


def publish_checkpoint(tmp: Path, final: Path, keep: int | None = None) -> Path:
    """Rename an assembled checkpoint folder into place, point ``last`` at it, drop all but the newest ``keep``."""
    ck = final.parent
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(ck)
    atomic_write_text(ck / "last", final.name + "\n")
    if keep:
        done = sorted(p for p in ck.glob("step-*") if p.is_dir())
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
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


def write_run_folder(out: str | Path, model: nn.Module, run_cfg: dict[str, Any], meta: dict[str, Any]) -> Path:
    """A run folder with a single checkpoint (step 0): what an importer or a packaged model writes."""
    out = Path(out)
    ck = checkpoint_dir(out)
    name = f"step-{int(meta.get('step', 0)):07d}"
    tmp = ck / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_checkpoint_files(tmp, model, run_cfg, meta)
    publish_checkpoint(tmp, ck / name)
    write_json(out / "run.json", run_cfg)
    return out


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The JSON descriptions of a checkpoint folder (or a run's latest): folder, model, run, transfer,
    preprocessing, meta. The weights are read with :func:`load_weights`."""
    folder = resolve_checkpoint(path)

    def opt(name: str) -> dict[str, Any]:
        return read_json(folder / name) if (folder / name).is_file() else {}

    return {
        "folder": str(folder),
        "model": read_json(folder / "model.json"),
        "run": opt("run.json"),
        "transfer": opt("transfer.json"),
        "preprocessing": opt("preprocessing.json"),
        "meta": read_json(folder / "meta.json"),
    }
