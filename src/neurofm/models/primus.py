"""Primus, nnssl's transformer (from dynamic-network-architectures), with the transfer contract.

Primus embeds non-overlapping 8^3 patches with one convolution (``down_projection``), runs an
EVA transformer over the tokens (``eva``: RoPE plus a learned absolute position embedding) and
decodes with transposed convolutions (``up_projection``). The modules are DNA's own and keep
their attribute names, so the state-dict keys are those of nnssl's Primus checkpoints
(``down_projection.proj.weight``, ``eva.blocks.N...``, ``up_projection.decode...``,
``mask_token``) and weights move between the two without renaming.

Sizes: nnssl's S / B / M / L (M: 864 wide, 16 blocks, 12 heads; OpenMind's Primus-M), and a
``tiny`` one for CPUs. Like ResEnc it is pretrained on one channel: downstream, every present
contrast goes through the shared encoder (``input_mode = "single"``).

Downstream, segmentation uses a new ``up_projection`` with one output per class (as nnU-Net's
Primus fine-tuning, which takes over the patch embedding and the transformer only);
classification and regression read the mean token and a learned pooling of the token grid.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

with warnings.catch_warnings():  # timm, imported by DNA's Primus, trips torch.jit's deprecation notice
    warnings.simplefilter("ignore", FutureWarning)
    from dynamic_network_architectures.architectures.primus import Primus
    from dynamic_network_architectures.building_blocks.patch_encode_decode import PatchDecode

from neurofm.errors import ConfigError
from neurofm.models.base import Backbone, FeatureDims, Features, check_task
from neurofm.models.layers import he_init
from neurofm.models.registry import register_model

#: nnssl's sizes (dynamic_network_architectures' _PRIMUS_CONFIGS) and a CPU one
PRIMUS_SIZES: dict[str, dict[str, int]] = {
    "S": {"embed_dim": 396, "eva_depth": 12, "eva_numheads": 6},
    "B": {"embed_dim": 792, "eva_depth": 12, "eva_numheads": 12},
    "M": {"embed_dim": 864, "eva_depth": 16, "eva_numheads": 12},
    "L": {"embed_dim": 1056, "eva_depth": 24, "eva_numheads": 16},
    "tiny": {"embed_dim": 96, "eva_depth": 2, "eva_numheads": 2},
}


@register_model("primus")
class PrimusBackbone(Backbone):
    """DNA's Primus under nnssl's key names (see module docstring).

    Args:
        in_channels / out_channels: input channels and reconstruction outputs.
        img_size: the cube the model takes (its position embedding is sized for it).
        patch_size: edge of the patch embedding (nnssl: 8).
        size: ``S``, ``B``, ``M``, ``L`` or ``tiny``; ``embed_dim``, ``eva_depth``, ``eva_numheads`` override it.
        drop_path_rate: stochastic depth in the transformer blocks.
        init_values / scale_attn_inner: layer scale (its initial value; None: off) and a norm inside
            attention, both on in DNA's PrimusS/B/M/L (nnssl's checkpoints).
    """

    input_mode = "single"
    stem_keys = ("down_projection.proj.weight",)
    encoder_prefixes = ("down_projection.", "eva.")
    pretext_prefixes = ("up_projection.", "mask_token")

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        img_size: int = 160,
        patch_size: int = 8,
        size: str = "M",
        drop_path_rate: float = 0.0,
        init_values: float | None = 0.1,
        scale_attn_inner: bool = True,
        **overrides: Any,
    ):
        super().__init__()
        if size not in PRIMUS_SIZES:
            raise ConfigError(f"unknown Primus size {size!r}; choose from {list(PRIMUS_SIZES)}")
        unknown = set(overrides) - {"embed_dim", "eva_depth", "eva_numheads"}
        if unknown:
            raise ConfigError(f"unknown Primus arguments {sorted(unknown)}")
        dims = {**PRIMUS_SIZES[size], **overrides}
        head_dim, rem = divmod(dims["embed_dim"], dims["eva_numheads"])
        if rem or head_dim % 6:
            raise ConfigError(
                f"embed_dim {dims['embed_dim']} / eva_numheads {dims['eva_numheads']} must be a whole multiple "
                "of 6 (3D rotary embedding)"
            )
        if img_size % patch_size:
            raise ConfigError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")
        self.config: dict[str, Any] = {
            "in_channels": in_channels,
            "out_channels": out_channels,
            "img_size": img_size,
            "patch_size": patch_size,
            "size": size,
            "drop_path_rate": drop_path_rate,
            "init_values": init_values,
            "scale_attn_inner": scale_attn_inner,
            **overrides,
        }
        self.in_channels = in_channels
        self.fixed_size = img_size
        self.downsampling = patch_size
        self.embed_dim = dims["embed_dim"]
        net = Primus(
            in_channels,
            dims["embed_dim"],
            (patch_size,) * 3,
            out_channels,
            eva_depth=dims["eva_depth"],
            eva_numheads=dims["eva_numheads"],
            input_shape=(img_size,) * 3,
            drop_path_rate=drop_path_rate,
            init_values=init_values,
            scale_attn_inner=scale_attn_inner,
        )
        # DNA's modules under DNA's names: the keys of nnssl's checkpoints
        self.down_projection, self.eva, self.up_projection = net.down_projection, net.eva, net.up_projection
        self.register_buffer("mask_token", net.mask_token)

    def feature_dims(self) -> FeatureDims:
        return FeatureDims(maps=(self.embed_dim,))

    def forward_features(self, x: torch.Tensor) -> Features:
        """The token grid ``maps[0]`` ``(B, embed_dim, X/p, Y/p, Z/p)`` and the mean token as ``pooled``."""
        self.check_input(x)
        h = self.down_projection(x)
        b, c, *grid = h.shape
        tokens, _ = self.eva(h.flatten(2).transpose(1, 2))  # (B, N, C) in DNA's (w h d) order
        maps = tokens.transpose(1, 2).reshape(b, c, *grid)
        return Features(maps=[maps], pooled=tokens.mean(dim=1), latents={"tokens": tokens})

    def forward_pretext(self, x: torch.Tensor, reconstruct: bool = True) -> dict[str, torch.Tensor | None]:
        """The reconstruction (None when not ``reconstruct``); Primus has no pretext heads."""
        if not reconstruct:
            return {"reconstruction": None}
        return {"reconstruction": self.up_projection(self.forward_features(x).maps[0])}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_pretext(x)["reconstruction"]

    # ------------------------------------------------------------------ downstream
    @classmethod
    def downstream_kwargs(
        cls, kwargs: dict[str, Any], n_contrasts: int, pretext_features: bool = False
    ) -> dict[str, Any]:
        return {**kwargs, "in_channels": 1, "out_channels": 1}

    def reset_head(self, task: str, classes: int) -> None:
        check_task(task)
        if task == "seg":
            self.up_projection = PatchDecode((self.downsampling,) * 3, self.embed_dim, classes)
            he_init(self.up_projection)
        else:
            self.up_projection = None

    def forward_head(self, features: Features) -> torch.Tensor:
        return self.up_projection(features.maps[0])
