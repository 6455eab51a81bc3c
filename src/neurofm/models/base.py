"""The transfer contract every backbone keeps (timm-style), so no wrapper asks which model it holds.

A backbone is an ``nn.Module`` subclass of :class:`Backbone` that answers:

* ``forward_features(x) -> Features`` — multi-scale maps, one pooled vector per input, the
  anatomy / contrast parts where it has them, and the tensors its pretraining objective scores;
* ``input_mode`` — ``"single"``: contrasts go one at a time through one shared encoder
  (``in_channels`` 1); ``"stack"``: all contrasts at once, as channels;
* ``stem_keys`` / ``encoder_prefixes`` / ``pretext_prefixes`` — its parts by state-dict key:
  the weights that depend on the input channels, the transferable encoder, the heads used
  only by a pretraining objective;
* ``feature_dims()`` — the channels of ``Features.maps`` and the widths of ``anatomy`` / ``contrast``;
* ``reset_head(task, classes)`` — become a downstream trunk: pretext parts dropped and, for
  ``seg``, a decoder with ``classes`` outputs installed, run by ``forward_head(features)``;
* ``transfer_prefixes(task)`` — the pretrained keys that trunk takes over;
* ``keep_pretext_features()`` — (optional) keep a pretext head in the trunk, so that a probe can read what the
  pretext head read (``Features.pretext``) and its classifier's logits of a case (``pretext_logits``); called before
  ``reset_head``;
* ``reads_pretext_logits(kwargs)`` — (optional) whether settings build a pretext classifier ``pretext_logits`` reads;
* ``downstream_kwargs(kwargs, n_contrasts, pretext_features)`` — the constructor arguments of that trunk: no
  pretext head is built that ``reset_head`` would drop, so a trunk built from scratch with a run's architecture
  draws the same initial weights whatever pretext heads that run trained (``pretext_features`` keeps the one
  ``keep_pretext_features`` keeps);
* ``disentangles`` / ``recombine(anatomy_of, contrast_of)`` — a backbone with separate
  anatomy and contrast latents can render one scan's anatomy in another's contrast.

A new backbone is one module that subclasses :class:`Backbone`, registers itself with
``@register_model`` and is imported in :func:`neurofm.models.registry.load_builtin`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from neurofm.errors import ConfigError

INPUT_MODES = ("single", "stack")
TASKS = ("seg", "cls", "reg")


@dataclass
class Features:
    """What ``forward_features`` returns, for every backbone.

    Attributes:
        maps: encoder outputs, finest first, each ``(B, C_i, X_i, Y_i, Z_i)`` (a ViT: its token grid).
        pooled: ``(B, D)`` every map averaged over space and concatenated (multi-scale).
        anatomy: ``(B, A)`` the subject (anatomy) part, where the backbone has one.
        contrast: ``(B, K)`` the contrast part, where it has one.
        latents: tensors a pretraining objective scores (e.g. ``mu_s``, ``logvar_s``); backbone-specific.
        pretext: ``(B, P)`` a pretext head's learned pooling of the maps, in a trunk that keeps it
            (:meth:`Backbone.keep_pretext_features`).
    """

    maps: list[torch.Tensor]
    pooled: torch.Tensor
    anatomy: torch.Tensor | None = None
    contrast: torch.Tensor | None = None
    latents: dict[str, torch.Tensor] = field(default_factory=dict)
    pretext: torch.Tensor | None = None


@dataclass(frozen=True)
class FeatureDims:
    """Widths of :class:`Features`: channels of each map, of the anatomy, contrast and pretext vectors (0: none)."""

    maps: tuple[int, ...]
    anatomy: int = 0
    contrast: int = 0
    pretext: int = 0
    pretext_logits: int = 0  # the kept pretext classifier's outputs per case (Backbone.pretext_logits)

    @property
    def pooled(self) -> int:
        return sum(self.maps)


def global_pool(maps: list[torch.Tensor]) -> torch.Tensor:
    """Average every ``(B, C, ...)`` map over space and concatenate: ``(B, sum C)``."""
    return torch.cat([m.flatten(2).mean(2) for m in maps], dim=1)


class Backbone(nn.Module):
    """Base class of the registered backbones (see module docstring)."""

    input_mode: ClassVar[str] = "single"
    stem_keys: ClassVar[tuple[str, ...]] = ()
    encoder_prefixes: ClassVar[tuple[str, ...]] = ()
    pretext_prefixes: ClassVar[tuple[str, ...]] = ()
    disentangles: ClassVar[bool] = False  # has anatomy and contrast latents a decoder can recombine

    config: dict[str, Any]
    in_channels: int
    downsampling: int = 1  # spatial sizes must be multiples of this
    fixed_size: int | None = None  # a backbone that takes exactly this cube (a ViT)

    def forward_features(self, x: torch.Tensor) -> Features:
        raise NotImplementedError

    def feature_dims(self) -> FeatureDims:
        raise NotImplementedError

    def reset_head(self, task: str, classes: int) -> None:
        """Drop the pretext parts; for ``seg`` install a decoder with ``classes`` outputs."""
        raise NotImplementedError

    def forward_head(self, features: Features) -> torch.Tensor:
        """Segmentation logits ``(B, classes, X, Y, Z)`` from the features of ``(B, C, X, Y, Z)``."""
        raise NotImplementedError(f"{type(self).__name__} has no segmentation head; call reset_head('seg', n)")

    def recombine(self, anatomy_of: torch.Tensor, contrast_of: torch.Tensor) -> torch.Tensor:
        """Decode the anatomy latent of ``anatomy_of`` with the contrast latent of ``contrast_of``.

        Both are ``(B, C, X, Y, Z)`` batches; the result is a reconstruction of the same shape."""
        raise NotImplementedError(f"{type(self).__name__} has no separate anatomy and contrast latents")

    def transfer_prefixes(self, task: str) -> tuple[str, ...]:
        """Pretrained keys a downstream trunk for ``task`` takes over (default: the encoder)."""
        return self.encoder_prefixes

    def keep_pretext_features(self) -> None:
        """Keep a pretext head through :meth:`reset_head` (a cls/reg trunk), so that ``forward_features`` gives its
        learned pooling as ``Features.pretext``, :meth:`pretext_logits` its classifier's reading of a case, and
        ``transfer_prefixes`` takes its pretrained weights over. A backbone without such a head refuses."""
        raise ConfigError(f"{type(self).__name__} has no pretext head whose pooled features a probe could read")

    def pretext_logits(self, per_scan: torch.Tensor, present: torch.Tensor, contrasts: list[str]) -> torch.Tensor:
        """A kept pretext classifier's logits per case ``(B, K)`` from each scan's ``Features.pretext`` ``(B, C, P)``
        (``feature_dims().pretext_logits`` = K > 0 where the backbone has one)."""
        raise ConfigError(f"{type(self).__name__} has no pretext classifier to read")

    @classmethod
    def reads_pretext_logits(cls, kwargs: dict[str, Any]) -> bool:
        """Whether a backbone built from ``kwargs`` has a pretext classifier that :meth:`pretext_logits` can read
        (``probe_features=pretext-logit``)."""
        return False

    @classmethod
    def downstream_kwargs(
        cls, kwargs: dict[str, Any], n_contrasts: int, pretext_features: bool = False
    ) -> dict[str, Any]:
        """Constructor arguments of the downstream trunk (pretext heads off, input channels set; with
        ``pretext_features`` the head that :meth:`keep_pretext_features` keeps stays on)."""
        return dict(kwargs)

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected (B, {self.in_channels}, X, Y, Z), got {tuple(x.shape)}")
        if self.fixed_size is not None and tuple(x.shape[2:]) != (self.fixed_size,) * 3:
            n = self.fixed_size
            raise ValueError(f"expected (B, {self.in_channels}, {n}, {n}, {n}), got {tuple(x.shape)}")
        if any(s % self.downsampling for s in x.shape[2:]):
            raise ValueError(f"spatial size {tuple(x.shape[2:])} must be divisible by {self.downsampling}")

    def transfer_map(self) -> dict[str, Any]:
        """Written to ``transfer.json``: what a downstream task needs to adapt these weights."""
        return {
            "in_channels": int(self.in_channels),
            "input_mode": self.input_mode,
            "stem_keys": list(self.stem_keys),
            "encoder_prefixes": list(self.encoder_prefixes),
            "pretext_prefixes": list(self.pretext_prefixes),
        }


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ConfigError(f"task should be one of {TASKS}, got {task!r}")
