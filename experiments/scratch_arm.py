"""The demo's scratch regression arm alone, with its settings overridden: per seed, its MAE, the constant
predictor's, Pearson r and the spread of its predictions. A quick diagnostic (no pairing with other arms; use
demo_seeds.py for the paired study).

    python experiments/scratch_arm.py STORE DIR 0,1,2 batch_size=8 steps=300
    python experiments/scratch_arm.py STORE DIR 0,1,2 head_init=zero batch_size=8 steps=300 source=fomo25-tiny-cswap

Overrides are FinetuneConfig fields (``source=MODEL`` fine-tunes that pretrained model instead, in full mode).
The other settings are the demo's regression arm's, so 8 crops a step since 2026-12-05 (rule_scratch_batch.md);
``batch_size=2`` gives the arm the rule's exploration started from.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from neurofm.demo import DemoConfig, finetune_config
from neurofm.tasks.finetune import finetune


def main() -> None:
    data, out, seeds = sys.argv[1], Path(sys.argv[2]), [int(s) for s in sys.argv[3].split(",")]
    base = finetune_config(DemoConfig(), DemoConfig().pretrained["reg"], "reg", "age")
    over: dict = {}
    for kv in sys.argv[4:]:
        k, v = kv.split("=", 1)
        kind = type(getattr(base, k))
        over[k] = (v == "True") if kind is bool else kind(v)
    res = []
    for s in seeds:
        cfg = replace(base, seed=s, bootstrap=10, **over)
        d = out / f"seed{s}"
        t0 = time.time()
        finetune(data, d, cfg, progress=False)
        with open(d / "predictions.csv") as f:
            rows = list(csv.DictReader(f))
        t = np.array([float(r["target"]) for r in rows])
        p = np.array([float(r["prediction"]) for r in rows])
        m = json.loads((d / "run.json").read_text())["task_info"]["target_mean"]
        mae, const = float(np.abs(t - p).mean()), float(np.abs(t - m).mean())
        res.append((mae, const))
        print(
            f"seed {s} mae {mae:6.2f} const {const:6.2f} r {np.corrcoef(t, p)[0, 1]:+.2f} "
            f"predsd {p.std():5.1f} tsd {t.std():5.1f} ({time.time() - t0:.0f} s)",
            flush=True,
        )
    a = np.array(res)
    print("mean mae", a[:, 0].mean().round(2), "const", a[:, 1].mean().round(2), over)


if __name__ == "__main__":
    main()
