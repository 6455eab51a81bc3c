"""Metrics from MONAI, scikit-learn, torchmetrics and SciPy, with bootstrap intervals.

Segmentation (per case): Dice, normalised surface Dice (NSD, tolerance in mm) and the 95th
percentile Hausdorff distance (mm), from MONAI. Classification (over cases): AUROC, accuracy,
balanced accuracy, F1 (scikit-learn) and expected calibration error (torchmetrics).
Regression: MAE, RMSE and Pearson r. Every summary carries a bootstrap 95 % interval over cases.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _onehot(label: np.ndarray, classes: int) -> torch.Tensor:
    t = torch.as_tensor(label.astype(np.int64))
    return torch.nn.functional.one_hot(t, classes).permute(3, 0, 1, 2)[None].float()  # (1, K, X, Y, Z)


def segmentation_case(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: tuple[float, ...],
    classes: int = 2,
    nsd_tolerance_mm: float = 2.0,
) -> dict[str, float]:
    """Dice, NSD and HD95 of one case, averaged over foreground classes.

    Both empty: Dice = NSD = 1 and HD95 = 0. One empty: Dice = NSD = 0 and HD95 = NaN.
    """
    import warnings

    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

    warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")  # MONAI-internal deprecation
    out: dict[str, list[float]] = {"dice": [], "nsd": [], "hd95": []}
    p1, t1 = _onehot(pred, classes), _onehot(truth, classes)
    for c in range(1, classes):
        pe, te = not p1[0, c].any(), not t1[0, c].any()
        if pe and te:
            out["dice"].append(1.0)
            out["nsd"].append(1.0)
            out["hd95"].append(0.0)
            continue
        if pe or te:
            out["dice"].append(0.0)
            out["nsd"].append(0.0)
            out["hd95"].append(float("nan"))
            continue
        pc, tc = p1[:, [0, c]], t1[:, [0, c]]
        out["dice"].append(float(compute_dice(pc, tc, include_background=False)[0, 0]))
        out["nsd"].append(
            float(compute_surface_dice(pc, tc, class_thresholds=[nsd_tolerance_mm], spacing=list(spacing))[0, 0])
        )
        out["hd95"].append(float(compute_hausdorff_distance(pc, tc, percentile=95, spacing=list(spacing))[0, 0]))
    return {k: float(np.nanmean(v)) if not np.all(np.isnan(v)) else float("nan") for k, v in out.items()}


def expected_calibration_error(prob: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE (torchmetrics), for ``prob`` ``(N, K)`` and integer labels ``y``."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    p = torch.as_tensor(prob, dtype=torch.float32)
    return float(
        multiclass_calibration_error(
            p, torch.as_tensor(y, dtype=torch.long), num_classes=p.shape[1], n_bins=bins, norm="l1"
        )
    )


def classification_metrics(prob: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """AUROC (one-vs-rest macro for >2 classes), accuracy, balanced accuracy, F1, ECE."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

    prob = np.asarray(prob, dtype=float)
    y = np.asarray(y, dtype=int)
    k = prob.shape[1]
    pred = prob.argmax(1)
    out = {
        "accuracy": accuracy_score(y, pred),
        "balanced_accuracy": balanced_accuracy_score(y, pred),
        "f1": f1_score(y, pred, average="binary" if k == 2 else "macro", zero_division=0),
        "ece": expected_calibration_error(prob, y),
    }
    present = np.unique(y)
    if len(present) < 2:
        out["auroc"] = float("nan")
    elif k == 2:
        out["auroc"] = roc_auc_score(y, prob[:, 1])
    else:
        out["auroc"] = roc_auc_score(y, prob, multi_class="ovr", average="macro", labels=list(range(k)))
    return {m: float(v) for m, v in out.items()}


def classification_resampler(
    prob: np.ndarray, y: np.ndarray, bins: int = 15
) -> Callable[[np.ndarray], dict[str, float]]:
    """``idx -> classification_metrics(prob[idx], y[idx])`` for a bootstrap: what each case adds (its predicted
    class, its top-label confidence and bin, as torchmetrics reads them) is computed once, and a resample adds up
    counts. The metrics equal scikit-learn's and torchmetrics' (tested on random and degenerate resamples: the
    counting ones exactly, AUROC and ECE to float rounding); through the libraries a thousand resamples took 13-14 s
    on 2 AVX2 cores, mostly in their input checks, and 0.3-0.5 s this way (``benchmarks/bench_bootstrap.py``)."""
    prob = np.asarray(prob, dtype=float)
    y = np.asarray(y, dtype=int)
    k = prob.shape[1]
    pred = prob.argmax(1)
    # ECE as torchmetrics reads a case: float32 probabilities, top-label confidence and bin (right-closed edges)
    p32 = torch.as_tensor(prob, dtype=torch.float32)
    if bool(((p32 < 0) | (p32 > 1)).any()) or (k > 2 and not np.allclose(prob.sum(1), 1.0)):
        # not probabilities: torchmetrics would read logits and scikit-learn refuse; the libraries, as they do
        return lambda idx: classification_metrics(prob[idx], y[idx])
    conf, top = p32.max(dim=1)
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float32)
    bin_of = (torch.bucketize(conf, edges, right=True) - 1).numpy()
    conf = conf.numpy().astype(float)
    top_right = (top.numpy() == y).astype(float)
    cell = y * k + pred  # the case's cell of the confusion matrix

    def metrics(idx: np.ndarray) -> dict[str, float]:
        n = len(idx)
        cm = np.bincount(cell[idx], minlength=k * k).reshape(k, k)
        true_sum, pred_sum, tp = cm.sum(1), cm.sum(0), np.diag(cm)
        seen = true_sum > 0
        with np.errstate(invalid="ignore", divide="ignore"):  # a class neither true nor predicted: F1 0
            f1_per = np.nan_to_num(2.0 * tp / (true_sum + pred_sum))
        f1 = f1_per[1] if k == 2 else float(np.mean(f1_per[seen | (pred_sum > 0)]))
        count = np.bincount(bin_of[idx], minlength=bins + 1).astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            gap = np.nan_to_num(np.bincount(bin_of[idx], top_right[idx] - conf[idx], minlength=bins + 1) / count)
        out = {
            "accuracy": tp.sum() / n,
            "balanced_accuracy": float(np.mean(tp[seen] / true_sum[seen])),
            "f1": f1,
            "ece": float(np.abs(gap) @ (count / n)),
        }
        yi = y[idx]
        if seen.sum() < 2:
            out["auroc"] = float("nan")
        elif k == 2:
            out["auroc"] = binary_auroc(yi, prob[idx, 1])
        elif not seen.all():
            out["auroc"] = float("nan")  # a class absent: its one-vs-rest AUROC, and so their mean, is undefined
        else:
            out["auroc"] = float(np.mean([binary_auroc((yi == c).astype(int), prob[idx, c]) for c in range(k)]))
        return {m: float(v) for m, v in out.items()}

    return metrics


def regression_metrics(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """MAE, RMSE and Pearson r (NumPy's ``corrcoef``: SciPy's ``pearsonr`` gives the same r with more checks per
    call, and a bootstrap calls this a thousand times a run; ``benchmarks/bench_bootstrap.py``); r is NaN for two
    cases or a constant."""
    pred, y = np.asarray(pred, float), np.asarray(y, float)
    err = pred - y
    constant = len(y) <= 2 or not (np.std(pred) > 0 and np.std(y) > 0)
    r = float("nan") if constant else float(np.clip(np.corrcoef(pred, y)[0, 1], -1.0, 1.0))
    return {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err**2).mean())), "pearson_r": r}


def bootstrap(
    fn: Callable[[np.ndarray], dict[str, float]], n: int, reps: int = 1000, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Point estimate and percentile 95 % interval of ``fn(indices)`` over ``reps`` resamples of n cases."""
    import warnings

    rng = np.random.default_rng(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate resamples (one class) warn in scikit-learn
        return _bootstrap(fn, n, reps, rng)


def _bootstrap(fn, n: int, reps: int, rng: np.random.Generator) -> dict[str, dict[str, float]]:
    point = fn(np.arange(n))
    samples: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(reps):
        try:
            res = fn(rng.integers(0, n, n))
        except ValueError:
            continue  # e.g. a resample with one class only
        for k, v in res.items():
            if v == v:  # not NaN
                samples[k].append(v)
    out = {}
    for k, v in point.items():
        s = samples[k]
        lo, hi = np.percentile(s, [2.5, 97.5]) if len(s) >= 20 else (float("nan"), float("nan"))
        out[k] = {"value": float(v), "ci_low": float(lo), "ci_high": float(hi), "n": n}
    return out


def summarize(task: str, cases: list[dict[str, Any]], reps: int = 1000, seed: int = 0) -> dict[str, dict[str, float]]:
    """Summary metrics with intervals from per-case rows (as written to the per-case CSV)."""
    n = len(cases)
    if n == 0:
        return {}
    if task == "seg":
        keys = ["dice", "nsd", "hd95"]
        vals = np.array([[c[k] for k in keys] for c in cases], float)
        return bootstrap(lambda idx: {k: float(np.nanmean(vals[idx, i])) for i, k in enumerate(keys)}, n, reps, seed)
    if task == "cls":
        prob = np.array([c["prob"] for c in cases], float)
        y = np.array([c["target"] for c in cases], int)
        return bootstrap(classification_resampler(prob, y), n, reps, seed)
    pred = np.array([c["prediction"] for c in cases], float)
    y = np.array([c["target"] for c in cases], float)
    return bootstrap(lambda idx: regression_metrics(pred[idx], y[idx]), n, reps, seed)


#: the metric every comparison reports per task, and whether higher is better
HEADLINE = {"seg": ("dice", True), "cls": ("auroc", True), "reg": ("mae", False)}


def _headline_arrays(task: str, rows: list[dict[str, Any]]) -> tuple[np.ndarray, ...]:
    if task == "seg":
        return (np.array([r["dice"] for r in rows], float),)
    if task == "cls":
        return np.array([r["prob"] for r in rows], float), np.array([r["target"] for r in rows], int)
    return np.array([r["prediction"] for r in rows], float), np.array([r["target"] for r in rows], float)


def binary_auroc(y: np.ndarray, score: np.ndarray) -> float:
    """AUROC of a two-class score as the Mann-Whitney statistic (ties count half): the value
    ``sklearn.metrics.roc_auc_score`` gives, without its input checks — a paired bootstrap calls it
    tens of thousands of times (through sklearn: ~100 s of the tiny demo test's 274 s, under cProfile)."""
    from scipy.stats import rankdata

    pos = np.asarray(y) == 1
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _headline_value(task: str, arrays: tuple[np.ndarray, ...], idx: np.ndarray) -> float:
    if task == "seg":
        return float(np.nanmean(arrays[0][idx]))
    if task == "cls":
        from sklearn.metrics import roc_auc_score

        prob, y = arrays[0][idx], arrays[1][idx]
        if len(np.unique(y)) < 2:
            return float("nan")
        if prob.shape[1] == 2:
            return binary_auroc(y, prob[:, 1])
        return float(roc_auc_score(y, prob, multi_class="ovr", average="macro", labels=list(range(prob.shape[1]))))
    pred, y = arrays[0][idx], arrays[1][idx]
    return float(np.abs(pred - y).mean())


def headline_value(task: str, rows: list[dict[str, Any]]) -> float:
    """The headline metric (``HEADLINE``) of one set of per-case rows."""
    return _headline_value(task, _headline_arrays(task, rows), np.arange(len(rows)))


def paired_seeds(
    task: str,
    arm: list[list[dict[str, Any]]],
    reference: list[list[dict[str, Any]]] | None = None,
    reps: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """The headline metric of an arm over several seeds and, with ``reference``, its paired difference.

    ``arm[s]`` and ``reference[s]`` are the per-case rows of seed ``s`` (one few-shot draw and
    initialisation), on the same test cases in the same order. The value is the mean over seeds of
    each seed's metric; the difference the mean over seeds of (arm - reference) on the same cases.
    The 95 % intervals come from a hierarchical bootstrap: seeds are resampled, then cases within
    each drawn seed, the same cases for both arms; so they hold both sources of noise.
    """
    import warnings

    n = len(arm)
    if reference is not None and len(reference) != n:
        raise ValueError(f"{n} seeds of the arm but {len(reference)} of the reference")
    a = [_headline_arrays(task, rows) for rows in arm]
    b = [_headline_arrays(task, rows) for rows in reference] if reference is not None else None
    for s in range(n):
        if b is not None and [r.get("key") for r in arm[s]] != [r.get("key") for r in reference[s]]:
            raise ValueError(f"seed {s}: the two arms were not scored on the same cases")
    full = [np.arange(len(rows)) for rows in arm]
    per_seed = [_headline_value(task, a[s], full[s]) for s in range(n)]
    diffs = [per_seed[s] - _headline_value(task, b[s], full[s]) for s in range(n)] if b is not None else None
    rng = np.random.default_rng(seed)
    vals, dvals = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(reps):
            va, vd = [], []
            for s in rng.integers(0, n, n):
                idx = rng.integers(0, len(full[s]), len(full[s]))
                x = _headline_value(task, a[s], idx)
                va.append(x)
                if b is not None:
                    vd.append(x - _headline_value(task, b[s], idx))
            vals.append(np.nanmean(va))
            if b is not None:
                dvals.append(np.nanmean(vd))
    out: dict[str, Any] = {
        "metric": HEADLINE[task][0],
        "value": float(np.nanmean(per_seed)),
        "ci_low": float(np.nanpercentile(vals, 2.5)),
        "ci_high": float(np.nanpercentile(vals, 97.5)),
        "per_seed": per_seed,
        "seeds": n,
        "cases": int(sum(len(f) for f in full)),
    }
    if diffs is not None:
        out.update(
            difference=float(np.nanmean(diffs)),
            difference_low=float(np.nanpercentile(dvals, 2.5)),
            difference_high=float(np.nanpercentile(dvals, 97.5)),
            difference_per_seed=diffs,
        )
    return out


#: the per-case uncertainty each task ranks its cases by for selective prediction
UNCERTAINTY = {"seg": "uncertainty_entropy", "cls": "uncertainty_entropy", "reg": "uncertainty_window_std"}


def selective(task: str, rows: list[dict[str, Any]], coverages: tuple[float, ...] = (1.0, 0.9, 0.75, 0.5)) -> dict:
    """The headline metric when only the most certain cases are kept (risk-coverage), by the per-case
    uncertainty of :data:`UNCERTAINTY`; empty when the rows carry none."""
    key = UNCERTAINTY[task]
    if not rows or any(key not in r or r[key] != r[key] for r in rows):
        return {}
    order = np.argsort([r[key] for r in rows], kind="stable")
    arrays = _headline_arrays(task, rows)
    metric = {"seg": "dice", "cls": "accuracy", "reg": "mae"}[task]  # per-case scores: accuracy, not AUROC

    def value(idx: np.ndarray) -> float:
        if task == "cls":
            return float((arrays[0][idx].argmax(1) == arrays[1][idx]).mean())
        return _headline_value(task, arrays, idx)

    out = {"ranked_by": key, "metric": metric, "points": []}
    for cov in coverages:
        k = max(1, int(round(cov * len(rows))))
        out["points"].append({"coverage": k / len(rows), "cases": int(k), metric: value(order[:k])})
    return out


def fit_temperature(log_probs: np.ndarray, y: np.ndarray) -> float:
    """The temperature T that minimises the negative log-likelihood of ``softmax(log_probs / T)`` (Guo et al.
    2017's temperature scaling), searched over T in [0.05, 20]."""
    from scipy.optimize import minimize_scalar

    z = torch.as_tensor(np.asarray(log_probs, float))
    t = torch.as_tensor(np.asarray(y, int))

    def nll(log_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(z / float(np.exp(log_t)), t))

    res = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(res.x))


def per_site(task: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The headline metric (and for classification the ECE) of the cases of each site."""
    out = []
    sites = sorted({str(r.get("site")) for r in rows})
    metric, _ = HEADLINE[task]
    for site in sites:
        sub = [r for r in rows if str(r.get("site")) == site]
        row = {"site": site, "cases": len(sub), metric: headline_value(task, sub) if len(sub) > 1 else float("nan")}
        if task == "cls" and len(sub) > 1:
            row["ece"] = expected_calibration_error(
                np.array([r["prob"] for r in sub]), np.array([r["target"] for r in sub])
            )
        out.append(row)
    return out


def reliability_figure(rows: list[dict[str, Any]], png: str | Path, bins: int = 10) -> Path | None:
    """Reliability diagram of classification rows: accuracy against top-label confidence per bin, with the
    case count per bin and the ECE in the title; None when the rows are not classification rows."""
    from neurofm.plots import pyplot, save_figure

    if not rows or "prob" not in rows[0]:
        return None
    prob = np.array([r["prob"] for r in rows], float)
    y = np.array([r["target"] for r in rows], int)
    conf, pred = prob.max(1), prob.argmax(1)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges) - 1, 0, bins - 1)
    centres, accs, counts = [], [], []
    for b in range(bins):
        sel = which == b
        if sel.any():
            centres.append(conf[sel].mean())
            accs.append((pred[sel] == y[sel]).mean())
            counts.append(int(sel.sum()))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfect calibration")
    ax.plot(centres, accs, "o-", color="C0", label="this model")
    for c, a, n in zip(centres, accs, counts, strict=True):
        ax.annotate(str(n), (c, a), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax.set(xlim=(0, 1), ylim=(0, 1.05), xlabel="confidence (top-class probability)", ylabel="accuracy")
    ax.set_title(f"reliability, {len(rows)} cases, ECE {expected_calibration_error(prob, y):.3f}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    return save_figure(fig, png)
