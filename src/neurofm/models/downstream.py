"""Downstream models: a pretrained backbone with a segmentation decoder or a cls/reg head.

Multi-contrast inputs ``x`` ``(B, C, X, Y, Z)`` come with ``present`` ``(B, C)``; a missing
contrast is zero-filled and never contributes:

* **per-contrast backbones** (the 1-channel CNNs: dual-latent U-Net, ResEnc): every present
  contrast goes through the shared encoder. Classification/regression: subject (anatomy)
  features are averaged over present contrasts, contrast features are concatenated in a
  fixed contrast order (zeros for a missing one) with presence flags, then a head.
  Segmentation: one decoder pass per present contrast; the logits are fused with learned
  per-contrast weights (softmax over the contrasts present).
* **stack backbones** (the ViT, which sees all contrasts as channels): the stack goes in
  at once; the stem is adapted when the contrasts differ from pretraining (see
  :func:`adapt_stem`).
"""

from __future__ import annotations

from typing import Any

import torch
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from torch import nn

from neurofm.errors import CheckpointError, ConfigError
from neurofm.models.dual_latent import DualLatentUNet
from neurofm.models.layers import freeze_unused_seg_layers
from neurofm.models.registry import create_model, register_model
from neurofm.models.resenc import ResEncUNet
from neurofm.models.vit import ViTAutoEncoder

TASKS = ("seg", "cls", "reg")
MODES = ("linear", "frozen", "full")


def downstream_backbone_kwargs(name: str, kwargs: dict[str, Any], n_contrasts: int) -> dict[str, Any]:
    """The backbone's arguments without its pretraining heads (and the right input channels)."""
    kw = dict(kwargs)
    if name == "resenc_unet":
        kw.update(anatomy_outputs=0, health_classes=0, dense_classes=0)
    if name == "vit_autoenc":
        kw["in_channels"] = n_contrasts
        kw["out_channels"] = n_contrasts
    return kw


class DownstreamModel(nn.Module):
    """Backbone + task head (see module docstring).

    Args:
        backbone: ``{"name": registry name, "kwargs": {...}}`` of the pretrained model.
        task: ``seg``, ``cls`` or ``reg``.
        n_out: classes (seg includes background; cls) or 1 (reg).
        contrasts: the input contrasts, in channel order.
        mode: ``linear`` (frozen encoder, linear head; cls/reg), ``frozen`` (frozen encoder,
            trained decoder/head) or ``full``.
        head_hidden: width of the MLP head (frozen / full).
    """

    def __init__(
        self,
        backbone: dict[str, Any],
        task: str,
        n_out: int,
        contrasts: list[str],
        mode: str = "full",
        head_hidden: int = 256,
    ):
        super().__init__()
        if task not in TASKS:
            raise ConfigError(f"task should be one of {TASKS}, got {task!r}")
        if mode not in MODES:
            raise ConfigError(f"mode should be one of {MODES}, got {mode!r}")
        if task == "seg" and mode == "linear":
            raise ConfigError("a linear probe is defined for cls/reg; for segmentation use --mode frozen or full")
        if not contrasts:
            raise ConfigError("at least one input contrast is needed")
        self.config = {
            "backbone": backbone,
            "task": task,
            "n_out": n_out,
            "contrasts": list(contrasts),
            "mode": mode,
            "head_hidden": head_hidden,
        }
        self.task, self.n_out, self.contrasts, self.mode = task, n_out, list(contrasts), mode
        n_c = len(contrasts)
        kw = downstream_backbone_kwargs(backbone["name"], backbone.get("kwargs", {}), n_c)
        self.backbone = create_model(backbone["name"], **kw)
        bb = self.backbone
        self.stack = isinstance(bb, ViTAutoEncoder)
        self.in_channels = n_c
        self.downsampling = bb.downsampling
        if task == "seg":
            if isinstance(bb, DualLatentUNet):
                self.decoder = UNetDecoder(bb.encoder, n_out, 1, deep_supervision=False)
                freeze_unused_seg_layers(self.decoder)
            elif isinstance(bb, ResEncUNet):
                bb.decoder.seg_layers = nn.ModuleList(
                    [nn.Conv3d(layer.in_channels, n_out, 1) for layer in bb.decoder.seg_layers]
                )
                freeze_unused_seg_layers(bb.decoder)
                self.decoder = None  # the backbone's own (pretrained) decoder, new output layer
            else:
                ch = bb.net.conv3d_transpose_1.in_channels
                k = bb.net.conv3d_transpose_1.kernel_size
                self.decoder = nn.ConvTranspose3d(ch, n_out, kernel_size=k, stride=k)
            self.fusion = None if self.stack else nn.Parameter(torch.zeros(n_c))
        else:
            dim = self._feature_dim()
            self.head = (
                nn.Linear(dim, n_out)
                if mode == "linear"
                else nn.Sequential(
                    nn.Linear(dim, head_hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(head_hidden, n_out)
                )
            )
        self._drop_unused()
        if mode in ("linear", "frozen"):
            for name, p in self.backbone.named_parameters():
                if any(name.startswith(pfx) for pfx in bb.encoder_prefixes):
                    p.requires_grad_(False)

    # transfer API (a fine-tuned model can itself be inspected and adapted)
    @property
    def stem_keys(self) -> tuple[str, ...]:
        return tuple(f"backbone.{k}" for k in self.backbone.stem_keys)

    @property
    def encoder_prefixes(self) -> tuple[str, ...]:
        return tuple(f"backbone.{p}" for p in self.backbone.encoder_prefixes)

    pretext_prefixes: tuple[str, ...] = ()

    def _drop_unused(self) -> None:
        """Remove pretraining-only parts the task never runs (no dead weights, nothing unused for DDP)."""
        bb = self.backbone
        if isinstance(bb, DualLatentUNet):
            bb.decoder = None  # the reconstruction decoder (no skips)
            if self.task == "seg":
                bb.subject_head = bb.contrast_head = None
        elif isinstance(bb, ResEncUNet) and self.task != "seg":
            bb.decoder = None
        elif isinstance(bb, ViTAutoEncoder):
            bb.net.conv3d_transpose_1 = None
            if self.task != "seg":
                bb.net.conv3d_transpose = None

    # ------------------------------------------------------------------ features
    def _feature_dim(self) -> int:
        bb, n_c = self.backbone, len(self.contrasts)
        if isinstance(bb, DualLatentUNet):
            return bb.latent + n_c * bb.latent + n_c
        if isinstance(bb, ResEncUNet):
            f = bb.encoder.output_channels[-1]
            return bb.n_anatomy + n_c * (f - bb.n_anatomy) + n_c
        return bb.hidden_size

    @property
    def encoder_frozen(self) -> bool:
        return self.mode in ("linear", "frozen")

    def _encode(self, x: torch.Tensor) -> dict[str, Any]:
        if self.encoder_frozen:
            with torch.no_grad():
                return self.backbone.forward_features(x)
        return self.backbone.forward_features(x)

    def _pooled(self, f: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(subject features, contrast features) per scan."""
        if "mu_s" in f:
            return f["mu_s"].mean(dim=(2, 3, 4)), f["mu_c"].mean(dim=(2, 3, 4))
        anat = f["anatomy"].mean(dim=(2, 3, 4))
        rest = torch.cat([f["health"], f["free"]], dim=1).mean(dim=(2, 3, 4))
        return anat, rest

    def features(self, x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Fused per-case feature vector ``(B, D)`` (cls/reg)."""
        if self.stack:
            return self._encode(x * present[:, :, None, None, None].to(x.dtype))["pooled"]
        b, c = present.shape
        flat = present.reshape(-1)
        idx = flat.nonzero().squeeze(1)
        scans = x.reshape(b * c, 1, *x.shape[2:])[idx]
        subj, con = self._pooled(self._encode(scans))
        s_all = subj.new_zeros(b * c, subj.shape[1]).index_copy(0, idx, subj).view(b, c, -1)
        c_all = con.new_zeros(b * c, con.shape[1]).index_copy(0, idx, con).view(b, c, -1)
        w = present.to(subj.dtype)
        subject = (s_all * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)
        return torch.cat([subject, c_all.flatten(1), w], dim=1)

    # ------------------------------------------------------------------- forward
    def _skips(self, scans: torch.Tensor) -> list[torch.Tensor]:
        if self.encoder_frozen:
            with torch.no_grad():
                return self.backbone.encoder(scans)
        return self.backbone.encoder(scans)

    def _seg_one(self, scans: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        if isinstance(bb, ResEncUNet):
            return bb.decoder(self._skips(scans))
        if isinstance(bb, DualLatentUNet):
            return self.decoder(self._skips(scans))
        tokens = self._encode(scans)["tokens"]
        g = [s // bb.downsampling for s in scans.shape[2:]]
        h = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *g)
        return self.decoder(bb.net.conv3d_transpose(h))

    def forward(self, x: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        """Logits: ``(B, n_out, X, Y, Z)`` for seg, ``(B, n_out)`` for cls/reg."""
        if x.ndim != 5 or x.shape[1] != len(self.contrasts):
            raise ValueError(
                f"expected (B, {len(self.contrasts)}, X, Y, Z) for contrasts {self.contrasts}, got {tuple(x.shape)}"
            )
        if present is None:
            present = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        present = present.bool()
        if not present.any(dim=1).all():
            raise ValueError("every case needs at least one present contrast")
        if self.task != "seg":
            return self.head(self.features(x, present))
        if self.stack:
            return self._seg_one(x * present[:, :, None, None, None].to(x.dtype))
        b, c = present.shape
        idx = present.reshape(-1).nonzero().squeeze(1)
        logits = self._seg_one(x.reshape(b * c, 1, *x.shape[2:])[idx])
        full = logits.new_zeros(b * c, *logits.shape[1:]).index_copy(0, idx, logits).view(b, c, *logits.shape[1:])
        w = torch.softmax(self.fusion.masked_fill(~present, float("-inf")), dim=1)  # (B, C), 0 where missing
        return (full * w[:, :, None, None, None, None]).sum(1)

    def param_groups(self, lr: float, backbone_lr: float) -> list[dict[str, Any]]:
        """Encoder parameters at ``backbone_lr`` (group 0), everything else at ``lr`` (group 1)."""
        enc, rest = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            is_enc = name.startswith("backbone.") and any(
                name[len("backbone.") :].startswith(pfx) for pfx in self.backbone.encoder_prefixes
            )
            (enc if is_enc else rest).append(p)
        return [{"params": enc, "lr": backbone_lr, "name": "encoder"}, {"params": rest, "lr": lr, "name": "head"}]


@register_model("downstream")
def downstream(**kwargs: Any) -> DownstreamModel:
    return DownstreamModel(**kwargs)


def transferable_keys(model: DownstreamModel, pretrained_keys: list[str]) -> list[str]:
    """Pretrained backbone keys that a downstream model takes over (encoder; ResEnc decoder stages for seg)."""
    bb = model.backbone
    prefixes = list(bb.encoder_prefixes)
    if model.task == "seg" and isinstance(bb, ResEncUNet):
        prefixes += ["decoder.stages.", "decoder.transpconvs."]
    return [k for k in pretrained_keys if any(k.startswith(p) for p in prefixes)]


def adapt_stem(weight: torch.Tensor, pretrained: list[str] | None, wanted: list[str]) -> tuple[torch.Tensor, list[int]]:
    """Stem weights ``(out, C_old, ...)`` for new input contrasts.

    A contrast seen in pretraining keeps its channel's weights; an unseen one gets the mean
    over the pretrained channels. Returns the new weight and, per new channel, the source
    channel (-1: mean).
    """
    c_old = weight.shape[1]
    names = list(pretrained) if pretrained and len(pretrained) == c_old else []
    src = [names.index(c) if c in names else -1 for c in wanted]
    if not names and c_old == len(wanted):
        src = list(range(c_old))
    mean = weight.mean(dim=1)
    cols = [weight[:, s] if s >= 0 else mean for s in src]
    return torch.stack(cols, dim=1).contiguous(), src


def load_pretrained(
    model: DownstreamModel, state: dict[str, torch.Tensor], pretrained_contrasts: list[str] | None
) -> dict[str, Any]:
    """Copy the transferable pretrained weights into ``model.backbone``.

    Asserts that every transferred key exists with a matching shape (the stem may be
    adapted to other contrasts) and returns a report: transferred keys, stem adaptation,
    and the exact list of backbone keys left at their initial values.
    """
    from neurofm.train.checkpoint import load_state

    bb = model.backbone
    own = bb.state_dict()
    keys = transferable_keys(model, list(state))
    if not keys:
        raise CheckpointError("the checkpoint has no encoder weights this model can use (wrong backbone?)")
    sub = {}
    report: dict[str, Any] = {"stem_adaptation": None}
    for k in keys:
        if k not in own and getattr(bb, k.split(".")[0], "absent") is None:
            continue  # a part the task does not use (e.g. the latent heads for segmentation)
        if k not in own:
            raise CheckpointError(f"pretrained key {k!r} has no place in the {type(bb).__name__} backbone")
        v = state[k]
        if k in bb.stem_keys and tuple(v.shape) != tuple(own[k].shape):
            v, src = adapt_stem(v, pretrained_contrasts, model.contrasts)
            report["stem_adaptation"] = {
                "key": k,
                "pretrained_contrasts": pretrained_contrasts,
                "contrasts": model.contrasts,
                "source_channel": src,
            }
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(f"{k}: pretrained shape {tuple(v.shape)} vs model {tuple(own[k].shape)}")
        sub[k] = v
    missing = load_state(bb, sub, strict=False)
    report["transferred"] = len(sub)
    report["initialised"] = sorted(missing)
    return report


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
