"""How the frozen features' read-out grows with pretraining: one closed-form linear probe per checkpoint.

For each checkpoint of a pretraining run (``--checkpoints``: folders ``.../checkpoints/step-NNNNNNN``;
keep them with ``trainer.keep_checkpoints``, or copy them as they appear), the demo's cls/reg protocol —
a linear probe fitted in closed form on the frozen encoder (``neurofm finetune --mode linear``) — on
the same few-shot draws for every checkpoint, next to a random encoder read the same way and the
constant predictor; differences are paired against the constant predictor.

    python experiments/probe_curve.py --checkpoints RUN/checkpoints/step-* --data STORE --out DIR [--seeds 3]

Writes ``DIR/results.json``: per task, one row per checkpoint (its step as ``x``) and floor.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from neurofm.analyze.experiments import Arm, paired_study
from neurofm.train.config import FinetuneConfig
from neurofm.utils import to_jsonable


def step_of(folder: Path) -> int:
    meta = json.loads((folder / "meta.json").read_text())
    return int(meta["step"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", type=Path, nargs="+", required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--cls-shots", type=int, default=16)
    ap.add_argument("--reg-shots", type=int, default=24)
    args = ap.parse_args()
    checkpoints = sorted(args.checkpoints, key=step_of)
    arms = [Arm(f"step {step_of(c)}", str(c), "linear") for c in checkpoints]
    arms += [Arm("random linear", "random", "linear"), Arm("constant", "constant", "")]
    base = FinetuneConfig(
        task="reg", target="age", source="scratch", arch=str(checkpoints[-1]), contrasts=["T1w", "FLAIR"],
        patch=32, num_workers=2, tta=False,
    )  # fmt: skip
    results = {}
    for task, target, shots in (("cls", "healthy", args.cls_shots), ("reg", "age", args.reg_shots)):
        cfg = replace(base, task=task, target=target, shots=shots)
        rows = paired_study(args.data, args.out, cfg, arms, args.seeds, f"{task}-{target}", reference="constant")
        for r, arm in zip(rows, arms, strict=True):
            r["x"] = step_of(Path(arm.source)) if arm.name.startswith("step") else None
        results[task] = rows
        for r in rows:
            diff = f"  minus constant {r['difference']:+.3f}" if "difference" in r else ""
            print(f"{task} {r['init']:16s} {r['metric']} {r['value']:.3f}{diff}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(to_jsonable(results), indent=1) + "\n")


if __name__ == "__main__":
    main()
