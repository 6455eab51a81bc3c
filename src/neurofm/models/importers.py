"""Bring weights from nnssl / nnU-Net (ResEnc, Primus) and MONAI (ViTAutoEnc) into a neurofm run folder.

The source files are PyTorch pickles. They are read by :func:`~neurofm.io.checkpoint.safe_load`
(``torch.load(weights_only=True)`` plus numpy's plain values), which only rebuilds tensors,
containers and numbers: a file whose pickle would run code is refused with the name of the
object it tried to call. The architecture is read from the tensor shapes and checked against
the checkpoint's own plan where it has one (nnssl's adaptation plan, nnU-Net's plans), so no
code or config from the source is executed either.

What the plan says is carried over (:mod:`neurofm.io.nnssl`): the pretraining spacing,
patch and normalisation become the run's preprocessing and patch (so fine-tuning and
``predict`` use them by default), and the whole plan is kept in ``run.json``
(``extra.source``) and the source's stem / encoder keys in ``transfer.json``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from neurofm.errors import CheckpointError
from neurofm.io.checkpoint import load_state, safe_load, write_run_folder
from neurofm.io.nnssl import SourcePlan, check_resenc_plan, read_source_plan
from neurofm.models.primus import PRIMUS_SIZES
from neurofm.models.registry import create_model

_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DDP wrappers

__all__ = ["import_weights", "primus_kwargs", "resenc_kwargs", "safe_load", "vit_kwargs"]


def _state_dict(obj: Any) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("network_weights", "state_dict", "model", "model_state_dict", "weights"):
            if key in obj and isinstance(obj[key], dict):
                return _state_dict(obj[key])
        tensors = {k: v for k, v in obj.items() if torch.is_tensor(v)}
        if tensors:
            out = {}
            for k, v in tensors.items():
                while k.startswith(_PREFIXES):  # DDP around torch.compile, or the other way round
                    k = next(k.removeprefix(p) for p in _PREFIXES if k.startswith(p))
                out[k] = v
            return out
    raise CheckpointError("no state dict (tensors) found in the file")


def resenc_kwargs(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """ResEnc architecture (filters, blocks, channels) from a DNA/nnU-Net state dict."""
    stages = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.stages\.(\d+)\.", k))})
    if not stages or "encoder.stem.convs.0.conv.weight" not in sd:
        raise CheckpointError("not a ResEnc state dict (no encoder.stem / encoder.stages keys)")
    features, blocks = [], []
    for s in stages:
        b = sorted({int(m.group(1)) for k in sd if (m := re.match(rf"encoder\.stages\.{s}\.blocks\.(\d+)\.", k))})
        blocks.append(len(b))
        features.append(int(sd[f"encoder.stages.{s}.blocks.0.conv2.conv.weight"].shape[0]))
    seg = sorted(k for k in sd if re.match(r"decoder\.seg_layers\.\d+\.weight", k))
    out_channels = int(sd[seg[-1]].shape[0]) if seg else 1
    return {
        "in_channels": int(sd["encoder.stem.convs.0.conv.weight"].shape[1]),
        "out_channels": out_channels,
        "features": features,
        "blocks": blocks,
    }


def vit_kwargs(sd: dict[str, torch.Tensor], num_heads: int | None = None) -> dict[str, Any]:
    """ViTAutoEnc dimensions from a MONAI state dict (heads: given, or hidden/64 as in ViT)."""
    try:
        w = sd["patch_embedding.patch_embeddings.weight"]
        pos = sd["patch_embedding.position_embeddings"]
    except KeyError:
        raise CheckpointError("not a MONAI ViTAutoEnc state dict (no patch_embedding weights)") from None
    hidden, patch = int(w.shape[0]), int(w.shape[-1])
    grid = round(pos.shape[1] ** (1 / 3))
    layers = len({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    heads = num_heads or max(1, hidden // 64)
    return {
        "in_channels": int(w.shape[1]),
        "out_channels": int(sd["conv3d_transpose_1.weight"].shape[1]),
        "img_size": grid * patch,
        "patch_size": patch,
        "size": "base",
        "hidden_size": hidden,
        "num_layers": layers,
        "num_heads": heads,
        "mlp_dim": int(sd["blocks.0.mlp.linear1.weight"].shape[0]),
        "deconv_chns": int(sd["conv3d_transpose.weight"].shape[1]),
        "qkv_bias": "blocks.0.attn.qkv.bias" in sd,
    }


def primus_kwargs(sd: dict[str, torch.Tensor], num_heads: int | None, plan: SourcePlan) -> dict[str, Any]:
    """Primus dimensions from an nnssl state dict; heads from ``num_heads``, the plan's class name (PrimusM
    ...) or the nnssl size with the same width and depth."""
    try:
        w = sd["down_projection.proj.weight"]
        pos = sd["eva.pos_embed"]
    except KeyError:
        raise CheckpointError("not a Primus state dict (no down_projection.proj / eva.pos_embed)") from None
    embed, patch = int(w.shape[0]), int(w.shape[-1])
    if len(set(w.shape[2:])) != 1:
        raise CheckpointError(f"Primus with a non-cubic patch embedding {tuple(w.shape[2:])} is not supported")
    depth = len({int(m.group(1)) for k in sd if (m := re.match(r"eva\.blocks\.(\d+)\.", k))})
    tokens = int(pos.shape[1])
    grid = round(tokens ** (1 / 3))
    if grid**3 != tokens:
        raise CheckpointError(f"eva.pos_embed has {tokens} tokens: not a cube (a non-cubic pretraining patch)")
    size = next((n for n, d in PRIMUS_SIZES.items() if (d["embed_dim"], d["eva_depth"]) == (embed, depth)), None)
    named = (plan.architecture or "").removeprefix("Primus")
    heads = num_heads or (PRIMUS_SIZES[named]["eva_numheads"] if named in PRIMUS_SIZES else None)
    heads = heads or (PRIMUS_SIZES[size]["eva_numheads"] if size else None)
    if heads is None:
        raise CheckpointError(f"Primus of width {embed} and depth {depth} is no nnssl size: give --num-heads")
    last = max(int(m.group(1)) for k in sd if (m := re.match(r"up_projection\.decode\.(\d+)\.weight", k)))
    out = {
        "in_channels": int(w.shape[1]),
        "out_channels": int(sd[f"up_projection.decode.{last}.weight"].shape[1]),
        "img_size": grid * patch,
        "patch_size": patch,
        "size": size or "M",
        # DNA's PrimusS/B/M/L have layer scale and a norm inside attention; a plain Primus has neither
        "init_values": 0.1 if "eva.blocks.0.gamma_1" in sd else None,
        "scale_attn_inner": "eva.blocks.0.attn.norm.weight" in sd,
    }
    if size is None or heads != PRIMUS_SIZES[size]["eva_numheads"]:
        out.update(embed_dim=embed, eva_depth=depth, eva_numheads=heads)
    return out


def import_weights(
    kind: str,
    src: str | Path,
    out: str | Path,
    *,
    num_heads: int | None = None,
    spacing: float | None = None,
    contrasts: list[str] | None = None,
) -> Path:
    """Write a run folder (one checkpoint) from an nnssl / nnU-Net (ResEnc or Primus) or MONAI ViTAutoEnc file.

    ``spacing`` (mm) overrides the source plan's; without either, 1 mm is recorded.
    """
    if kind not in SOURCES:
        raise CheckpointError(f"unknown import kind {kind!r}; choose from {', '.join(sorted(SOURCES))}")
    obj = safe_load(src)
    sd = _state_dict(obj)
    plan = read_source_plan(obj)
    try:
        name, kwargs, state, data = SOURCES[kind](sd, num_heads, plan)
        model = create_model(name, **kwargs)
        load_state(model, state, strict=True)
    except CheckpointError as e:
        raise CheckpointError(f"{src}: {e}") from None
    if contrasts:
        data["contrasts"] = contrasts
    patch = plan.recommended_patch or plan.patch
    if kwargs.get("img_size"):  # a transformer takes the cube it was built for
        patch = [kwargs["img_size"]] * 3
    pre = {
        "spacing": spacing if spacing is not None else (plan.iso_spacing or 1.0),
        "orientation": "RAS",
        "normalize": plan.normalize or "zscore",
    }
    run_cfg = {
        "preset": f"imported-{kind}",
        "model": {"name": name, "kwargs": kwargs},
        "data": {"patch": min(patch) if patch else 128, **data},
        "extra": {
            "preprocessing": pre,
            "imported_from": str(Path(src).resolve()),
            "source": plan.record(),
            "source_keys": {k: v for k, v in plan.keys.items() if v},
        },
    }
    meta = {"step": 0, "epoch": plan.epoch or 0, "time": "", "imported_from": str(src)}
    return write_run_folder(out, model, run_cfg, meta)


def _check_keys(plan: SourcePlan, encoder_prefixes: tuple[str, ...]) -> None:
    """The plan's stem and encoder must be parts of what neurofm's backbone transfers."""
    for what in ("key_to_stem", "key_to_encoder"):
        key = plan.keys.get(what)
        if key and not any(f"{key}.".startswith(p) for p in encoder_prefixes):
            raise CheckpointError(f"the plan's {what} {key!r} is not part of the encoder ({encoder_prefixes})")


def _from_nnssl(sd: dict[str, torch.Tensor], num_heads: int | None, plan: SourcePlan) -> tuple[str, dict, dict, dict]:
    """nnssl / nnU-Net: a Primus where the weights have an EVA transformer, else a ResEnc U-Net."""
    if "down_projection.proj.weight" in sd or (plan.architecture or "").startswith("Primus"):
        from neurofm.models.primus import PrimusBackbone

        _check_keys(plan, PrimusBackbone.encoder_prefixes)
        return "primus", primus_kwargs(sd, num_heads, plan), sd, {"contrasts": None, "intensity": "zscore"}
    from neurofm.models.resenc import ResEncUNet

    kwargs = resenc_kwargs(sd)
    check_resenc_plan(plan, kwargs)
    _check_keys(plan, ResEncUNet.encoder_prefixes)
    return "resenc_unet", kwargs, sd, {"contrasts": None, "intensity": "zscore"}


def _from_monai_vit(
    sd: dict[str, torch.Tensor], num_heads: int | None, plan: SourcePlan
) -> tuple[str, dict, dict, dict]:
    kwargs = vit_kwargs(sd, num_heads)
    # LaMIM's four channels; LaMIM and MONAI's self-supervised tutorials scale every channel to [0, 1]
    contrasts = ["T1w", "T1c", "T2w", "FLAIR"] if kwargs["in_channels"] == 4 else None
    return (
        "vit_autoenc",
        kwargs,
        {f"net.{k}": v for k, v in sd.items()},
        {"contrasts": contrasts, "intensity": "minmax"},
    )


#: import kind -> (registry name, kwargs, state dict in our key names, data settings) from a state dict and plan
SOURCES = {
    "nnssl": _from_nnssl,
    "nnunet": _from_nnssl,
    "resenc": _from_nnssl,
    "primus": _from_nnssl,
    "monai": _from_monai_vit,
    "vit": _from_monai_vit,
    "lamim": _from_monai_vit,
}
