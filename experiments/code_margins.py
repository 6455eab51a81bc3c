"""How firmly a one-hot anatomy code names its classes: the soft probabilities behind the hard argmax.

    python experiments/code_margins.py RUN --data EVAL_STORE --sessions 6

Encodes the central 32³ crop of every scan of the first sessions and prints, for the anatomy logits, the mean of the
largest soft probability (the model's temperature), the median gap between the largest and second logit, and the
same largest probability at other temperatures (rule_refit_critic.md).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from neurofm.models.registry import model_from_checkpoint
from neurofm.store import Store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--data", required=True)
    ap.add_argument("--sessions", type=int, default=6)
    ap.add_argument("--patch", type=int, default=32)
    args = ap.parse_args()
    model, _ = model_from_checkpoint(args.run)
    model.eval()
    store = Store(args.data)
    crops = []
    for key in store.keys[: args.sessions]:
        for name in store.record(key)["images"]:
            v = np.asarray(store.read(key, name), np.float32)
            c = [max(0, (s - args.patch) // 2) for s in v.shape]
            crops.append(torch.tensor(v[c[0] : c[0] + args.patch, c[1] : c[1] + args.patch, c[2] : c[2] + args.patch]))
    with torch.no_grad():
        lat = model.forward_features(torch.stack(crops)[:, None]).latents
    if "logits_s" not in lat:
        raise SystemExit(f"{args.run}: the anatomy code is not categorical")
    logits, tau = lat["logits_s"], float(getattr(model, "anatomy_temperature", 1.0))
    top = logits.topk(2, dim=1).values
    out = {
        "crops": len(crops),
        "temperature": tau,
        "hard": bool(getattr(model, "hard_anatomy", False)),
        "classes": int(logits.shape[1]),
        "median_gap_first_second_logit": float((top[:, 0] - top[:, 1]).median()),
        "logit_sd_over_classes": float(logits.std(1).mean()),
        "mean_largest_probability": {
            str(t): float(torch.softmax(logits / t, 1).max(1).values.mean()) for t in (tau, 1.0, 2.0)
        },
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
