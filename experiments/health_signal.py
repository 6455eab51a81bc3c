"""Can a few labelled subjects tell a patient from a healthy subject at 4 mm, and from which read-out?

The demo asks for healthy vs patient (a tumour, an infarct or white-matter hyperintensities) from 16
labelled subjects; its linear probe reads whole-scan *averages* of the frozen features. A lesion fills
a few per cent of the brain at most, so an average may hide it. On the demo's few-shot splits
(``make_splits``, the seeds of ``neurofm demo``), a logistic regression (balanced classes, penalty
cross-validated on the training subjects) from

* ``histograms``: each scan's intensity histograms (whole volume and inside the brain mask);
* ``quantiles``: five quantiles of the intensities inside the brain mask (0.1 %, 1 %, 90 %, 99 %,
  99.9 %): how bright or dark its extremes are, which a lesion moves;

and from the pretrained run's (``--run``) and a random copy's whole-scan encoder maps reduced over space
by their ``mean`` (what the demo's probe reads), their ``max``, both, or the mean, maximum and standard
deviation of the anatomy latent map; AUROC on the held-out sessions, T1w, T2w, FLAIR and T1c side by side.

    python experiments/health_signal.py --store STORE --run RUN [--seeds 5] [--shots 16] --out results.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from age_signal import fresh_copy, histogram_features
from sklearn.linear_model import LogisticRegressionCV
from sklearn.metrics import roc_auc_score

from neurofm.data.finetune import build_cases, make_splits
from neurofm.infer.runtime import global_windows
from neurofm.models.registry import model_from_checkpoint
from neurofm.store import Store


@torch.no_grad()
def map_features(model: torch.nn.Module, store: Store, key: str, contrasts: list[str]) -> dict[str, np.ndarray]:
    """Per reduction (``mean``, ``max``, ``latent``): every contrast's vector concatenated (zeros if missing)."""
    per: dict[str, list] = {"mean": [], "max": [], "latent": []}
    for c in contrasts:
        if c not in store.record(key)["images"]:
            for v in per.values():
                v.append(None)
            continue
        v = np.asarray(store.read(key, c), np.float32)[None, None]
        f = model.forward_features(torch.from_numpy(global_windows(v, 0, 16)))  # the whole scan
        per["mean"].append(f.pooled[0].numpy())
        per["max"].append(torch.cat([m.flatten(2).amax(2) for m in f.maps], 1)[0].numpy())
        mu = f.latents["mu_s"].flatten(2)[0]
        per["latent"].append(torch.cat([mu.mean(1), mu.amax(1), mu.std(1)]).numpy())
    out = {}
    for name, vs in per.items():
        dim = next(len(v) for v in vs if v is not None)
        out[name] = np.concatenate([np.zeros(dim) if v is None else v for v in vs])
    return out


def quantile_features(store: Store, key: str, contrasts: list[str]) -> np.ndarray:
    brain = np.asarray(store.read(key, "brain")) > 0
    out = []
    for c in contrasts:
        if c not in store.record(key)["images"]:
            out += [0.0] * 5
            continue
        out += list(np.quantile(np.asarray(store.read(key, c), np.float32)[brain], [0.001, 0.01, 0.9, 0.99, 0.999]))
    return np.asarray(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--run", required=True, help="a pretrained run or a shipped model's name")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--contrasts", default="T1w,T2w,FLAIR,T1c")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    store, contrasts = Store(args.store), args.contrasts.split(",")
    cs = build_cases(store, "cls", "healthy", contrasts)
    feats = {
        "histograms": {c.key: histogram_features(store, c.key, contrasts) for c in cs.cases},
        "quantiles": {c.key: quantile_features(store, c.key, contrasts) for c in cs.cases},
    }
    model = model_from_checkpoint(args.run)[0].eval()
    for tag, m in (("pretrained", model), ("random", fresh_copy(model))):
        per_case = {c.key: map_features(m, store, c.key, contrasts) for c in cs.cases}
        feats[f"{tag} mean"] = {k: v["mean"] for k, v in per_case.items()}
        feats[f"{tag} max"] = {k: v["max"] for k, v in per_case.items()}
        feats[f"{tag} mean+max"] = {k: np.concatenate([v["mean"], v["max"]]) for k, v in per_case.items()}
        feats[f"{tag} anatomy latent mean/max/sd"] = {k: v["latent"] for k, v in per_case.items()}
    aurocs: dict[str, list[float]] = {name: [] for name in feats}
    for seed in range(args.seeds):
        (train, test), *_ = make_splits(cs, seed=seed, shots=args.shots)
        y_tr, y_te = np.array([c.target for c in train]), np.array([c.target for c in test])
        for name, f in feats.items():
            x_tr, x_te = np.stack([f[c.key] for c in train]), np.stack([f[c.key] for c in test])
            mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-9
            clf = LogisticRegressionCV(Cs=np.logspace(-4, 2, 13), cv=3, class_weight="balanced", max_iter=2000)
            clf.fit((x_tr - mu) / sd, y_tr)
            aurocs[name].append(float(roc_auc_score(y_te, clf.decision_function((x_te - mu) / sd))))
    rows = {name: {"auroc": float(np.mean(v)), "per_seed": v} for name, v in aurocs.items()}
    for name, r in rows.items():
        print(f"{name:36s} {r['auroc']:.3f}  " + " ".join(f"{a:.2f}" for a in r["per_seed"]))
    if args.out:
        info = {
            "command": "python experiments/health_signal.py "
            + " ".join(f"--{k} {v}" for k, v in (("run", args.run), ("seeds", args.seeds), ("shots", args.shots)))
            + " --store STORE",
            "contrasts": contrasts,
            "results": rows,
        }
        args.out.write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
