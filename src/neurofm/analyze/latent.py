"""The paper's checks on the two latents.

* **Anatomy is shared across contrasts**: cosine similarity of subject (anatomy) latents
  between scans of one subject in different contrasts, against scans of different subjects.
* **Contrast lives in the contrast latent**: a linear probe predicts the contrast from each
  latent; it should succeed from the contrast latent and fail (near chance) from the anatomy
  latent.

Latents are centred on the dataset mean before cosines are taken: without it a shared offset
makes every pair look alike. Probes are logistic regressions scored by cross-validation grouped
by subject, so no subject is in both the training and the test folds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


def _unit(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=0, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def latent_similarity(
    df: pd.DataFrame, column: str = "subject_latent", max_pairs: int = 20000, seed: int = 0
) -> dict[str, Any]:
    """Mean cosine between scans of the same subject in different contrasts, and between subjects.

    Returns ``within`` / ``across`` means, their difference, and the per-pair values (for plots).
    """
    x = np.stack(df[column].to_numpy()).astype(np.float64)
    if x.shape[1] == 0:
        return {}
    u = _unit(x)
    subj = df["subject"].to_numpy()
    con = df["contrast"].to_numpy()
    rng = np.random.default_rng(seed)
    n = len(df)
    i, j = np.triu_indices(n, k=1)
    if len(i) > max_pairs:
        keep = rng.choice(len(i), max_pairs, replace=False)
        # keep every within-subject pair: they are few and are what is being measured
        same = np.flatnonzero(subj[i] == subj[j])
        keep = np.union1d(keep, same)
        i, j = i[keep], j[keep]
    cos = (u[i] * u[j]).sum(1)
    within = cos[(subj[i] == subj[j]) & (con[i] != con[j])]
    across = cos[subj[i] != subj[j]]
    if len(within) == 0 or len(across) == 0:
        return {}
    return {
        "within": float(within.mean()),
        "across": float(across.mean()),
        "difference": float(within.mean() - across.mean()),
        "n_within": int(len(within)),
        "n_across": int(len(across)),
        "within_values": within.tolist(),
        "across_values": across.tolist(),
    }


def contrast_probe(df: pd.DataFrame, column: str, folds: int = 5, seed: int = 0) -> dict[str, Any]:
    """Cross-validated accuracy of a linear probe predicting the contrast from ``column``.

    Folds are grouped by subject, so the probe is always tested on subjects it never saw; with scans
    of fewer than two subjects there is no such split and the result is empty.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.stack(df[column].to_numpy()).astype(np.float64)
    y = df["contrast"].to_numpy()
    groups = df["subject"].to_numpy()
    if x.shape[1] == 0 or len(set(y)) < 2 or len(set(groups)) < 2:
        return {}
    k = min(folds, len(set(groups)))
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    pred = cross_val_predict(clf, x, y, groups=groups, cv=GroupKFold(n_splits=k))
    values, counts = np.unique(y, return_counts=True)
    return {
        "accuracy": float((pred == y).mean()),
        "chance": float(counts.max() / counts.sum()),
        "classes": [str(v) for v in values],
        "n": int(len(y)),
        "folds": k,
    }


def latent_analysis(df: pd.DataFrame, seed: int = 0) -> dict[str, Any]:
    """Similarity and probes for both latents (see module docstring)."""
    out: dict[str, Any] = {"scans": int(len(df)), "subjects": int(df["subject"].nunique())}
    for name, col in (("anatomy", "subject_latent"), ("contrast", "contrast_latent")):
        sim = latent_similarity(df, col, seed=seed)
        probe = contrast_probe(df, col, seed=seed)
        if sim or probe:
            out[name] = {"similarity": sim, "contrast_probe": probe}
    return out


def summary_table(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows for a report: latent, within/across similarity, probe accuracy vs chance."""
    rows = []
    for name in ("anatomy", "contrast"):
        r = result.get(name)
        if not r:
            continue
        sim, probe = r.get("similarity", {}), r.get("contrast_probe", {})
        rows.append(
            {
                "latent": name,
                "cosine within subject": sim.get("within"),
                "cosine across subjects": sim.get("across"),
                "contrast probe accuracy": probe.get("accuracy"),
                "chance": probe.get("chance"),
            }
        )
    return rows
