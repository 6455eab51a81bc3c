"""Downstream models: a pretrained backbone with a segmentation decoder or a cls/reg head.

Multi-contrast inputs ``x`` ``(B, C, X, Y, Z)`` come with ``present`` ``(B, C)``; a missing
contrast is zero-filled and never contributes:

* **single-input backbones** (the 1-channel CNNs: dual-latent U-Net, ResEnc): every present
  contrast goes through the shared encoder. Classification/regression: subject (anatomy)
  features are averaged over present contrasts; contrast features and the multi-scale pooled
  features are concatenated in a fixed contrast order (zeros for a missing one) with presence
  flags; the vector is standardised with statistics of the training crops
  (:meth:`DownstreamModel.fit_feature_norm`). Outside linear probing the head also reads a
  learned pooling of every encoder map (with ``pool_latent``, also of the anatomy latent map of a
  disentangling backbone; 1x1x1 convolution, GELU, average over space): the plain averages of
  InstanceNorm-ed maps hardly differ between scans, and a non-linear map of them before the average
  reads what their spatial pattern says (how much of which tissue).
  Segmentation: one decoder pass per present contrast; the logits are fused with learned
  per-contrast weights (softmax over the contrasts present).
* **stack backbones** (the ViT, which sees all contrasts as channels): the stack goes in
  at once; the stem is adapted when the contrasts differ from pretraining (see
  :func:`adapt_stem`).

Everything about the backbone comes from its transfer contract (:mod:`neurofm.models.base`):
its input mode, feature widths, task head, and which pretrained keys it takes over.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from neurofm.errors import CheckpointError, ConfigError
from neurofm.io.checkpoint import load_state
from neurofm.models.base import Features, check_task
from neurofm.models.layers import pointwise_positions
from neurofm.models.registry import create_model, model_class, register_model

MODES = ("linear", "frozen", "full")
POOLS = ("mean", "meanmax")


@register_model("downstream")
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
        pool_channels: channels of the learned pooling of each encoder map (frozen / full; 0: none).
        pool: how that pooling reduces space: ``mean`` (how much of a pattern a scan holds) or ``meanmax``
            (the mean and the maximum: also whether a small focus, such as a lesion, is anywhere in it).
        pool_latent: the learned pooling also reads the anatomy latent map of a disentangling backbone (its
            spatial mean, a linear map of InstanceNorm-ed features, hardly differs between scans).
        probe_head: (frozen / full cls/reg) a linear layer beside the MLP head, reading the standardised fused
            features as the linear probe does; the two outputs add. Fine-tuning fits it in closed form first and
            starts the MLP's output layer at zero (``head_init=probe``, LP-FT).
        pretext_features: (cls/reg) the trunk keeps its pretext head's learned pooling
            (:meth:`~neurofm.models.base.Backbone.keep_pretext_features`, with its pretrained weights) and the fused
            vector holds each scan's pooled vector beside its stage means (``probe_features=pretext`` reads them
            alone) and, where the head has contrast slots, its classifier's logits of the case
            (``probe_features=pretext-logit``).

    ``freeze_encoder`` (set by the fine-tuning schedule) holds the encoder still for a while in
    ``full`` mode: no gradient is computed for it, as in ``frozen``.
    """

    def __init__(
        self,
        backbone: dict[str, Any],
        task: str,
        n_out: int,
        contrasts: list[str],
        mode: str = "full",
        head_hidden: int = 256,
        pool_channels: int = 16,
        pool: str = "mean",
        pool_latent: bool = False,
        probe_head: bool = False,
        pretext_features: bool = False,
    ):
        super().__init__()
        check_task(task)
        if mode not in MODES:
            raise ConfigError(f"mode should be one of {MODES}, got {mode!r}")
        if task == "seg" and mode == "linear":
            raise ConfigError("a linear probe is defined for cls/reg; for segmentation use --mode frozen or full")
        if not contrasts:
            raise ConfigError("at least one input contrast is needed")
        if pool not in POOLS:
            raise ConfigError(f"pool should be one of {POOLS}, got {pool!r}")
        if probe_head and (task == "seg" or mode == "linear"):
            raise ConfigError("a probe beside the head is for cls/reg heads trained by steps (mode frozen or full)")
        self.config = {
            "backbone": backbone,
            "task": task,
            "n_out": n_out,
            "contrasts": list(contrasts),
            "mode": mode,
            "head_hidden": head_hidden,
            "pool_channels": pool_channels,
            "pool": pool,
            "pool_latent": pool_latent,
            "probe_head": probe_head,
            "pretext_features": pretext_features,
        }
        self.task, self.n_out, self.contrasts, self.mode, self.pool_kind = task, n_out, list(contrasts), mode, pool
        n_c = len(contrasts)
        cls = model_class(backbone["name"])
        # asked only when it is on: a backbone registered from outside with the two-argument form still builds
        extra = {"pretext_features": True} if pretext_features else {}
        kw = cls.downstream_kwargs(backbone.get("kwargs", {}), n_c, **extra)
        self.backbone = bb = create_model(backbone["name"], **kw)
        self.stack = bb.input_mode == "stack"
        self.in_channels = n_c
        self.downsampling = bb.downsampling
        if pretext_features:
            bb.keep_pretext_features()
        bb.reset_head(task, n_out)
        self.freeze_encoder = False
        self.latent_pool = False
        self.probe: nn.Linear | None = None
        if task == "seg":
            self.fusion = None if self.stack else nn.Parameter(torch.zeros(n_c))
        else:
            dim = fixed_dim = self._feature_dim()
            # per-feature standardisation (set from the training crops): the pooled features of different
            # scans differ by little around large shared offsets, which a head cannot learn from as they are
            self.register_buffer("feature_mean", torch.zeros(dim))
            self.register_buffer("feature_std", torch.ones(dim))
            learned = mode != "linear" and pool_channels > 0
            maps = bb.feature_dims().maps if learned else ()
            self.latent_pool = learned and pool_latent and bb.disentangles and not self.stack
            if self.latent_pool:
                maps = (*maps, bb.feature_dims().anatomy)
            self.pool = nn.ModuleList(nn.Sequential(nn.Conv3d(c, pool_channels, 1), nn.GELU()) for c in maps)
            dim += len(maps) * pool_channels * (1 if self.stack else n_c) * (2 if pool == "meanmax" else 1)
            self.head = (
                nn.Linear(dim, n_out)
                if mode == "linear"
                else nn.Sequential(
                    nn.Linear(dim, head_hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(head_hidden, n_out)
                )
            )
            if probe_head:
                self.probe = nn.Linear(fixed_dim, n_out)
        if mode in ("linear", "frozen"):
            for name, p in bb.named_parameters():
                if any(name.startswith(pfx) for pfx in bb.encoder_prefixes):
                    p.requires_grad_(False)

    @torch.no_grad()
    def zero_output(self) -> None:
        """Set the cls/reg head's output layer to zero, so that the untrained head predicts the training targets'
        mean (regression targets are standardised) or equal class probabilities, the constant predictor; training
        moves it from there. MAE's fine-tuning starts its head near zero the same way (std 2e-5)."""
        if self.task == "seg":
            raise ConfigError("zero_output is for the cls/reg head; segmentation has none")
        last = self.head if isinstance(self.head, nn.Linear) else self.head[-1]
        last.weight.zero_()
        last.bias.zero_()

    # transfer contract (a fine-tuned model can itself be inspected and adapted)
    @property
    def stem_keys(self) -> tuple[str, ...]:
        return tuple(f"backbone.{k}" for k in self.backbone.stem_keys)

    @property
    def encoder_prefixes(self) -> tuple[str, ...]:
        return tuple(f"backbone.{p}" for p in self.backbone.encoder_prefixes)

    def transfer_map(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels,
            "input_mode": "stack",  # a fine-tuned model takes the contrast stack and its presence flags
            "stem_keys": list(self.stem_keys),
            "encoder_prefixes": list(self.encoder_prefixes),
            "pretext_prefixes": [],
        }

    # ------------------------------------------------------------------ features
    def _feature_dim(self) -> int:
        d = self.backbone.feature_dims()
        if self.stack:
            return d.pooled
        n_c = len(self.contrasts)
        return d.anatomy + n_c * (d.contrast + d.pooled + d.pretext + 1) + d.pretext_logits

    def feature_columns(self, kind: str = "all") -> torch.Tensor:
        """Indices of the fused feature vector (:meth:`features`) that ``kind`` names: ``all``; ``stages`` (the
        encoder's stage means and the presence flags, without the anatomy and contrast latents); ``pretext`` (the
        pretext head's pooled vectors and the presence flags, in a model built with ``pretext_features``);
        ``pretext-logit`` (that head's classifier's logits of the case and the presence flags).

        The fused vector is the anatomy latent, then per contrast its contrast latent, stage means and pretext
        vector, then the pretext classifier's logits, then the presence flags."""
        n = self._feature_dim()
        if kind == "all":
            return torch.arange(n)
        if kind not in ("stages", "pretext", "pretext-logit"):
            raise ConfigError(f"feature columns are all, stages, pretext or pretext-logit, got {kind!r}")
        d = self.backbone.feature_dims()
        if kind.startswith("pretext") and not (d.pretext_logits if kind == "pretext-logit" else d.pretext):
            raise ConfigError(
                f"{kind} columns need a model built with pretext_features (probe_features={kind}) whose backbone has "
                "that pretext head"
            )
        if self.stack:
            return torch.arange(n)  # a stack backbone's fused vector is its stage means
        keep = torch.zeros(n, dtype=torch.bool)
        n_c = len(self.contrasts)
        per_scan = d.contrast + d.pooled + d.pretext
        if kind == "pretext-logit":
            start = d.anatomy + n_c * per_scan
            keep[start : start + d.pretext_logits] = True
        else:
            offset, width = (d.contrast, d.pooled) if kind == "stages" else (d.contrast + d.pooled, d.pretext)
            for i in range(n_c):
                start = d.anatomy + i * per_scan + offset
                keep[start : start + width] = True
        keep[n - n_c :] = True  # the presence flags
        return keep.nonzero().squeeze(1)

    @property
    def encoder_frozen(self) -> bool:
        return self.mode in ("linear", "frozen") or self.freeze_encoder

    def _encode(self, x: torch.Tensor) -> Features:
        if self.encoder_frozen:
            with torch.no_grad():
                return self.backbone.forward_features(x)
        return self.backbone.forward_features(x)

    def features(self, x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Fused per-case feature vector ``(B, D)`` (cls/reg), before standardisation."""
        return self._fused(x, present, learned=False)[0]

    def _fused(
        self, x: torch.Tensor, present: torch.Tensor, learned: bool = True, every: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the fixed fused vector, the learned pooling of the maps or None).

        ``every``: encode every contrast and mask the missing ones out afterwards (the same result, no
        data-dependent shapes: what an exported graph does) instead of encoding only the present ones."""
        use_pool = learned and len(self.pool) > 0
        if self.stack:
            f = self._encode(x * present[:, :, None, None, None].to(x.dtype))
            return f.pooled, (self._learned_pool(f) if use_pool else None)
        b, c = present.shape
        w = present.to(x.dtype)
        if every:
            f = self._encode(x.reshape(b * c, 1, *x.shape[2:]))

            def per_contrast(v: torch.Tensor) -> torch.Tensor:  # (B*C, D) -> (B, C, D), zeros where missing
                return v.reshape(b, c, -1) * w[..., None]

        else:
            idx = present.reshape(-1).nonzero().squeeze(1)
            f = self._encode(x.reshape(b * c, 1, *x.shape[2:])[idx])

            def per_contrast(v: torch.Tensor) -> torch.Tensor:  # (n_present, D) -> (B, C, D), zeros where missing
                return v.new_zeros(b * c, v.shape[1]).index_copy(0, idx, v).view(b, c, -1)

        parts = []
        if f.anatomy is not None:  # the anatomy is the subject's: averaged over its contrasts
            parts.append((per_contrast(f.anatomy) * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0))
        per_scan = [f.contrast, f.pooled] if f.contrast is not None else [f.pooled]
        if f.pretext is not None:
            per_scan.append(f.pretext)
        parts.append(per_contrast(torch.cat(per_scan, dim=1)).flatten(1))
        if f.pretext is not None and self.backbone.feature_dims().pretext_logits:  # the pretext classifier's reading
            parts.append(self.backbone.pretext_logits(per_contrast(f.pretext), present, self.contrasts))
        fixed = torch.cat([*parts, w], dim=1)
        return fixed, (per_contrast(self._learned_pool(f)).flatten(1) if use_pool else None)

    def _learned_pool(self, f: Features) -> torch.Tensor:
        maps = [*f.maps, f.latents["mu_s"]] if self.latent_pool else f.maps
        out = []
        for p, m in zip(self.pool, maps, strict=True):
            v = pointwise_positions(p[0], p[1], m)
            out += [v.mean(1), v.amax(1)] if self.pool_kind == "meanmax" else [v.mean(1)]
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def fit_feature_norm(self, batches: Any) -> torch.Tensor:
        """Set the standardisation of the fused features from ``(x, present)`` batches of training crops;
        returns those features ``(N, D)``, before standardisation."""
        was = self.training
        self.eval()
        feats = torch.cat([self.features(x, present) for x, present in batches])
        self.train(was)
        self.feature_mean.copy_(feats.mean(0))
        self.feature_std.copy_(feats.std(0, unbiased=False).clamp_min(1e-3) if len(feats) > 1 else 1.0)
        return feats

    def standardise(self, fixed: torch.Tensor) -> torch.Tensor:
        """Fused features standardised, clipped to +-6 (a value the training crops never showed, such as a
        contrast missing only at test time, stays bounded)."""
        return ((fixed - self.feature_mean) / self.feature_std).clamp(-6.0, 6.0)

    def normalised_features(self, x: torch.Tensor, present: torch.Tensor, every: bool = False) -> torch.Tensor:
        """Standardised fused features (:meth:`standardise`) and the learned pooling of the maps."""
        return self._head_inputs(x, present, every)[0]

    def _head_inputs(
        self, x: torch.Tensor, present: torch.Tensor, every: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(what the head reads, the standardised fused features alone: what a linear probe reads)."""
        fixed, maps = self._fused(x, present, every=every)
        fixed = self.standardise(fixed)
        return (torch.cat([fixed, maps], dim=1) if maps is not None else fixed), fixed

    # ------------------------------------------------------------------- forward
    def _segment(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_head(self._encode(x))

    def forward(self, x: torch.Tensor, present: torch.Tensor | None = None, every: bool = False) -> torch.Tensor:
        """Logits: ``(B, n_out, X, Y, Z)`` for seg, ``(B, n_out)`` for cls/reg.

        ``every``: run every contrast through the encoder and mask the missing ones out (same logits;
        the form an exported graph takes, with no shape that depends on which contrasts are present)."""
        if x.ndim != 5 or x.shape[1] != len(self.contrasts):
            raise ValueError(
                f"expected (B, {len(self.contrasts)}, X, Y, Z) for contrasts {self.contrasts}, got {tuple(x.shape)}"
            )
        if present is None:
            present = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        present = present.bool()
        tracing = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
        if not tracing and not present.any(dim=1).all():
            raise ValueError("every case needs at least one present contrast")
        if self.task != "seg":
            feats, fixed = self._head_inputs(x, present, every)
            out = self.head(feats)
            return out + self.probe(fixed) if self.probe is not None else out
        if self.stack:
            return self._segment(x * present[:, :, None, None, None].to(x.dtype))
        b, c = present.shape
        if every:
            logits = self._segment(x.reshape(b * c, 1, *x.shape[2:]))
            full = logits.reshape(b, c, *logits.shape[1:])
        else:
            idx = present.reshape(-1).nonzero().squeeze(1)
            logits = self._segment(x.reshape(b * c, 1, *x.shape[2:])[idx])
            full = logits.new_zeros(b * c, *logits.shape[1:]).index_copy(0, idx, logits)
            full = full.view(b, c, *logits.shape[1:])
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


def transferable_keys(model: DownstreamModel, pretrained_keys: list[str]) -> list[str]:
    """Pretrained backbone keys that a downstream model takes over (the backbone says which, per task)."""
    prefixes = model.backbone.transfer_prefixes(model.task)
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
    bb = model.backbone
    own = bb.state_dict()
    keys = transferable_keys(model, list(state))
    if not keys:
        raise CheckpointError("the checkpoint has no encoder weights this model can use (wrong backbone?)")
    sub = {}
    report: dict[str, Any] = {"stem_adaptation": None}
    for k in keys:
        if k not in own:
            raise CheckpointError(f"pretrained key {k!r} has no place in the {type(bb).__name__} backbone")
        v = state[k]
        if k in bb.stem_keys and tuple(v.shape) != tuple(own[k].shape):
            # a shared single-input encoder takes one contrast at a time: its one channel is the mean
            v, src = adapt_stem(v, pretrained_contrasts, model.contrasts if model.stack else ["(each contrast)"])
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
