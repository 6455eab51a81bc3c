"""The fomo25 dual-latent U-Net: one encoder for all contrasts, anatomy and contrast latents.

Encoder: a plain 3D U-Net encoder (dynamic-network-architectures ``PlainConvEncoder``),
5 levels of 2 x (Conv3d 3^3 -> InstanceNorm(affine) -> LeakyReLU 0.01), max-pool
downsampling, 32/64/128/256/512 filters. Every stage's output is average-pooled to the
bottleneck grid and concatenated; two 1x1x1 convolutions give the mean and log-variance
of a *subject* (anatomy) latent and a *contrast* latent (256 channels each).

The contrast latent is either a map on the bottleneck grid like the anatomy latent
(``contrast_code="spatial"``, the paper's form) or one vector per scan from the globally
pooled features, broadcast over the grid in the decoder (``"global"``). A spatial contrast
map can carry the whole scan, so a decoder fed ``[z_subject of b, z_contrast of a]``
rebuilds ``a`` by copying; a single vector cannot hold the anatomy of a crop.

How the decoder takes the contrast code (``contrast_injection``): ``concat`` (the paper's) stacks it
with the anatomy latent as input channels. A global code broadcast that way adds the same offset
to each channel at every position (up to the 2^3 pattern of the first transposed convolution), which
the InstanceNorm after it largely subtracts again: what is left acts through that pattern and the
non-linearities, not as a per-channel scale and shift of the anatomy's features. ``film`` feeds the decoder the anatomy
latent alone and lets a global code set every decoder stage's per-channel scale and shift after its
InstanceNorm (FiLM, Perez et al. 2018; AdaIN in style transfer), so the contrast code decides the
intensities the anatomy is rendered with.

With ``contrast_classes > 0`` two small pretext heads read the latents: a contrast classifier on
the contrast latent's spatial mean and an adversary at every position of the anatomy latent
(trained through a gradient reversal by ``objective.w_adversary``), so that no part of the anatomy
latent can tell the contrast. Both are dropped downstream.

The anatomy latent is a Gaussian posterior (``anatomy_code="gaussian"``, the paper's form) or, with
``anatomy_code="categorical"``, a distribution over ``latent`` classes at every bottleneck position
(a softmax; during pretraining a Gumbel-softmax sample, CALAMITI's anatomy code, Zuo et al. 2021):
each position says which of a few learnt kinds of tissue pattern it holds, a code too coarse to
carry a contrast's intensities as well, so the decoder has to take them from the contrast latent.
``anatomy_code="onehot"`` is the same code made hard: each position *is* its most likely class (a one-hot
vector; in pretraining a hard Gumbel-softmax sample), with the softmax's gradient passed straight through
(Bengio et al. 2013). The class probabilities' confidence, which a soft code also hands the decoder and a
probe, is then not part of the code.

With ``anatomy_outputs > 0`` an anatomy projector (the SSL3D winner's anatomy anchor, put on the
fomo25 subject latent) reads the anatomy latent map and predicts the subject's regional-volume
vector (``objective.w_anatomy``); dropped downstream.

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
from neurofm.io.manifest import CONTRASTS
from neurofm.models.base import Backbone, FeatureDims, Features, check_task, global_pool
from neurofm.models.layers import conv_kwargs, freeze_unused_seg_layers, he_init, pointwise_positions
from neurofm.models.registry import register_model

LOGVAR_RANGE = (-10.0, 10.0)


class GlobalContrastHead(nn.Module):
    """``(B, C, *grid) -> (B, out, 1, 1, 1)``: 1x1x1 conv, LeakyReLU, average over space, 1x1x1 conv.

    The non-linearity before the average matters: every encoder stage ends in InstanceNorm, which
    fixes each channel's spatial mean and variance, so the plain average of the features (or of any
    linear map of them) is nearly the same for every scan. A contrast shows in the spatial pattern of
    the features (which tissue is bright), and a non-linear map of them followed by an average reads it.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, hidden, 1)
        self.act = nn.LeakyReLU(0.01)
        self.out = nn.Conv3d(hidden, out_channels, 1)

    @property
    def bias(self) -> torch.Tensor:
        return self.out.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.proj(x)).mean(dim=(2, 3, 4), keepdim=True))


class FiLMBlock(nn.Module):
    """Conv3d 3^3 -> InstanceNorm (no affine of its own) -> ``h * (1 + gamma) + beta`` -> LeakyReLU,
    with ``gamma``, ``beta`` per channel from a code vector: the decoder stage of ``contrast_injection=film``."""

    def __init__(self, channels: int, code: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, padding=1)
        self.norm = nn.InstanceNorm3d(channels, eps=1e-5, affine=False)
        self.film = nn.Linear(code, 2 * channels)
        self.act = nn.LeakyReLU(0.01)

    def forward(self, h: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.film(code).chunk(2, dim=1)
        h = self.norm(self.conv(h))
        return self.act(h * (1 + gamma[..., None, None, None]) + beta[..., None, None, None])


class AnatomyProjector(nn.Module):
    """``(B, latent, *grid) -> (B, out)``: 1x1x1 conv, GELU, average over space, LayerNorm, linear.

    As for :class:`GlobalContrastHead`, the non-linearity comes before the average: the spatial mean of
    the anatomy latent, a linear map of InstanceNorm-ed features, is nearly the same for every scan, and
    how much of the crop looks like which tissue is read only through a non-linear map of the positions.
    """

    def __init__(self, latent: int, out: int, hidden: int):
        super().__init__()
        self.proj = nn.Conv3d(latent, hidden, 1)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, out)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.act(self.proj(z)).mean(dim=(2, 3, 4))))


class RunningStandardise(nn.Module):
    """Each feature standardised by running statistics of the training batches, clipped to +-6.

    A pretext batch holds a few scans, too few for a batch's own statistics (batch normalisation); the running
    mean and variance are cumulative averages over the first ``1 / momentum`` training batches, then exponential
    ones. The statistics take no gradient; the gradient passes through the scaling. Evaluation uses the running
    statistics as they stand. This is the pretext's form of what the downstream probe does from the training
    crops (``DownstreamModel.fit_feature_norm``): the pooled stages of different scans differ by little around
    large shared offsets, which a linear layer cannot learn from as they are."""

    def __init__(self, dim: int, momentum: float = 0.01):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                rate = (1.0 / (self.seen + 1).to(x.dtype)).clamp_min(self.momentum)
                self.mean.lerp_(x.mean(0), rate)
                self.var.lerp_((x - self.mean).pow(2).mean(0), rate)
                self.seen += 1
        return self.standardise(x)

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` standardised by the statistics as they stand (no update, in either mode)."""
        return ((x - self.mean) * torch.rsqrt(self.var.clamp_min(1e-12))).clamp(-6.0, 6.0)


#: the health pretext's contrast slots: one per name of ``io.manifest.CONTRASTS``, and one for any other name
HEALTH_SLOTS = len(CONTRASTS) + 1


def scan_slots(v: torch.Tensor, ids: torch.Tensor, weight: torch.Tensor, slots: int) -> torch.Tensor:
    """``v``: ``(B, n, D)``, ``n`` scans per row; ``ids``: ``(B, n)`` each scan's contrast index (-1: another name);
    ``weight``: ``(B, n)``, 1 for a scan that is there and 0 for one that is not. Returns ``(B, slots * D)``: each
    scan's vector in its contrast's slot, the scans of one slot averaged, zeros in the slots of contrasts the row lacks
    (the downstream models' per-contrast fusion), so that a head knows which contrast it reads."""
    b, n, d = v.shape
    ids = torch.where(ids < 0, torch.full_like(ids, slots - 1), ids).long()
    rows = (torch.arange(b, device=v.device)[:, None] * slots + ids).reshape(-1)
    w = weight.to(v.dtype).reshape(-1)
    total = v.new_zeros(b * slots, d).index_add(0, rows, v.reshape(b * n, d) * w[:, None])
    count = v.new_zeros(b * slots).index_add(0, rows, w)
    return (total / count.clamp_min(1.0)[:, None]).view(b, slots * d)


def pair_slots(v: torch.Tensor, ids: torch.Tensor, slots: int) -> torch.Tensor:
    """``v``: ``(2B, D)``, a pair's first scans then its second; ``ids``: ``(2B,)`` each scan's contrast index (-1:
    another name). Returns ``(B, slots * D)``: :func:`scan_slots` of each pair; a pair of one contrast twice (a session
    with one scan) gets their mean in that slot."""
    half = v.shape[0] // 2
    pairs, pair_ids = v.view(2, half, -1).transpose(0, 1), ids.view(2, half).T
    return scan_slots(pairs, pair_ids, torch.ones_like(pair_ids, dtype=v.dtype), slots)


class PooledHealthHead(nn.Module):
    """The health pretext's classifier reading each encoder stage as the downstream heads learn to pool it: a 1x1x1
    convolution and GELU at every position, then the mean over the crop (``DownstreamModel``'s learned pooling), for
    a pair's two scans side by side; optionally standardised (:class:`RunningStandardise`); then linear. Unlike a
    linear layer on the stage means, it is not linear in the features before the mean: a channel that fires only at
    a lesion's positions keeps its sign in the pooled value instead of being cancelled by opposite values elsewhere
    in the crop."""

    def __init__(self, stages: tuple[int, ...], classes: int, channels: int, norm: bool = False, slots: int = 0):
        super().__init__()
        self.slots = slots
        self.pool = nn.ModuleList(nn.Conv3d(c, channels, 1) for c in stages)
        dim = (slots or 2) * channels * len(stages)
        self.norm = RunningStandardise(dim) if norm else nn.Identity()
        self.out = nn.Linear(dim, classes)

    def pooled(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """Each scan's pooled vector ``(N, channels * stages)`` from its encoder stages ``maps`` (``N`` scans)."""
        return torch.cat([pointwise_positions(c, F.gelu, m).mean(1) for c, m in zip(self.pool, maps, strict=True)], 1)

    def forward(self, maps: list[torch.Tensor], ids: torch.Tensor | None = None) -> torch.Tensor:
        """``maps``: the encoder stages of ``2B`` scans (the pairs' first scans, then the second); ``ids``: their
        contrast indices, needed with ``slots`` (:func:`pair_slots`). Returns ``(B, classes)``."""
        return self.out(self.norm(_side_by_side(self.pooled(maps), ids, self.slots)))

    def case_logits(self, per_scan: torch.Tensor, present: torch.Tensor, contrasts: list[str]) -> torch.Tensor:
        """The classifier's logits ``(B, classes)`` for cases of several contrasts: ``per_scan`` ``(B, C, D)`` each
        case's pooled vectors in ``contrasts``' order, ``present`` ``(B, C)``. Each present scan goes in its contrast's
        slot (:func:`scan_slots`), as pretraining read a pair (:func:`pair_slots`: a one-scan session read twice fills
        one slot); the standardisation as it stands, never updated here."""
        if not self.slots:
            raise ConfigError("the health classifier's logits per case need contrast slots (model.kwargs.health_slots)")
        ids = torch.tensor([CONTRASTS.index(c) if c in CONTRASTS else -1 for c in contrasts], device=per_scan.device)
        x = scan_slots(per_scan, ids.expand(per_scan.shape[0], -1), present, self.slots)
        return self.out(self.norm.standardise(x) if isinstance(self.norm, RunningStandardise) else x)


def _side_by_side(v: torch.Tensor, ids: torch.Tensor | None, slots: int) -> torch.Tensor:
    """A pair's two scans' vectors as one: in their contrasts' slots (``slots`` > 0) or first then second."""
    if slots:
        if ids is None:
            raise ConfigError("the health head's contrast slots need each scan's contrast (health_logits' ids)")
        return pair_slots(v, ids, slots)
    half = v.shape[0] // 2
    return torch.cat([v[:half], v[half:]], dim=1)


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
        contrast_code: ``spatial`` (a map, as the paper) or ``global`` (one vector per scan).
        contrast_injection: ``concat`` (the code stacked with the anatomy latent as decoder input, as the
            paper) or ``film`` (a global code scales and shifts every decoder stage; see the module docstring).
        contrast_classes: > 0 builds the contrast classifier and the anatomy adversary (pretext heads).
        anatomy_outputs: > 0 builds the anatomy projector with one output per region (a pretext head).
        health_classes: > 0 builds the health classifier (a pretext head, ``objective.w_health``): a linear layer
            on the encoder stages of a pair's two scans, each averaged over the crop, side by side: the stage means
            that the downstream linear probe reads (beside the latents), so that what the pretext learns is in a form
            that probe can read (``health_pool`` pools them otherwise).
        health_norm: standardise those stage means by running statistics before the health classifier's linear
            layer (:class:`RunningStandardise`), as the downstream probe standardises them; off, the layer reads them
            as they are (the form of experiments/rule_health_pretext_explore.md, which did not learn the labels).
        health_pool: > 0: the health classifier reads each encoder stage through a learned pooling of this many
            channels (:class:`PooledHealthHead`, the downstream heads' form) instead of the stage means.
        health_slots: the health classifier reads each scan of a pair in its contrast's slot (:func:`pair_slots`,
            zeros for the contrasts the pair lacks, as the downstream models fuse contrasts), not first and second.
        anatomy_code: ``gaussian`` (a posterior mean and log-variance, as the paper), ``categorical``
            (a softmax over ``latent`` classes per position; see the module docstring) or ``onehot`` (its most
            likely class, the softmax's gradient passed straight through).
        anatomy_temperature: the categorical code's softmax temperature.
        anatomy_logit_norm: standardise each position's class logits (zero mean, unit variance over the
            classes, no learnt scale) before the softmax, so that the code's overall confidence is set by the
            temperature and cannot follow the input's contrast; which classes a position favours, and by how
            much relative to each other, is still the encoder's.
    """

    stem_keys = ("encoder.stages.0.0.convs.0.conv.weight", "encoder.stages.0.0.convs.0.all_modules.0.weight")
    encoder_prefixes = ("encoder.", "subject_head.", "contrast_head.")
    pretext_prefixes = ("decoder.", "adversary.", "contrast_classifier.", "anatomy_projector.", "health_head.")
    disentangles = True

    def __init__(
        self,
        in_channels: int = 1,
        features: tuple[int, ...] = (32, 64, 128, 256, 512),
        latent: int = 256,
        n_conv: int = 2,
        out_channels: int = 1,
        contrast_code: str = "spatial",
        contrast_injection: str = "concat",
        contrast_classes: int = 0,
        anatomy_outputs: int = 0,
        anatomy_code: str = "gaussian",
        anatomy_temperature: float = 0.5,
        anatomy_logit_norm: bool = False,
        health_classes: int = 0,
        health_norm: bool = False,
        health_pool: int = 0,
        health_slots: bool = False,
    ):
        super().__init__()
        features = tuple(int(f) for f in features)
        if contrast_code not in ("spatial", "global"):
            raise ConfigError(f"contrast_code should be spatial or global, got {contrast_code!r}")
        if contrast_injection not in ("concat", "film"):
            raise ConfigError(f"contrast_injection should be concat or film, got {contrast_injection!r}")
        if contrast_injection == "film" and contrast_code != "global":
            raise ConfigError(
                "contrast_injection=film needs contrast_code=global: a spatial contrast map has no single "
                "scale and shift per channel"
            )
        if anatomy_code not in ("gaussian", "categorical", "onehot"):
            raise ConfigError(f"anatomy_code should be gaussian, categorical or onehot, got {anatomy_code!r}")
        if anatomy_logit_norm and anatomy_code == "gaussian":
            raise ConfigError("anatomy_logit_norm needs a categorical or onehot anatomy_code")
        if not anatomy_temperature > 0:
            raise ConfigError(f"anatomy_temperature should be > 0, got {anatomy_temperature}")
        if len(features) < 2 or min(features) < 1:
            raise ConfigError(f"features should list >= 2 positive filter counts, got {features}")
        if latent < 1:
            raise ConfigError(f"latent should be >= 1, got {latent}")
        if contrast_classes < 0 or anatomy_outputs < 0 or health_classes < 0:
            raise ConfigError(
                "contrast_classes, anatomy_outputs and health_classes should be >= 0, got "
                f"{contrast_classes}, {anatomy_outputs}, {health_classes}"
            )
        self.config: dict[str, Any] = {
            "in_channels": in_channels,
            "features": list(features),
            "latent": latent,
            "n_conv": n_conv,
            "out_channels": out_channels,
            "contrast_code": contrast_code,
        }
        if contrast_classes:  # recorded only when used: older runs' model.json stay as they were
            self.config["contrast_classes"] = contrast_classes
        if anatomy_outputs:
            self.config["anatomy_outputs"] = anatomy_outputs
        if health_classes:
            self.config["health_classes"] = health_classes
        if health_pool < 0:
            raise ConfigError(f"health_pool should be >= 0, got {health_pool}")
        switches = (
            ("health_norm", bool(health_norm)),
            ("health_pool", int(health_pool)),
            ("health_slots", bool(health_slots)),
        )
        for name, on in switches:
            if on:
                if not health_classes:
                    raise ConfigError(f"{name} needs a health classifier (health_classes > 0)")
                self.config[name] = on
        if contrast_injection != "concat":
            self.config["contrast_injection"] = contrast_injection
        if anatomy_code != "gaussian":
            self.config.update(anatomy_code=anatomy_code, anatomy_temperature=anatomy_temperature)
        if anatomy_logit_norm:
            self.config["anatomy_logit_norm"] = True
        self.anatomy_logit_norm = bool(anatomy_logit_norm)
        self.categorical_anatomy = anatomy_code in ("categorical", "onehot")
        self.hard_anatomy = anatomy_code == "onehot"
        self.anatomy_temperature = anatomy_temperature
        self.in_channels = in_channels
        self.global_contrast = contrast_code == "global"
        self.film = contrast_injection == "film"
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
        self.contrast_head = (
            GlobalContrastHead(pooled, 2 * latent, hidden=2 * latent)
            if contrast_code == "global"
            else nn.Conv3d(pooled, 2 * latent, 1)
        )
        ups, blocks = [], []
        ch = latent if self.film else 2 * latent
        for f in reversed(features[:-1]):
            ups.append(nn.ConvTranspose3d(ch, f, 2, 2))
            blocks.append(
                FiLMBlock(f, latent)
                if self.film
                else StackedConvBlocks(1, input_channels=f, output_channels=f, kernel_size=3, initial_stride=1, **kw)
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
        self.adversary: nn.Module | None = None
        self.contrast_classifier: nn.Module | None = None
        if contrast_classes:
            self.adversary = nn.Sequential(  # per position of the anatomy map
                nn.Conv3d(latent, latent, 1), nn.LeakyReLU(0.01), nn.Conv3d(latent, contrast_classes, 1)
            )
            self.contrast_classifier = nn.Linear(latent, contrast_classes)
        self.anatomy_projector: nn.Module | None = None
        if anatomy_outputs:
            self.anatomy_projector = AnatomyProjector(latent, anatomy_outputs, hidden=2 * latent)
        self.health_head: nn.Module | None = None
        self.health_slots = HEALTH_SLOTS if health_slots else 0
        if health_classes:  # on the encoder stages of both scans of a pair side by side (health_logits)
            if health_pool:
                self.health_head = PooledHealthHead(
                    features, health_classes, health_pool, bool(health_norm), self.health_slots
                )
            else:
                dim = (self.health_slots or 2) * pooled
                linear = nn.Linear(dim, health_classes)
                self.health_head = nn.Sequential(RunningStandardise(dim), linear) if health_norm else linear
        self.pretext_features = False  # a cls/reg trunk that keeps the health head (keep_pretext_features)
        he_init(self)
        # Start the posteriors narrow (sigma ~ 0.08): with unit variance the sampled latents are mostly
        # noise and the decoder learns nothing for hundreds of steps; the KL term widens them as needed.
        for head in (self.subject_head, self.contrast_head):
            nn.init.constant_(head.bias[latent:], -5.0)

    def feature_dims(self) -> FeatureDims:
        has_latents = self.subject_head is not None
        head = self.health_head if self.pretext_features else None
        return FeatureDims(
            maps=tuple(self.config["features"]),
            anatomy=self.latent if has_latents else 0,
            contrast=self.latent if has_latents else 0,
            pretext=sum(c.out_channels for c in head.pool) if head is not None else 0,
            pretext_logits=head.out.out_features if head is not None and head.slots else 0,
        )

    def pretext_logits(self, per_scan: torch.Tensor, present: torch.Tensor, contrasts: list[str]) -> torch.Tensor:
        """The kept health classifier's logits per case (:meth:`PooledHealthHead.case_logits`)."""
        if not self.pretext_features:
            raise ConfigError("pretext logits need the health head kept (keep_pretext_features)")
        return self.health_head.case_logits(per_scan, present, contrasts)

    def forward_features(self, x: torch.Tensor) -> Features:
        """Encode ``x`` (B, C, X, Y, Z).

        Returns:
            :class:`Features`: ``maps`` (encoder stage outputs), ``pooled``, ``anatomy`` / ``contrast``
            (the latent means averaged over space) and ``latents`` ``mu_s``/``logvar_s``/``mu_c``/``logvar_c``,
            each ``(B, latent, X/16, Y/16, Z/16)`` at full size; a categorical anatomy code gives
            ``logits_s`` instead of ``logvar_s`` and ``mu_s`` is its class probabilities.
        """
        self.check_input(x)
        skips = self.encoder(x)
        feats = Features(maps=skips, pooled=global_pool(skips))
        if self.pretext_features:  # the health head's pooled reading of each scan (its classifier reads cases)
            feats.pretext = self.health_head.pooled(skips)
        if self.subject_head is None:  # a segmentation trunk: no latents
            return feats
        # every stage averaged down to the bottleneck grid: stage i is 2^(n-1-i) times larger (sizes are multiples
        # of the downsampling), so a fixed-kernel average is exact and keeps the graph free of data-dependent sizes
        n = len(skips)
        pooled = torch.cat([F.avg_pool3d(s, 2 ** (n - 1 - i)) if i < n - 1 else s for i, s in enumerate(skips)], dim=1)
        mu_s, logvar_s = self.subject_head(pooled).chunk(2, dim=1)
        mu_c, logvar_c = self.contrast_head(pooled).chunk(2, dim=1)  # global: (B, latent, 1, 1, 1)
        feats.latents = {"mu_c": mu_c, "logvar_c": logvar_c.clamp(*LOGVAR_RANGE)}
        if self.categorical_anatomy:  # class probabilities; the objective samples from the logits
            if self.anatomy_logit_norm:  # over the class axis, without a learnt scale
                mu_s = F.layer_norm(mu_s.movedim(1, -1), (mu_s.shape[1],)).movedim(-1, 1)
            probs = F.softmax(mu_s / self.anatomy_temperature, dim=1)
            if self.hard_anatomy:  # the most likely class, with the softmax's gradient (straight through)
                hard = F.one_hot(probs.argmax(1), probs.shape[1]).movedim(-1, 1).to(probs.dtype)
                probs = hard + (probs - probs.detach())  # exactly one-hot in the forward pass
            feats.latents.update(logits_s=mu_s, mu_s=probs)
            mu_s = feats.latents["mu_s"]
        else:
            feats.latents.update(mu_s=mu_s, logvar_s=logvar_s.clamp(*LOGVAR_RANGE))
        feats.anatomy, feats.contrast = mu_s.mean(dim=(2, 3, 4)), mu_c.mean(dim=(2, 3, 4))
        return feats

    def health_logits(self, feats: Features, n: int, ids: torch.Tensor | None = None) -> torch.Tensor:
        """The health classifier's logits ``(n / 2, classes)`` for pairs whose first scans are ``feats``' rows
        ``[: n / 2]`` and second scans rows ``[n / 2 : n]``; ``ids``: those ``n`` scans' contrast indices (needed by
        ``health_slots``)."""
        if self.health_head is None:
            raise ConfigError("objective.w_health needs the model's health head (model.kwargs.health_classes=2)")
        if isinstance(self.health_head, PooledHealthHead):
            return self.health_head([m[:n] for m in feats.maps], ids)
        return self.health_head(_side_by_side(feats.pooled[:n], ids, self.health_slots))

    def decode(self, z_s: torch.Tensor, z_c: torch.Tensor) -> torch.Tensor:
        """Reconstruct from a subject and a contrast latent: ``(B, out_channels, X, Y, Z)``.

        A global contrast code ``(B, latent, 1, 1, 1)`` is broadcast over the subject latent's grid, or with
        ``contrast_injection=film`` sets each decoder stage's scale and shift."""
        stages = zip(self.decoder["ups"], self.decoder["blocks"], strict=True)
        if self.film:
            h, code = z_s, z_c.flatten(1)
            for up, block in stages:
                h = block(up(h), code)
        else:
            h = torch.cat([z_s, z_c.expand(-1, -1, *z_s.shape[2:])], dim=1)
            for up, block in stages:
                h = block(up(h))
        return self.decoder["out"](h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction from the latent means."""
        f = self.forward_features(x)
        return self.decode(f.latents["mu_s"], f.latents["mu_c"])

    def recombine(self, anatomy_of: torch.Tensor, contrast_of: torch.Tensor) -> torch.Tensor:
        """The anatomy of one batch of scans rendered in the contrast of another (latent means)."""
        s = self.forward_features(anatomy_of).latents["mu_s"]
        c = self.forward_features(contrast_of).latents["mu_c"]
        return self.decode(s, c)

    # ------------------------------------------------------------------ downstream
    @classmethod
    def reads_pretext_logits(cls, kwargs: dict[str, Any]) -> bool:
        """A health head with learned pooling and contrast slots (what :meth:`PooledHealthHead.case_logits` reads)."""
        return all(int(kwargs.get(k, 0) or 0) > 0 for k in ("health_classes", "health_pool", "health_slots"))

    @classmethod
    def downstream_kwargs(
        cls, kwargs: dict[str, Any], n_contrasts: int, pretext_features: bool = False
    ) -> dict[str, Any]:
        """No adversary, contrast classifier or anatomy projector, and no health head unless ``pretext_features``
        keeps it: a head built only to be dropped by :meth:`reset_head` would move the random stream, and with it
        the initial weights of a trunk trained from scratch with this architecture."""
        off = ("contrast_classes", "anatomy_outputs")
        if not pretext_features:
            off += ("health_classes", "health_norm", "health_pool", "health_slots")
        return {k: v for k, v in kwargs.items() if k not in off}

    def keep_pretext_features(self) -> None:
        """Keep the health head (:class:`PooledHealthHead`: 1x1x1 convolution, GELU and mean per stage, then its
        standardisation and classifier) in the cls/reg trunk: ``Features.pretext`` is then each scan's pooled vector,
        the one the pretext's classifier read in the scan's contrast slot, and :meth:`pretext_logits` that
        classifier's reading of a case (with contrast slots)."""
        if not isinstance(self.health_head, PooledHealthHead):
            raise ConfigError(
                "pretext features need a health head with learned pooling (model.kwargs.health_pool > 0 in "
                "pretraining); a health head on the stage means reads what probe_features=stages reads"
            )
        self.pretext_features = True

    def reset_head(self, task: str, classes: int) -> None:
        check_task(task)
        self.decoder = None  # the reconstruction decoder (no skips)
        kept = self.health_head if self.pretext_features and task != "seg" else None
        self.adversary = self.contrast_classifier = self.anatomy_projector = self.health_head = None
        if kept is not None:  # its pooling, standardisation and classifier (PooledHealthHead.case_logits)
            self.health_head = kept
        elif self.pretext_features:
            raise ConfigError("pretext features are for cls/reg trunks, not segmentation")
        if task == "seg":
            self.subject_head = self.contrast_head = None
            self.seg_decoder = UNetDecoder(self.encoder, classes, 1, deep_supervision=False)
            freeze_unused_seg_layers(self.seg_decoder)

    def forward_head(self, features: Features) -> torch.Tensor:
        return self.seg_decoder(features.maps)

    def transfer_prefixes(self, task: str) -> tuple[str, ...]:
        if task == "seg":
            return ("encoder.",)
        return (*self.encoder_prefixes, "health_head.") if self.pretext_features else self.encoder_prefixes
