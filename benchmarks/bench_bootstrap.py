"""A fine-tuning run's bootstrap intervals: per-resample counting against the libraries' own functions.

Every run summarises its test cases with a 95 % interval from ``--bootstrap`` resamples (1000 by default). Until
2026-12-07 each classification resample called scikit-learn (accuracy, balanced accuracy, F1, AUROC) and torchmetrics
(ECE), and each regression resample SciPy's ``pearsonr``; now ``classification_resampler`` adds up each case's
counts and Pearson r is NumPy's ``corrcoef``. This times both ways on the same cases and resamples, as a ratio, and
gives the largest difference between their interval bounds.

    python benchmarks/bench_bootstrap.py [--cases 24 100] [--reps 200]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from _common import save

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, nargs="+", default=[24, 100])
    ap.add_argument("--reps", type=int, default=200, help="resamples per timing (the libraries' way is slow)")
    args = ap.parse_args()

    import numpy as np
    from scipy.stats import pearsonr

    from neurofm.evaluate.metrics import (
        bootstrap,
        classification_metrics,
        classification_resampler,
        regression_metrics,
    )

    def library_regression(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:  # as it was: SciPy's r
        err = pred - y
        r = float(pearsonr(pred, y)[0]) if len(y) > 2 and np.std(pred) > 0 and np.std(y) > 0 else float("nan")
        return {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err**2).mean())), "pearson_r": r}

    rows = []
    for n in args.cases:
        rng = np.random.default_rng(n)
        y = rng.integers(0, 2, n)
        logit = rng.normal(size=n) + y
        prob = np.stack([1 / (1 + np.exp(logit)), 1 / (1 + np.exp(-logit))], 1)
        age = rng.normal(50, 11, n)
        pred = age + rng.normal(0, 8, n)
        ways = {
            "cls": (
                lambda idx, prob=prob, y=y: classification_metrics(prob[idx], y[idx]),
                classification_resampler(prob, y),
            ),
            "reg": (
                lambda idx, pred=pred, age=age: library_regression(pred[idx], age[idx]),
                lambda idx, pred=pred, age=age: regression_metrics(pred[idx], age[idx]),
            ),
        }
        for task, (library, ours) in ways.items():
            out = {}
            for name, fn in (("libraries", library), ("neurofm", ours)):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fn(np.arange(n))  # imports and first-call set-up, untimed
                    t = time.perf_counter()
                    out[name] = bootstrap(fn, n, reps=args.reps, seed=0)
                    out[f"{name}_s"] = time.perf_counter() - t
            diff = max(
                abs(out["libraries"][m][k] - out["neurofm"][m][k])
                for m in out["libraries"]
                for k in ("value", "ci_low", "ci_high")
            )
            row = {
                "task": task,
                "cases": n,
                "reps": args.reps,
                "libraries_s_per_1000": out["libraries_s"] * 1000 / args.reps,
                "neurofm_s_per_1000": out["neurofm_s"] * 1000 / args.reps,
                "libraries_over_neurofm": out["libraries_s"] / out["neurofm_s"],
                "max_abs_bound_difference": diff,
            }
            rows.append(row)
            print(
                f"{task} {n:>4} cases: libraries {row['libraries_s_per_1000']:.2f} s, neurofm "
                f"{row['neurofm_s_per_1000']:.3f} s per 1000 resamples ({row['libraries_over_neurofm']:.0f}x); "
                f"values and bounds differ by at most {diff:.1e}"
            )
    save("bootstrap", {"rows": rows})


if __name__ == "__main__":
    main()
