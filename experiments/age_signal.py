"""How much of the age target can a few labelled subjects read from the images? (a ceiling check)

The demo asks for brain age from 24 labelled subjects. ``neurofm synth`` ages a head by enlarging
the ventricles and thinning the cortex, and its ground-truth volumes follow age closely. This script
asks how much of that reaches the prepared images a model sees, with no network involved: on the
demo's own few-shot splits (``make_splits``, the same seeds as ``neurofm demo``), a ridge regression
(penalty chosen by cross-validation on the training subjects) from

* ``histograms``: each session's intensity histograms (T1w and FLAIR, 40 bins, whole prepared
  volume and inside the brain mask) — the tissue proportions a pooled CNN feature can read;
* ``label map``: the share of the brain mask each label of the prepared 4 mm segmentation (``dseg``)
  takes — the geometry a model sees, read by a perfect segmenter at the model's resolution;
* ``volumes``: the generator's ground-truth lateral-ventricle volume and extraventricular CSF, each
  over the intracranial volume — what a perfect segmenter of those structures would measure;

and, with ``--run RUN`` (a pretrained run or a shipped model's name), from

* ``RUN features``: the backbone's multi-scale pooled features of each whole scan (every encoder map
  averaged over space, T1w and FLAIR concatenated) — what a linear probe on the frozen encoder reads,
  without crops or training;
* ``random features``: the same from the same architecture with fresh weights;
* ``RUN anatomy projection``: for a fomo25 model pretrained with ``objective.w_anatomy``, the regional
  volumes its anatomy projector predicts from each whole scan (a pretext head, not used downstream);

against the constant predictor (the training mean), as MAE in years over the held-out sessions.

    python experiments/age_signal.py --store STORE --bids BIDS [--run RUN] [--seeds 5] [--shots 24] --out results.json
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import RidgeCV

from neurofm.analyze.latent import intensity_histogram
from neurofm.data.finetune import build_cases, make_splits
from neurofm.infer.runtime import global_windows
from neurofm.models.registry import model_from_checkpoint
from neurofm.store import Store


def histogram_features(store: Store, key: str, contrasts: list[str]) -> np.ndarray:
    brain = np.asarray(store.read(key, "brain")) > 0
    out = []
    have = store.record(key)["images"]
    for c in contrasts:
        if c not in have:  # a missing contrast: zeros, as the fine-tuned models see it
            out += [np.zeros(40), np.zeros(40)]
            continue
        v = np.asarray(store.read(key, c), np.float32)
        out += [intensity_histogram(v), intensity_histogram(v[brain])]
    return np.concatenate(out)


def label_map_features(store: Store, key: str, labels: int) -> np.ndarray:
    dseg = np.asarray(store.read(key, "dseg")).astype(np.int64)
    brain = np.asarray(store.read(key, "brain")) > 0
    return np.bincount(dseg.ravel(), minlength=labels)[:labels] / max(brain.sum(), 1)


@torch.no_grad()
def network_features(
    model: torch.nn.Module, store: Store, key: str, contrasts: list[str], projection: bool = False
) -> np.ndarray:
    """The pooled features of each whole scan, or (``projection``) its anatomy projector's regional volumes."""
    out = []
    for c in contrasts:
        if c not in store.record(key)["images"]:
            out.append(None)
            continue
        v = np.asarray(store.read(key, c), np.float32)[None, None]
        x = torch.from_numpy(global_windows(v, 0, 16))  # the whole scan, padded so that every stride divides it
        f = model.forward_features(x)
        out.append((model.anatomy_projector(f.latents["mu_s"]) if projection else f.pooled)[0].numpy())
    dim = next(len(o) for o in out if o is not None)
    return np.concatenate([np.zeros(dim) if o is None else o for o in out])


def fresh_copy(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    fresh = copy.deepcopy(model)
    for m in fresh.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return fresh.eval()


def volume_features(bids: Path) -> pd.DataFrame:
    v = pd.read_csv(bids / "derivatives" / "neurofm-synth" / "volumes.csv")
    tiv = v["total intracranial"]
    vent = v[[c for c in v.columns if c.endswith("Lateral Ventricle")]].sum(axis=1)
    return pd.DataFrame(
        {
            "key": v.subject + "_" + v.session,
            "ventricles/tiv": vent / tiv,
            "csf/tiv": v["extraventricular csf"] / tiv,
        }
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--bids", type=Path, required=True, help="the synth BIDS root (its derivatives hold the volumes)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--shots", type=int, default=24)
    ap.add_argument("--contrasts", default="T1w,FLAIR")
    ap.add_argument("--run", help="also read age from this model's frozen whole-scan features (and a random copy)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    store = Store(args.store)
    contrasts = args.contrasts.split(",")
    cs = build_cases(store, "reg", "age", contrasts)
    vols = volume_features(args.bids).set_index("key")
    labels = 1 + max(max(store.record(c.key)["label_maps"]["dseg"]["values"]) for c in cs.cases)
    feats = {
        "histograms": {c.key: histogram_features(store, c.key, contrasts) for c in cs.cases},
        "label map": {c.key: label_map_features(store, c.key, labels) for c in cs.cases},
        "volumes": {c.key: vols.loc[c.key].to_numpy(float) for c in cs.cases},
    }
    if args.run:
        model = model_from_checkpoint(args.run)[0].eval()
        for name, m in ((f"{Path(args.run).name} features", model), ("random features", fresh_copy(model))):
            feats[name] = {c.key: network_features(m, store, c.key, contrasts) for c in cs.cases}
        if getattr(model, "anatomy_projector", None) is not None:  # fomo25 with objective.w_anatomy
            feats[f"{Path(args.run).name} anatomy projection"] = {
                c.key: network_features(model, store, c.key, contrasts, projection=True) for c in cs.cases
            }
    results: dict[str, list[dict[str, float]]] = {name: [] for name in [*feats, "constant"]}
    for seed in range(args.seeds):
        (train, test), *_ = make_splits(cs, seed=seed, shots=args.shots)
        y_tr = np.array([c.target for c in train], float)
        y_te = np.array([c.target for c in test], float)
        results["constant"].append({"mae": float(np.abs(y_te - y_tr.mean()).mean())})
        for name, f in feats.items():
            x_tr = np.stack([f[c.key] for c in train])
            x_te = np.stack([f[c.key] for c in test])
            mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-9
            model = RidgeCV(alphas=np.logspace(-3, 4, 30)).fit((x_tr - mu) / sd, y_tr)
            pred = model.predict((x_te - mu) / sd)
            r = float(np.corrcoef(pred, y_te)[0, 1]) if pred.std() > 0 else 0.0
            results[name].append({"mae": float(np.abs(pred - y_te).mean()), "r": r, "alpha": float(model.alpha_)})
    summary = {
        name: {
            "mae_mean": float(np.mean([r["mae"] for r in rows])),
            "per_seed_mae": [round(r["mae"], 2) for r in rows],
            **({"r_mean": float(np.mean([r["r"] for r in rows]))} if "r" in rows[0] else {}),
        }
        for name, rows in results.items()
    }
    for name, s in summary.items():
        r = f"  r {s['r_mean']:.2f}" if "r_mean" in s else ""
        print(f"{name:28s} MAE {s['mae_mean']:.2f} years{r}   per seed {s['per_seed_mae']}")
    if args.out:
        args.out.write_text(
            json.dumps({"run": args.run, "shots": args.shots, "seeds": args.seeds, "results": summary}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
