"""Which channels of the anatomy latent does the contrast probe read: those that vary, or those that hardly do?

    python experiments/probe_channels.py RUN [RUN ...] --data EVAL_STORE --sessions 80 [--floor 1e-3]

The analysis probe (``neurofm.analyze.latent.contrast_probe``: scikit-learn's ``StandardScaler``, then a logistic
regression, grouped by subject) standardises every channel to unit variance, however small its spread over scans. A
soft categorical code's unused classes have probabilities that vary by 1e-8 or less between scans. This script splits
the whole-scan anatomy vector's channels at ``floor`` times their mean variance over scans (the floor of the
refitted critics, ``objective.adversary_floor``) and runs the same probe on each side. It also runs the probe once
on every channel scaled as the floored critic scales it. Results: ``results_scan_critic.json`` ("channels").
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from neurofm.analyze.embed import embed_store
from neurofm.analyze.latent import contrast_probe
from neurofm.store import Store


def split_probe(df, floor: float) -> dict[str, object]:
    x = np.stack(df["subject_latent"].to_numpy()).astype(np.float64)
    var = x.var(0)
    low = var < floor * var.mean()
    out: dict[str, object] = {
        "channels": int(x.shape[1]),
        "channels_below_floor": int(low.sum()),
        "variance_range_above": [float(var[~low].min()), float(var[~low].max())] if (~low).any() else None,
        "variance_range_below": [float(var[low].min()), float(var[low].max())] if low.any() else None,
    }
    for name, cols in (("all", np.ones_like(low)), ("above_floor", ~low), ("below_floor", low)):
        if cols.any():
            d = df.copy()
            d["part"] = list(x[:, cols].astype(np.float32))
            r = contrast_probe(d, "part")
            out[name] = [round(r["accuracy"], 4), round(r["accuracy_low"], 4), round(r["accuracy_high"], 4)]
    # every channel scaled as the floored critic scales it (contrast_probe would standardise them again)
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold, cross_val_predict

    z = (x - x.mean(0)) / np.sqrt(var + floor * var.mean())
    y = df["contrast"].to_numpy()
    k = min(5, df["subject"].nunique())
    pred = cross_val_predict(LogisticRegression(max_iter=2000), z, y, groups=df["subject"].to_numpy(), cv=GroupKFold(k))
    out["all_floored_scale"] = round(float((pred == y).mean()), 4)
    out["chance"] = round(float(contrast_probe(df, "subject_latent")["chance"]), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--data", required=True)
    ap.add_argument("--sessions", type=int, default=80)
    ap.add_argument("--floor", type=float, default=1e-3)
    args = ap.parse_args()
    keys = Store(args.data).keys[: args.sessions]
    result = {}
    for run in args.runs:
        result[run] = split_probe(embed_store(run, args.data, keys=keys), args.floor)
        print(run, json.dumps(result[run]), flush=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
