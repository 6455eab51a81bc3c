"""Take neurofm weights to the field's tools: an nnssl checkpoint that nnssl and nnU-Net's pretrained
fine-tuning load.

``neurofm export RUN --format nnssl --out FILE.pth`` writes what nnssl's trainer writes and its
loaders read: ``network_weights`` (the whole ResidualEncoderUNet / Primus state dict under DNA's
key names, which are neurofm's) and ``nnssl_adaptation_plan`` (architecture, pretraining plan
with spacing, patch and normalisation, input channels, stem / encoder / input-projection / position
embedding keys), plus ``trainer_name`` and ``current_epoch``. Only tensors, strings, numbers and
lists: it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from neurofm.errors import CheckpointError
from neurofm.io.checkpoint import read_checkpoint
from neurofm.io.nnssl import primus_adaptation_plan, resenc_adaptation_plan
from neurofm.models.primus import PRIMUS_SIZES
from neurofm.models.registry import model_from_checkpoint

FORMATS = ("nnssl",)


def _nnssl_payload(run: str | Path) -> dict[str, Any]:
    info = read_checkpoint(run)
    name = info["model"]["name"]
    if name == "downstream":
        raise CheckpointError(
            f"{run} is a fine-tuned model; --format nnssl exports a pretrained run (its backbone and adaptation plan)"
        )
    if name not in ("resenc_unet", "primus"):
        raise CheckpointError(f"--format nnssl exports resenc_unet and primus backbones; {run} holds {name}")
    model, info = model_from_checkpoint(run)
    kw = model.config
    pre = info["preprocessing"]
    patch = int(info["run"].get("data", {}).get("patch") or kw.get("img_size") or 128)
    spacing, normalize = pre.get("spacing", 1.0), pre.get("normalize", "zscore")
    state = model.state_dict()
    if name == "resenc_unet":  # the DNA network only: neurofm's ssl3d heads stay behind
        state = {k: v for k, v in state.items() if k.startswith(("encoder.", "decoder."))}
        plan = resenc_adaptation_plan(kw, patch, spacing, normalize)
    else:
        size = kw.get("size", "M")
        dims = {**PRIMUS_SIZES[size], **{k: kw[k] for k in ("embed_dim", "eva_depth", "eva_numheads") if k in kw}}
        layer = {"init_values": kw.get("init_values", 0.1), "scale_attn_inner": kw.get("scale_attn_inner", True)}
        # DNA's PrimusS/B/M/L by name; any other size as a Primus with its arguments
        custom = size not in ("S", "B", "M", "L") or dims != PRIMUS_SIZES[size] or layer["init_values"] != 0.1
        custom = custom or not layer["scale_attn_inner"]
        arch_kwargs = (
            {**dims, **layer, "patch_embed_size": [kw["patch_size"]] * 3, "input_shape": [kw["img_size"]] * 3}
            if custom
            else None
        )
        arch = "Primus" if custom else f"Primus{size}"
        plan = primus_adaptation_plan(arch, arch_kwargs, kw["in_channels"], kw["img_size"], spacing, normalize)
    return {
        "network_weights": {k: v.detach().clone().contiguous() for k, v in state.items()},
        "nnssl_adaptation_plan": plan,
        "trainer_name": f"neurofm:{info['run'].get('preset', name)}",
        "current_epoch": int(info["meta"].get("epoch", 0) or 0),
    }


def export_run(run: str | Path, fmt: str, out: str | Path) -> Path:
    """Write ``run`` in another tool's format to ``out`` (atomically); returns the file."""
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    out = Path(out)
    if out.is_dir() or out.suffix not in (".pth", ".pt"):  # a folder: nnssl's file name inside it
        out = out / "checkpoint_final.pth"
    payload = _nnssl_payload(run)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, out)
    return out
