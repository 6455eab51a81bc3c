"""How well can the contrast of a scan be told at all on these data? A supervised ceiling for the probe.

Issue 11 asks that a linear probe read the contrast from fomo25's contrast latent at >= 95 %. Every run so far
stops at 0.65-0.86, most errors T1c taken for T1w or back. This script asks whether the data allow 95 %: the
fomo25-tiny encoder, trained from scratch *with the contrast as its label* (a classification fine-tune as
neurofm builds it: ``DownstreamModel`` ``cls``, full), read the way ``neurofm analyze`` reads a scan (every
window of the patch size over the whole scan, logits averaged), cross-validated by subject on the same
evaluation set (GroupKFold, the probe's folds). If this supervised model stays below 95 %, the probe's goal
is out of reach of any self-supervised latent at this resolution and budget; if it clears it, the gap is the
objective's.

    OMP_NUM_THREADS=2 python experiments/contrast_ceiling.py --data EVAL_STORE --out FILE.json --steps 600

Writes the per-fold and pooled accuracy, the confusion matrix, the T1c/T1w pair's accuracy and the command.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from neurofm.analyze.latent import most_confused
from neurofm.data.sampling import window_slices
from neurofm.models.downstream import DownstreamModel
from neurofm.preprocess.transforms import pad_to
from neurofm.store import Store
from neurofm.utils import to_jsonable, write_json

BACKBONE = {"name": "dual_latent_unet", "kwargs": {"features": [8, 16, 32, 64], "latent": 32}}


def load_scans(store: Store, patch: int) -> tuple[list[np.ndarray], list[str], list[str]]:
    vols, contrasts, subjects = [], [], []
    for key in store.keys:
        rec = store.record(key)
        for name in rec["images"]:
            v = np.asarray(store.read(key, name), np.float32)
            vols.append(pad_to(v, patch, float(v.min())))
            contrasts.append(name)
            subjects.append(rec["subject"])
    return vols, contrasts, subjects


def crops(vols: list[np.ndarray], idx: np.ndarray, patch: int, rng: np.random.Generator) -> torch.Tensor:
    out = []
    for i in idx:
        v = vols[i]
        o = [int(rng.integers(0, s - patch + 1)) for s in v.shape]
        c = v[o[0] : o[0] + patch, o[1] : o[1] + patch, o[2] : o[2] + patch]
        for ax in range(3):  # left-right and the other flips: the contrast does not depend on them
            if rng.random() < 0.5:
                c = np.flip(c, ax)
        out.append(np.ascontiguousarray(c))
    return torch.from_numpy(np.stack(out))[:, None]


@torch.no_grad()
def scan_logits(model: DownstreamModel, v: np.ndarray, patch: int) -> torch.Tensor:
    x = torch.from_numpy(v)[None, None]
    logits = [model(x[(slice(None), slice(None), *w)]) for w in window_slices(tuple(x.shape[2:]), patch, 0.0)]
    return torch.cat(logits).mean(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--patch", type=int, default=32)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--max-folds", type=int, default=None, help="train only the first N folds (time)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from sklearn.model_selection import GroupKFold

    torch.manual_seed(args.seed)
    vols, contrasts, subjects = load_scans(Store(args.data), args.patch)
    classes = sorted(set(contrasts))
    y = np.array([classes.index(c) for c in contrasts])
    groups = np.array(subjects)
    pred = np.full(len(y), -1)
    folds = []
    splits = list(GroupKFold(n_splits=args.folds).split(y, y, groups))[: args.max_folds]
    for k, (train, test) in enumerate(splits):
        t0 = time.time()
        rng = np.random.default_rng(args.seed + k)
        model = DownstreamModel(BACKBONE, "cls", len(classes), ["scan"], "full")
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
        with torch.no_grad():  # the fused features' standardisation, from training crops (as finetune does)
            every = torch.ones(args.batch, 1, dtype=torch.bool)
            model.fit_feature_norm(
                [(crops(vols, rng.choice(train, args.batch), args.patch, rng), every) for _ in range(8)]
            )
        model.train()
        losses = []
        for _step in range(args.steps):
            idx = rng.choice(train, args.batch)
            loss = F.cross_entropy(model(crops(vols, idx, args.patch, rng)), torch.from_numpy(y[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        model.eval()
        for i in test:
            pred[i] = int(scan_logits(model, vols[i], args.patch).argmax())
        acc = float((pred[test] == y[test]).mean())
        folds.append(
            {
                "fold": k,
                "accuracy": acc,
                "test_scans": int(len(test)),
                "loss_first_50": float(np.mean(losses[:50])),
                "loss_last_50": float(np.mean(losses[-50:])),
                "minutes": (time.time() - t0) / 60,
            }
        )
        print(folds[-1], flush=True)
    done = pred >= 0
    confusion = np.zeros((len(classes), len(classes)), int)
    np.add.at(confusion, (y[done], pred[done]), 1)
    pair = [classes.index("T1c"), classes.index("T1w")] if {"T1c", "T1w"} <= set(classes) else []
    in_pair = done & np.isin(y, pair)
    result = {
        "question": "the contrast of a scan, read by the fomo25-tiny encoder trained with the contrast as its label "
        "(cross-validated by subject, every window of the scan): the ceiling of the analysis' contrast probe",
        "command": " ".join(["python", *sys.argv]),
        "classes": classes,
        "accuracy": float((pred[done] == y[done]).mean()),
        "chance": float(np.bincount(y[done]).max() / done.sum()),
        "scans": int(done.sum()),
        "confusion": confusion.tolist(),
        "most_confused": most_confused(classes, confusion),
        "t1c_t1w_accuracy": float((pred[in_pair] == y[in_pair]).mean()) if pair else None,
        "folds": folds,
    }
    write_json(args.out, to_jsonable(result))
    print({k: v for k, v in result.items() if k not in ("folds", "confusion")})


if __name__ == "__main__":
    main()
