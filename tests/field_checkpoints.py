"""Checkpoints laid out as the field's trainers write them, built from their code as read:

* nnssl (MIC-DKFZ/nnssl): ``src/nnssl/training/nnsslTrainer/AbstractTrainer.py::save_checkpoint`` (the
  dict below), ``src/nnssl/adaptation_planning/adaptation_plan.py`` (``AdaptationPlan.serialize``:
  ``architecture_plans`` / ``pretrain_plan`` / ``pretrain_num_input_channels`` /
  ``recommended_downstream_patchsize`` / ``key_to_encoder`` / ``key_to_stem``, and the later
  ``keys_to_in_proj`` / ``key_to_lpe`` that nnU-Net's pretrained fine-tuning reads),
  ``src/nnssl/experiment_planning/experiment_planners/plan.py`` (``Plan`` / ``ConfigurationPlan``,
  whose ``spacing`` / ``patch_size`` are numpy arrays);
* nnU-Net v2 (MIC-DKFZ/nnUNet): ``nnUNetTrainer.save_checkpoint`` (the same first seven entries,
  ``init_args`` = plans / configuration / fold / dataset_json / device, and
  ``inference_allowed_mirroring_axes``), ``nnUNetLogger`` (lists of numpy floats: ``np.mean`` of
  the losses, pseudo-Dice, its EMA), ``nnUNetResEncUNetLPlans.json`` (``architecture`` with
  ``network_class_name`` and ``arch_kwargs`` whose classes are dotted names).

Each keeps what makes loading hard: numpy scalars, dtypes and arrays, ``torch.device``, optimiser
and grad-scaler state, EMA fields, tuples.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn


def _optimizer_state(net: nn.Module) -> dict[str, Any]:
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    for p in net.parameters():  # SGD's state after a step: one momentum buffer per parameter
        opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    return opt.state_dict()


def _grad_scaler_state() -> dict[str, Any]:
    return {
        "scale": 65536.0,
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": 2000,
        "_growth_tracker": 7,
    }


def _logging(epochs: int = 3) -> dict[str, list[Any]]:
    rng = np.random.default_rng(0)
    return {
        "mean_fg_dice": [np.float64(x) for x in rng.random(epochs)],
        "ema_fg_dice": [np.float64(x) for x in rng.random(epochs)],
        "dice_per_class_or_region": [[np.float64(x) for x in rng.random(2)] for _ in range(epochs)],
        "train_losses": [np.float32(x) for x in -rng.random(epochs)],
        "val_losses": [np.float32(x) for x in -rng.random(epochs)],
        "lrs": [float(x) for x in rng.random(epochs)],
        "epoch_start_timestamps": [1.7e9 + i for i in range(epochs)],
        "epoch_end_timestamps": [1.7e9 + i + 0.5 for i in range(epochs)],
    }


def _configuration_plan(patch: list[int], spacing: list[float]) -> dict[str, Any]:
    return {
        "data_identifier": "nnsslPlans_onemmiso",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "batch_dice": False,
        "patch_size": np.array(patch),
        "median_image_size_in_voxels": np.array([182, 218, 182]),
        "spacing": np.array(spacing, dtype=np.float64),
        "normalization_schemes": ["ZScoreNormalization"],
        "use_mask_for_norm": [False],
        "UNet_class_name": "ResidualEncoderUNet",
        "UNet_base_num_features": 32,
        "n_conv_per_stage_encoder": (1, 3, 4, 6, 6, 6),
        "n_conv_per_stage_decoder": (1, 1, 1, 1, 1),
        "num_pool_per_axis": [5, 5, 5],
        "pool_op_kernel_sizes": [[1, 1, 1]] + [[2, 2, 2]] * 5,
        "conv_kernel_sizes": [[3, 3, 3]] * 6,
        "unet_max_num_features": 320,
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_mask": "resample_data_or_seg_to_shape",
        "resampling_fn_mask_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
    }


#: what nnssl's adaptation plans say about each architecture's keys
PRIMUS_KEYS = {
    "key_to_stem": "down_projection",
    "key_to_encoder": "eva",
    "keys_to_in_proj": ["down_projection.proj"],
    "key_to_lpe": "eva.pos_embed",
}
RESENC_KEYS = {
    "key_to_stem": "encoder.stem",
    "key_to_encoder": "encoder.stages",
    "keys_to_in_proj": ["encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"],
    "key_to_lpe": None,
}


def nnssl_checkpoint(
    net: nn.Module,
    arch_class_name: str,
    arch_kwargs: dict[str, Any] | None,
    *,
    patch: list[int],
    spacing: list[float],
    key_to_stem: str,
    key_to_encoder: str,
    keys_to_in_proj: list[str],
    key_to_lpe: str | None,
    trainer: str = "BaseMAETrainer",
) -> dict[str, Any]:
    """What nnssl's ``save_checkpoint`` writes for ``net``."""
    plan = {
        "dataset_name": "Dataset745_OpenMind",
        "plans_name": "nnsslPlans",
        "original_median_spacing_after_transp": np.array([1.0, 1.0, 1.0]),
        "original_median_shape_after_transp": np.array([182, 218, 182]),
        "image_reader_writer": "NibabelReaderWriter",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {"onemmiso": _configuration_plan(patch, spacing)},
        "experiment_planner_used": "ExperimentPlanner",
    }
    return {
        "network_weights": net.state_dict(),
        "optimizer_state": _optimizer_state(net),
        "grad_scaler_state": _grad_scaler_state(),
        "logging": _logging(),
        "_best_ema": None,
        "current_epoch": 1000,
        "init_args": {
            "plan": plan,
            "configuration_name": "onemmiso",
            "fold": 0,
            "pretrain_json": {"collection_name": "OpenMind", "datasets": {}},
            "device": torch.device("cuda"),
        },
        "trainer_name": trainer,
        "nnssl_adaptation_plan": {
            "architecture_plans": {
                "arch_class_name": arch_class_name,
                "arch_kwargs": arch_kwargs,
                "arch_kwargs_requiring_import": ["conv_op", "norm_op", "dropout_op", "nonlin"] if arch_kwargs else None,
            },
            "pretrain_plan": plan,
            "pretrain_num_input_channels": 1,
            "recommended_downstream_patchsize": (160, 160, 160),
            "key_to_encoder": key_to_encoder,
            "key_to_stem": key_to_stem,
            "keys_to_in_proj": keys_to_in_proj,
            "key_to_lpe": key_to_lpe,
        },
    }


def resenc_arch_kwargs(features: list[int], blocks: list[int]) -> dict[str, Any]:
    """``architecture.arch_kwargs`` of nnU-Net's ResEnc plans (classes as dotted names)."""
    n = len(features)
    return {
        "n_stages": n,
        "features_per_stage": list(features),
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3]] * n,
        "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
        "n_blocks_per_stage": list(blocks),
        "n_conv_per_stage_decoder": [1] * (n - 1),
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }


def nnunet_checkpoint(
    net: nn.Module,
    features: list[int],
    blocks: list[int],
    *,
    spacing: list[float],
    patch: list[int],
    channels: dict[str, str],
    labels: dict[str, int],
) -> dict[str, Any]:
    """What nnU-Net v2's ``nnUNetTrainer.save_checkpoint`` writes for a ResEnc network."""
    plans = {
        "dataset_name": "Dataset220_BraTS",
        "plans_name": "nnUNetResEncUNetLPlans",
        "original_median_spacing_after_transp": spacing,
        "original_median_shape_after_transp": [140, 171, 137],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": patch,
                "median_image_size_in_voxels": [140, 171, 137],
                "spacing": spacing,
                "normalization_schemes": ["ZScoreNormalization"] * len(channels),
                "use_mask_for_norm": [True] * len(channels),
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "architecture": {
                    "network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
                    "arch_kwargs": resenc_arch_kwargs(features, blocks),
                    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
                },
                "batch_dice": False,
            },
            "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"},
        },
        "experiment_planner_used": "nnUNetPlannerResEncL",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            c: {"max": 4000.0, "mean": 800.5, "median": 790.0, "min": 0.0, "std": 210.3} for c in channels
        },
    }
    return {
        "network_weights": net.state_dict(),
        "optimizer_state": _optimizer_state(net),
        "grad_scaler_state": _grad_scaler_state(),
        "logging": _logging(),
        "_best_ema": np.float64(0.8123),
        "current_epoch": 1000,
        "init_args": {
            "plans": plans,
            "configuration": "3d_fullres",
            "fold": 0,
            "dataset_json": {"channel_names": channels, "labels": labels, "numTraining": 484, "file_ending": ".nii.gz"},
            "unpack_dataset": True,
            "device": torch.device("cuda"),
        },
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }
