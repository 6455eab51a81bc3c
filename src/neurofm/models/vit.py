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
from neurofm.models.base import Backbone, FeatureDims, Features, check_task
from neurofm.models.registry import register_model

VIT_SIZES = {
    "paper": {"hidden_size": 2048, "num_layers": 16, "num_heads": 32, "mlp_dim": 3072},
    "base": {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "mlp_dim": 3072},
    "small": {"hidden_size": 384, "num_layers": 8, "num_heads": 6, "mlp_dim": 1536},
    "tiny": {"hidden_size": 96, "num_layers": 2, "num_heads": 4, "mlp_dim": 192},
}


@register_model("vit_autoenc")
class ViTAutoEncoder(Backbone):
    """MONAI ViTAutoEnc with neurofm's transfer contract: all contrasts at once, as channels.

    Downstream, segmentation keeps the first transposed convolution of the decoder and ends
    in a new one with one output per class; classification and regression read the mean token.
    """

    input_mode = "stack"
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
        self.fixed_size = img_size
        self.downsampling = patch_size
        self.seg_out: nn.Module | None = None  # installed by reset_head("seg", n)
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

    def feature_dims(self) -> FeatureDims:
        return FeatureDims(maps=(self.net.norm.normalized_shape[0],))

    def forward_features(self, x: torch.Tensor) -> Features:
        """Tokens of the last layer as a grid ``maps[0]`` ``(B, hidden, X/p, Y/p, Z/p)``, their mean as ``pooled``."""
        self.check_input(x)
        h = self.net.patch_embedding(x)
        for blk in self.net.blocks:
            h = blk(h)
        h = self.net.norm(h)  # (B, N, hidden)
        grid = [s // self.downsampling for s in x.shape[2:]]
        tokens = h.transpose(1, 2).reshape(h.shape[0], h.shape[2], *grid)
        return Features(maps=[tokens], pooled=h.mean(dim=1), latents={"tokens": h})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0]

    # ------------------------------------------------------------------ downstream
    @classmethod
    def downstream_kwargs(
        cls, kwargs: dict[str, Any], n_contrasts: int, pretext_features: bool = False
    ) -> dict[str, Any]:
        return {**kwargs, "in_channels": n_contrasts, "out_channels": n_contrasts}

    def reset_head(self, task: str, classes: int) -> None:
        check_task(task)
        last = self.net.conv3d_transpose_1
        self.net.conv3d_transpose_1 = None
        if task == "seg":
            self.seg_out = nn.ConvTranspose3d(
                last.in_channels, classes, kernel_size=last.kernel_size, stride=last.kernel_size
            )
        else:
            self.net.conv3d_transpose = None

    def forward_head(self, features: Features) -> torch.Tensor:
        return self.seg_out(self.net.conv3d_transpose(features.maps[0]))
