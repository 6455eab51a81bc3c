"""Does the CPU thread count change a fine-tuning result? The demo's scratch arm, trained again on chosen seeds.

The scratch arm of the demo's segmentation rows (``neurofm.demo.finetune_config``, the architecture of
``--pretrained``) on the given seeds and labelled subjects, in this process's thread count; run it under
``OMP_NUM_THREADS=1`` and ``=2`` with two ``--out`` folders and compare the Dice with an earlier study's.

    OMP_NUM_THREADS=1 python experiments/thread_check.py --data DEMO/store --out DIR1 --shots 2 --seeds 0 1 2
    OMP_NUM_THREADS=2 python experiments/thread_check.py --data DEMO/store --out DIR2 --shots 2 --seeds 4

Prints one line per seed (threads, seconds, Dice) and writes ``DIR/thread_check.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from neurofm.analyze import experiments
from neurofm.demo import DemoConfig, finetune_config
from neurofm.utils import write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrained", default="fomo25-tiny-cnce", help="the model whose architecture scratch takes")
    ap.add_argument("--data", type=Path, required=True, help="the demo's store")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shots", type=int, default=2, help="labelled subjects")
    ap.add_argument("--seeds", type=int, nargs="+", default=[4])
    args = ap.parse_args()
    demo = DemoConfig(pretrained=args.pretrained, tasks=[("seg", "lesion")])
    demo.shots = {**demo.shots, "seg": args.shots}
    base = replace(finetune_config(demo, args.pretrained, "seg", "lesion"), source="scratch", mode="full")
    rows = []
    for seed in args.seeds:
        folder = args.out / f"seg-lesion-scratch-seed{seed}"
        start = time.time()
        experiments.arm_rows(args.data, folder, replace(base, seed=seed, bootstrap=50), redo_stale=True)
        dice = json.loads((folder / "summary.json").read_text())["metrics"]["dice"]["value"]
        rows.append({"seed": seed, "threads": torch.get_num_threads(), "seconds": time.time() - start, "dice": dice})
        print(f"seed {seed}: threads {rows[-1]['threads']}, {rows[-1]['seconds']:.0f} s, Dice {dice:.4f}", flush=True)
    write_json(args.out / "thread_check.json", {"command": " ".join(["python", *sys.argv]), "rows": rows})


if __name__ == "__main__":
    main()
