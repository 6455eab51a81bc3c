"""Named recipes as data (``neurofm pretrain --preset NAME``), LitGPT-style rows.

A row gives the settings that differ from the config defaults, optionally on top of
another row (``base``). Every recipe also has a ``-tiny`` size: the same objective and
optimiser with a small model, patch and budget that train on a 2-core CPU in minutes
(the ``TINY`` row of its backbone on top of the recipe's row).

Fine-tuning has its own table (``neurofm finetune --preset NAME``).
"""

from __future__ import annotations

from typing import Any

from neurofm.config import merge

LAMIM_CONTRASTS = ["T1w", "T1c", "T2w", "FLAIR"]

_SGD_NNSSL = {  # nnssl's optimiser
    "name": "sgd",
    "lr": 1e-2,
    "weight_decay": 3e-5,
    "momentum": 0.99,
    "nesterov": True,
    "schedule": "poly",
    "warmup_epochs": 0,
    "grad_clip": 12.0,
    "epochs": 1000,
}
_ADAM_LAMIM = {"name": "adam", "lr": 1e-4, "weight_decay": 0.0, "schedule": "constant", "epochs": 300, "grad_clip": 0.0}
_FOMO25_OFF = {"w_swap": 0.0, "w_kl": 0.0, "w_align": 0.0, "w_repel": 0.0, "variational": False}

#: full-size recipes
BASE: dict[str, dict[str, Any]] = {
    "fomo25": {
        "help": "dual-latent U-Net, cross-contrast swap (FOMO25 winner)",
        "model": {"name": "dual_latent_unet", "kwargs": {}},
        "objective": {"kind": "fomo25"},
        "data": {"patch": 128, "batch_size": 2, "steps_per_epoch": 250},
        "optim": {
            "name": "adamw",
            "lr": 1e-4,
            "weight_decay": 0.01,
            "warmup_epochs": 5,
            "epochs": 100,
            "grad_clip": 1.0,
        },
    },
    "fomo25-paper": {
        "base": "fomo25",
        "help": "fomo25 in the paper's form: spatial contrast latent, plain cosine, swap from the same crop",
        "model": {"kwargs": {"contrast_code": "spatial"}},
        "objective": {"align": "cosine", "swap_anatomy": "mean", "swap_contrast": "same", "kl_reduction": "sum"},
    },
    "fomo25-cmeans": {
        "base": "fomo25",
        "help": "fomo25 as neurofm ships it (fomo25-tiny-cmeans): one contrast vector per scan scaling every "
        "decoder stage, categorical anatomy, centred agreement, swap across scans, contrast means pulled together",
        "model": {"kwargs": {"contrast_code": "global", "contrast_injection": "film", "anatomy_code": "categorical"}},
        "objective": {
            "kl_reduction": "sum",
            "align": "centred",
            "swap_anatomy": "other",
            "swap_contrast": "reference",
            "rec_anatomy": "random",
            "w_contrast_means": 100.0,
            "contrast_input": "clean",
        },
    },
    "fomo25-cmeans-health": {
        "base": "fomo25-cmeans",
        "help": "fomo25-cmeans with a health pretext: a classifier on each pair's clean encodings, trained on the "
        "pool's health labels (weak supervision by the pool's metadata, as SSL3D's health pretext)",
        "objective": {"w_health": 1.0},
    },
    "mae": {
        "base": "fomo25",
        "help": "plain masked autoencoder on the fomo25 backbone (ablation)",
        "objective": _FOMO25_OFF,
    },
    "ssl3d": {
        "help": "ResEnc-L MAE with anatomy projector and health classifier (SSL3D winner)",
        "model": {
            "name": "resenc_unet",
            "kwargs": {"features": [32, 64, 128, 256, 320, 320], "blocks": [1, 3, 4, 6, 6, 6]},
        },
        "objective": {"kind": "ssl3d"},
        "data": {"patch": 160, "batch_size": 2, "steps_per_epoch": 250},
        "optim": _SGD_NNSSL,
    },
    "mae-resencl": {
        "base": "ssl3d",
        "help": "plain masked autoencoder on ResEnc-L (ablation)",
        "objective": {"w_anatomy": 0.0, "w_health": 0.0},
    },
    "primus-mae": {
        "help": "Primus-M transformer (nnssl, OpenMind), masked autoencoder on 8^3 tokens",
        "model": {"name": "primus", "kwargs": {"size": "M", "img_size": 160, "patch_size": 8}},
        "objective": {"kind": "mae", "block": 8, "mask_ratio": 0.75},
        "data": {"patch": 160, "batch_size": 2, "steps_per_epoch": 250},
        "optim": {
            "name": "adamw",
            "lr": 3e-4,
            "weight_decay": 0.05,
            "warmup_epochs": 10,
            "epochs": 1000,
            "grad_clip": 1.0,
        },
    },
    "lamim16": {
        "help": "ViT autoencoder, per-contrast 16^3 coarse dropout (LaMIM)",
        "model": {"name": "vit_autoenc", "kwargs": {"size": "paper", "img_size": 96, "patch_size": 16}},
        "objective": {"kind": "lamim", "hole": 16, "holes": 86},  # ~40 % of a 96^3 stack, as the paper
        "data": {
            "patch": 96,
            "batch_size": 7,
            "steps_per_epoch": 250,
            "contrasts": LAMIM_CONTRASTS,
            "intensity": "minmax",
        },
        "optim": _ADAM_LAMIM,
    },
    "lamim4": {
        "base": "lamim16",
        "help": "ViT autoencoder, per-contrast 4^3 coarse dropout (LaMIM)",
        "objective": {"hole": 4, "holes": 6000},  # the paper's count
    },
}

_TINY_DATA = {"patch": 32, "batch_size": 2, "num_workers": 0, "steps_per_epoch": 10, "affine_p": 0.0}
_TINY_TRAINER = {"checkpoint_every": 10, "log_every": 1}

#: the -tiny size of each recipe: a CPU-sized model and budget, the recipe's objective and optimiser kept
TINY: dict[str, dict[str, Any]] = {
    "fomo25": {
        "model": {"kwargs": {"features": [8, 16, 32, 64], "latent": 32}},
        # KL warmed up over SPEC's 10 epochs of 100 steps (1,000 steps), not over 20 steps
        "data": {**_TINY_DATA, "steps_per_epoch": 100},
        "optim": {"lr": 2e-3, "warmup_epochs": 1, "epochs": 4},
        "trainer": _TINY_TRAINER,
    },
    "ssl3d": {
        "model": {"kwargs": {"features": [8, 16, 32, 64], "blocks": [1, 1, 2, 2]}},
        "objective": {"block": 8},
        "data": _TINY_DATA,
        "optim": {"lr": 1e-2, "epochs": 4, "momentum": 0.9},
        "trainer": _TINY_TRAINER,
    },
    "primus-mae": {
        "model": {"kwargs": {"size": "tiny", "img_size": 32}},
        "data": _TINY_DATA,
        "optim": {"lr": 1e-3, "warmup_epochs": 1, "epochs": 4},
        "trainer": _TINY_TRAINER,
    },
    "lamim16": {
        "model": {"kwargs": {"size": "tiny", "img_size": 32, "patch_size": 4}},
        "objective": {"hole": 8, "holes": None},  # holes: as many as cover 40 % of the 32^3 patch
        "data": _TINY_DATA,
        "optim": {"lr": 1e-3, "epochs": 4},
        "trainer": _TINY_TRAINER,
    },
    "lamim4": {"base": "lamim16", "objective": {"hole": 4}},
}


def _family(name: str) -> str:
    """The row of BASE without a ``base`` of its own that ``name`` builds on."""
    while BASE[name].get("base") and name not in TINY:
        name = BASE[name]["base"]
    return name


def _tiny_row(name: str) -> dict[str, Any]:
    row = TINY[_family(name)]
    return merge(_tiny_row(row["base"]), {k: v for k, v in row.items() if k != "base"}) if row.get("base") else row


PRESETS: dict[str, dict[str, Any]] = {**BASE}
for _name in BASE:
    PRESETS[f"{_name}-tiny"] = {"base": _name, **_tiny_row(_name)}

PRESET_HELP = {name: row["help"] for name, row in BASE.items()}


#: fine-tuning presets (``neurofm finetune --preset NAME``): rows over FinetuneConfig's defaults
FINETUNE_PRESETS: dict[str, dict[str, Any]] = {
    "full": {
        "help": "the whole network; a pretrained encoder held still for the first quarter of the steps, "
        "then at the head's rate",
        "mode": "full",
    },
    "frozen": {"help": "encoder frozen, head or decoder trained", "mode": "frozen"},
    "linear": {"help": "linear probe on the frozen encoder's features (cls/reg)", "mode": "linear"},
    "few-shot-seg": {
        "help": "segmentation from a handful of labelled subjects as neurofm demo runs it: full, 200 steps at "
        "lr 1e-2, lesion voxels weighted 10x in the cross-entropy, half the crops centred on foreground",
        "mode": "full",
        "steps": 200,
        "lr": 1e-2,
        "seg_fg_weight": 10.0,
        "fg_p": 0.5,
    },
}


def get_preset(name: str):
    """The :class:`~neurofm.train.config.Recipe` of a preset name."""
    from neurofm.train.config import Recipe

    return Recipe.from_name(name)
