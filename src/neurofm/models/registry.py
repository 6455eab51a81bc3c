"""Models by name, timm-style: ``create_model("dual_latent_unet", features=(8, 16, 32))``.

Every registered backbone keeps the transfer contract of :mod:`neurofm.models.base`;
``downstream`` wraps one with a task head. A model built from a checkpoint folder is the
registered class with the saved keyword arguments and weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from neurofm.errors import ConfigError
from neurofm.io.checkpoint import WEIGHTS, count_parameters, load_state, load_weights, read_checkpoint

_REGISTRY: dict[str, type[nn.Module]] = {}

__all__ = ["count_parameters", "create_model", "list_models", "model_class", "model_from_checkpoint", "register_model"]


def register_model(name: str):
    """Class decorator: ``@register_model("resenc_unet") class ResEncUNet(Backbone): ...``."""

    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = cls
        return cls

    return deco


def load_builtin() -> None:
    """Importing the modules registers their models (a new backbone adds its module here)."""
    from neurofm.models import downstream, dual_latent, primus, resenc, vit  # noqa: F401


def list_models() -> list[str]:
    load_builtin()
    return sorted(_REGISTRY)


def model_class(name: str) -> type[nn.Module]:
    load_builtin()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model. Unknown names and bad arguments raise :class:`ConfigError`."""
    cls = model_class(name)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"bad arguments for model {name!r}: {e}") from None


def model_from_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint folder (or a run's latest) with its weights, and its descriptions."""
    info = read_checkpoint(path)
    model = create_model(info["model"]["name"], **info["model"]["kwargs"])
    load_state(model, load_weights(Path(info["folder"]) / WEIGHTS))
    return model, info
