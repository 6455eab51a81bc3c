"""fomo25: dual-latent VAE with cross-contrast swapping (and, with its terms off, plain MAE).

Loss = w_rec (rec_a + rec_b) + w_swap (swap_ab + swap_ba) + w_kl(t) KL
       + w_align align(zs_a, zs_b) + w_repel cos(zc_a, zc_b)

* rec: SmoothL1 (beta 0.1) over the volume, or MSE on masked voxels only.
* swap_ab renders anatomy in b's contrast and compares it with ``x_b``. (The challenge's
  public code compares it with ``x_a``, which fights the contrast term; this is the
  intended target.) Its anatomy is ``mean(zs_a, zs_b)`` (the paper) or ``zs_a`` alone
  (``swap_anatomy="other"``); its contrast code is ``zc_b`` of the same crop (the paper) or
  of another crop of scan b (``swap_contrast="reference"``), so that a contrast latent
  that copies its crop cannot meet the term.
* KL of both posteriors (``contrast_variational=False``: the anatomy's only, the contrast latent
  being its mean; a categorical anatomy code, ``model.kwargs.anatomy_code``, has none and is
  sampled by a Gumbel-softmax in training) against N(0, 1), summed over latent elements as SPEC states
  (``kl_reduction="mean"``: averaged, as the first version did), its weight ramping
  linearly from 0 to ``w_kl`` over ``kl_warmup_epochs``.
* align: ``cosine`` — 1 - cos of the flattened anatomy latents (the paper; a shared offset
  meets it); ``centred`` — the same after subtracting a running mean of the anatomy latent;
  ``dense_nce`` — InfoNCE between the anatomy vectors of a and b at every bottleneck
  position, against all other positions and samples of the batch (a shared offset cannot
  meet it, and it asks the latent to say *which* anatomy is where); ``mse`` — the squared
  difference of a's and b's anatomy latents at every position, each channel divided by its
  running variance over crops and positions: the two must be *equal*, not only parallel, so
  neither a per-contrast offset nor a per-contrast scale (both invisible to a cosine, both read
  by a linear probe) can stay, and shrinking the latent does not help; ``classes`` (a categorical anatomy
  code only) — the cross-entropy between a's and b's class distributions at every position, both ways,
  over ``log K``: the same class, held with confidence, at the same place in both contrasts. It is 0 when
  the two are sure of one class and agree, 1 when both are uniform. With ``w_anatomy_usage`` at the same
  weight the two are Invariant Information Clustering's objective taken apart (Ji et al. 2019: the mutual
  information of the two views' classes is the entropy of the class marginal, which the usage term asks to
  be high, less the entropy of one view's class given the other's, which this term bounds from above);
  alone, agreement collapses the code onto a few classes, and since a pair's crops sit at the same place, a code
  that names only places in the crop meets both for free unless the views' geometry differs (``pair_flip``
  and ``pair_shift``, below; docs/pretraining.md).
* align_mean (``w_align_mean``): the same squared difference for the *crop means* of the two
  anatomy latents, each channel divided by the running variance of crop means. A contrast offset
  that is small beside the anatomy's variation from position to position (what the per-position
  terms and the adversary see) can still be large beside the variation of whole-scan means (what a
  probe on a scan's pooled latent reads); this term measures it on that scale.
* contrast_means (``w_contrast_means``): the mean anatomy vector of each contrast over many crops (a
  running mean; crops come from random places, so it is the mean of whole-scan vectors of that
  contrast) is pulled to the mean over contrasts, the current batch carrying the gradient. It asks
  for what a linear probe on whole-scan vectors needs absent — equal class means — without an
  adversary. Uses the scans' BIDS suffixes, as the adversary does. ``contrast_means_metric="diagonal"``
  scales each channel by its running variance over crop means; ``"whitened"`` measures the spread in
  the metric of their running covariance (the Fisher ratio of a linear discriminant): a probe reads a
  small offset along a direction in which crop means hardly vary, which a per-channel scale underweights.
* scan_means (``w_scan_means``): the same term on whole scans instead of crops: the loader adds each pair's first
  scan whole (``scan_a``, as for ``adversary_fit="scans"``, below), read as the analysis reads it, and the per-contrast
  running means, their scale and the gradient are those of these whole-scan vectors. Equal class means are what a
  linear probe needs to do no better than a constant predictor (Belrose et al. 2023, LEACE), so this asks for the
  probe's chance level directly, without a critic to fit and chase; it costs a whole scan's windows, with their
  backward pass, per pair and step.
* repel: cos(zc_a, zc_b) pushes the contrast latents of two contrasts apart.
* health (``w_health``): a linear classifier (``model.health_head``, a pretext head that no downstream model keeps)
  reads the pair's two scans unmasked, each encoder stage averaged over the crop, side by side (the stage means
  the downstream linear probe reads, beside the latents), and is trained on the pool's health labels
  (``data.health_label``; unknown labels left out), as the SSL3D recipe's health pretext is. It is weak supervision
  by the pool's metadata, not a label-free objective (experiments/rule_health_supervised_ceiling.md: an encoder
  trained on the pool's labels; experiments/rule_health_pretext_explore.md: this pretext did not learn the labels
  in 3,000 steps of 2 pairs, nor with the stage means standardised first, ``model.kwargs.health_norm``,
  experiments/rule_health_pretext_standardised.md). ``model.kwargs.health_pool`` reads the stages through a learned
  pooling instead (the model's ``health_logits`` picks the form).
* contrast_nce (``w_contrast_nce``): InfoNCE on the contrast codes of every encoded crop — the two crops of
  one scan (the pair crop and the reference crop, at another place) are each other's positive, and every
  other crop of the batch is a negative, the same session's other contrast at the same place first among
  them. The code must then say which scan it came from, whatever the crop shows, and tell one subject's
  contrasts apart; it uses no contrast names. Needs the reference crops (``swap_contrast="reference"``).
* adversary (``w_adversary``): a small classifier reads the contrast from the anatomy latent at
  every position while a gradient reversal (Ganin & Lempitsky 2015) makes the encoder remove what it
  reads: the anatomy latent of a crop must not tell its contrast. ``adversary_pool="mean"``: it reads each
  crop's mean anatomy vector instead (a categorical code's class shares), the kind of vector a linear
  probe of whole scans reads, where a per-position adversary can sit at chance while the probe still tells
  the contrast. ``adversary_fit="refit"`` (crop means only) puts the analysis probe itself in the loop: the term
  keeps the last ``adversary_buffer`` crops' mean anatomy vectors and contrasts (detached), and every
  ``adversary_refit`` training steps fits a fresh critic on them as the analysis fits its probe (each channel
  standardised, then an L2-penalised multinomial logistic regression); the encoder's term is the KL divergence from
  the buffer's contrast frequencies to that critic's prediction for each crop, 0 when the critic can say no more than
  the frequencies. An online critic on raw class shares (which differ by ~0.005 between crops) hardly learns;
  the refitted one reads them standardised, as the probe does, and cannot fall behind the encoder by more than
  ``adversary_refit`` steps. On a one-hot code its gradient passes straight through the soft probabilities while
  the critic counts hard classes: in 3,000-step runs the encoder flattened the former and left the latter telling
  the contrast (docs/pretraining.md, "The probe as the critic"). On a soft code it met the critic and the analysis
  probe still read the contrast: a crop hardly shows it, a whole scan's average does, and the critic sees crops.
  ``adversary_fit="scans"`` moves the critic and its term to whole scans: the loader adds each pair's first scan
  whole and unaugmented (``scan_a``, centre-padded to the store's largest shape, with its own shape
  ``scan_shape_a``), read as the analysis reads a scan: the windows of the crop size that tile the scan's own
  shape, their mean anatomy vectors averaged (:func:`scan_vectors`). Until 2026-12-04 they tiled the padded canvas,
  and the encoder blinded those windows while the analysis' own still read the contrast
  (``experiments/rule_scan_critic_onehot.md``). The term
  keeps the last ``adversary_scans`` scans themselves, not their vectors, and at every fit encodes them again with
  the current encoder (no gradient), so the critic cannot be fitted on vectors of an encoder that has since moved
  away from them; the encoder's term is the same KL divergence on the batch's whole-scan vectors, with the
  gradient through every window. It costs a whole scan's windows per pair, with their backward pass, at every
  step, and ``adversary_scans`` scans' windows, forward only, at every fit; the bank sits on the training device.
  Both critics floor each channel's variance at ``adversary_floor`` (1e-3) times the channels' mean before
  standardising. At 0 they standardise as the analysis probe's ``StandardScaler`` does: on a soft code the floored
  critic left the contrast in classes whose probabilities vary by 1e-8 or less between scans, which the probe
  blows up to unit variance and reads (docs/pretraining.md, "The critic on whole scans").
  ``w_contrast_id`` trains a classifier of the contrast on the contrast latent's mean. Both use the scan's BIDS suffix
  (T1w, T1c, ...), which every scan of a store has: metadata, not a downstream label. They and contrast_means read the
  masked encodings the other terms use, or (``contrast_input="clean"``) an extra encoding of the unmasked crops, which
  is what a downstream model and the latent analysis see.
* anatomy (``w_anatomy``): the SSL3D winner's anatomy anchor on the fomo25 subject latent — a projector
  reads each scan's anatomy latent map (a non-linear map per position, then the average) and predicts
  the subject's regional-volume vector (ICV-normalised, standardised per region over the pool, as
  ``ssl3d``), scored by 1 - cosine. The target is the same for every contrast of a subject, and it is
  what a brain's age and atrophy show in.
  Volumes come from a SynthSeg/FastSurfer table, a label map or neurofm's tissue segmentation (SPEC §1b).
* ``rec_anatomy="random"`` rebuilds each scan of a valid pair from its own anatomy latent or its
  partner's, at random (as CALAMITI does): reconstruction itself then asks the anatomy latent to
  be the same for both contrasts, and the contrast to come from the contrast latent.
* remap (``remap_p``): with that probability per pair, the second scan of the pair (and its reference crop)
  is replaced by a random intensity remapping of the first — a new contrast of exactly the same anatomy, the
  crop unmoved. The map is a random piecewise-linear function of the intensity (``remap_knots`` segments
  between the crop's darkest and brightest voxel, the darkest kept darkest, each knot's value uniform in
  [0, 1], not monotonic), rescaled to the crop's mean and standard deviation. Every pair term (agreement,
  swap, CALAMITI's random anatomy) then also asks the anatomy latent to be the same under any such map —
  SynthSeg's domain randomisation (Billot et al. 2023) put into the pair objective, without labels — and the
  contrast code to say which map it was. The remapped scan has no contrast name (-1): the terms that use
  the BIDS suffix skip it. A single-scan session gets its pair this way too.
* anatomy_usage (``w_anatomy_usage``, a categorical anatomy code only): ``1 - H(p) / log K``, where ``p`` is the
  class distribution averaged over every position of every crop the batch encodes and ``K`` the number of classes
  (wav2vec 2.0's codebook diversity term, Baevski et al. 2020, on the log scale). It is 0 when the batch uses every
  class equally and 1 when it uses one. Without it the code drifts to a few classes (docs/pretraining.md: 5-6 of
  32, two of them holding 79-83 % of positions), and a scan's anatomy vector is then a handful of shares that
  differ little between subjects.
* pair_flip: in training, the second scan of each pair (and its reference crop) is encoded mirrored along a random
  subset of the three axes (each with probability one half, the same for the whole batch) and its latent maps
  mirrored back before any term reads them. The two crops of a pair sit at the same place, so without it an anatomy
  code that says only *where in the crop* a position is (which zero padding lets a convolution tell) agrees across
  contrasts for free — the shortcut Invariant Information Clustering avoids by giving its two views different
  geometry. A mirror alone does not close it: a code of places that is itself symmetric under the mirrors (edge or
  inner along each axis: 2³ classes) still agrees, and that is what a 10,000-step run learned (docs/pretraining.md).
* pair_shift: in training, the second scan of each pair (and its reference crop) is also shifted circularly by a
  random whole number of bottleneck cells along each axis (``torch.roll``; uniform over the grid, the same for the
  whole batch) and its latent maps shifted back, so every position of a's map meets the same tissue in b's but seen
  from another place in the crop (and across a wrap-around seam). No code of places survives a shift; only a code
  that follows the image can agree. With ``pair_flip`` the shift follows the mirror. Needs crops whose sides are a
  multiple of the model's ``downsampling``. (The unmasked encoding that ``contrast_input="clean"`` adds is neither
  mirrored nor shifted.)
* A session with one scan contributes only its reconstruction and KL (unless remapped).
* Under DDP the running estimates (the anatomy statistics, the per-contrast means of contrast_means and scan_means
  and their scale) move by the statistics of the whole global batch, summed over the ranks, so every rank holds the
  same estimates and a checkpoint written by rank 0 holds what every rank used; the gradient is still each rank's
  own batch's. The anatomy statistics of ``align`` are the ranks' average of their batch statistics. The critic's
  bank (``w_adversary``) stays per rank: each rank fits its critic on its own scans.

The paper's form is ``align="cosine", swap_anatomy="mean", swap_contrast="same"`` with a
spatial contrast latent; the defaults were chosen by measurement (docs/pretraining.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from neurofm.data.config import DataConfig
from neurofm.data.pretrain import DataNeeds
from neurofm.errors import ConfigError
from neurofm.io.manifest import CONTRASTS
from neurofm.objectives.masking import block_mask
from neurofm.preprocess.windows import window_slices


@dataclass
class Fomo25Config:
    kind: str = "fomo25"
    block: int = 4
    mask_ratio: float = 0.6
    rec_loss: str = "smooth_l1"  # smooth_l1 (whole volume) | masked_mse
    smooth_l1_beta: float = 0.1
    w_rec: float = 3.0
    w_swap: float = 1.0
    w_kl: float = 1e-3
    kl_warmup_epochs: float = 10.0
    kl_reduction: str = "sum"  # sum (SPEC) | mean
    w_align: float = 0.5
    align: str = "cosine"  # cosine (paper) | centred | dense_nce | mse | classes
    align_temperature: float = 0.1
    w_align_mean: float = 0.0
    w_contrast_means: float = 0.0
    contrast_means_metric: str = "diagonal"  # diagonal | whitened
    contrast_means_ridge: float = 1e-3  # added to the variances (covariance), times their mean
    w_scan_means: float = 0.0  # > 0: the contrast_means term on whole scans, read as the analysis reads them
    w_repel: float = 0.5
    w_contrast_nce: float = 0.0
    contrast_nce_temperature: float = 0.1
    w_adversary: float = 0.0
    adversary_pool: str = "position"  # position: every position of the anatomy latent | mean: each crop's mean
    # online: a head trained through a gradient reversal | refit: the probe in the loop, on crops | scans: the probe
    # in the loop, on whole scans encoded by the current encoder
    adversary_fit: str = "online"
    adversary_refit: int = 50  # refit, scans: steps between fits of the critic
    adversary_buffer: int = 512  # refit: crops (their mean anatomy vectors) the critic is fitted on
    adversary_scans: int = 96  # scans: the last whole scans kept and encoded again at every fit of the critic
    # refit, scans: the critic's channel variances floored at this share of their mean; 0: scikit-learn's
    # StandardScaler, as the analysis probe (a channel that hardly varies is read at full scale)
    adversary_floor: float = 1e-3
    w_contrast_id: float = 0.0
    w_anatomy: float = 0.0  # > 0: the anatomy latent predicts the subject's regional volumes (1 - cosine)
    w_anatomy_usage: float = 0.0  # > 0: a categorical anatomy code spreads the batch over its classes
    w_health: float = 0.0  # > 0: a health classifier reads each pair's clean encodings (the pool's health labels)
    contrast_input: str = "masked"  # masked: the contrast terms read the masked encodings | clean
    swap_anatomy: str = "mean"  # mean (paper) | other
    swap_contrast: str = "same"  # same (paper) | reference
    rec_anatomy: str = "own"  # own (paper) | random
    remap_p: float = 0.0  # probability that a pair's second scan is a random intensity remapping of its first
    remap_knots: int = 4
    pair_flip: bool = False  # True: a pair's second scan encoded mirrored (random axes), its latents mirrored back
    pair_shift: bool = False  # True: ... and shifted circularly by whole bottleneck cells, its latents shifted back
    variational: bool = True
    contrast_variational: bool = True  # False: the contrast latent is its mean (no sampling, no KL)

    data_mode: ClassVar[str] = "pair"

    def __post_init__(self) -> None:
        choices = {
            "rec_loss": ("smooth_l1", "masked_mse"),
            "kl_reduction": ("sum", "mean"),
            "align": ("cosine", "centred", "dense_nce", "mse", "classes"),
            "swap_anatomy": ("mean", "other"),
            "swap_contrast": ("same", "reference"),
            "rec_anatomy": ("own", "random"),
            "contrast_input": ("masked", "clean"),
            "contrast_means_metric": ("diagonal", "whitened"),
            "adversary_pool": ("position", "mean"),
            "adversary_fit": ("online", "refit", "scans"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"objective.{name} should be {' or '.join(allowed)}, got {getattr(self, name)!r}")
        for name in (
            "w_rec",
            "w_swap",
            "w_kl",
            "w_align",
            "w_align_mean",
            "w_contrast_means",
            "w_scan_means",
            "w_repel",
            "w_contrast_nce",
            "w_adversary",
            "w_contrast_id",
            "w_anatomy",
            "w_anatomy_usage",
            "w_health",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"objective.{name} should be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.remap_p <= 1.0:
            raise ConfigError(f"objective.remap_p should be in [0, 1], got {self.remap_p}")
        if self.remap_knots < 1:
            raise ConfigError(f"objective.remap_knots should be >= 1, got {self.remap_knots}")
        if self.adversary_fit != "online" and self.adversary_pool != "mean":
            raise ConfigError(
                f"objective.adversary_fit={self.adversary_fit} fits its critic on mean anatomy vectors, as the "
                "analysis probe reads whole scans: set objective.adversary_pool=mean"
            )
        if self.adversary_refit < 1 or self.adversary_buffer < 8 or self.adversary_scans < 8:
            raise ConfigError(
                f"objective.adversary_refit should be >= 1 and objective.adversary_buffer and adversary_scans >= 8, "
                f"got {self.adversary_refit}, {self.adversary_buffer} and {self.adversary_scans}"
            )
        if self.adversary_floor < 0:
            raise ConfigError(f"objective.adversary_floor should be >= 0, got {self.adversary_floor}")
        if not self.contrast_means_ridge > 0:
            raise ConfigError(f"objective.contrast_means_ridge should be > 0, got {self.contrast_means_ridge}")
        if not self.align_temperature > 0:
            raise ConfigError(f"objective.align_temperature should be > 0, got {self.align_temperature}")
        if not self.contrast_nce_temperature > 0:
            raise ConfigError(f"objective.contrast_nce_temperature should be > 0, got {self.contrast_nce_temperature}")
        if self.w_contrast_nce > 0 and not (self.w_swap > 0 and self.swap_contrast == "reference"):
            raise ConfigError(
                "objective.w_contrast_nce needs a second crop of each scan: objective.swap_contrast=reference "
                "(with objective.w_swap > 0)"
            )

    @property
    def online_heads(self) -> bool:
        """Whether the model needs its contrast heads (the online adversary, the contrast classifier)."""
        return (self.w_adversary > 0 and self.adversary_fit == "online") or self.w_contrast_id > 0

    def data_needs(self) -> DataNeeds:
        return DataNeeds(
            reference_crop=self.w_swap > 0 and self.swap_contrast == "reference",
            volumes=self.w_anatomy > 0,
            whole_scan=(self.w_adversary > 0 and self.adversary_fit == "scans") or self.w_scan_means > 0,
        )

    def model_kwargs(self, kwargs: dict[str, Any], data: DataConfig, extra: dict[str, Any]) -> dict[str, Any]:
        out = dict(kwargs)
        if self.online_heads:
            out["contrast_classes"] = len(CONTRASTS)
        if self.w_anatomy > 0:
            out["anatomy_outputs"] = len(extra["regions"])
        if self.w_health > 0:
            out["health_classes"] = 2
        return out

    def example_batch(self, batch: int, patch: int, extra: dict[str, Any], device: Any = "cpu") -> dict[str, Any]:
        """Random inputs of the shapes the loader gives (benchmarks, tests)."""
        names = ["x_a", "x_b"] + (["x_a_ref", "x_b_ref"] if self.data_needs().reference_crop else [])
        out: dict[str, Any] = {n: torch.randn(batch, 1, patch, patch, patch, device=device) for n in names}
        out["pair_valid"] = torch.ones(batch, dtype=torch.bool, device=device)
        out["contrast_a"] = torch.zeros(batch, dtype=torch.long, device=device)
        out["contrast_b"] = torch.ones(batch, dtype=torch.long, device=device)
        if self.w_health > 0:
            out["health"] = torch.arange(batch, device=device) % 2
        if self.w_anatomy > 0:
            out["volumes"] = torch.randn(batch, len(extra.get("regions", ())), device=device)
            out["has_volumes"] = torch.ones(batch, dtype=torch.bool, device=device)
        if self.data_needs().whole_scan:
            canvas = extra.get("scan_canvas", (patch,) * 3)
            out["scan_a"] = torch.randn(batch, 1, *canvas, device=device)
            out["scan_shape_a"] = torch.tensor(canvas, device=device).expand(batch, 3).clone()
        return out


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) per sample, ``(B,)``: summed (or averaged) over latent elements."""
    kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).flatten(1)
    return kl.sum(1) if reduction == "sum" else kl.mean(1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of flattened samples: ``(B,)``."""
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1, eps=1e-6)


def contrast_nce(codes: torch.Tensor, valid: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE on the contrast codes ``(4B, ...)`` of the crops ``[x_a, x_b, x_a_ref, x_b_ref]``: each crop's
    positive is the other crop of its scan, every other crop a negative; the second scans of invalid pairs
    (``valid`` ``(B,)``, 0/1) are neither anchors nor negatives. Mean over anchors."""
    n = codes.shape[0]
    bsz = n // 4
    v = F.normalize(codes.flatten(1).float(), dim=1, eps=1e-6)
    ones = torch.ones_like(valid)
    keep = torch.cat([ones, valid, ones, valid]).bool()
    logits = (v @ v.T) / temperature
    drop = torch.eye(n, dtype=torch.bool, device=v.device) | ~keep[None, :]
    logits = logits.masked_fill(drop, float("-inf"))
    positive = (torch.arange(n, device=v.device) + 2 * bsz) % n  # a kept anchor's positive is kept too
    return F.cross_entropy(logits[keep], positive[keep])


def class_usage(probs: torch.Tensor) -> torch.Tensor:
    """``1 - H(p) / log K`` of the class distribution ``p`` averaged over the samples and positions of ``probs``
    ``(B, K, *grid)`` (each position's probabilities summing to 1): 0 when every class is used equally, 1 when
    one class takes every position."""
    k = probs.shape[1]
    p = probs.movedim(1, -1).reshape(-1, k).float().mean(0)
    entropy = -(p * p.clamp_min(1e-12).log()).sum()
    return 1.0 - entropy / math.log(k)


def class_agreement(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """The cross-entropy between the class distributions of ``a`` and ``b`` at the same positions, averaged
    over the two directions and the positions and divided by ``log K``, from their log-probabilities
    ``(B, K, *grid)``: ``(B,)``. 0 when both put all their mass on the same class at every position; 1 when
    both are uniform."""
    k = logp_a.shape[1]
    p_a, p_b = logp_a.exp(), logp_b.exp()
    ce = -0.5 * ((p_a * logp_b).sum(1) + (p_b * logp_a).sum(1))
    return ce.flatten(1).mean(1) / math.log(k)


def dense_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-sample InfoNCE between the vectors of ``a`` and ``b`` ``(B, C, *grid)`` at the same position,
    the other positions and samples being the negatives (symmetric): ``(B,)``."""
    n, c = a.shape[:2]
    ta = F.normalize(a.flatten(2).transpose(1, 2).reshape(-1, c), dim=1)  # (B*P, C)
    tb = F.normalize(b.flatten(2).transpose(1, 2).reshape(-1, c), dim=1)
    logits = ta @ tb.T / temperature
    target = torch.arange(len(ta), device=a.device)
    loss = 0.5 * (
        F.cross_entropy(logits, target, reduction="none") + F.cross_entropy(logits.T, target, reduction="none")
    )
    return loss.view(n, -1).mean(1)


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; the gradient's sign flipped backward (a gradient reversal layer)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return -grad


def reverse_gradient(x: torch.Tensor) -> torch.Tensor:
    return _ReverseGradient.apply(x)


def random_remap(x: torch.Tensor, others: tuple[torch.Tensor, ...] = (), knots: int = 4) -> tuple[torch.Tensor, ...]:
    """A random intensity remapping per sample of ``x`` ``(B, 1, *grid)``, applied alike to each of ``others``
    (crops of the same scans): a piecewise-linear function with ``knots`` equal segments between the sample's
    lowest and highest value (over ``x`` and ``others``), 0 at the lowest, a uniform draw in [0, 1] at every
    other knot, then shifted and scaled so that the remapped ``x`` has ``x``'s mean and standard deviation.

    Returns:
        the remapped ``x`` and ``others``, in that order.
    """
    n = x.shape[0]
    flat = [t.reshape(n, -1) for t in (x, *others)]
    lo = torch.stack([f.amin(1) for f in flat]).amin(0)[:, None]  # (B, 1)
    hi = torch.stack([f.amax(1) for f in flat]).amax(0)[:, None]
    values = torch.rand(n, knots + 1, device=x.device, dtype=x.dtype)
    values[:, 0] = 0.0

    def apply(f: torch.Tensor) -> torch.Tensor:
        t = (f - lo) / (hi - lo).clamp_min(1e-6) * knots
        i = t.floor().clamp(0, knots - 1)
        w = (t - i).clamp(0.0, 1.0)
        i = i.long()
        return values.gather(1, i) * (1 - w) + values.gather(1, i + 1) * w

    mapped = [apply(f) for f in flat]
    mean, std = flat[0].mean(1, keepdim=True), flat[0].std(1, keepdim=True)
    m_mean, m_std = mapped[0].mean(1, keepdim=True), mapped[0].std(1, keepdim=True).clamp_min(1e-6)
    return tuple(((m - m_mean) / m_std * std + mean).view_as(t) for m, t in zip(mapped, (x, *others), strict=True))


def known_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the targets that are known (>= 0); 0 when none is (no host sync)."""
    ce = F.cross_entropy(logits, target.clamp_min(0), reduction="none")
    known = (target >= 0).to(ce.dtype)
    return (ce * known).sum() / known.sum().clamp_min(1.0)


def _wmean(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (v * w).sum() / w.sum().clamp_min(1.0)


def _floored(var: torch.Tensor, relative: float = 1e-3) -> torch.Tensor:
    """Variances with a floor of ``relative`` times their mean, so that dividing by them is scale-free: a
    fixed floor swamps small latents' variances (a categorical code's crop-mean probabilities vary by
    about 1e-7 to 1e-6 per class) and makes the term shrink with the latent's scale instead."""
    return var + relative * var.mean() + 1e-12


def fit_linear_probe(
    x: torch.Tensor, y: torch.Tensor, c: float = 1.0, max_iter: int = 100, floor: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A multinomial logistic regression of the labels ``y`` ``(N,)`` on ``x`` ``(N, C)``, each channel standardised
    first: the analysis probe's fit (scikit-learn's ``StandardScaler`` and ``LogisticRegression``, whose L2 penalty
    is ``|W|^2 / (2 c)`` beside the summed cross-entropy), by L-BFGS in float64. A channel's variance is floored at
    ``floor`` times the channels' mean variance (``_floored``), so that a near-constant channel cannot take the
    gradients that flow through it; ``floor=0`` standardises as ``StandardScaler`` does, every channel to unit
    variance however small its spread (a constant channel is left unscaled). Returns ``(mean, scale, weight (K, C),
    bias (K,), classes (K,), accuracy)``, ``classes`` the labels present, sorted, and ``accuracy`` on ``x`` itself."""
    x = x.detach().double()
    classes, index = torch.unique(y, return_inverse=True)
    mean = x.mean(0)
    var = x.var(0, unbiased=False)
    if floor > 0:
        scale = _floored(var, floor).sqrt()
    else:  # scikit-learn's StandardScaler: a scale below 10 machine epsilons counts as none
        scale = var.sqrt()
        scale = torch.where(scale < 10 * torch.finfo(scale.dtype).eps, torch.ones_like(scale), scale)
    z = (x - mean) / scale
    weight = torch.zeros(len(classes), z.shape[1], dtype=z.dtype, device=z.device, requires_grad=True)
    bias = torch.zeros(len(classes), dtype=z.dtype, device=z.device, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, index, reduction="sum") + (weight**2).sum() / (2 * c)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    weight, bias = weight.detach(), bias.detach()
    accuracy = ((z @ weight.T + bias).argmax(1) == index).double().mean()
    return mean, scale, weight, bias, classes, accuracy


def analysis_windows(shape: tuple[int, ...], canvas: tuple[int, ...], patch: int) -> list[tuple[slice, ...]]:
    """The windows the latent analysis cuts from a scan of ``shape`` (``neurofm.analyze.embed.scan_features``: the
    scan centre-padded up to the patch where it is shorter, its own shape tiled by ``patch^3`` windows without
    overlap), as slices of the ``canvas`` the loader centre-pads the scan into (``scan_a``). Both paddings take the
    scan's darkest value, so the windows hold the same voxels as the analysis' own."""
    own = [max(int(s), patch) for s in shape]
    start = [(c - s) // 2 - (o - s) // 2 for c, s, o in zip(canvas, shape, own, strict=True)]
    if any(a < 0 or a + o > c for a, o, c in zip(start, own, canvas, strict=True)):
        raise ValueError(f"a scan of shape {tuple(shape)} does not fit the canvas {tuple(canvas)} at patch {patch}")
    return [
        tuple(slice(a + w.start, a + w.stop) for a, w in zip(start, win, strict=True))
        for win in window_slices(tuple(own), patch, 0.0)
    ]


def scan_vectors(model: nn.Module, scans: torch.Tensor, patch: int, shapes: torch.Tensor | None = None) -> torch.Tensor:
    """Whole-scan anatomy vectors ``(B, C)`` of scans ``(B, 1, *canvas)`` as the latent analysis reads them
    (``neurofm.analyze.embed.scan_features``): each scan's own windows (:func:`analysis_windows`; ``shapes``
    ``(B, 3)`` gives each scan's shape inside the canvas, the whole canvas when ``None``), their mean anatomy vectors
    averaged."""
    canvas = tuple(scans.shape[2:])
    rows = shapes.tolist() if shapes is not None else [canvas] * len(scans)
    cuts = [(i, w) for i, shape in enumerate(rows) for w in analysis_windows(shape, canvas, patch)]
    x = torch.stack([scans[(i, slice(None), *w)] for i, w in cuts])  # (windows, 1, P, P, P)
    a = model.forward_features(x).anatomy  # (windows, C)
    owner = torch.tensor([i for i, _ in cuts], device=a.device)
    count = torch.bincount(owner, minlength=len(scans)).to(a.dtype)
    return a.new_zeros(len(scans), a.shape[1]).index_add(0, owner, a) / count[:, None]


def _world_size() -> int:
    """The number of DDP ranks when ``torch.distributed`` is set up, else 1."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank_mean(value: torch.Tensor) -> torch.Tensor:
    """``value`` (detached) averaged over the DDP ranks; itself outside DDP."""
    ranks = _world_size()
    if ranks == 1:
        return value
    import torch.distributed as dist

    out = value.detach().float().clone()
    dist.all_reduce(out)
    return (out / ranks).to(value.dtype)


def _global_batch_stats(
    m: torch.Tensor, onehot: torch.Tensor, whitened: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Over every rank's rows of ``m`` ``(N, C)`` with contrasts ``onehot`` ``(N, K)``, in one all_reduce: which
    contrasts are present ``(K,)``, their mean vectors ``(K, C)``, and the rows' unbiased covariance ``(C, C)``
    (``whitened``) or variance ``(C,)`` -- what one process would compute from the concatenated batch."""
    import torch.distributed as dist

    k, c = onehot.shape[1], m.shape[1]
    m64, oh = m.double(), onehot.double()
    second = (m64.T @ m64).reshape(-1) if whitened else (m64**2).sum(0)
    parts = [oh.T @ m64, oh.sum(0), m64.sum(0), second, m64.new_tensor([float(len(m))])]
    flat = torch.cat([t.reshape(-1) for t in parts])
    dist.all_reduce(flat)
    sums, count, total, second, n = flat.split([t.numel() for t in parts])
    sums, n = sums.view(k, c), n[0]
    mean = total / n.clamp_min(1.0)
    outer = torch.outer(mean, mean).reshape(-1) if whitened else mean**2
    spread = (second - n * outer) / (n - 1.0).clamp_min(1.0)
    means = sums / count.clamp_min(1.0)[:, None]
    return count > 0, means.to(m.dtype), (spread.view(c, c) if whitened else spread).to(m.dtype)


class Fomo25Loss(nn.Module):
    """Scores a dual-latent model (``forward_features`` with mu/logvar latents, and ``decode``) on scan pairs."""

    def __init__(self, cfg: Fomo25Config):
        super().__init__()
        self.cfg = cfg
        # The running estimates below stay out of the state dict (their shapes follow the first batch); a checkpoint
        # carries them through running_state() / load_running_state(), so a resumed run goes on with them.

        # the running mean (align=centred) and per-channel variance (align=mse) of the anatomy latent
        self.register_buffer("anatomy_mean", torch.zeros(0), persistent=False)
        self.register_buffer("anatomy_var", torch.zeros(0), persistent=False)
        self.register_buffer("anatomy_mean_var", torch.zeros(0), persistent=False)
        # per contrast: running mean of crop-mean anatomy vectors, and whether it has been seen
        self.register_buffer("contrast_means", torch.zeros(0), persistent=False)
        self.register_buffer("contrast_seen", torch.zeros(0, dtype=torch.bool), persistent=False)
        # the running variance (diagonal) or covariance (whitened) of the crop means contrast_means reads
        self.register_buffer("contrast_means_scale", torch.zeros(0), persistent=False)
        # w_scan_means: the same three for whole-scan anatomy vectors
        self.register_buffer("scan_means", torch.zeros(0), persistent=False)
        self.register_buffer("scan_seen", torch.zeros(0, dtype=torch.bool), persistent=False)
        self.register_buffer("scan_means_scale", torch.zeros(0), persistent=False)
        # adversary_fit=refit: the last crops' mean anatomy vectors and contrasts (-1 unknown), and the critic last
        # fitted on them (standardisation, weights, the contrasts it knows and their frequencies, its accuracy)
        self.register_buffer("critic_x", torch.zeros(0), persistent=False)
        self.register_buffer("critic_y", torch.zeros(0, dtype=torch.long), persistent=False)
        # adversary_fit=scans: the banked scans' own shapes
        self.register_buffer("critic_shape", torch.zeros(0, 3, dtype=torch.long), persistent=False)
        for name in ("critic_mean", "critic_scale", "critic_weight", "critic_bias", "critic_prior"):
            self.register_buffer(name, torch.zeros(0), persistent=False)
        self.register_buffer("critic_classes", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("critic_accuracy", torch.tensor(float("nan")), persistent=False)
        self.critic_calls = 0  # training calls that wrote to the critic's ring buffer
        self.critic_written = 0  # rows written into the critic's ring buffer (critic_x, critic_y)

    def running_state(self) -> dict[str, Any]:
        """What the objective has estimated so far and a resumed run needs: its running buffers (anatomy and
        contrast statistics, the critic's bank and its last fit) and the critic's counters; tensors and ints only, so
        a checkpoint holding it loads with ``weights_only``."""
        buffers = {k: v.detach().clone() for k, v in self._buffers.items() if k in self._non_persistent_buffers_set}
        return {"buffers": buffers, "critic_calls": self.critic_calls, "critic_written": self.critic_written}

    def load_running_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`running_state`'s output, each buffer on the device its current value is on; unknown
        names are refused (a checkpoint of another objective)."""
        unknown = sorted(set(state["buffers"]) - self._non_persistent_buffers_set)
        if unknown:
            raise ConfigError(f"the checkpoint's objective state has buffers this objective lacks: {unknown}")
        for k, v in state["buffers"].items():
            setattr(self, k, v.to(getattr(self, k).device))
        self.critic_calls = int(state["critic_calls"])
        self.critic_written = int(state["critic_written"])

    def reconstruction(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Per-sample reconstruction loss ``(B,)``; ``mask`` (True = hidden) selects voxels for masked_mse."""
        if self.cfg.rec_loss == "masked_mse" and mask is not None:
            m = mask.float()
            return ((pred - target) ** 2 * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1.0)
        if self.cfg.rec_loss == "masked_mse":
            return ((pred - target) ** 2).flatten(1).mean(1)
        return F.smooth_l1_loss(pred, target, beta=self.cfg.smooth_l1_beta, reduction="none").flatten(1).mean(1)

    def swap_terms(self, model: nn.Module, zs_a, zs_b, zc_a, zc_b, x_a, x_b):
        """Cross-contrast swap: anatomy (``mean(zs_a, zs_b)``, or ``zs_a`` / ``zs_b`` alone with
        ``swap_anatomy="other"``) with ``zc_b`` -> ``x_b``, and with ``zc_a`` -> ``x_a``.

        Returns:
            per-sample losses ``(swap_ab, swap_ba)`` and the two predictions.
        """
        if self.cfg.swap_anatomy == "mean":
            zs_ab = zs_ba = 0.5 * (zs_a + zs_b)
        else:
            zs_ab, zs_ba = zs_a, zs_b
        pred = model.decode(torch.cat([zs_ab, zs_ba]), torch.cat([zc_b, zc_a]))
        pred_ab, pred_ba = pred.chunk(2)
        return (
            self.reconstruction(pred_ab, x_b, None),
            self.reconstruction(pred_ba, x_a, None),
            pred_ab,
            pred_ba,
        )

    def align_term(
        self,
        mus_a: torch.Tensor,
        mus_b: torch.Tensor,
        valid: torch.Tensor,
        logits: torch.Tensor | None = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """The agreement of a pair's anatomy latents (``cfg.align``); ``align="classes"`` reads a categorical
        code's ``logits`` (the first ``2 * len(mus_a)`` rows: a's, then b's) and softmax ``temperature``."""
        cfg = self.cfg
        if cfg.align == "classes":
            if logits is None:
                raise ConfigError(
                    "objective.align=classes needs a categorical anatomy code (model.kwargs.anatomy_code=categorical)"
                )
            bsz = len(mus_a)
            logp = F.log_softmax(logits[: 2 * bsz].float() / temperature, dim=1)  # mu_s's log, computed stably
            return _wmean(class_agreement(logp[:bsz], logp[bsz:]), valid)
        if cfg.align == "dense_nce":
            keep = valid.bool()
            if not keep.any():
                return mus_a.sum() * 0.0
            return dense_nce(mus_a[keep], mus_b[keep], cfg.align_temperature).mean()
        if cfg.align == "mse":
            var = torch.cat([mus_a, mus_b]).detach().transpose(0, 1).flatten(1).var(1)  # (C,) over crops, positions
            scale = _floored(self._running("anatomy_var", var)).view(1, -1, *([1] * (mus_a.dim() - 2)))
            return _wmean(((mus_a - mus_b) ** 2 / scale).flatten(1).mean(1), valid)
        if cfg.align == "centred":
            batch_mean = torch.cat([mus_a, mus_b]).mean(0).detach()
            centre = self._running("anatomy_mean", batch_mean).view_as(batch_mean)
            return _wmean(1.0 - cosine(mus_a - centre, mus_b - centre), valid)
        return _wmean(1.0 - cosine(mus_a, mus_b), valid)

    def align_mean_term(self, mus_a: torch.Tensor, mus_b: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Squared difference of the crop means of a's and b's anatomy latents, per channel over the running
        variance of crop means (see module docstring): ``()``."""
        m_a, m_b = mus_a.flatten(2).mean(2), mus_b.flatten(2).mean(2)  # (B, C)
        self._running("anatomy_mean_var", torch.cat([m_a, m_b]).detach().var(0))
        if self.anatomy_mean_var.numel() != m_a.shape[1]:
            return mus_a.sum() * 0.0
        return _wmean(((m_a - m_b) ** 2 / _floored(self.anatomy_mean_var)).mean(1), valid)

    def _running(self, name: str, value: torch.Tensor, momentum: float = 0.01, global_: bool = False) -> torch.Tensor:
        """The buffer ``name`` as a running mean of ``value`` (under DDP, of the ranks' average of it, unless
        ``global_`` says it is already the global batch's): set by the first value (or one of another size), then
        moved by ``momentum`` at each training call; returned."""
        buf = getattr(self, name)
        if self.training and not global_:  # every rank is in a training step: the ranks can meet (never outside one)
            value = _rank_mean(value)
        if buf.numel() != value.numel():
            setattr(self, name, value.clone())
        elif self.training:
            buf.mul_(1 - momentum).add_(momentum * value)
        return getattr(self, name)

    def contrast_means_term(self, mus: torch.Tensor, ids: torch.Tensor, momentum: float = 0.02) -> torch.Tensor:
        """Spread of the per-contrast running means of crop-mean anatomy vectors ``mus`` ``(N, C, *grid)``
        (contrast ``ids`` ``(N,)``, -1 unknown) around their mean, in the metric of the crop means' running
        variance per channel (averaged over channels) or running covariance (``contrast_means_metric``); the
        contrasts of this batch carry the gradient (see module docstring): ``()``."""
        return self._means_spread(mus.flatten(2).mean(2), ids, "contrast", momentum)

    def scan_means_term(
        self, model: nn.Module, scans: torch.Tensor, ids: torch.Tensor, patch: int, shapes: torch.Tensor | None
    ) -> torch.Tensor:
        """``w_scan_means`` (see module docstring): :meth:`contrast_means_term` on whole scans ``(B, 1, *canvas)`` of
        contrasts ``ids`` ``(B,)``, each read as the analysis reads it (:func:`scan_vectors`, tiled by its own
        ``shapes``), with the gradient through every window, and with running estimates of its own. A batch holds one
        whole scan per pair, so each contrast's running mean moves by 0.05 (not 0.02) when the contrast is seen."""
        return self._means_spread(scan_vectors(model, scans, patch, shapes), ids, "scan", 0.05)

    def _means_spread(self, m: torch.Tensor, ids: torch.Tensor, kind: str, momentum: float) -> torch.Tensor:
        """The spread term of vectors ``m`` ``(N, C)``, on the running buffers ``{kind}_means``, ``{kind}_seen`` and
        ``{kind}_means_scale`` (contrast: crops, scan: whole scans)."""
        means_name, seen_name, scale_name = f"{kind}_means", f"{kind}_seen", f"{kind}_means_scale"
        k, c = len(CONTRASTS), m.shape[1]
        whitened = self.cfg.contrast_means_metric == "whitened"
        onehot = F.one_hot(ids.clamp_min(0), k).to(m.dtype) * (ids >= 0).to(m.dtype)[:, None]  # (N, K)
        count = onehot.sum(0)  # (K,)
        here = count > 0
        batch_mean = (onehot.T @ m) / count.clamp_min(1.0)[:, None]  # (K, C)
        ranks = _world_size() if self.training else 1  # the ranks meet only in a training step, which all run
        if ranks == 1:  # the running estimates move by this batch's statistics
            all_here, all_mean = here, batch_mean.detach()
            if len(m) > 1:
                self._running(scale_name, torch.cov(m.detach().T).reshape(c, c) if whitened else m.detach().var(0))
        else:  # by the global batch's: every rank holds the same estimates (see module docstring)
            all_here, all_mean, spread = _global_batch_stats(m.detach(), onehot, whitened)
            if len(m) * ranks > 1:
                self._running(scale_name, spread, global_=True)
        if getattr(self, means_name).shape != (k, c):
            setattr(self, means_name, m.new_zeros(k, c))
            setattr(self, seen_name, torch.zeros(k, dtype=torch.bool, device=m.device))
        with torch.no_grad():
            if self.training:
                old, was_seen = getattr(self, means_name), getattr(self, seen_name)
                blend = torch.where(was_seen[:, None], (1 - momentum) * old + momentum * all_mean, all_mean)
                setattr(self, means_name, torch.where(all_here[:, None], blend, old))
                setattr(self, seen_name, was_seen | all_here)
        scale = getattr(self, scale_name)
        if scale.numel() != (c * c if whitened else c):
            return m.sum() * 0.0
        # the running means, with the gradient of this batch's means where a contrast is present; their
        # spread over the contrasts seen so far (0 while fewer than two were), without a host sync
        means = getattr(self, means_name) + torch.where(here[:, None], batch_mean - batch_mean.detach(), 0.0)
        seen = getattr(self, seen_name).to(m.dtype)[:, None]  # (K, 1)
        n_seen = seen.sum().clamp_min(1.0)
        d = (means - (means * seen).sum(0, keepdim=True) / n_seen) * seen  # (K, C)
        if whitened:  # sum_k d_k^T S^-1 d_k in float64, S ridge-regularised (crop means can be singular)
            cov = scale.view(c, c).double()
            ridge = self.cfg.contrast_means_ridge * cov.diagonal().mean() + 1e-12
            cov = cov + ridge * torch.eye(c, dtype=cov.dtype, device=cov.device)
            return ((d.double() * torch.linalg.solve(cov, d.double().T).T).sum() / n_seen).to(m.dtype)
        return (d**2 / _floored(scale, self.cfg.contrast_means_ridge)).sum() / (n_seen * c)

    def _remember(self, x: torch.Tensor, y: torch.Tensor, size: int, shapes: torch.Tensor | None = None) -> bool:
        """Write ``x`` ``(N, ...)`` (detached), its contrasts ``y`` ``(N,)`` and, for whole scans, each scan's own
        shape ``shapes`` ``(N, 3)`` into the critic's ring buffer of ``size`` rows, in place (a new buffer when the
        rows' shape or the size changes); True when the buffer is full and ``adversary_refit`` training calls have
        passed since the last fit."""
        if self.critic_x.shape[1:] != x.shape[1:] or len(self.critic_x) != size:
            self.critic_x = x.new_zeros(size, *x.shape[1:])
            self.critic_y = torch.full((size,), -1, dtype=torch.long, device=x.device)
            self.critic_shape = torch.zeros(size, 3, dtype=torch.long, device=x.device)
            self.critic_written = 0
        x, y = x.detach()[-size:], y[-size:]
        rows = (self.critic_written + torch.arange(len(x), device=x.device)) % size
        self.critic_x[rows], self.critic_y[rows] = x, y.to(self.critic_y.dtype)
        if shapes is not None:
            self.critic_shape[rows] = shapes[-size:].to(self.critic_shape)
        self.critic_written += len(x)
        self.critic_calls += 1
        return self.critic_calls % self.cfg.adversary_refit == 0 and self.critic_written >= size

    def _fit_critic(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Fit the critic on vectors ``x`` ``(N, C)`` and contrasts ``y`` ``(N,)`` (-1 unknown), as the analysis fits
        its probe; left as it was when fewer than two contrasts are known."""
        known = y >= 0
        if len(torch.unique(y[known])) < 2:
            return
        mean, scale, weight, bias, classes, accuracy = fit_linear_probe(
            x[known], y[known], floor=self.cfg.adversary_floor
        )
        counts = (y[known][:, None] == classes[None, :]).sum(0).double()
        self.critic_mean, self.critic_scale, self.critic_weight = mean, scale, weight
        self.critic_bias, self.critic_classes = bias, classes
        self.critic_prior, self.critic_accuracy = counts / counts.sum(), accuracy

    def _critic_kl(self, m: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The mean over vectors ``m`` ``(N, C)`` of a contrast the critic knows of ``KL(prior || critic(m_i))``; 0
        before the first fit."""
        if self.critic_weight.numel() == 0:
            return m.sum() * 0.0
        z = (m.double() - self.critic_mean) / self.critic_scale
        logp = F.log_softmax(z @ self.critic_weight.T + self.critic_bias, dim=1)  # (N, K)
        prior = self.critic_prior
        kl = (prior * (prior.log() - logp)).sum(1)  # (N,)
        counted = (target[:, None] == self.critic_classes[None, :]).any(1)  # a contrast the critic knows
        return _wmean(kl, counted.to(kl.dtype)).to(m.dtype)

    def refit_critic_term(self, m: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``adversary_fit="refit"`` (see module docstring): the mean over crops of known contrast of
        ``KL(prior || critic(m_i))``, for crop-mean anatomy vectors ``m`` ``(N, C)`` and contrasts ``target``
        ``(N,)`` (-1 unknown), with the critic last fitted on the buffer; 0 until the first fit. In training the
        crops join the buffer and, every ``adversary_refit`` calls once the buffer is full, a new critic is fitted."""
        if self.training and self._remember(m, target, self.cfg.adversary_buffer):
            self._fit_critic(self.critic_x, self.critic_y)
        return self._critic_kl(m, target)

    def scan_critic_term(
        self,
        model: nn.Module,
        scans: torch.Tensor,
        target: torch.Tensor,
        patch: int,
        shapes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``adversary_fit="scans"`` (see module docstring): ``KL(prior || critic(s_i))`` averaged over whole scans
        ``scans`` ``(B, 1, *canvas)`` of known contrast ``target`` ``(B,)``, ``s_i`` the scan's anatomy vector as the
        analysis reads it (:func:`scan_vectors`, each scan tiled by its own ``shapes`` ``(B, 3)``; the whole canvas
        when ``None``), with the gradient. In training the scans join a bank of the last ``adversary_scans``; every
        ``adversary_refit`` calls once it is full, the bank is encoded again by the current encoder, without a
        gradient, and a new critic is fitted on it."""
        if shapes is None:
            shapes = torch.tensor(scans.shape[2:], device=scans.device).expand(len(scans), 3)
        if self.training and self._remember(scans, target, self.cfg.adversary_scans, shapes):
            with torch.no_grad():
                bank = torch.cat(
                    [
                        scan_vectors(model, b, patch, s)
                        for b, s in zip(self.critic_x.split(8), self.critic_shape.split(8), strict=True)
                    ]
                )
            self._fit_critic(bank, self.critic_y)
        if self.critic_weight.numel() == 0:  # nothing to score yet: spare the encoding
            return scans.sum() * 0.0
        return self._critic_kl(scan_vectors(model, scans, patch, shapes), target)

    @staticmethod
    def second_view(
        n: int, bsz: int, size: tuple[int, ...], cell: int | None, flip: bool, shift: bool, device: Any
    ) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]] | None:
        """The view of a pair's second scan (rows ``bsz:2*bsz`` and ``3*bsz:`` of ``n`` stacked crops of spatial
        ``size``): ``(apply, undo)``, each a function of a ``(n, C, *grid)`` tensor that moves only those rows.
        ``apply`` mirrors along a random subset of the axes (``flip``; each with probability one half) and then
        shifts circularly by a random whole number of cells of ``cell`` voxels along each axis (``shift``; uniform
        over the ``size // cell`` grid); ``undo`` maps a tensor of any grid that divides ``size`` (the input, or a
        latent map of ``size // cell`` positions) back. Drawn on the CPU (no device sync); ``None`` when the draw
        changes nothing."""
        dims = tuple(d for d, f in zip((2, 3, 4), torch.rand(3) < 0.5, strict=True) if f) if flip else ()
        if shift:
            if not cell or any(s % cell for s in size):
                raise ConfigError(
                    f"objective.pair_shift needs crop sides that are a multiple of the model's downsampling ({cell}), "
                    f"got {tuple(size)}"
                )
            cells = [int(torch.randint(0, s // cell, ())) for s in size]
        else:
            cells = [0] * len(size)
        if not dims and not any(cells):
            return None
        rows = torch.zeros(n, dtype=torch.bool)
        rows[bsz : 2 * bsz] = True
        rows[3 * bsz :] = True
        sel = rows.to(device).view(-1, *([1] * (1 + len(size))))

        def steps(t: torch.Tensor, sign: int) -> tuple[int, ...]:  # called only when a cell moves (cell is set)
            return tuple(sign * k * t.shape[2 + i] // (size[i] // cell) for i, k in enumerate(cells))

        def apply(t: torch.Tensor) -> torch.Tensor:
            v = t.flip(dims) if dims else t
            v = v.roll(steps(t, 1), (2, 3, 4)) if any(cells) else v
            return torch.where(sel, v, t)

        def undo(t: torch.Tensor) -> torch.Tensor:
            v = t.roll(steps(t, -1), (2, 3, 4)) if any(cells) else t
            v = v.flip(dims) if dims else v
            return torch.where(sel, v, t)

        return apply, undo

    def remap_pairs(self, batch: dict[str, Any], use_ref: bool) -> dict[str, Any]:
        """``batch`` with the second scan of a random ``remap_p`` of its pairs replaced by a random intensity
        remapping of the first (:func:`random_remap`; its reference crop by the same map of the first's),
        those pairs marked valid and their second contrast unknown (-1)."""
        x_a = batch["x_a"]
        bsz = x_a.shape[0]
        take = torch.rand(bsz, device=x_a.device) < self.cfg.remap_p
        sel = take.view(-1, *([1] * (x_a.dim() - 1)))
        out = dict(batch)
        if use_ref:
            r, r_ref = random_remap(x_a, (batch["x_a_ref"],), self.cfg.remap_knots)
            out["x_b_ref"] = torch.where(sel, r_ref, batch["x_b_ref"])
        else:
            (r,) = random_remap(x_a, (), self.cfg.remap_knots)
        out["x_b"] = torch.where(sel, r, batch["x_b"])
        valid = batch.get("pair_valid", torch.ones(bsz, dtype=torch.bool, device=x_a.device)).bool()
        out["pair_valid"] = valid | take
        cb = batch.get("contrast_b", torch.full((bsz,), -1, dtype=torch.long, device=x_a.device))
        out["contrast_b"] = torch.where(take.view_as(cb), torch.full_like(cb, -1), cb)
        return out

    def forward(self, model: nn.Module, batch: dict[str, Any], progress: float = 0.0):
        """Args:
            model: a dual-latent model (``forward_features`` + ``decode``).
            batch: ``x_a``, ``x_b`` ``(B, 1, X, Y, Z)``; ``pair_valid`` ``(B,)`` bool; with
                ``swap_contrast="reference"`` also ``x_a_ref``, ``x_b_ref`` (the same scans, another crop).
            progress: training progress in epochs (drives the KL warm-up).

        Returns:
            (total loss, dict of detached terms, dict of tensors for figures)
        """
        cfg = self.cfg
        use_ref = cfg.w_swap > 0 and cfg.swap_contrast == "reference"
        if cfg.remap_p > 0 and self.training:
            batch = self.remap_pairs(batch, use_ref)
        x_a, x_b = batch["x_a"], batch["x_b"]
        valid = batch.get("pair_valid", torch.ones(x_a.shape[0], dtype=torch.bool, device=x_a.device)).float()
        bsz = x_a.shape[0]
        scans = [x_a, x_b] + ([batch["x_a_ref"], batch["x_b_ref"]] if use_ref else [])
        x = torch.cat(scans)
        masks = block_mask(len(x), tuple(x_a.shape[2:]), cfg.block, cfg.mask_ratio, device=x_a.device)
        inputs = x.masked_fill(masks, 0.0)
        view = None
        if (cfg.pair_flip or cfg.pair_shift) and self.training:
            cell = getattr(model, "downsampling", None)
            view = self.second_view(len(x), bsz, tuple(x.shape[2:]), cell, cfg.pair_flip, cfg.pair_shift, x.device)
        if view is not None:
            inputs = view[0](inputs)
        lat = model.forward_features(inputs).latents
        if view is not None:  # every spatial latent map back in the pair's own frame
            lat = {k: view[1](v) if v.dim() == inputs.dim() else v for k, v in lat.items()}
        mu_s, mu_c, lv_c = lat["mu_s"], lat["mu_c"], lat["logvar_c"]
        categorical = "logits_s" in lat  # a categorical anatomy code: no Gaussian posterior, no KL
        z_s, z_c = mu_s, mu_c
        if cfg.variational and self.training:
            if categorical:
                tau = float(getattr(model, "anatomy_temperature", 1.0))
                hard = bool(getattr(model, "hard_anatomy", False))  # anatomy_code=onehot: one-hot samples
                z_s = F.gumbel_softmax(lat["logits_s"], tau=tau, hard=hard, dim=1)
            else:
                z_s = mu_s + torch.randn_like(mu_s) * (0.5 * lat["logvar_s"]).exp()
            if cfg.contrast_variational:
                z_c = mu_c + torch.randn_like(mu_c) * (0.5 * lv_c).exp()
        pair = slice(0, 2 * bsz)  # the reference crops only lend their contrast codes
        zs_rec = z_s[pair]
        if cfg.rec_anatomy == "random":  # each scan rebuilt from its own or its partner's anatomy, at random
            take = (torch.rand(2 * bsz, device=x.device) < 0.5) & torch.cat([valid, valid]).bool()
            partner = torch.cat([z_s[bsz : 2 * bsz], z_s[:bsz]])
            zs_rec = torch.where(take[:, None, None, None, None], partner, zs_rec)
        rec = model.decode(zs_rec, z_c[pair])
        rec_all = self.reconstruction(rec, x[pair], masks[pair])
        terms: dict[str, torch.Tensor] = {}
        terms["rec"] = _wmean(rec_all[:bsz], torch.ones_like(valid)) + _wmean(rec_all[bsz:], valid)
        total = cfg.w_rec * terms["rec"]
        out = {"input": x_a, "masked": x_a.masked_fill(masks[:bsz], 0.0), "reconstruction": rec[:bsz]}
        zs_a, zs_b = z_s[:bsz], z_s[bsz : 2 * bsz]
        zc_a, zc_b = z_c[:bsz], z_c[bsz : 2 * bsz]
        if cfg.w_swap > 0:
            if use_ref:
                zc_a, zc_b = z_c[2 * bsz : 3 * bsz], z_c[3 * bsz :]
            s_ab, s_ba, pred_ab, _ = self.swap_terms(model, zs_a, zs_b, zc_a, zc_b, x_a, x_b)
            terms["swap"] = _wmean(s_ab, valid) + _wmean(s_ba, valid)
            total = total + cfg.w_swap * terms["swap"]
            out.update(swap=pred_ab, target_b=x_b)
        if cfg.w_kl > 0 and cfg.variational:
            w = torch.cat([torch.ones_like(valid), valid] + ([valid, valid] if use_ref else []))
            kl = (
                torch.zeros(len(x), device=x.device)
                if categorical
                else kl_divergence(mu_s, lat["logvar_s"], cfg.kl_reduction)
            )
            if cfg.contrast_variational:
                kl = kl + kl_divergence(mu_c, lv_c, cfg.kl_reduction)
            terms["kl"] = _wmean(kl, w)
            weight = cfg.w_kl * min(1.0, progress / cfg.kl_warmup_epochs) if cfg.kl_warmup_epochs > 0 else cfg.w_kl
            terms["kl_weight"] = torch.tensor(weight)
            total = total + weight * terms["kl"]
        mus_a, mus_b = mu_s[:bsz], mu_s[bsz : 2 * bsz]
        muc_a, muc_b = mu_c[:bsz], mu_c[bsz : 2 * bsz]
        if cfg.w_align > 0:
            tau = float(getattr(model, "anatomy_temperature", 1.0))
            terms["align"] = self.align_term(mus_a, mus_b, valid, lat.get("logits_s"), tau)
            total = total + cfg.w_align * terms["align"]
        if cfg.w_align_mean > 0:
            terms["align_mean"] = self.align_mean_term(mus_a, mus_b, valid)
            total = total + cfg.w_align_mean * terms["align_mean"]
        contrast_terms = (
            cfg.w_contrast_means > 0 or cfg.w_adversary > 0 or cfg.w_contrast_id > 0 or cfg.w_contrast_nce > 0
        )
        clean = None
        if (contrast_terms and cfg.contrast_input == "clean") or cfg.w_health > 0:
            clean = model.forward_features(x)  # what a downstream model sees: the scans unmasked
        if contrast_terms and cfg.contrast_input == "clean":
            mu_s, mu_c = clean.latents["mu_s"], clean.latents["mu_c"]
        if cfg.w_health > 0:
            ids = torch.cat([batch["contrast_a"].view(-1), batch["contrast_b"].view(-1)])
            terms["health"] = self.health_term(model, clean, 2 * bsz, batch["health"].view(-1), ids)
            total = total + cfg.w_health * terms["health"]
        if cfg.w_contrast_means > 0:
            ids_b = torch.where(
                valid.bool(), batch["contrast_b"].view(-1), torch.full_like(batch["contrast_b"].view(-1), -1)
            )
            ids = torch.cat([batch["contrast_a"].view(-1), ids_b]).long()
            terms["contrast_means"] = self.contrast_means_term(mu_s[: 2 * bsz], ids)
            total = total + cfg.w_contrast_means * terms["contrast_means"]
        if cfg.w_scan_means > 0:
            terms["scan_means"] = self.scan_means_term(
                model,
                batch["scan_a"],
                batch["contrast_a"].view(-1).long(),
                int(x_a.shape[-1]),
                batch.get("scan_shape_a"),
            )
            total = total + cfg.w_scan_means * terms["scan_means"]
        if cfg.w_repel > 0:
            terms["repel"] = _wmean(cosine(muc_a, muc_b), valid)
            total = total + cfg.w_repel * terms["repel"]
        if cfg.w_contrast_nce > 0:  # use_ref holds (the config requires the reference crops)
            terms["contrast_nce"] = contrast_nce(mu_c, valid, cfg.contrast_nce_temperature)
            total = total + cfg.w_contrast_nce * terms["contrast_nce"]
        if cfg.w_anatomy_usage > 0:
            if not categorical:
                raise ConfigError(
                    "objective.w_anatomy_usage needs a categorical anatomy code (model.kwargs.anatomy_code=categorical)"
                )
            terms["anatomy_usage"] = class_usage(lat["mu_s"])  # the masked encodings of every crop
            total = total + cfg.w_anatomy_usage * terms["anatomy_usage"]
        if cfg.w_anatomy > 0:
            terms["anatomy"] = self.anatomy_term(model, mus_a, mus_b, batch, valid)
            total = total + cfg.w_anatomy * terms["anatomy"]
        if cfg.w_adversary > 0 or cfg.w_contrast_id > 0:
            total = total + self.contrast_terms(model, mu_s, mu_c, batch, bsz, use_ref, terms)
        return total, {k: v.detach() for k, v in terms.items()}, out

    @staticmethod
    def health_term(
        model: nn.Module, clean: Any, n: int, target: torch.Tensor, ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Cross-entropy of the health classifier on a pair's two clean encodings (``clean``'s first ``n`` rows: the
        first scans, then the second; ``ids`` their contrasts), read as the model's head reads them
        (``health_logits``); unknown labels (-1) are left out."""
        if getattr(model, "health_head", None) is None:
            raise ConfigError("objective.w_health needs the model's health head (model.kwargs.health_classes=2)")
        return known_ce(model.health_logits(clean, n, ids), target.long())

    @staticmethod
    def anatomy_term(model: nn.Module, mus_a, mus_b, batch: dict[str, Any], valid: torch.Tensor) -> torch.Tensor:
        """1 - cos(projection, v) for each scan of a pair: both contrasts must give the subject's volumes."""
        if getattr(model, "anatomy_projector", None) is None:
            raise ConfigError("objective.w_anatomy needs a model built with anatomy_outputs > 0")
        v, has = batch["volumes"], batch["has_volumes"].float()
        loss = mus_a.new_zeros(())
        for mu, w in ((mus_a, has), (mus_b, has * valid)):
            proj = model.anatomy_projector(mu)
            cos = F.cosine_similarity(proj, v.to(proj.dtype), dim=1, eps=1e-6)
            loss = loss + ((1.0 - cos) * w).sum() / w.sum().clamp_min(1.0)
        return loss

    def contrast_terms(self, model, mu_s, mu_c, batch, bsz: int, use_ref: bool, terms: dict) -> torch.Tensor:
        """The anatomy adversary and the contrast classifier on every encoded scan (see module docstring)."""
        cfg = self.cfg
        if cfg.online_heads and getattr(model, "adversary", None) is None:
            raise ConfigError("objective.w_adversary / w_contrast_id need a model built with contrast_classes > 0")
        ids = [batch["contrast_a"], batch["contrast_b"]]
        target = torch.cat(ids + (ids if use_ref else [])).long().view(-1)  # -1: a contrast outside CONTRASTS
        total = mu_s.sum() * 0.0
        if cfg.w_adversary > 0 and cfg.adversary_fit != "online":
            if cfg.adversary_fit == "scans":
                patch = int(batch["x_a"].shape[-1])
                terms["adversary"] = self.scan_critic_term(
                    model, batch["scan_a"], batch["contrast_a"].view(-1), patch, batch.get("scan_shape_a")
                )
            else:
                terms["adversary"] = self.refit_critic_term(mu_s.flatten(2).mean(2), target)
            terms["critic_accuracy"] = self.critic_accuracy.clone()
            total = total + cfg.w_adversary * terms["adversary"]
        elif cfg.w_adversary > 0:
            read = mu_s  # (N, C, *grid); "mean": each crop's mean vector (a categorical code's class shares)
            if cfg.adversary_pool == "mean":
                read = mu_s.mean(dim=tuple(range(2, mu_s.dim())), keepdim=True)
            logits = model.adversary(reverse_gradient(read))  # (N, classes, *grid)
            per_position = target.view(-1, *([1] * (read.dim() - 2))).expand(-1, *read.shape[2:])
            terms["adversary"] = known_ce(logits, per_position)
            total = total + cfg.w_adversary * terms["adversary"]
        if cfg.w_contrast_id > 0:
            terms["contrast_id"] = known_ce(model.contrast_classifier(mu_c.mean(dim=(2, 3, 4))), target)
            total = total + cfg.w_contrast_id * terms["contrast_id"]
        return total
