"""Take neurofm models elsewhere: an nnssl checkpoint that nnssl and nnU-Net's pretrained fine-tuning
load (pretrained runs), or an ONNX / TorchScript graph of a fine-tuned model (deployment).

**ONNX / TorchScript** (``neurofm export FT --format onnx|torchscript --out DIR``): the graph takes
``image`` ``(B, C, X, Y, Z)`` float32 — the contrasts stacked in the model's order, preprocessed as
its store was (``preprocessing`` in the JSON) — and ``present`` ``(B, C)`` float32 (1 present, 0
missing), and returns ``logits``: ``(B, K, X, Y, Z)`` (seg), ``(B, K)`` (cls) or ``(B, 1)`` (reg, the
standardised target: ``value = logit * target_std + target_mean``). Every contrast goes through
the encoder and a missing one is masked out, so no shape depends on the data. Batch and spatial
size are dynamic where the backbone allows; a transformer takes exactly its cube (``fixed_size``).
The model is exported in eval mode (InstanceNorm with its running statistics off, dropout off,
one output: no deep supervision). ``DIR/neurofm-export.json`` (also in the ONNX file's metadata)
holds the task, contrasts, classes, patch, target scaling, preprocessing and the parity measured
against PyTorch right after the export.

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
from neurofm.utils import write_json

FORMATS = ("nnssl", "onnx", "torchscript")
EXPORT_JSON = "neurofm-export.json"


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


class Deployable(torch.nn.Module):
    """A fine-tuned model as exported: ``(image, present) -> logits`` (see module docstring)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        return self.model(image, present > 0.5, every=True)


def example_input(model: Any, batch: int = 2, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A random ``(image, present)`` pair the exported graph takes (one contrast missing in the second case)."""
    n_c = len(model.contrasts)
    size = size or getattr(model.backbone, "fixed_size", None) or 2 * int(model.downsampling)
    g = torch.Generator().manual_seed(0)
    image = torch.randn(batch, n_c, size, size, size, generator=g)
    present = torch.ones(batch, n_c)
    if n_c > 1 and batch > 1:
        present[1, -1] = 0.0
        image[1, -1] = 0.0
    return image, present


def _export_graph(run: str | Path, fmt: str, out: Path) -> Path:
    import warnings

    model, info = model_from_checkpoint(run)
    task = info["run"].get("task_info")
    if info["model"]["name"] != "downstream" or task is None:
        raise CheckpointError(
            f"{run}: --format {fmt} exports a fine-tuned model (neurofm finetune); this is a pretrained run"
        )
    model.eval()
    net = Deployable(model).eval()
    fixed = getattr(model.backbone, "fixed_size", None)
    image, present = example_input(model)
    out.mkdir(parents=True, exist_ok=True)
    dims = {0: "batch"} if fixed else {0: "batch", 2: "x", 3: "y", 4: "z"}
    with torch.no_grad():
        want = net(image, present)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on shape arithmetic that is constant for a given input
        if fmt == "onnx":
            path = out / "model.onnx"
            tmp = out / ".model.onnx.tmp"
            torch.onnx.export(
                net,
                (image, present),
                str(tmp),
                input_names=["image", "present"],
                output_names=["logits"],
                dynamic_axes={
                    "image": dims,
                    "present": {0: "batch"},
                    "logits": {0: "batch"}
                    | ({k: v for k, v in dims.items() if k > 1} if task["task"] == "seg" else {}),
                },
                opset_version=17,
                dynamo=False,
            )
            got = _onnx_run(tmp, image, present)
        else:
            path = out / "model.pt"
            tmp = out / ".model.pt.tmp"
            traced = torch.jit.trace(net, (image, present), check_trace=False)
            traced.save(str(tmp))
            with torch.no_grad():
                got = torch.jit.load(str(tmp))(image, present).numpy()
    parity = float(abs(got - want.numpy()).max())
    meta = {
        "format": fmt,
        "file": path.name,
        "inputs": {
            "image": "(B, C, X, Y, Z) float32: contrasts in `contrasts` order, preprocessed as `preprocessing`",
            "present": "(B, C) float32: 1 present, 0 missing (a missing contrast's channel is ignored)",
        },
        "output": "logits",
        "dynamic": "batch" if fixed else "batch and spatial size (multiples of `downsampling`)",
        "fixed_size": fixed,
        "downsampling": int(model.downsampling),
        "task_info": task,
        "preprocessing": info["preprocessing"],
        "source_run": str(Path(info["folder"]).resolve()),
        "parity_max_abs_logit": parity,
    }
    if fmt == "onnx":
        _onnx_metadata(tmp, meta)
    os.replace(tmp, path)
    write_json(out / EXPORT_JSON, meta)
    return path


def _onnx_run(path: Path, image: torch.Tensor, present: torch.Tensor) -> Any:
    from neurofm.preprocess.windows import onnx_session

    return onnx_session(path).run(None, {"image": image.numpy(), "present": present.numpy()})[0]


def _onnx_metadata(path: Path, meta: dict[str, Any]) -> None:
    import json

    import onnx

    m = onnx.load(str(path))
    entry = m.metadata_props.add()
    entry.key, entry.value = "neurofm", json.dumps(meta)
    onnx.save(m, str(path))


def export_run(run: str | Path, fmt: str, out: str | Path) -> Path:
    """Write ``run`` in another tool's format to ``out`` (atomically); returns the file."""
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    out = Path(out)
    if fmt in ("onnx", "torchscript"):
        return _export_graph(run, fmt, out)
    if out.is_dir() or out.suffix not in (".pth", ".pt"):  # a folder: nnssl's file name inside it
        out = out / "checkpoint_final.pth"
    payload = _nnssl_payload(run)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, out)
    return out
