"""Named recipes (``neurofm pretrain --preset NAME``), each also in a ``-tiny`` size.

A preset is data, not a subclass: a function returning a :class:`RunConfig`. The tiny
sizes keep the recipe (objective, optimiser, schedule shape) and shrink the model,
patch and budget so that they train on a 2-core CPU in minutes.
"""

from __future__ import annotations

from collections.abc import Callable

from neurofm.errors import ConfigError
from neurofm.models.resenc import RESENC_L
from neurofm.objectives.fomo25 import Fomo25Config
from neurofm.objectives.lamim import LaMIMConfig
from neurofm.objectives.masking import holes_for_fraction
from neurofm.objectives.ssl3d import SSL3DConfig
from neurofm.train.config import DataConfig, ModelSpec, OptimConfig, RunConfig, TrainerConfig

LAMIM_CONTRASTS = ["T1w", "T1c", "T2w", "FLAIR"]


def _tiny_trainer() -> TrainerConfig:
    return TrainerConfig(checkpoint_every=10, log_every=1)


def _fomo25(tiny: bool, plain_mae: bool = False) -> RunConfig:
    obj = Fomo25Config()
    if plain_mae:  # the ablation: same backbone and reconstruction, no anatomy/contrast terms
        obj = Fomo25Config(w_swap=0.0, w_kl=0.0, w_align=0.0, w_repel=0.0, variational=False)
    name = ("mae" if plain_mae else "fomo25") + ("-tiny" if tiny else "")
    if tiny:
        obj.kl_warmup_epochs = 2.0
        return RunConfig(
            preset=name,
            model=ModelSpec("dual_latent_unet", {"features": [8, 16, 32, 64], "latent": 32}),
            objective=obj,
            data=DataConfig(mode="pair", patch=32, batch_size=2, num_workers=0, steps_per_epoch=10, affine_p=0.0),
            optim=OptimConfig(name="adamw", lr=2e-3, warmup_epochs=1, epochs=4),
            trainer=_tiny_trainer(),
        )
    return RunConfig(
        preset=name,
        model=ModelSpec("dual_latent_unet", {}),
        objective=obj,
        data=DataConfig(mode="pair", patch=128, batch_size=2, steps_per_epoch=250),
        optim=OptimConfig(name="adamw", lr=1e-4, weight_decay=0.01, warmup_epochs=5, epochs=100, grad_clip=1.0),
    )


def _ssl3d(tiny: bool, plain_mae: bool = False) -> RunConfig:
    obj = SSL3DConfig(w_anatomy=0.0, w_health=0.0) if plain_mae else SSL3DConfig()
    name = ("mae-resencl" if plain_mae else "ssl3d") + ("-tiny" if tiny else "")
    optim = OptimConfig(
        name="sgd",
        lr=1e-2,
        weight_decay=3e-5,
        momentum=0.99,
        nesterov=True,
        schedule="poly",
        warmup_epochs=0,
        grad_clip=12.0,
        epochs=1000,
    )
    if tiny:
        obj.block = 8
        optim.lr, optim.epochs, optim.momentum = 1e-2, 4, 0.9
        return RunConfig(
            preset=name,
            model=ModelSpec("resenc_unet", {"features": [8, 16, 32, 64], "blocks": [1, 1, 2, 2]}),
            objective=obj,
            data=DataConfig(mode="scan", patch=32, batch_size=2, num_workers=0, steps_per_epoch=10, affine_p=0.0),
            optim=optim,
            trainer=_tiny_trainer(),
        )
    return RunConfig(
        preset=name,
        model=ModelSpec("resenc_unet", {"features": list(RESENC_L["features"]), "blocks": list(RESENC_L["blocks"])}),
        objective=obj,
        data=DataConfig(mode="scan", patch=160, batch_size=2, steps_per_epoch=250),
        optim=optim,
    )


def _lamim(hole: int, tiny: bool) -> RunConfig:
    name = f"lamim{hole}" + ("-tiny" if tiny else "")
    if tiny:
        h = 8 if hole == 16 else 4
        return RunConfig(
            preset=name,
            model=ModelSpec("vit_autoenc", {"size": "tiny", "img_size": 32, "patch_size": 4}),
            objective=LaMIMConfig(hole=h, holes=holes_for_fraction((32, 32, 32), h)),
            data=DataConfig(
                mode="stack",
                patch=32,
                batch_size=2,
                num_workers=0,
                steps_per_epoch=10,
                contrasts=LAMIM_CONTRASTS,
                intensity="minmax",
                affine_p=0.0,
            ),
            optim=OptimConfig(name="adam", lr=1e-3, weight_decay=0.0, schedule="constant", epochs=4, grad_clip=0.0),
            trainer=_tiny_trainer(),
        )
    return RunConfig(
        preset=name,
        model=ModelSpec("vit_autoenc", {"size": "paper", "img_size": 96, "patch_size": 16}),
        objective=LaMIMConfig(hole=hole, holes=86 if hole == 16 else 6000),
        data=DataConfig(
            mode="stack",
            patch=96,
            batch_size=7,
            steps_per_epoch=250,
            contrasts=LAMIM_CONTRASTS,
            intensity="minmax",
        ),
        optim=OptimConfig(name="adam", lr=1e-4, weight_decay=0.0, schedule="constant", epochs=300, grad_clip=0.0),
    )


PRESETS: dict[str, Callable[[], RunConfig]] = {}
for _tiny in (False, True):
    _sfx = "-tiny" if _tiny else ""
    PRESETS[f"fomo25{_sfx}"] = lambda t=_tiny: _fomo25(t)
    PRESETS[f"mae{_sfx}"] = lambda t=_tiny: _fomo25(t, plain_mae=True)
    PRESETS[f"ssl3d{_sfx}"] = lambda t=_tiny: _ssl3d(t)
    PRESETS[f"mae-resencl{_sfx}"] = lambda t=_tiny: _ssl3d(t, plain_mae=True)
    PRESETS[f"lamim16{_sfx}"] = lambda t=_tiny: _lamim(16, t)
    PRESETS[f"lamim4{_sfx}"] = lambda t=_tiny: _lamim(4, t)

PRESET_HELP = {
    "fomo25": "dual-latent U-Net, cross-contrast swap (FOMO25 winner)",
    "ssl3d": "ResEnc-L MAE with anatomy projector and health classifier (SSL3D winner)",
    "lamim16": "ViT autoencoder, per-contrast 16^3 coarse dropout (LaMIM)",
    "lamim4": "ViT autoencoder, per-contrast 4^3 coarse dropout (LaMIM)",
    "mae": "plain masked autoencoder on the fomo25 backbone (ablation)",
    "mae-resencl": "plain masked autoencoder on ResEnc-L (ablation)",
}


def get_preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()
