"""Backbones and heads from a registry (see :mod:`neurofm.models.registry`)."""

from neurofm.models.registry import count_parameters, create_model, list_models

__all__ = ["count_parameters", "create_model", "list_models"]
