"""LaMIM's backbone: MONAI's ``ViTAutoEnc`` (ViT encoder + transposed-conv decoder).

Paper size: 4 input and 4 output channels (T1w, T1c, T2w, FLAIR), 96^3 input, patch 16,
conv patch embedding, hidden 2048, 16 layers, 32 heads, MLP 3072 (~0.5 B parameters).
The MONAI module sits under ``net.``, so a MONAI state dict loads with the prefix added.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.nets import ViTAutoEnc
from torch import nn

from neurofm.errors import ConfigError
from neurofm.models.registry import register_model

VIT_SIZES = {
    "paper": {"hidden_size": 2048, "num_layers": 16, "num_heads": 32, "mlp_dim": 3072},
    "base": {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "mlp_dim": 3072},
    "small": {"hidden_size": 384, "num_layers": 8, "num_heads": 6, "mlp_dim": 1536},
    "tiny": {"hidden_size": 96, "num_layers": 2, "num_heads": 4, "mlp_dim": 192},
}


class ViTAutoEncoder(nn.Module):
    """MONAI ViTAutoEnc with neurofm's transfer API."""

    stem_keys = ("net.patch_embedding.patch_embeddings.weight",)
    encoder_prefixes = ("net.patch_embedding.", "net.blocks.", "net.norm.")
    pretext_prefixes = ("net.conv3d_transpose",)

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 4,
        img_size: int = 96,
        patch_size: int = 16,
        size: str = "paper",
        **overrides: Any,
    ):
        super().__init__()
        if size not in VIT_SIZES:
            raise ConfigError(f"unknown ViT size {size!r}; choose from {list(VIT_SIZES)}")
        if int(patch_size**0.5) ** 2 != patch_size:
            raise ConfigError(f"patch_size must be a square number (4, 9, 16, ...) for ViTAutoEnc, got {patch_size}")
        if img_size % patch_size:
            raise ConfigError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")
        dims = {**VIT_SIZES[size], **overrides}
        if dims["hidden_size"] % dims["num_heads"]:
            raise ConfigError(f"hidden_size {dims['hidden_size']} must be divisible by num_heads {dims['num_heads']}")
        self.config = {
            "in_channels": in_channels,
            "out_channels": out_channels,
            "img_size": img_size,
            "patch_size": patch_size,
            "size": size,
            **overrides,
        }
        self.in_channels = in_channels
        self.img_size = img_size
        self.downsampling = patch_size
        self.net = ViTAutoEnc(
            in_channels=in_channels,
            out_channels=out_channels,
            img_size=img_size,
            patch_size=patch_size,
            proj_type="conv",
            **dims,
        )
        # MONAI's transformer blocks always build a cross-attention norm, used only with cross-attention;
        # freeze it (the keys stay, for MONAI state-dict compatibility) so DDP finds no unused parameters.
        for blk in self.net.blocks:
            if not getattr(blk, "with_cross_attention", False) and hasattr(blk, "norm_cross_attn"):
                blk.norm_cross_attn.requires_grad_(False)

    @property
    def hidden_size(self) -> int:
        return self.net.norm.normalized_shape[0]

    def forward_features(self, x: torch.Tensor) -> dict[str, Any]:
        """Tokens of the last layer ``(B, N, hidden)`` and their mean ``(B, hidden)``."""
        if x.ndim != 5 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != (self.img_size,) * 3:
            raise ValueError(
                f"expected (B, {self.in_channels}, {self.img_size}, {self.img_size}, {self.img_size}), "
                f"got {tuple(x.shape)}"
            )
        h = self.net.patch_embedding(x)
        for blk in self.net.blocks:
            h = blk(h)
        h = self.net.norm(h)
        return {"tokens": h, "pooled": h.mean(dim=1), "skips": [h]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0]


@register_model("vit_autoenc")
def vit_autoenc(**kwargs: Any) -> ViTAutoEncoder:
    return ViTAutoEncoder(**kwargs)
