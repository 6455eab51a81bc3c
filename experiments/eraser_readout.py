"""What else the eraser takes from the anatomy vector: age and health read linearly from it, before and after.

    python experiments/eraser_readout.py RUN [RUN ...] --data EVAL_STORE --sessions 80 --out FILE.json

Each RUN must have an eraser (``neurofm erase``, fitted on the pretraining pool). Its whole-scan anatomy vectors on
the evaluation store (``neurofm.analyze.embed.embed_store``: ``subject_latent`` after the eraser,
``subject_latent_raw`` before) are read by a ridge regression of age (mean absolute error, years) and a logistic
regression of ``healthy`` (AUROC), each channel standardised, cross-validated over 5 folds grouped by subject (the
analysis' contrast probe's protocol), with the penalty chosen inside each training fold. The constant predictor
(the training fold's mean age) is the floor. An eraser that took anatomy with the contrast would raise the error.
Results: ``results_eraser.json`` ("readout").
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from neurofm.analyze.embed import embed_store
from neurofm.analyze.run import spread_sessions
from neurofm.store import Store


def readout(df, column: str) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegressionCV, RidgeCV
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.stack(df[column].to_numpy()).astype(np.float64)
    age = df["age"].to_numpy(np.float64)
    healthy = df["healthy"].to_numpy(int)
    groups = df["subject"].to_numpy()
    pred_age, pred_const, score = np.zeros(len(x)), np.zeros(len(x)), np.zeros(len(x))
    for train, test in GroupKFold(n_splits=5).split(x, age, groups):
        reg = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 4, 15)))
        pred_age[test] = reg.fit(x[train], age[train]).predict(x[test])
        pred_const[test] = age[train].mean()
        clf = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=10, max_iter=2000))
        score[test] = clf.fit(x[train], healthy[train]).predict_proba(x[test])[:, 1]
    return {
        "age_mae": float(np.abs(pred_age - age).mean()),
        "age_mae_constant": float(np.abs(pred_const - age).mean()),
        "age_r": float(np.corrcoef(pred_age, age)[0, 1]),
        "healthy_auroc": float(roc_auc_score(healthy, score)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--data", required=True)
    ap.add_argument("--sessions", type=int, default=80)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    keys = spread_sessions(Store(args.data), args.sessions)
    out = {}
    for run in args.runs:
        df = embed_store(run, args.data, keys=keys)
        if "subject_latent_raw" not in df:
            raise SystemExit(f"{run}: no eraser (run neurofm erase first)")
        out[run] = {
            "scans": int(len(df)),
            "subjects": int(df["subject"].nunique()),
            "before": readout(df, "subject_latent_raw"),
            "after": readout(df, "subject_latent"),
        }
        print(run, json.dumps(out[run]), flush=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
