"""Whether an online contrast adversary on crop means can see anything: its head applied to whole-scan anatomy vectors.

    python experiments/adversary_blind.py RUN --data EVAL_STORE --sessions 80

RUN is a pretraining run with ``objective.w_adversary`` > 0 and ``objective.adversary_pool=mean`` (the model keeps its
adversary head). Prints the spread of the class shares and of the head's logits across scans, what it predicts and
its accuracy (rule_refit_critic.md).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from neurofm.analyze.embed import embed_store
from neurofm.io.manifest import CONTRASTS
from neurofm.models.registry import model_from_checkpoint
from neurofm.store import Store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--data", required=True)
    ap.add_argument("--sessions", type=int, default=80)
    args = ap.parse_args()
    df = embed_store(args.run, args.data, keys=Store(args.data).keys[: args.sessions])
    model, _ = model_from_checkpoint(args.run)
    if getattr(model, "adversary", None) is None:
        raise SystemExit(f"{args.run}: the model has no adversary head")
    x = torch.tensor(np.stack(df.subject_latent.to_numpy()))
    with torch.no_grad():
        logits = model.adversary(x[:, :, None, None, None]).flatten(1).numpy()
    y = np.array([CONTRASTS.index(c) for c in df.contrast])
    pred = logits.argmax(1)
    print(
        json.dumps(
            {
                "scans": len(df),
                "classes": list(CONTRASTS),
                "share_sd_across_scans_median": float(np.median(x.numpy().std(0))),
                "adversary_logit_sd_across_scans_per_class": logits.std(0).round(5).tolist(),
                "adversary_logit_mean_per_class": logits.mean(0).round(4).tolist(),
                "adversary_accuracy": float((pred == y).mean()),
                "adversary_predicted_classes": np.bincount(pred, minlength=len(CONTRASTS)).tolist(),
                "true_classes": np.bincount(y, minlength=len(CONTRASTS)).tolist(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
