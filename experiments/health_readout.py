"""Which read-out of a health-pretext encoder carries health to a new store (an exploration).

A health pretext (``fomo25-cmeans-health`` with ``health_pool``) can learn the pool's labels and its own head can read
a new store zero-shot (``fomo25_health_head.py``), while the demo's linear probe, on the crop-averaged encoder stages,
does not read it. This asks which features a few-shot linear read-out should take. Per session with T1w and FLAIR,
``--crops`` random crops (the same places for every model), each read two ways and averaged over the crops:

* ``stage_means``: each encoder stage averaged over the crop, T1w's then FLAIR's (what the demo's probe reads,
  without the latents);
* ``head_pooled``: the pretext head's own pooled vector, its 1x1x1 convolution and GELU per position then the mean,
  T1w's then FLAIR's (models with a pooled health head only).

For each seed, ``--shots`` labelled subjects (``--draws balanced``: half of each class, drawn with seed 1000 + seed;
``--draws demo``: the demo's stratified few-shot draw of that seed, as ``neurofm finetune --shots`` makes it) train a
logistic regression on standardised features
(``C`` fixed, the same for every read-out), and the other subjects' sessions are scored (AUROC). Every model and
read-out sees the same draws, so read-outs are paired by seed; the floors are the constant (0.5) and the same
architecture at fresh weights. A per-seed comparison with a t interval, not the demo's hierarchical bootstrap.

    python experiments/health_readout.py --store STORE --models f0=RUN0 f1=RUN1 [--seeds 10] [--out OUT.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from fomo25_health_head import paired_crops
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from neurofm.data.finetune import build_cases, make_splits
from neurofm.models.dual_latent import PooledHealthHead
from neurofm.models.registry import create_model, model_from_checkpoint
from neurofm.store import Store

CONTRASTS = ("T1w", "FLAIR")


@torch.no_grad()
def session_features(model: torch.nn.Module, crops: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """``crops``: ``(2, 1, P, P, P)`` each, T1w then FLAIR at one place. The read-outs, averaged over the crops."""
    out: dict[str, list[np.ndarray]] = {"stage_means": [], "head_pooled": []}
    head = getattr(model, "health_head", None)
    for pair in crops:
        feats = model.forward_features(pair)
        out["stage_means"].append(feats.pooled.reshape(-1).numpy())
        if isinstance(head, PooledHealthHead):
            out["head_pooled"].append(head.pooled(feats.maps).reshape(-1).numpy())
    return {k: np.mean(v, axis=0) for k, v in out.items() if v}


def auroc_per_seed(
    x: np.ndarray, y: np.ndarray, subjects: np.ndarray, draws: list[np.ndarray], c: float
) -> list[float]:
    out = []
    for train_subjects in draws:
        tr = np.isin(subjects, train_subjects)
        mean, std = x[tr].mean(0), x[tr].std(0) + 1e-6
        est = LogisticRegression(C=c, class_weight="balanced", max_iter=5000).fit((x[tr] - mean) / std, y[tr])
        out.append(float(roc_auc_score(y[~tr], est.predict_proba((x[~tr] - mean) / std)[:, 1])))
    return out


def paired_t(a: list[float], b: list[float]) -> list[float]:
    """The mean of ``a - b`` over seeds and its 95 % t interval."""
    d = np.asarray(a) - np.asarray(b)
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return [float(d.mean()), float(d.mean() - half), float(d.mean() + half)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--models", nargs="+", required=True, help="NAME=RUN (a checkpoint folder or run)")
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--crops", type=int, default=4)
    ap.add_argument("--patch", type=int, default=32)
    ap.add_argument("--c", type=float, default=0.1, help="logistic regression's inverse penalty")
    ap.add_argument("--draws", choices=["balanced", "demo"], default="balanced", help="how the labelled are drawn")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    store, rng = Store(args.store), np.random.default_rng(0)
    cases = [c for c in build_cases(store, "cls", "healthy", None).cases if set(CONTRASTS) <= set(c.contrasts)]
    crops_of = []
    for c in cases:
        a, b = (np.asarray(store.read(c.key, k), np.float32) for k in CONTRASTS)
        crops_of.append(paired_crops(a, b, args.crops, args.patch, rng))
    y = np.array([1 - int(c.target) for c in cases])  # 1: patient (the store's label: 1 is healthy)
    subjects = np.array([c.subject for c in cases])
    by_class = {k: sorted({s for s, t in zip(subjects, y, strict=True) if t == k}) for k in (0, 1)}
    draws = []
    demo_cases = build_cases(store, "cls", "healthy", list(CONTRASTS)) if args.draws == "demo" else None
    for seed in range(args.seeds):
        if demo_cases is not None:  # the subjects the demo's health arm labels at this seed
            train = make_splits(demo_cases, seed=seed, shots=args.shots)[0][0]
            draws.append(np.array(sorted({c.subject for c in train})))
            continue
        r = np.random.default_rng(1000 + seed)
        n1 = args.shots // 2
        draws.append(
            np.concatenate(
                [r.choice(by_class[1], n1, replace=False), r.choice(by_class[0], args.shots - n1, replace=False)]
            )
        )
    rows: dict[str, list[float]] = {}
    fresh = None
    for spec in args.models:
        name, run = spec.split("=", 1)
        model, info = model_from_checkpoint(run)
        todo = [(name, model.eval())]
        if fresh is None and isinstance(getattr(model, "health_head", None), PooledHealthHead):
            torch.manual_seed(0)  # one fresh encoder and head, of the first model with a pooled health head
            fresh = create_model(info["model"]["name"], **info["model"]["kwargs"]).eval()
            todo.append(("fresh weights", fresh))
        for label, m in todo:
            feats = [session_features(m, crops) for crops in crops_of]
            for readout in feats[0]:
                x = np.stack([f[readout] for f in feats])
                rows[f"{label}: {readout}"] = auroc_per_seed(x, y, subjects, draws, args.c)
    result = {"sessions": len(y), "patients": int(y.sum()), "shots": args.shots, "draws": args.draws, "rows": {}}
    for k, v in rows.items():
        row = {"mean": float(np.mean(v)), "per_seed": v}
        label, readout = k.split(": ")
        partners = {"minus_stage_means": f"{label}: stage_means", "minus_fresh_weights": f"fresh weights: {readout}"}
        for key, partner in partners.items():
            if partner != k and partner in rows:
                row[key] = paired_t(v, rows[partner])
        result["rows"][k] = row
        extra = "  ".join(
            f"{key[6:]} {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]" for key, d in row.items() if key[:6] == "minus_"
        )
        print(f"{k:30s} {row['mean']:.3f}  {extra}")
    if args.out:
        models = " ".join(f"{s.split('=', 1)[0]}=RUN" for s in args.models)
        command = (
            f"python experiments/health_readout.py --store STORE --models {models} --shots {args.shots} "
            f"--seeds {args.seeds} --crops {args.crops} --patch {args.patch} --c {args.c} --draws {args.draws}"
        )
        args.out.write_text(json.dumps({"command": command, **result}, indent=2))


if __name__ == "__main__":
    main()
