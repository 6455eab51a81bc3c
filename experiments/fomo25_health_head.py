"""The fomo25 health pretext's own classifier, read zero-shot on a store (an exploration).

``fomo25-cmeans-health``'s health head (``objective.w_health``) is trained on the pretraining pool's labels. Before
asking why a few-shot probe does or does not read health from the encoder, ask whether the head itself tells a patient
from a healthy subject on sessions it never saw. Per session with both contrasts of ``--contrasts``, the head reads the
two scans as a pretraining pair (first and second, each in its contrast's slot when the model has
``health_slots``) on ``--crops`` random crops of ``--patch``³, the same place in both scans, unmasked (what it was
trained on); the probability of "patient" (class 1) is averaged over the crops. AUROC against the store's
``healthy`` label (a patient scoring higher is above 0.5).

    python experiments/fomo25_health_head.py --run RUN --store STORE [--sessions 80] [--out OUT.json]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from ssl3d_health_head import parse, report

from neurofm.data.finetune import build_cases
from neurofm.data.pretrain import contrast_id
from neurofm.models.registry import model_from_checkpoint
from neurofm.store import Store


def paired_crops(a: np.ndarray, b: np.ndarray, n: int, patch: int, rng: np.random.Generator) -> list[torch.Tensor]:
    """``n`` random ``patch``³ crops of two co-registered scans, each at one place in both: ``(2, 1, P, P, P)``."""
    out = []
    for _ in range(n):
        i, j, k = (int(rng.integers(0, size - patch + 1)) for size in a.shape)
        box = (slice(i, i + patch), slice(j, j + patch), slice(k, k + patch))
        out.append(torch.from_numpy(np.stack([a[box], b[box]]))[:, None])
    return out


@torch.no_grad()
def patient_probability(model: torch.nn.Module, pair: torch.Tensor, ids: torch.Tensor) -> float:
    """``pair``: ``(2, 1, X, Y, Z)``, a pair's first and second scan."""
    feats = model.forward_features(pair)
    return torch.softmax(model.health_logits(feats, 2, ids), 1)[0, 1].item()


def main() -> None:
    contrasts = {"default": "T1w,FLAIR", "help": "the pair's first and second contrast"}
    args = parse(__doc__, "a fomo25 run with a health head (objective.w_health > 0)", contrasts=contrasts)
    model = model_from_checkpoint(args.run)[0].eval()
    if getattr(model, "health_head", None) is None:
        raise SystemExit(f"{args.run} has no health head (a fomo25 run with objective.w_health > 0 has one)")
    first, second = args.contrasts.split(",")
    ids = torch.tensor([contrast_id(first), contrast_id(second)])
    store, rng = Store(args.store), np.random.default_rng(args.seed)
    cases = build_cases(store, "cls", "healthy", None).cases[: args.sessions]
    patient, score, skipped = [], [], 0
    for c in cases:
        images = store.record(c.key)["images"]
        if first not in images or second not in images:
            skipped += 1
            continue
        a, b = (np.asarray(store.read(c.key, k), np.float32) for k in (first, second))
        if a.shape != b.shape or min(a.shape) < args.patch:
            skipped += 1
            continue
        p = [patient_probability(model, pair, ids) for pair in paired_crops(a, b, args.crops, args.patch, rng)]
        patient.append(1 - c.target)  # the store's label: 1 is healthy
        score.append(float(np.mean(p)))
    y = np.array(patient)
    row = {
        "sessions": len(y),
        "skipped": skipped,
        "patients": int(y.sum()),
        "auroc_crops": float(roc_auc_score(y, score)),
    }
    report(row, args, Path(__file__).name, f"--contrasts {args.contrasts} --sessions {args.sessions}")


if __name__ == "__main__":
    main()
