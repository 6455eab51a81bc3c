"""Does a fine-tuned regression fit its own training crops? (issue 11's age row: is scratch's limit fitting or
generalising?)

Reads a finished ``neurofm finetune --task reg`` run, draws ``--crops`` training crops of its own training
subjects (the training loader's crops and flips, another seed), and compares the model's predictions on them with
the targets: Pearson r, and the predictions' SD over the training targets' (both standardised as the model learns
them). Beside it, the run's test-set MAE and r from its ``summary.json`` and the SD of its test predictions and
targets (years) from its ``predictions.csv``. A model that learns a constant has
r near 0 and a small SD on its own training crops; one that fits them but not the test set is limited by how few
subjects it learns from.

    python experiments/scratch_fit.py RUN [RUN ...] --data STORE --out results.json
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from neurofm.data.finetune import FinetuneDataset, build_cases
from neurofm.models.registry import model_from_checkpoint
from neurofm.store import Store
from neurofm.utils import write_json


@torch.no_grad()
def training_fit(run: Path, data: str, crops: int, seed: int) -> dict:
    model, info = model_from_checkpoint(run)
    model.eval()
    rc, task = info["run"], info["run"]["task_info"]
    if task["task"] != "reg":
        raise SystemExit(f"{run}: a {task['task']} run; this reads regression runs")
    store = Store(data)
    cs = build_cases(store, "reg", task["target"], rc["data"]["contrasts"])
    train_subjects = set(rc["split"]["train_subjects"])
    train = [c for c in cs.cases if c.subject in train_subjects]
    ds = FinetuneDataset(data, cs, train, int(rc["data"]["patch"]), length=crops, seed=seed)
    batches = list(DataLoader(ds, batch_size=8))
    p = torch.cat([model(b["x"], b["present"])[:, 0] for b in batches]).numpy()
    y = (torch.cat([b["y"] for b in batches]).double().numpy() - task["target_mean"]) / task["target_std"]
    summary = json.loads((run / "summary.json").read_text())["metrics"]
    with open(run / "predictions.csv", newline="") as f:
        test = [(float(r["prediction"]), float(r["target"])) for r in csv.DictReader(f)]
    tp, ty = np.array(test).T
    return {
        "run": run.name,
        "steps": rc["steps"],
        "lr": rc["lr"],
        "train_subjects": len(train_subjects),
        "training_crops": crops,
        "training_r": float(np.corrcoef(p, y)[0, 1]),
        "training_prediction_sd_over_target_sd": float(p.std() / y.std()),
        "test_mae": summary["mae"]["value"],
        "test_r": summary["pearson_r"]["value"],
        "test_prediction_sd": float(tp.std()),
        "test_target_sd": float(ty.std()),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--crops", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    rows = [training_fit(r, args.data, args.crops, args.seed) for r in args.runs]
    for r in rows:
        print(json.dumps(r))
    write_json(args.out, {"command": "python experiments/scratch_fit.py " + " ".join(sys.argv[1:]), "runs": rows})


if __name__ == "__main__":
    main()
