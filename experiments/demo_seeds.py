"""The demo's fine-tuning rows for chosen tasks, over more seeds than the demo runs.

The same arms and settings as ``neurofm demo`` (``neurofm.demo.finetune_config``: the pretrained model
read as the demo reads it, scratch, a frozen random encoder and the constant predictor), paired on the
same few-shot draws, seeds 0 .. N-1. Pointed at a demo's ``finetune`` folder, it reuses the demo's finished
runs (their settings are compared first) and adds the missing seeds.

    python experiments/demo_seeds.py --data DEMO/store --out DEMO/finetune --tasks reg --seeds 10
    python experiments/demo_seeds.py --pretrained fomo25-tiny-cmeans --data STORE --out DIR --tasks cls --seeds 10

Writes ``DIR/results-<tasks>-<seeds>.json``: one row per task and arm (value, interval, paired difference
from scratch, per-seed values) and the command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from neurofm.analyze.experiments import paired_study, standard_arms
from neurofm.demo import DemoConfig, finetune_config
from neurofm.utils import to_jsonable, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrained", default=DemoConfig().pretrained, help="a shipped model or a run folder")
    ap.add_argument("--data", type=Path, required=True, help="the demo's store (or another labelled store)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tasks", nargs="+", default=["seg", "cls", "reg"], choices=["seg", "cls", "reg"])
    ap.add_argument("--seeds", type=int, default=10)
    args = ap.parse_args()
    demo = DemoConfig(pretrained=args.pretrained)
    rows = []
    for task, target in demo.tasks:
        if task not in args.tasks:
            continue
        arms = standard_arms(args.pretrained, task, demo.modes.get(task, ["full"]), demo.floors)
        cfg = finetune_config(demo, args.pretrained, task, target)
        rows += paired_study(args.data, args.out, cfg, arms, args.seeds, f"{task}-{target}", redo_stale=True)
    for r in rows:
        line = f"{r['task']} {r['init']:<18} {r['value']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
        if "difference" in r:  # every arm but the reference
            line += f"  minus scratch {r['difference']:+.3f} [{r['difference_low']:+.3f}, {r['difference_high']:+.3f}]"
        print(line)
    name = f"results-{'-'.join(args.tasks)}-{args.seeds}.json"
    write_json(args.out / name, {"command": " ".join(["python", *sys.argv]), "rows": to_jsonable(rows)})


if __name__ == "__main__":
    main()
