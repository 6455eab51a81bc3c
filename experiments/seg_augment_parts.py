"""Which part of nnU-Net's augmentation sends the demo's pretrained segmentation arm to the empty-prediction plateau?

With ``--augment nnunet`` two of ten pretrained runs of the demo's segmentation rows (seeds 1 and 4, 4 labelled
subjects) ended at Dice 0 (``experiments/results_seg_augment.json``). This trains the pretrained arm of those seeds
(and seed 0, which did not collapse) with the spatial half only (rotation and scaling) and the intensity half only
(noise, blur, brightness, contrast, low resolution, gamma), the demo's other settings unchanged, plus the whole
pipeline on seed 1 as a control. The data-loader runs in this process (``num_workers=0``: a sample's draws are its
own, so the items are the ones a worker would make), where the pipeline's parameters are swapped in.

    python experiments/seg_augment_parts.py --data DEMO/store --out DIR

Writes ``DIR/results.json`` (Dice per variant and seed) with the command.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import neurofm.data.finetune as finetune_data
from neurofm.data.augment import NnUNetAugment
from neurofm.demo import DemoConfig, finetune_config
from neurofm.tasks.finetune import finetune
from neurofm.utils import write_json

SPATIAL = NnUNetAugment(noise_p=0, blur_p=0, brightness_p=0, contrast_p=0, lowres_p=0, gamma_inverted_p=0, gamma_p=0)
INTENSITY = NnUNetAugment(rotate_p=0, scale_p=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="the demo's store")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--pretrained", default=DemoConfig().pretrained)
    args = ap.parse_args()
    base = finetune_config(DemoConfig(), args.pretrained, "seg", "lesion")
    dice: dict[str, float] = {}
    for variant, params, seeds in [("whole", NnUNetAugment(), [1]), ("spatial", SPATIAL, [1, 4, 0]),
                                   ("intensity", INTENSITY, [1, 4, 0])]:  # fmt: skip
        finetune_data.NnUNetAugment = lambda p=params: p  # type: ignore[misc]
        for seed in seeds:
            cfg = replace(
                base, source=args.pretrained, mode="full", seed=seed, augment="nnunet", num_workers=0, bootstrap=50
            )
            summary = finetune(args.data, args.out / f"{variant}-seed{seed}", cfg, progress=False)
            value = summary["metrics"]["dice"]
            dice[f"{variant}-seed{seed}"] = value["value"] if isinstance(value, dict) else value
            print(variant, seed, round(dice[f"{variant}-seed{seed}"], 3), flush=True)
    write_json(args.out / "results.json", {"command": " ".join(["python", *sys.argv]), "dice": dice})


if __name__ == "__main__":
    main()
