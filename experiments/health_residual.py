"""Health read from what the pretrained model cannot predict: its reconstruction residual (an exploration).

The demo's health probe reads features averaged over the scan, and tumours of tens of cm3 barely move that average
(``health_by_diagnosis.py``); a per-position normative read-out of the features does no better than fresh weights
(``health_normative.py``). A pretrained fomo25 model holds something fresh weights do not: a decoder that renders an
anatomy code in a contrast. Where a scan holds what the pretraining pool rarely showed, or what one contrast shows
and another hides (FLAIR's bright lesions), the rendering misses it. The score here is that miss. Per session and
target contrast ``b``:

* ``self``: ``decode(anatomy(x_b), contrast(x_b))``, the model's own reconstruction;
* ``cross``: ``decode(anatomy(x_a), contrast(x_b))`` averaged over the session's other contrasts ``a``: ``b``
  predicted from the others;
* ``blur``: ``x_b`` averaged over the bottleneck's cell and interpolated back, what a decoder that knew only the
  coarse image could give (a control: no pretraining);
* ``image``: the image itself (its residual against zero), as ``health_normative.py --level 0`` reads it;

each for the pretrained model and for the same architecture with fresh weights. The squared residual is put on the
store's common grid and read two ways: ``raw``, the mean of its top ``--top`` share inside the brain, summed over
contrasts; ``normative``, the same after z-scoring each position against the labelled subjects' healthy sessions of
each few-shot split (``make_splits``, the demo's seeds). AUROC on the held-out sessions, higher score = patient. No
label of a patient is used. Exploration, not a rule: nothing in the demo depends on it.

    python experiments/health_residual.py --store STORE --run fomo25-tiny-cswap [--seeds 10] --out r.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from age_signal import fresh_copy
from health_normative import on_grid, padded
from sklearn.metrics import roc_auc_score

from neurofm.data.finetune import build_cases, make_splits
from neurofm.models.registry import model_from_checkpoint
from neurofm.store import Store


@torch.no_grad()
def residuals(model: torch.nn.Module, xs: dict[str, torch.Tensor], cut: tuple[slice, ...]) -> dict[str, np.ndarray]:
    """Per reader (``self``, ``cross``): the squared residual of each contrast, stacked in ``xs``' order on the
    grid (``xs``: each contrast padded by :func:`health_normative.padded`; ``cut`` takes the padding off)."""
    lat = {k: model.forward_features(x).latents for k, x in xs.items()}
    own, cross = [], []
    for b, x in xs.items():
        target = x[0, 0][cut].numpy()
        own.append((target - model.decode(lat[b]["mu_s"], lat[b]["mu_c"])[0, 0][cut].numpy()) ** 2)
        others = [model.decode(lat[a]["mu_s"], lat[b]["mu_c"])[0, 0][cut].numpy() for a in xs if a != b]
        cross.append((target - np.mean(others, 0)) ** 2)
    return {"self": np.stack(own), "cross": np.stack(cross)}


def controls(xs: dict[str, torch.Tensor], cut: tuple[slice, ...], stride: int) -> dict[str, np.ndarray]:
    """The readers with no weights: ``blur`` (the residual against the image averaged over the bottleneck's cell)
    and ``image`` (the image itself, squared)."""
    blur, image = [], []
    for x in xs.values():
        target = x[0, 0][cut].numpy()
        coarse = F.interpolate(F.avg_pool3d(x, stride), size=x.shape[2:], mode="trilinear")[0, 0][cut].numpy()
        blur.append((target - coarse) ** 2)
        image.append(target**2)
    return {"blur": np.stack(blur), "image": np.stack(image)}


def top_mean(values: np.ndarray, share: float) -> float:
    v = np.sort(values)[::-1]
    return float(v[: max(1, int(share * len(v)))].mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--run", required=True, help="a pretrained fomo25 run or a shipped model's name")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--top", type=float, default=0.01, help="share of brain positions the score averages")
    ap.add_argument("--contrasts", default="T1w,T2w,FLAIR")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    store, contrasts = Store(args.store), args.contrasts.split(",")
    cs = build_cases(store, "cls", "healthy", contrasts)
    model = model_from_checkpoint(args.run)[0].eval()
    stride = 2 ** (len(model.config["features"]) - 1)
    models = {"pretrained": model, "fresh": fresh_copy(model)}
    res: dict[str, dict[str, np.ndarray]] = {}  # reader -> key -> (K, X, Y, Z)
    brain: dict[str, np.ndarray] = {}
    for c in cs.cases:
        if not all(k in store.record(c.key)["images"] for k in contrasts):
            continue  # a session missing a contrast is left out of every reader alike
        xs = {}
        for k in contrasts:
            xs[k], cut = padded(on_grid(store, c.key, k), stride)
        brain[c.key] = on_grid(store, c.key, "brain") > 0
        found = dict(controls(xs, cut, stride))
        for name, m in models.items():
            found.update({f"{name}-{r}": v for r, v in residuals(m, xs, cut).items()})
        for label, v in found.items():
            res.setdefault(label, {})[c.key] = v
    readers = sorted(res)
    rows: dict[str, dict[str, list[float]]] = {
        f"{r}/{w}": {"per_seed": []} for r in readers for w in ("raw", "normative")
    }
    for seed in range(args.seeds):
        (train, test), *_ = make_splits(cs, seed=seed, shots=args.shots)
        ref = [c.key for c in train if c.target == 1 and c.key in brain]
        test = [c for c in test if c.key in brain]
        y = np.array([c.target for c in test])
        for r in readers:
            stack = np.stack([res[r][k] for k in ref])
            mu, sd = stack.mean(0), stack.std(0) + 1e-3 * stack.std() + 1e-6
            raw, norm = [], []
            for c in test:
                m = brain[c.key]
                raw.append(sum(top_mean(v[m], args.top) for v in res[r][c.key]))
                z = (res[r][c.key] - mu) / sd
                norm.append(sum(top_mean(v[m], args.top) for v in z))
            rows[f"{r}/raw"]["per_seed"].append(float(roc_auc_score(1 - y, raw)))  # healthy is 1
            rows[f"{r}/normative"]["per_seed"].append(float(roc_auc_score(1 - y, norm)))
    for name, row in rows.items():
        row["auroc"] = float(np.mean(row["per_seed"]))
        print(f"{name:28s} {row['auroc']:.3f}  " + " ".join(f"{a:.2f}" for a in row["per_seed"]))
    if args.out:
        command = (
            f"python experiments/health_residual.py --store STORE --run {args.run} --seeds {args.seeds} "
            f"--top {args.top} --contrasts {args.contrasts}"
        )
        args.out.write_text(json.dumps({"command": command, "sessions": len(brain), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
