"""Bring weights from nnssl / nnU-Net (ResEnc) and MONAI (ViTAutoEnc) into a neurofm run folder.

The source files are PyTorch pickles. They are read with ``torch.load(weights_only=True)``,
which only rebuilds tensors and plain containers: a file whose pickle would run code is
refused with the name of the object it tried to call. The architecture is read from the
tensor shapes, so no code or config from the source is executed either.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from neurofm.errors import CheckpointError
from neurofm.models.registry import create_model
from neurofm.train.checkpoint import load_state, write_checkpoint_files

_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DDP wrappers


def safe_load(path: str | Path) -> Any:
    """``torch.load`` that never runs code from the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        name = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" (it calls {name.group(1)})" if name else ""
        raise CheckpointError(
            f"{path}: refused: the file holds executable pickle content{what}; "
            "only tensors and plain containers are loaded"
        ) from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None


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
    sd = _state_dict(safe_load(src))
    if kind in ("nnssl", "nnunet", "resenc"):
        name, kwargs, state = "resenc_unet", resenc_kwargs(sd), sd
    elif kind in ("monai", "vit", "lamim"):
        name, kwargs = "vit_autoenc", vit_kwargs(sd, num_heads)
        state = {f"net.{k}": v for k, v in sd.items()}
    else:
        raise CheckpointError(f"unknown import kind {kind!r}; choose nnssl, nnunet or monai")
    model = create_model(name, **kwargs)
    missing = load_state(model, state, strict=False)
    if missing:
        raise CheckpointError(f"{src}: the weights leave {len(missing)} tensors unset, e.g. {missing[:5]}")
    folder = Path(out) / "checkpoints" / "step-0000000"
    folder.mkdir(parents=True, exist_ok=True)
    stack = name == "vit_autoenc"
    run_cfg = {
        "preset": f"imported-{kind}",
        "model": {"name": name, "kwargs": kwargs},
        "data": {
            "patch": kwargs.get("img_size", 128),
            "contrasts": contrasts
            or (["T1w", "T1c", "T2w", "FLAIR"] if stack and kwargs["in_channels"] == 4 else None),
        },
        "extra": {
            "preprocessing": {"spacing": spacing, "orientation": "RAS", "normalize": "zscore"},
            "imported_from": str(Path(src).resolve()),
        },
    }
    write_checkpoint_files(folder, model, run_cfg, {"step": 0, "epoch": 0, "time": "", "imported_from": str(src)})
    from neurofm.utils import atomic_write_text, write_json

    write_json(Path(out) / "run.json", run_cfg)
    atomic_write_text(Path(out) / "checkpoints" / "last", "step-0000000\n")
    return Path(out)
