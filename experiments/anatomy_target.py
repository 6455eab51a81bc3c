"""Has fomo25's anatomy projector (``objective.w_anatomy``) learnt anything beyond a constant?

Draws pretraining pairs from the run's own pool exactly as pretraining does, encodes the
*unmasked* crops, and reports for the projector's output: its cosine with each subject's
standardised regional-volume target (what the loss scores), the mean cosine between the outputs
of different samples (1.0: the projector gives every crop the same vector), and the same two
numbers for the best constant (the mean target) as a floor.

    python experiments/anatomy_target.py --run RUN [--store POOL_STORE] [--batches 32]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from neurofm.data.pretrain import pretrain_loader
from neurofm.models.registry import model_from_checkpoint
from neurofm.tasks.pretrain import prepare_data
from neurofm.train.config import Recipe
from neurofm.utils import read_json


def mean_offdiagonal_cosine(v: torch.Tensor) -> float:
    n = F.normalize(v, dim=1)
    c = n @ n.T
    return float((c.sum() - c.diagonal().sum()) / (len(v) * (len(v) - 1)))


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--store", help="default: the run's own pool")
    ap.add_argument("--batches", type=int, default=32)
    args = ap.parse_args()
    saved = read_json(args.run / "run.json")
    saved.pop("neurofm_version", None)
    cfg = Recipe.from_dict(saved)
    cfg, index = prepare_data(cfg, args.store or saved["extra"]["store"])
    model = model_from_checkpoint(str(args.run))[0].eval()
    if getattr(model, "anatomy_projector", None) is None:
        raise SystemExit(f"{args.run}: no anatomy projector (pretrained without objective.w_anatomy)")
    loader = pretrain_loader(args.store or saved["extra"]["store"], index, cfg.data, cfg.data_needs(), seed=0)
    proj, target = [], []
    for i, batch in enumerate(loader):
        if i >= args.batches:
            break
        mu = model.forward_features(batch["x_a"]).latents["mu_s"]
        proj.append(model.anatomy_projector(mu))
        target.append(batch["volumes"])
    p, t = torch.cat(proj), torch.cat(target)
    const = t.mean(0, keepdim=True).expand_as(t)
    out = {
        "run": str(args.run),
        "crops": len(p),
        "cosine to target": float(F.cosine_similarity(p, t, dim=1).mean()),
        "cosine between outputs of different crops": mean_offdiagonal_cosine(p),
        "mean target: cosine to target": float(F.cosine_similarity(const, t, dim=1).mean()),
        "targets: cosine between different crops": mean_offdiagonal_cosine(t),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
