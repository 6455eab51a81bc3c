"""Models by name, timm-style: ``create_model("dual_latent_unet", features=(8, 16, 32))``.

Every registered backbone follows one transfer API:

* ``config`` — the keyword arguments that rebuild it (saved in checkpoints);
* ``in_channels``;
* ``forward_features(x)`` — encoder outputs as a dict (``skips`` at least);
* ``stem_keys`` — state-dict keys whose shape depends on the number of input channels;
* ``encoder_prefixes`` — state-dict prefixes of the transferable encoder;
* ``pretext_prefixes`` — heads used only by a pretraining objective (dropped downstream).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from neurofm.errors import ConfigError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = fn
        return fn

    return deco


def _load_builtin() -> None:
    # Importing the modules registers their models.
    from neurofm.models import downstream, dual_latent, resenc, vit  # noqa: F401


def list_models() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model. Unknown names and bad arguments raise :class:`ConfigError`."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    try:
        return _REGISTRY[name](**kwargs)
    except TypeError as e:
        raise ConfigError(f"bad arguments for model {name!r}: {e}") from None


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def transfer_map(model: nn.Module) -> dict[str, Any]:
    """The keys a downstream task needs to adapt: stem, encoder, pretext heads."""
    return {
        "in_channels": int(model.in_channels),
        "stem_keys": list(model.stem_keys),
        "encoder_prefixes": list(model.encoder_prefixes),
        "pretext_prefixes": list(getattr(model, "pretext_prefixes", ())),
    }
