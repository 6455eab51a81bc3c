"""The health pretext's own classifier, zero-shot, on the demo's test cases, paired with its arms (an exploration).

``fomo25_health_head.py`` reads the pretext head on a store's first sessions. This reads it on exactly the test cases
of a ``probe_pairs.py`` study, seed by seed, so that it pairs case by case with that study's arms: how far is a probe
fitted on 16 labelled subjects from the classifier the pretraining pool's labels trained? Each test session is tiled
into ``--patch``³ windows without overlap (the windows of ``probe_windows=tiles``); the head reads each window's
scans of ``--contrasts`` as a pretraining pair (each in its contrast's slot; a session with one of them reads it twice,
as a one-scan session was paired in pretraining); the probability of "patient" is averaged over the windows. No label
of the store is used: the head's classes are the pool's (1: patient), and the store's ``healthy`` (1: healthy) is their
reverse.

    python experiments/pretext_head_paired.py --run RUN --store STORE --study DIR --name f0 [--tag -pretext-tiles]

``DIR`` is a ``probe_pairs.py --out`` folder: its scratch runs give the test cases and the reference, and with
``--name`` and ``--tag`` that model's linear-probe runs are paired too. Prints and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neurofm.analyze.experiments import read_predictions
from neurofm.data.pretrain import contrast_id
from neurofm.evaluate.metrics import paired_seeds
from neurofm.infer.runtime import global_windows
from neurofm.models.registry import model_from_checkpoint
from neurofm.store import Store
from neurofm.utils import to_jsonable, write_json


@torch.no_grad()
def patient_probability(model: Any, store: Store, key: str, contrasts: list[str], patch: int) -> float:
    """The head's probability of "patient" for one session, averaged over its tiled windows."""
    have = [c for c in contrasts if c in store.record(key)["images"]]
    if not have:
        raise ValueError(f"{key} has none of {contrasts}")
    pair = (have * 2)[:2] if len(have) == 1 else have[:2]
    x = np.stack([np.asarray(store.read(key, c), np.float32) for c in pair])
    wins = torch.from_numpy(global_windows(x[None], patch))  # (W, 2, P, P, P)
    ids = torch.tensor([contrast_id(c) for c in pair]).repeat_interleave(len(wins))
    scans = torch.cat([wins[:, :1], wins[:, 1:]])  # the pairs' first scans, then their second
    feats = model.forward_features(scans)
    return torch.softmax(model.health_logits(feats, len(scans), ids), 1)[:, 1].mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a fomo25 run with a health head (objective.w_health > 0)")
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--study", type=Path, required=True, help="a probe_pairs.py --out folder")
    ap.add_argument("--name", help="that study's name of this model, to pair with its probe runs")
    ap.add_argument("--tag", default="", help="the probe runs' read-out tag, e.g. -pretext-tiles")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--contrasts", default="T1w,FLAIR")
    ap.add_argument("--patch", type=int, default=32)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    model = model_from_checkpoint(args.run)[0].eval()
    if getattr(model, "health_head", None) is None:
        raise SystemExit(f"{args.run} has no health head (a fomo25 run with objective.w_health > 0 has one)")
    store, contrasts = Store(args.store), args.contrasts.split(",")

    def rows_of(name: str) -> list[list[dict[str, Any]]]:
        return [read_predictions(args.study / name.format(s=s) / "predictions.csv") for s in range(args.seeds)]

    scratch = rows_of("floors/cls-healthy-scratch-seed{s}")
    scores: dict[str, float] = {}
    head = []
    for rows in scratch:
        seed_rows = []
        for r in rows:
            if r["key"] not in scores:
                scores[r["key"]] = patient_probability(model, store, r["key"], contrasts, args.patch)
            p = scores[r["key"]]
            seed_rows.append({**r, "prob": [p, 1.0 - p], "prediction": int(p < 0.5)})
        head.append(seed_rows)
    keep = ("value", "ci_low", "ci_high", "difference", "difference_low", "difference_high", "per_seed")
    out: dict[str, Any] = {
        "sessions_scored": len(scores),
        "head_minus_scratch": {k: v for k, v in paired_seeds("cls", head, scratch).items() if k in keep},
    }
    if args.name:
        probe = rows_of(f"{args.name}/cls-healthy{args.tag}-pretrained-linear-seed{{s}}")
        res = paired_seeds("cls", head, probe)
        out["head_minus_probe"] = {k: v for k, v in res.items() if k in keep}
    cmd = f"python experiments/{Path(__file__).name} --run RUN --store STORE --study DIR --seeds {args.seeds}"
    cmd += f" --contrasts {args.contrasts} --patch {args.patch}"
    cmd += f" --name {args.name} --tag={args.tag}" if args.name else ""
    out["command"] = cmd
    print(json.dumps({k: v for k, v in out.items() if k != "command"}, default=float, indent=1))
    if args.out:
        write_json(args.out, to_jsonable(out))


if __name__ == "__main__":
    main()
