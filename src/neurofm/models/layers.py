"""Layer choices shared by the convolutional backbones (injected as classes + kwargs, DNA-style)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def conv_kwargs(negative_slope: float = 0.01) -> dict[str, Any]:
    """Conv3d -> InstanceNorm3d(affine) -> LeakyReLU, as nnU-Net and the challenge models use."""
    return {
        "conv_op": nn.Conv3d,
        "conv_bias": True,
        "norm_op": nn.InstanceNorm3d,
        "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": nn.LeakyReLU,
        "nonlin_kwargs": {"negative_slope": negative_slope, "inplace": True},
    }


def he_init(module: nn.Module) -> None:
    """nnU-Net's initialisation (Kaiming normal for LeakyReLU(0.01), zero biases)."""
    from dynamic_network_architectures.initialization.weight_init import InitWeights_He

    module.apply(InitWeights_He(1e-2))


def freeze_unused_seg_layers(decoder: nn.Module) -> None:
    """DNA decoders build an output layer per stage for deep supervision; without it only the
    last is used. The others keep their keys (nnU-Net/nnssl compatibility) but are frozen, so
    every trainable parameter gets a gradient and DDP needs no unused-parameter search."""
    for layer in list(decoder.seg_layers)[:-1]:
        layer.requires_grad_(False)


def pointwise_positions(conv: nn.Conv3d, act: nn.Module | Any, m: torch.Tensor) -> torch.Tensor:
    """``act(conv(m))`` for a 1x1x1 convolution, as ``(B, positions, out_channels)``: the convolution as a linear map
    over the channels of a channels-last view (the same numbers to float rounding, and no oneDNN convolution, which
    is slow for a few channels over many voxels). The learned pooling of the downstream heads and of the health
    pretext's pooled head."""
    return act(nn.functional.linear(m.movedim(1, -1), conv.weight.flatten(1), conv.bias)).flatten(1, -2)
