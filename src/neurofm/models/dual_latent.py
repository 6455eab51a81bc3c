"""The fomo25 dual-latent U-Net: one encoder for all contrasts, anatomy and contrast latents.

Encoder: a plain 3D U-Net encoder (dynamic-network-architectures ``PlainConvEncoder``),
5 levels of 2 x (Conv3d 3^3 -> InstanceNorm(affine) -> LeakyReLU 0.01), max-pool
downsampling, 32/64/128/256/512 filters. Every stage's output is average-pooled to the
bottleneck grid and concatenated; two 1x1x1 convolutions give the mean and log-variance
of a *subject* (anatomy) latent and a *contrast* latent (256 channels each).

Decoder (reconstruction only, no skips): transposed-convolution upsampling of
``[z_subject, z_contrast]`` back to the input size. ~19 M parameters at full size.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from torch import nn

from neurofm.errors import ConfigError
from neurofm.models.base import Backbone, FeatureDims, Features, check_task, global_pool
from neurofm.models.layers import conv_kwargs, freeze_unused_seg_layers, he_init
from neurofm.models.registry import register_model

LOGVAR_RANGE = (-10.0, 10.0)


@register_model("dual_latent_unet")
class DualLatentUNet(Backbone):
    """Dual-latent U-Net (see module docstring).

    Downstream, segmentation gets a U-Net decoder with skips on the encoder (the latent
    heads and the reconstruction decoder are dropped); classification and regression read
    the pooled features and latents.

    Args:
        in_channels: input channels (1: each contrast is encoded separately).
        features: filters per encoder level; the bottleneck is ``2**(len-1)`` times smaller.
        latent: channels of each latent (subject, contrast).
        n_conv: convolutions per encoder level.
        out_channels: reconstruction channels.
    """

    stem_keys = ("encoder.stages.0.0.convs.0.conv.weight", "encoder.stages.0.0.convs.0.all_modules.0.weight")
    encoder_prefixes = ("encoder.", "subject_head.", "contrast_head.")
    pretext_prefixes = ("decoder.",)

    def __init__(
        self,
        in_channels: int = 1,
        features: tuple[int, ...] = (32, 64, 128, 256, 512),
        latent: int = 256,
        n_conv: int = 2,
        out_channels: int = 1,
    ):
        super().__init__()
        features = tuple(int(f) for f in features)
        if len(features) < 2 or min(features) < 1:
            raise ConfigError(f"features should list >= 2 positive filter counts, got {features}")
        if latent < 1:
            raise ConfigError(f"latent should be >= 1, got {latent}")
        self.config: dict[str, Any] = {
            "in_channels": in_channels,
            "features": list(features),
            "latent": latent,
            "n_conv": n_conv,
            "out_channels": out_channels,
        }
        self.in_channels = in_channels
        self.latent = latent
        self.downsampling = 2 ** (len(features) - 1)
        kw = conv_kwargs()
        self.encoder = PlainConvEncoder(
            in_channels,
            len(features),
            features,
            kernel_sizes=3,
            strides=[1] + [2] * (len(features) - 1),
            n_conv_per_stage=n_conv,
            return_skips=True,
            pool="max",
            **kw,
        )
        pooled = sum(features)
        self.subject_head = nn.Conv3d(pooled, 2 * latent, 1)
        self.contrast_head = nn.Conv3d(pooled, 2 * latent, 1)
        ups, blocks = [], []
        ch = 2 * latent
        for f in reversed(features[:-1]):
            ups.append(nn.ConvTranspose3d(ch, f, 2, 2))
            blocks.append(
                StackedConvBlocks(1, input_channels=f, output_channels=f, kernel_size=3, initial_stride=1, **kw)
            )
            ch = f
        self.decoder = nn.ModuleDict(
            {
                "ups": nn.ModuleList(ups),
                "blocks": nn.ModuleList(blocks),
                "out": nn.Conv3d(ch, out_channels, 1),
            }
        )
        self.seg_decoder: nn.Module | None = None  # installed by reset_head("seg", n)
        he_init(self)
        # Start the posteriors narrow (sigma ~ 0.08): with unit variance the sampled latents are mostly
        # noise and the decoder learns nothing for hundreds of steps; the KL term widens them as needed.
        for head in (self.subject_head, self.contrast_head):
            nn.init.constant_(head.bias[latent:], -5.0)

    def feature_dims(self) -> FeatureDims:
        has_latents = self.subject_head is not None
        return FeatureDims(
            pooled=sum(self.config["features"]),
            anatomy=self.latent if has_latents else 0,
            contrast=self.latent if has_latents else 0,
        )

    def forward_features(self, x: torch.Tensor) -> Features:
        """Encode ``x`` (B, C, X, Y, Z).

        Returns:
            :class:`Features`: ``maps`` (encoder stage outputs), ``pooled``, ``anatomy`` / ``contrast``
            (the latent means averaged over space) and ``latents`` ``mu_s``/``logvar_s``/``mu_c``/``logvar_c``,
            each ``(B, latent, X/16, Y/16, Z/16)`` at full size.
        """
        self.check_input(x)
        skips = self.encoder(x)
        feats = Features(maps=skips, pooled=global_pool(skips))
        if self.subject_head is None:  # a segmentation trunk: no latents
            return feats
        grid = skips[-1].shape[2:]
        pooled = torch.cat([F.adaptive_avg_pool3d(s, grid) for s in skips], dim=1)
        mu_s, logvar_s = self.subject_head(pooled).chunk(2, dim=1)
        mu_c, logvar_c = self.contrast_head(pooled).chunk(2, dim=1)
        feats.latents = {
            "mu_s": mu_s,
            "logvar_s": logvar_s.clamp(*LOGVAR_RANGE),
            "mu_c": mu_c,
            "logvar_c": logvar_c.clamp(*LOGVAR_RANGE),
        }
        feats.anatomy, feats.contrast = mu_s.mean(dim=(2, 3, 4)), mu_c.mean(dim=(2, 3, 4))
        return feats

    def decode(self, z_s: torch.Tensor, z_c: torch.Tensor) -> torch.Tensor:
        """Reconstruct from a subject and a contrast latent: ``(B, out_channels, X, Y, Z)``."""
        h = torch.cat([z_s, z_c], dim=1)
        for up, block in zip(self.decoder["ups"], self.decoder["blocks"], strict=True):
            h = block(up(h))
        return self.decoder["out"](h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction from the latent means."""
        f = self.forward_features(x)
        return self.decode(f.latents["mu_s"], f.latents["mu_c"])

    # ------------------------------------------------------------------ downstream
    def reset_head(self, task: str, classes: int) -> None:
        check_task(task)
        self.decoder = None  # the reconstruction decoder (no skips)
        if task == "seg":
            self.subject_head = self.contrast_head = None
            self.seg_decoder = UNetDecoder(self.encoder, classes, 1, deep_supervision=False)
            freeze_unused_seg_layers(self.seg_decoder)

    def forward_head(self, features: Features) -> torch.Tensor:
        return self.seg_decoder(features.maps)

    def transfer_prefixes(self, task: str) -> tuple[str, ...]:
        return ("encoder.",) if task == "seg" else self.encoder_prefixes
