"""What nnssl and nnU-Net v2 checkpoints say about themselves, and nnssl's adaptation plan written back.

Layouts, as their trainers save them (``torch.save`` of a dict):

* **nnssl** (``AbstractTrainer.save_checkpoint``): ``network_weights``, ``optimizer_state``,
  ``grad_scaler_state``, ``logging``, ``_best_ema``, ``current_epoch``, ``init_args`` (the
  trainer's constructor arguments: plan, configuration, fold, pretrain JSON, ``torch.device``),
  ``trainer_name`` and ``nnssl_adaptation_plan`` (``AdaptationPlan.serialize()``): the
  architecture (``architecture_plans.arch_class_name`` / ``arch_kwargs``), the pretraining plan
  (its configuration's ``spacing``, ``patch_size``, ``normalization_schemes``), the input
  channels, ``recommended_downstream_patchsize`` and which state-dict keys are the stem, the
  encoder, the input projection and the learned position embedding (``key_to_stem``,
  ``key_to_encoder``, ``keys_to_in_proj``, ``key_to_lpe``). Older nnssl releases wrote a flat
  plan (``architecture_name``, ``num_input_channels``, ``input_patch_size``,
  ``state_dict_key_to_encoder`` / ``_stem``); both are read.
* **nnU-Net v2** (``nnUNetTrainer.save_checkpoint``): the same first seven entries, with
  ``init_args`` = ``plans`` (the plans JSON: per configuration ``spacing``, ``patch_size``,
  ``normalization_schemes``, ``architecture.network_class_name`` / ``arch_kwargs``),
  ``configuration``, ``fold``, ``dataset_json`` (``channel_names``, ``labels``), ``device``;
  and ``inference_allowed_mirroring_axes``.

The logs of both hold numpy scalars (``np.mean`` of the losses, the EMA pseudo-Dice), which
:func:`neurofm.io.checkpoint.safe_load` reads without running code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from neurofm.errors import CheckpointError

#: nnssl's / nnU-Net's normalisation schemes -> neurofm's ``normalize`` (None: no equivalent)
NORMALIZATION = {
    "ZScoreNormalization": "zscore",
    "NoNormalization": "none",
    "RescaleTo01Normalization": "minmax",
    "CTNormalization": None,
}


def plain(v: Any) -> Any:
    """numpy values and tuples -> JSON-able Python values, recursively."""
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, np.ndarray):
        return plain(v.tolist())
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)  # torch.device and the like: recorded by name


@dataclass
class SourcePlan:
    """What a source checkpoint says beyond its weights (all optional; JSON-able)."""

    tool: str = "none"  # nnssl | nnunet | none
    trainer: str | None = None
    epoch: int | None = None
    architecture: str | None = None
    arch_kwargs: dict[str, Any] | None = None
    in_channels: int | None = None
    spacing: list[float] | None = None
    patch: list[int] | None = None  # the pretraining / training patch
    recommended_patch: list[int] | None = None
    normalization: list[str] = field(default_factory=list)
    keys: dict[str, Any] = field(default_factory=dict)  # key_to_stem, key_to_encoder, keys_to_in_proj, key_to_lpe
    channel_names: dict[str, str] | None = None
    labels: dict[str, Any] | None = None
    mirroring_axes: list[int] | None = None

    def record(self) -> dict[str, Any]:
        return plain(asdict(self))

    @property
    def normalize(self) -> str | None:
        """neurofm's name of the source's normalisation (None where it has none or no equivalent)."""
        schemes = set(self.normalization)
        if len(schemes) != 1:
            return None
        return NORMALIZATION.get(schemes.pop())

    @property
    def iso_spacing(self) -> float | list[float] | None:
        """The spacing as neurofm records it: one number when isotropic."""
        if not self.spacing:
            return None
        return float(self.spacing[0]) if len(set(self.spacing)) == 1 else [float(s) for s in self.spacing]


def _first_configuration(plan: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    confs = plan.get("configurations") or {}
    if not isinstance(confs, dict) or not confs:
        return {}
    conf = dict(confs.get(name) or next(iter(confs.values())))
    parent = conf.get("inherits_from")  # nnU-Net: 3d_cascade_fullres inherits from 3d_fullres
    if parent and parent in confs:
        conf = {**confs[parent], **conf}
    return conf


def read_source_plan(obj: Any) -> SourcePlan:
    """The :class:`SourcePlan` of a loaded checkpoint (an empty one for a bare state dict)."""
    if not isinstance(obj, dict):
        return SourcePlan()
    out = SourcePlan(trainer=obj.get("trainer_name"), epoch=plain(obj.get("current_epoch")))
    ap = obj.get("nnssl_adaptation_plan")
    init = obj.get("init_args") if isinstance(obj.get("init_args"), dict) else {}
    if isinstance(ap, dict):
        out.tool = "nnssl"
        arch = ap.get("architecture_plans") or {}
        out.architecture = arch.get("arch_class_name") or ap.get("architecture_name")
        out.arch_kwargs = plain(arch.get("arch_kwargs")) or None
        out.in_channels = plain(ap.get("pretrain_num_input_channels", ap.get("num_input_channels")))
        conf = _first_configuration(plain(ap.get("pretrain_plan") or {}))
        out.patch = plain(conf.get("patch_size") or ap.get("input_patch_size")) or None
        out.recommended_patch = plain(ap.get("recommended_downstream_patchsize")) or out.patch
        out.spacing = plain(conf.get("spacing")) or None
        out.normalization = plain(conf.get("normalization_schemes") or [])
        out.keys = {
            "key_to_stem": ap.get("key_to_stem", ap.get("state_dict_key_to_stem")),
            "key_to_encoder": ap.get("key_to_encoder", ap.get("state_dict_key_to_encoder")),
            "keys_to_in_proj": plain(ap.get("keys_to_in_proj")),
            "key_to_lpe": ap.get("key_to_lpe"),
        }
    elif isinstance(init.get("plans"), dict):
        out.tool = "nnunet"
        conf = _first_configuration(plain(init["plans"]), init.get("configuration"))
        arch = conf.get("architecture") or {}
        name = arch.get("network_class_name") or conf.get("UNet_class_name")
        out.architecture = name.rsplit(".", 1)[-1] if name else None
        out.arch_kwargs = arch.get("arch_kwargs")
        out.patch = conf.get("patch_size")
        out.recommended_patch = out.patch
        out.spacing = conf.get("spacing")
        out.normalization = conf.get("normalization_schemes") or []
        ds = plain(init.get("dataset_json") or {})
        out.channel_names = ds.get("channel_names") or ds.get("modality")
        out.labels = ds.get("labels")
        out.in_channels = len(out.channel_names) if out.channel_names else None
        axes = obj.get("inference_allowed_mirroring_axes")
        out.mirroring_axes = plain(axes) if axes is not None else None
    return out


def check_resenc_plan(plan: SourcePlan, kwargs: dict[str, Any]) -> None:
    """Refuse a ResEnc plan whose layout neurofm's ResEnc cannot rebuild (kernels, strides, decoder convs)."""
    kw = plan.arch_kwargs or {}
    if not kw:
        return
    n = len(kwargs["features"])

    def each(v: Any) -> list[Any]:
        return v if isinstance(v, list) else [v] * n

    kernels, strides = each(kw.get("kernel_sizes", 3)), each(kw.get("strides", 2))
    iso = lambda v, want: all(x == want for x in (v if isinstance(v, list) else [v]))  # noqa: E731
    if not all(iso(k, 3) for k in kernels):
        raise CheckpointError(f"the source uses kernel sizes {kernels}; neurofm's ResEnc has 3x3x3 kernels only")
    if not iso(strides[0], 1) or not all(iso(s, 2) for s in strides[1:]):
        raise CheckpointError(f"the source uses strides {strides}; neurofm's ResEnc downsamples by 2 on every axis")
    dec = kw.get("n_conv_per_stage_decoder", 1)
    if any(d != 1 for d in (dec if isinstance(dec, list) else [dec])):
        raise CheckpointError(f"the source's decoder has {dec} convolutions per stage; neurofm's ResEnc has 1")
    feats = kw.get("features_per_stage")
    if feats is not None and list(feats) != list(kwargs["features"]):
        raise CheckpointError(f"the plan says {feats} filters per stage, the weights {kwargs['features']}")


# ----------------------------------------------------------------------------- writing
def _pretrain_plan(patch: int, spacing: float | list[float], normalize: str) -> dict[str, Any]:
    sp = [float(spacing)] * 3 if not isinstance(spacing, list) else [float(s) for s in spacing]
    scheme = {v: k for k, v in NORMALIZATION.items() if v}.get(normalize, "ZScoreNormalization")
    return {
        "dataset_name": "neurofm",
        "plans_name": "neurofmPlans",
        "original_median_spacing_after_transp": sp,
        "original_median_shape_after_transp": [patch] * 3,
        "image_reader_writer": "NibabelReaderWriter",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "neurofm",
        "configurations": {
            "neurofm": {
                "data_identifier": "neurofm",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "batch_dice": False,
                "patch_size": [patch] * 3,
                "median_image_size_in_voxels": [patch] * 3,
                "spacing": sp,
                "normalization_schemes": [scheme],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                "resampling_fn_mask": "resample_data_or_seg_to_shape",
                "resampling_fn_mask_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            }
        },
    }


def resenc_adaptation_plan(kwargs: dict[str, Any], patch: int, spacing: Any, normalize: str) -> dict[str, Any]:
    """nnssl's adaptation plan of a ResEnc U-Net with neurofm's layout (isotropic 3^3 kernels, stride 2)."""
    n = len(kwargs["features"])
    return {
        "architecture_plans": {
            "arch_class_name": "ResidualEncoderUNet",
            "arch_kwargs": {
                "n_stages": n,
                "features_per_stage": list(kwargs["features"]),
                "conv_op": "torch.nn.modules.conv.Conv3d",
                "kernel_sizes": [[3, 3, 3]] * n,
                "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
                "n_blocks_per_stage": list(kwargs["blocks"]),
                "n_conv_per_stage_decoder": [1] * (n - 1),
                "conv_bias": True,
                "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                "dropout_op": None,
                "dropout_op_kwargs": None,
                "nonlin": "torch.nn.modules.activation.LeakyReLU",
                "nonlin_kwargs": {"inplace": True},
            },
            "arch_kwargs_requiring_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
        "pretrain_plan": _pretrain_plan(patch, spacing, normalize),
        "pretrain_num_input_channels": int(kwargs.get("in_channels", 1)),
        "recommended_downstream_patchsize": [patch] * 3,
        "key_to_encoder": "encoder.stages",
        "key_to_stem": "encoder.stem",
        "keys_to_in_proj": ["encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"],
        "key_to_lpe": None,
    }


def primus_adaptation_plan(
    arch_name: str, arch_kwargs: dict[str, Any] | None, in_channels: int, patch: int, spacing: Any, normalize: str
) -> dict[str, Any]:
    """nnssl's adaptation plan of a Primus (``arch_name`` PrimusS/B/M/L, or Primus with ``arch_kwargs``)."""
    return {
        "architecture_plans": {
            "arch_class_name": arch_name,
            "arch_kwargs": arch_kwargs,
            "arch_kwargs_requiring_import": [] if arch_kwargs else None,
        },
        "pretrain_plan": _pretrain_plan(patch, spacing, normalize),
        "pretrain_num_input_channels": int(in_channels),
        "recommended_downstream_patchsize": [patch] * 3,
        "key_to_encoder": "eva",
        "key_to_stem": "down_projection",
        "keys_to_in_proj": ["down_projection.proj"],
        "key_to_lpe": "eva.pos_embed",
    }
