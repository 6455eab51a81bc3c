"""Health read as a deviation from the healthy labelled subjects, position by position (an exploration).

The demo's health probe reads each scan's features averaged over space; tumours of tens of cm3 barely move
that average (``health_by_diagnosis.py``). Neuroimaging's usual answer for "is something abnormal anywhere" is a
normative model: learn what healthy looks like at each position, then score how far a new scan strays. Every
session of a store made by ``neurofm synth`` sits on one grid (the store records where its cropped array lies),
so positions correspond across subjects. On the demo's few-shot splits (``make_splits``, the demo's seeds), with
the labelled subjects' *healthy* sessions as the reference:

* each session's feature map at one encoder level (``--level``; 0 is the finest), per contrast, put on the grid;
* per position and channel, the healthy reference's mean and standard deviation;
* a held-out session's score: the mean over its ``--top`` share of brain positions with the largest squared
  z-score (averaged over channels), summed over contrasts; higher means less healthy;

AUROC on the held-out sessions for the pretrained encoder (``--run``), the same architecture with fresh weights,
and the image itself (intensities at the same level's resolution). No label of a patient is used: only which
labelled subjects are healthy. Exploration, not a rule: nothing in the demo depends on it.

    python experiments/health_normative.py --store STORE --run fomo25-tiny-cmeans [--seeds 10] [--level 1] --out r.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from age_signal import fresh_copy
from sklearn.metrics import roc_auc_score

from neurofm.data.finetune import build_cases, make_splits
from neurofm.models.registry import model_from_checkpoint
from neurofm.store import Store


def on_grid(store: Store, key: str, name: str) -> np.ndarray:
    """The session's array ``name`` put back on the store's common grid (outside the crop: its minimum)."""
    rec = store.record(key)
    a = np.asarray(store.read(key, name), np.float32)
    out = np.full(rec["grid"]["shape"], a.min(), np.float32)
    (x0, x1), (y0, y1), (z0, z1) = rec["grid"]["crop"]
    out[x0:x1, y0:y1, z0:z1] = a
    return out


def padded(volume: np.ndarray, stride: int) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """``volume`` as a (1, 1, X, Y, Z) tensor padded at the far end with its minimum to a multiple of ``stride``
    (positions keep their grid index), and the slices that take the padding off again."""
    pad = [(0, -(-n // stride) * stride - n) for n in volume.shape]
    x = torch.from_numpy(np.pad(volume, pad, constant_values=float(volume.min())))[None, None]
    return x, tuple(slice(0, n) for n in volume.shape)


@torch.no_grad()
def maps(model: torch.nn.Module | None, volume: np.ndarray, level: int, stride: int = 16) -> np.ndarray:
    """``(C, X', Y', Z')``: the encoder's map at ``level`` of the whole grid (padded to a multiple of ``stride``),
    or (``model`` None) the image itself average-pooled to that map's size."""
    x, _ = padded(volume, stride)
    if model is None:
        return F.avg_pool3d(x, 2**level)[0].numpy() if level else x[0].numpy()
    return model.forward_features(x).maps[level][0].numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--run", required=True, help="a pretrained run or a shipped model's name")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--level", type=int, default=1, help="encoder level (0: finest)")
    ap.add_argument("--top", type=float, default=0.01, help="share of brain positions the score averages")
    ap.add_argument("--contrasts", default="T1w,FLAIR")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    store, contrasts = Store(args.store), args.contrasts.split(",")
    cs = build_cases(store, "cls", "healthy", contrasts)
    model = model_from_checkpoint(args.run)[0].eval()
    readers = {"pretrained": model, "random": fresh_copy(model), "image": None}
    feats: dict[str, dict[str, np.ndarray]] = {name: {} for name in readers}
    brain: dict[str, np.ndarray] = {}
    for c in cs.cases:
        vols = {k: on_grid(store, c.key, k) for k in contrasts if k in store.record(c.key)["images"]}
        if len(vols) < len(contrasts):
            continue  # a session missing a contrast is left out of every reader alike
        for name, m in readers.items():
            feats[name][c.key] = np.stack([maps(m, vols[k], args.level) for k in contrasts])  # (K, C, X, Y, Z)
        mask = maps(None, on_grid(store, c.key, "brain"), 0)[0]
        size = feats["pretrained"][c.key].shape[2:]
        brain[c.key] = F.adaptive_max_pool3d(torch.from_numpy(mask)[None, None], size)[0, 0].numpy() > 0
    aurocs: dict[str, list[float]] = {name: [] for name in readers}
    for seed in range(args.seeds):
        (train, test), *_ = make_splits(cs, seed=seed, shots=args.shots)
        ref = [c.key for c in train if c.target == 1 and c.key in brain]
        test = [c for c in test if c.key in brain]
        y = np.array([c.target for c in test])
        for name in readers:
            r = np.stack([feats[name][k] for k in ref])
            mu, sd = r.mean(0), r.std(0) + 1e-3 * r.std() + 1e-6
            scores = []
            for c in test:
                z2 = (((feats[name][c.key] - mu) / sd) ** 2).mean(1)  # (K, X, Y, Z): over channels
                per = [np.sort(z2[k][brain[c.key]])[::-1] for k in range(len(contrasts))]
                scores.append(sum(float(p[: max(1, int(args.top * len(p)))].mean()) for p in per))
            aurocs[name].append(float(roc_auc_score(y, -np.asarray(scores))))  # healthy is 1: less deviation
    rows = {name: {"auroc": float(np.mean(v)), "per_seed": v} for name, v in aurocs.items()}
    for name, r in rows.items():
        print(f"{name:12s} {r['auroc']:.3f}  " + " ".join(f"{a:.2f}" for a in r["per_seed"]))
    if args.out:
        command = (
            f"python experiments/health_normative.py --store STORE --run {args.run} --seeds {args.seeds} "
            f"--level {args.level} --top {args.top} --contrasts {args.contrasts}"
        )
        args.out.write_text(json.dumps({"command": command, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
