"""Bring weights from nnssl / nnU-Net (ResEnc) and MONAI (ViTAutoEnc) into a neurofm run folder.

The source files are PyTorch pickles. They are read with ``torch.load(weights_only=True)``,
which only rebuilds tensors and plain containers: a file whose pickle would run code is
refused with the name of the object it tried to call. The architecture is read from the
tensor shapes, so no code or config from the source is executed either.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from neurofm.errors import CheckpointError
from neurofm.io.checkpoint import load_state, safe_load, write_run_folder
from neurofm.models.registry import create_model

_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DDP wrappers

__all__ = ["import_weights", "resenc_kwargs", "safe_load", "vit_kwargs"]


def _state_dict(obj: Any) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("network_weights", "state_dict", "model", "model_state_dict", "weights"):
            if key in obj and isinstance(obj[key], dict):
                return _state_dict(obj[key])
        tensors = {k: v for k, v in obj.items() if torch.is_tensor(v)}
        if tensors:
            out = {}
            for k, v in tensors.items():
                for p in _PREFIXES:
                    k = k.removeprefix(p)
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


def import_weights(
    kind: str,
    src: str | Path,
    out: str | Path,
    *,
    num_heads: int | None = None,
    spacing: float = 1.0,
    contrasts: list[str] | None = None,
) -> Path:
    """Write a run folder (one checkpoint) from an nnssl/nnU-Net ResEnc or MONAI ViTAutoEnc file."""
    if kind not in SOURCES:
        raise CheckpointError(f"unknown import kind {kind!r}; choose nnssl, nnunet or monai")
    sd = _state_dict(safe_load(src))
    name, kwargs, state, data = SOURCES[kind](sd, num_heads)
    model = create_model(name, **kwargs)
    missing = load_state(model, state, strict=False)
    if missing:
        raise CheckpointError(f"{src}: the weights leave {len(missing)} tensors unset, e.g. {missing[:5]}")
    if contrasts:
        data["contrasts"] = contrasts
    run_cfg = {
        "preset": f"imported-{kind}",
        "model": {"name": name, "kwargs": kwargs},
        "data": {"patch": kwargs.get("img_size", 128), **data},
        "extra": {
            "preprocessing": {"spacing": spacing, "orientation": "RAS", "normalize": "zscore"},
            "imported_from": str(Path(src).resolve()),
        },
    }
    return write_run_folder(out, model, run_cfg, {"step": 0, "epoch": 0, "time": "", "imported_from": str(src)})


def _from_resenc(sd: dict[str, torch.Tensor], num_heads: int | None) -> tuple[str, dict, dict, dict]:
    return "resenc_unet", resenc_kwargs(sd), sd, {"contrasts": None, "intensity": "zscore"}


def _from_monai_vit(sd: dict[str, torch.Tensor], num_heads: int | None) -> tuple[str, dict, dict, dict]:
    kwargs = vit_kwargs(sd, num_heads)
    # LaMIM's four channels; LaMIM and MONAI's self-supervised tutorials scale every channel to [0, 1]
    contrasts = ["T1w", "T1c", "T2w", "FLAIR"] if kwargs["in_channels"] == 4 else None
    return (
        "vit_autoenc",
        kwargs,
        {f"net.{k}": v for k, v in sd.items()},
        {"contrasts": contrasts, "intensity": "minmax"},
    )


#: import kind -> (registry name, kwargs, state dict in our key names, data settings) from a state dict
SOURCES = {
    "nnssl": _from_resenc,
    "nnunet": _from_resenc,
    "resenc": _from_resenc,
    "monai": _from_monai_vit,
    "vit": _from_monai_vit,
    "lamim": _from_monai_vit,
}
