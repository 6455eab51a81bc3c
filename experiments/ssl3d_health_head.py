"""The ssl3d pretext's own health classifier, read zero-shot on a store (an exploration).

``ssl3d``'s health head is trained on the pretraining pool's labels. Before asking whether its features carry health
to a few-shot probe, ask whether the head itself tells a patient from a healthy subject on sessions it never saw.
Per session, the head's probability of "patient" (class 1 of the pretext) averaged over the session's contrasts, read
two ways: on the whole scan (padded to a multiple of the encoder's downsampling), and on ``--crops`` random crops of
``--patch``³ per contrast (what it was trained on, unmasked). AUROC against the store's ``healthy`` label (a patient
scoring higher is above 0.5).

    python experiments/ssl3d_health_head.py --run SSL3D/checkpoints/step-0003000 --store STORE [--sessions 80]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from health_normative import padded
from sklearn.metrics import roc_auc_score

from neurofm.data.finetune import build_cases
from neurofm.models.registry import model_from_checkpoint
from neurofm.store import Store


@torch.no_grad()
def patient_probability(model: torch.nn.Module, x: torch.Tensor) -> float:
    return torch.softmax(model.forward_pretext(x, reconstruct=False)["health"], 1)[0, 1].item()


def parse(doc: str, run_help: str, **more: dict) -> argparse.Namespace:
    """The options of a pretext head's zero-shot reading (``more``: further options, name -> add_argument's kwargs)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help=run_help)
    ap.add_argument("--store", type=Path, required=True)
    for name, kwargs in more.items():
        ap.add_argument(f"--{name}", **kwargs)
    ap.add_argument("--sessions", type=int, default=80, help="the store's first N labelled sessions")
    ap.add_argument("--crops", type=int, default=4)
    ap.add_argument("--patch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    return ap.parse_args()


def main() -> None:
    args = parse(__doc__, "an ssl3d run's checkpoint (its pretext heads are kept)")
    model = model_from_checkpoint(args.run)[0].eval()
    if getattr(model, "health_head", None) is None:
        raise SystemExit(f"{args.run} has no health head (an ssl3d run with objective.w_health > 0 has one)")
    stride = 2 ** (len(model.config["features"]) - 1)
    store, rng = Store(args.store), np.random.default_rng(args.seed)
    cases = build_cases(store, "cls", "healthy", None).cases[: args.sessions]
    patient, whole, crops = [], [], []
    for c in cases:
        w, p = [], []
        for k in store.record(c.key)["images"]:
            v = np.asarray(store.read(c.key, k), np.float32)
            w.append(patient_probability(model, padded(v, stride)[0]))
            if min(v.shape) < args.patch:
                continue
            for _ in range(args.crops):
                i, j, l = (int(rng.integers(0, n - args.patch + 1)) for n in v.shape)
                crop = np.ascontiguousarray(v[i : i + args.patch, j : j + args.patch, l : l + args.patch])
                p.append(patient_probability(model, torch.from_numpy(crop)[None, None]))
        patient.append(1 - c.target)  # the store's label: 1 is healthy
        whole.append(float(np.mean(w)))
        crops.append(float(np.mean(p)) if p else float("nan"))
    y = np.array(patient)
    ok = ~np.isnan(crops)
    row = {
        "sessions": len(y),
        "patients": int(y.sum()),
        "auroc_whole_scan": float(roc_auc_score(y, whole)),
        "auroc_crops": float(roc_auc_score(y[ok], np.asarray(crops)[ok])),
    }
    report(row, args, Path(__file__).name, f"--sessions {args.sessions}")


def report(row: dict, args: argparse.Namespace, script: str, options: str) -> None:
    """Print ``row``; with ``args.out``, write it beside the command that made it (placeholder paths): ``script``
    (experiments/'s file name), ``options``, then the crops, patch and seed."""
    print(json.dumps(row))
    if args.out:
        command = (
            f"python experiments/{script} --run RUN --store STORE {options} "
            f"--crops {args.crops} --patch {args.patch} --seed {args.seed}"
        )
        args.out.write_text(json.dumps({"command": command, **row}, indent=2))


if __name__ == "__main__":
    main()
