"""The analysis' contrast probe on single crops against whole scans: does a latent that hides the contrast crop by crop
still tell it once a scan's windows are averaged?

    python experiments/crop_vs_scan_probe.py RUN [RUN ...] --data EVAL_STORE --sessions 80 [--crops 1 4 16]
        [--augment none flip intensity all]

For every scan of the first sessions: the whole-scan anatomy vector (``neurofm.analyze.embed``: windows averaged) and
the mean anatomy vector of one crop of the run's patch size at a random place inside the volume, or the mean over
``--crops`` such crops (seeded draws). The same grouped, cross-validated probe
(``neurofm.analyze.latent.contrast_probe``) reads both (rule_refit_critic.md).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from neurofm.analyze.embed import embed_store
from neurofm.analyze.latent import contrast_probe
from neurofm.models.registry import model_from_checkpoint
from neurofm.store import Store


def augmenter(run: str, kind: str, seed: int):
    """The run's own training augmentation (``neurofm.data.pretrain.Augment`` with its data settings): ``all``;
    ``flip`` its mirror flips alone; ``intensity`` its gamma and noise alone; ``none``: None."""
    if kind == "none":
        return None
    from neurofm.data.config import DataConfig
    from neurofm.data.pretrain import Augment

    _, info = model_from_checkpoint(run)
    data = {k: v for k, v in info["run"].get("data", {}).items() if k in DataConfig.__dataclass_fields__}
    cfg = DataConfig(**data)
    if kind == "flip":
        cfg.affine_p, cfg.gamma_p, cfg.noise_p = 0.0, 0.0, 0.0
    elif kind == "intensity":
        cfg.flip_p, cfg.affine_p = 0.0, 0.0
    return Augment(cfg, seed)


def random_start(shape: tuple[int, ...], patch: int, rng: np.random.Generator) -> list[int]:
    """A random corner of a ``patch^3`` crop inside ``shape`` (0 along an axis shorter than the patch)."""
    return [int(rng.integers(0, max(1, s - patch + 1))) for s in shape]


def crop_at(v: np.ndarray, start: list[int], patch: int) -> np.ndarray:
    """The ``patch^3`` crop of ``v`` at ``start``, zero-padded at the end along an axis shorter than the patch (the
    committed numbers were cut so; ``preprocess.transforms.pad_to`` pads at the centre)."""
    crop = v[tuple(slice(a, a + patch) for a in start)]
    return np.pad(crop, [(0, patch - s) for s in crop.shape])


def crop_vectors(
    run: str, store: Store, df, patch: int, seed: int, crops: int = 1, augment: str = "none"
) -> list[np.ndarray]:
    """Per scan, the mean over ``crops`` random crops of the crops' mean anatomy vectors, each crop augmented as
    ``augmenter`` says."""
    model, _ = model_from_checkpoint(run)
    model.eval()
    rng = np.random.default_rng(seed)
    aug = augmenter(run, augment, seed)
    out = []
    for key, name in zip(df["key"], df["contrast"], strict=True):
        v = np.asarray(store.read(key, name), np.float32)
        batch = []
        for _ in range(crops):
            crop = crop_at(v, random_start(v.shape, patch, rng), patch)
            if aug is not None:
                crop = aug(crop[None], None, np.ones(1, bool))[0][0]
            batch.append(crop)
        with torch.no_grad():
            f = model.forward_features(torch.from_numpy(np.stack(batch))[:, None])
        out.append(f.anatomy.mean(0).numpy())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--data", required=True)
    ap.add_argument("--sessions", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--crops", type=int, nargs="+", default=[1], help="crops averaged per scan, e.g. 1 4 16")
    ap.add_argument(
        "--augment",
        nargs="+",
        default=["none"],
        choices=["none", "flip", "intensity", "all"],
        help="crops as the run's training augmentation makes them: all of it, its flips or its gamma and noise alone",
    )
    args = ap.parse_args()
    store = Store(args.data)
    result = {}
    for run in args.runs:
        df = embed_store(run, args.data, keys=store.keys[: args.sessions])
        _, info = model_from_checkpoint(run)
        patch = int(info["run"].get("data", {}).get("patch", 32))
        scan = contrast_probe(df, "subject_latent")
        result[run] = {
            "scans": len(df),
            "chance": scan["chance"],
            "whole_scan": [scan["accuracy"], scan["accuracy_low"], scan["accuracy_high"]],
        }
        for aug in args.augment:
            for n in args.crops:
                df["crop_latent"] = crop_vectors(run, store, df, patch, args.seed, n, aug)
                crop = contrast_probe(df, "crop_latent")
                key = ("one_crop" if n == 1 else f"mean_of_{n}_crops") + ("" if aug == "none" else f"_{aug}")
                result[run][key] = [crop["accuracy"], crop["accuracy_low"], crop["accuracy_high"]]
                print(run, key, result[run][key], flush=True)
        print(run, json.dumps(result[run]))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
