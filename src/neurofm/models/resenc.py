"""nnU-Net ResEnc U-Nets from dynamic-network-architectures, with the ssl3d pretext heads.

The encoder and decoder are DNA's own ``ResidualEncoder`` / ``UNetDecoder`` under the
attribute names ``encoder`` / ``decoder``, so their state-dict keys are exactly those of
nnU-Net and nnssl checkpoints (``encoder.stem...``, ``encoder.stages...``, ``decoder...``)
and weights move between the three without renaming.

ResEnc-L: 6 stages, 32/64/128/256/320/320 filters, 1/3/4/6/6/6 residual blocks, strides
1,2,2,2,2,2, InstanceNorm, LeakyReLU (~102 M parameters with its decoder).

ssl3d splits the bottleneck (the last encoder stage) by channel: the first ``anatomy``
fraction feeds an anatomy projector (avg-pool to 2^3 -> MLP with LayerNorm -> one output
per region), the next ``health`` fraction a healthy / not-healthy classifier, the rest
is free.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from torch import nn

from neurofm.errors import ConfigError
from neurofm.models.base import Backbone, FeatureDims, Features, check_task, global_pool
from neurofm.models.layers import conv_kwargs, freeze_unused_seg_layers, he_init
from neurofm.models.registry import register_model

RESENC_L = {"features": (32, 64, 128, 256, 320, 320), "blocks": (1, 3, 4, 6, 6, 6)}


class AnatomyProjector(nn.Module):
    """avg-pool to 2^3 -> Linear -> LayerNorm -> GELU -> Linear: a vector per sample."""

    def __init__(self, in_channels: int, out_features: int, hidden: int = 512):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * 8, hidden),
            nn.LayerNorm(hidden),
            nn.GELU(),
            nn.Linear(hidden, out_features),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(F.adaptive_avg_pool3d(x, 2))


@register_model("resenc_unet")
class ResEncUNet(Backbone):
    """ResEnc U-Net (encoder + decoder from DNA) with optional ssl3d pretext heads.

    Downstream, segmentation keeps the (pretrained) decoder with a new output layer;
    classification and regression read the pooled features, the anatomy channels as the
    anatomy part and the other bottleneck channels as the contrast part.

    Args:
        in_channels: input channels.
        out_channels: decoder outputs (1 for reconstruction, classes for segmentation).
        features: filters per stage.
        blocks: residual blocks per stage.
        anatomy_outputs: size of the regional-volume vector (0: no anatomy projector).
        anatomy_fraction / health_fraction: bottleneck channel split for the heads.
        dense_classes: > 0 adds a dense anatomy head predicting a label map from the
            anatomy channels (the ssl3d dense variant).
    """

    stem_keys = ("encoder.stem.convs.0.conv.weight", "encoder.stem.convs.0.all_modules.0.weight")
    encoder_prefixes = ("encoder.",)
    pretext_prefixes = ("decoder.", "anatomy_head.", "health_head.", "dense_head.")

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        features: tuple[int, ...] = RESENC_L["features"],
        blocks: tuple[int, ...] = RESENC_L["blocks"],
        anatomy_outputs: int = 0,
        anatomy_fraction: float = 0.5,
        health_fraction: float = 0.3,
        health_classes: int = 0,
        dense_classes: int = 0,
    ):
        super().__init__()
        features, blocks = tuple(int(f) for f in features), tuple(int(b) for b in blocks)
        if len(features) != len(blocks) or len(features) < 2:
            raise ConfigError(f"features and blocks need one entry per stage (>= 2), got {features} / {blocks}")
        if not (anatomy_fraction >= 0 and health_fraction >= 0 and anatomy_fraction + health_fraction <= 1):
            raise ConfigError(
                f"anatomy_fraction + health_fraction must be in [0, 1], got {anatomy_fraction} + {health_fraction}"
            )
        self.config: dict[str, Any] = {
            "in_channels": in_channels,
            "out_channels": out_channels,
            "features": list(features),
            "blocks": list(blocks),
            "anatomy_outputs": anatomy_outputs,
            "anatomy_fraction": anatomy_fraction,
            "health_fraction": health_fraction,
            "health_classes": health_classes,
            "dense_classes": dense_classes,
        }
        self.in_channels = in_channels
        self.downsampling = 2 ** (len(features) - 1)
        n = len(features)
        net = ResidualEncoderUNet(
            in_channels,
            n,
            features,
            kernel_sizes=3,
            strides=[1] + [2] * (n - 1),
            n_blocks_per_stage=blocks,
            num_classes=out_channels,
            n_conv_per_stage_decoder=[1] * (n - 1),
            **conv_kwargs(),
        )
        ResidualEncoderUNet.initialize(net)
        self.encoder, self.decoder = net.encoder, net.decoder
        freeze_unused_seg_layers(self.decoder)
        bott = features[-1]
        self.n_anatomy = int(round(bott * anatomy_fraction))
        self.n_health = int(round(bott * health_fraction))
        self.anatomy_head = AnatomyProjector(self.n_anatomy, anatomy_outputs) if anatomy_outputs > 0 else None
        self.health_head = nn.Linear(self.n_health, health_classes) if self.n_health > 0 and health_classes else None
        self.dense_head = nn.Conv3d(self.n_anatomy, dense_classes, 1) if dense_classes > 0 else None
        for head in (self.anatomy_head, self.health_head, self.dense_head):
            if head is not None:
                he_init(head)

    def feature_dims(self) -> FeatureDims:
        bott = self.config["features"][-1]
        return FeatureDims(maps=tuple(self.config["features"]), anatomy=self.n_anatomy, contrast=bott - self.n_anatomy)

    def forward_features(self, x: torch.Tensor) -> Features:
        """Encode ``(B, C, X, Y, Z)``; ``latents`` holds the bottleneck's ``anatomy``/``health``/``free`` channels."""
        self.check_input(x)
        skips = self.encoder(x)
        b = skips[-1]
        a, h = self.n_anatomy, self.n_health
        parts = {"anatomy": b[:, :a], "health": b[:, a : a + h], "free": b[:, a + h :]}
        return Features(
            maps=skips,
            pooled=global_pool(skips),
            anatomy=parts["anatomy"].mean(dim=(2, 3, 4)),
            contrast=b[:, a:].mean(dim=(2, 3, 4)),
            latents=parts,
        )

    def forward_pretext(self, x: torch.Tensor, reconstruct: bool = True) -> dict[str, torch.Tensor | None]:
        """What the ssl3d objective scores: ``reconstruction`` ``(B, out, X, Y, Z)`` (None when not
        ``reconstruct``: the heads alone, without the decoder's cost), and where the heads exist ``anatomy``
        (projection, ``(B, regions)``), ``health`` (logits ``(B, classes)``) and ``dense`` (label-map logits on
        the bottleneck grid)."""
        f = self.forward_features(x)
        anat = f.latents["anatomy"]
        return {
            "reconstruction": self.decoder(f.maps) if reconstruct else None,
            "anatomy": self.anatomy_head(anat) if self.anatomy_head is not None else None,
            "health": self.health_head(f.latents["health"].mean(dim=(2, 3, 4)))
            if self.health_head is not None
            else None,
            "dense": self.dense_head(anat) if self.dense_head is not None else None,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    # ------------------------------------------------------------------ downstream
    @classmethod
    def downstream_kwargs(
        cls, kwargs: dict[str, Any], n_contrasts: int, pretext_features: bool = False
    ) -> dict[str, Any]:
        # one contrast at a time through the shared encoder (a multi-channel source's stem is adapted)
        return {**kwargs, "in_channels": 1, "anatomy_outputs": 0, "health_classes": 0, "dense_classes": 0}

    def reset_head(self, task: str, classes: int) -> None:
        check_task(task)
        self.anatomy_head = self.health_head = self.dense_head = None
        if task != "seg":
            self.decoder = None
            return
        # the pretrained decoder stays; a new output layer per stage (only the last is trained)
        self.decoder.seg_layers = nn.ModuleList([nn.Conv3d(l.in_channels, classes, 1) for l in self.decoder.seg_layers])
        freeze_unused_seg_layers(self.decoder)

    def forward_head(self, features: Features) -> torch.Tensor:
        return self.decoder(features.maps)

    def transfer_prefixes(self, task: str) -> tuple[str, ...]:
        if task == "seg":
            return (*self.encoder_prefixes, "decoder.stages.", "decoder.transpconvs.")
        return self.encoder_prefixes
