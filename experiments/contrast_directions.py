"""Where does a linear probe find the contrast in a run's whole-scan latents?

For each run, on an evaluation store (the vectors of ``neurofm embed``): the Fisher ratio of the contrast
classes, sum_k p_k d_k^T (S + r I)^-1 d_k (d_k a class mean minus the overall mean, S the covariance over
scans, r a ridge times S's mean variance) at several ridges — what ``objective.contrast_means_metric=whitened``
trains, measured where the analysis measures; the covariance's spectrum; and the contrast probe of
``neurofm analyze``; and the per-channel spread of the contrasts' means (each channel over its variance,
averaged; what ``contrast_means_metric=diagonal`` trains) on whole-scan vectors and on random crops of the
same scans, which is what training sees. A large ratio only at a tiny ridge means the contrast sits in
directions in which the scans hardly vary, which a probe on standardised features still reads.

With ``--quantiles`` also a reference that needs no model: the same probe, T1w against T1c only, on
intensity quantiles of each scan (inside the brain mask, and over the whole volume).

    python experiments/contrast_directions.py --eval EVAL_STORE --runs RUN ... [--quantiles] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

RIDGES = (1e-1, 1e-3, 1e-6)
QUANTILES = (1, 5, 10, 25, 50, 75, 90, 95, 98, 99, 99.5, 99.8, 99.9)


def fisher_ratios(x: np.ndarray, y: np.ndarray, ridges=RIDGES) -> dict[str, float]:
    """The contrast classes' Fisher ratio of vectors ``x`` ``(N, C)`` at each ridge."""
    x = x.astype(np.float64)
    cov = np.cov(x.T)
    out = {}
    for r in ridges:
        s = cov + r * np.trace(cov) / len(cov) * np.eye(len(cov))
        total = 0.0
        for c in np.unique(y):
            d = x[y == c].mean(0) - x.mean(0)
            total += (y == c).mean() * float(d @ np.linalg.solve(s, d))
        out[f"{r:g}"] = total
    return out


def channel_spread(x: np.ndarray, y: np.ndarray) -> float:
    """Squared distance of each class mean from the overall mean, per channel over its variance, averaged."""
    x = x.astype(np.float64)
    var = x.var(0) + 1e-12
    return float(np.mean([((x[y == c].mean(0) - x.mean(0)) ** 2 / var).mean() for c in np.unique(y)]))


def crop_vectors(run: Path, store_root: Path, crops: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Anatomy vectors of ``crops`` random patch-sized crops of every scan, and their contrasts."""
    import torch

    from neurofm.data.sampling import random_box
    from neurofm.models.registry import model_from_checkpoint
    from neurofm.store import Store

    model, info = model_from_checkpoint(run)
    model.eval()
    patch = int(info["run"]["data"]["patch"])
    store, rng = Store(store_root), np.random.default_rng(seed)
    vectors, names = [], []
    with torch.no_grad():
        for key in store.keys:
            for name in store.record(key)["images"]:
                v = torch.from_numpy(np.asarray(store.read(key, name), np.float32))[None, None]
                for _ in range(crops):
                    box = random_box(tuple(v.shape[2:]), patch, rng)
                    vectors.append(model.forward_features(v[(slice(None), slice(None), *box)]).anatomy[0].numpy())
                    names.append(name)
    return np.stack(vectors), np.array(names)


def quantile_reference(store_root: Path) -> dict[str, float]:
    from neurofm.analyze.latent import contrast_probe
    from neurofm.store import Store

    store = Store(store_root)
    rows = []
    for key in store.keys:
        rec = store.record(key)
        brain = np.asarray(store.read(key, "brain")) > 0 if "brain" in rec.get("label_maps", {}) else None
        for name in ("T1w", "T1c"):
            if name not in rec["images"]:
                continue
            v = np.asarray(store.read(key, name), np.float32)
            inside = v[brain] if brain is not None and brain.shape == v.shape else v
            row = {"subject": rec["subject"], "contrast": name}
            row["brain"], row["volume"] = np.percentile(inside, QUANTILES), np.percentile(v, QUANTILES)
            rows.append(row)
    df = pd.DataFrame(rows)
    return {where: contrast_probe(df, where)["accuracy"] for where in ("brain", "volume")} | {"n": len(df)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval", type=Path, required=True)
    ap.add_argument("--runs", type=Path, nargs="*", default=[])
    ap.add_argument("--quantiles", action="store_true")
    ap.add_argument("--crops", type=int, default=4, help="random crops per scan for the crop-level spread")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from neurofm.analyze.embed import embed_store
    from neurofm.analyze.latent import contrast_probe

    result: dict = {"runs": {}}
    for run in args.runs:
        df = embed_store(run, args.eval)
        y = df["contrast"].to_numpy()
        row = {}
        for name, col in (("anatomy", "subject_latent"), ("contrast", "contrast_latent")):
            x = np.stack(df[col].to_numpy())
            spectrum = np.sort(np.linalg.eigvalsh(np.cov(x.T.astype(np.float64))))[::-1]
            row[name] = {
                "fisher_ratio": fisher_ratios(x, y),
                "spectrum_over_largest": [float(v) for v in spectrum / spectrum[0]],
                "probe": contrast_probe(df, col)["accuracy"],
            }
        row["anatomy"]["channel_spread_scans"] = channel_spread(np.stack(df["subject_latent"].to_numpy()), y)
        if args.crops > 0:
            row["anatomy"]["channel_spread_crops"] = channel_spread(*crop_vectors(run, args.eval, args.crops))
        result["runs"][run.name] = row
        print(run.name, json.dumps({k: {"fisher": v["fisher_ratio"], "probe": v["probe"]} for k, v in row.items()}))
    if args.quantiles:
        result["t1w_t1c_quantile_probe"] = quantile_reference(args.eval)
        print("T1w vs T1c from intensity quantiles:", result["t1w_t1c_quantile_probe"])
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
