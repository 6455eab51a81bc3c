"""Which patients do the health arms tell from healthy subjects? Finished health runs' AUROC by lesion type.

The demo's health task pools three kinds of patient (tumour, infarct, white-matter hyperintensities) against
healthy subjects. For each arm (a folder pattern with ``{seed}``) and seed this reads the run's held-out
predictions, and scores P(healthy) on the healthy sessions against each kind of patient's sessions alone (the
store's ``diagnosis`` label), beside the pooled AUROC; the mean over seeds is printed. It also prints each kind's
lesion volume in the store (the session's ``volumes.lesion``), to tell a lesion too small to see from one the
read-out does not see. The runs are read as they are.

    python experiments/health_by_diagnosis.py --data DEMO_STORE --seeds 10 \\
        --arm probe=E/cls-healthy-pretrained-linear-seed{seed} --arm scratch=E/cls-healthy-scratch-seed{seed}
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
from below_constant import arm_spec
from sklearn.metrics import roc_auc_score

from neurofm.store import Store
from neurofm.utils import write_json

KINDS = ("tumour", "infarct", "wmh")


def scores(folder: Path, diagnosis: dict[str, str]) -> dict[str, float]:
    """One run's AUROC for healthy (target 1) against every patient and against each kind alone."""
    with open(folder / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    y = np.array([int(r["target"]) for r in rows])
    p = np.array([json.loads(r["prob"])[1] for r in rows])
    kind = np.array([diagnosis[r["key"]] for r in rows])
    out = {"all": float(roc_auc_score(y, p))}
    for k in KINDS:
        keep = (kind == k) | (y == 1)
        if len(set(y[keep])) == 2:
            out[k] = float(roc_auc_score(y[keep], p[keep]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="the store the runs were trained on")
    ap.add_argument("--arm", type=arm_spec, action="append", required=True, help="NAME=FOLDER pattern with {seed}")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="write the rows here as JSON")
    args = ap.parse_args()
    store = Store(args.data)
    records = [store.record(k) for k in store.keys]
    diagnosis = {r["key"]: r["labels"]["diagnosis"] for r in records}
    volumes = {}
    for k in KINDS:
        v = np.array([r["volumes"].get("lesion", 0.0) for r in records if r["labels"]["diagnosis"] == k])
        if len(v):
            volumes[k] = {"sessions": len(v), "median_mm3": float(np.median(v)), "min_mm3": float(v.min())}
            print(f"{k}: {len(v)} sessions, lesion median {np.median(v):.0f} mm3, smallest {v.min():.0f} mm3")
    rows = {}
    for name, pattern in args.arm:
        seeds = range(args.first_seed, args.first_seed + args.seeds)
        per = [scores(Path(pattern.format(seed=s)), diagnosis) for s in seeds]
        rows[name] = {k: float(np.mean([p[k] for p in per if k in p])) for k in ("all", *KINDS)}
        rows[name]["per_seed"] = per
        print(f"{name}: " + "  ".join(f"{k} {rows[name][k]:.3f}" for k in ("all", *KINDS)))
    if args.out:
        arms = " ".join(f"--arm {name}=..." for name, _ in args.arm)
        command = f"python experiments/health_by_diagnosis.py --data STORE --seeds {args.seeds} {arms}"
        write_json(args.out, {"command": command, "lesion_volumes": volumes, "rows": rows})


if __name__ == "__main__":
    main()
