"""Where does a categorical anatomy code keep the contrast: in which class a position is, or in how sure it is?

For each run with a categorical anatomy code (``model.kwargs.anatomy_code=categorical``), on an evaluation store:

1. the most likely class at each bottleneck position of the central 32^3 crop of a T1w scan against the same crop
   of the session's T2w, FLAIR and T1c, and of a random intensity remapping of the T1w
   (:func:`neurofm.objectives.fomo25.random_remap`): the share of positions whose class is the same, and how many
   classes the code uses (30 sessions); and whether the code names places in the crop: the share of positions whose
   T1w class is, in every session, the class most common at that position over the sessions (1 for a code of places,
   near the largest class share for a code of the image), and the share of those per-position modes left unchanged
   by a mirror of the crop, averaged over the seven mirrors (1 for a code of places that the mirror of
   ``objective.pair_flip`` cannot break);
2. the latent analysis of ``neurofm analyze`` (centred cosine within - across subjects, the grouped contrast probe,
   the contrast gap) on each scan's anatomy vector read two ways: the class probabilities averaged over the scan's
   windows and positions (what ``neurofm analyze`` reads) and the share of positions whose most likely class is each
   class (the code's mode: a hard class fraction).

    python experiments/anatomy_mode.py --eval EVAL_STORE --out FILE.json RUN [RUN ...]
    python experiments/anatomy_mode.py --eval EVAL_STORE --out FILE.json --agreement-only RUN   # 1. only (a minute)
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import torch

from neurofm.analyze.embed import embed_store
from neurofm.analyze.latent import latent_analysis, summary_table
from neurofm.models.registry import model_from_checkpoint
from neurofm.objectives.fomo25 import random_remap
from neurofm.preprocess.transforms import pad_to
from neurofm.store import Store
from neurofm.utils import to_jsonable, write_json

PATCH = 32


def central(v: np.ndarray) -> torch.Tensor:
    o = [max((s - PATCH) // 2, 0) for s in v.shape]
    c = pad_to(v[o[0] : o[0] + PATCH, o[1] : o[1] + PATCH, o[2] : o[2] + PATCH], PATCH, float(v.min()))
    return torch.from_numpy(np.ascontiguousarray(c))[None, None]


@torch.no_grad()
def agreement(model, store: Store, sessions: int = 30, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    keys = [k for k in store.keys if {"T1w", "T2w", "FLAIR"} <= set(store.record(k)["images"])][:sessions]
    same: dict[str, list[float]] = {"T2w": [], "FLAIR": [], "T1c": [], "remapped T1w": []}
    used = np.zeros(0)
    maps = []
    for key in keys:
        rec = store.record(key)
        crops = {n: central(np.asarray(store.read(key, n), np.float32)) for n in rec["images"]}
        (crops["remapped T1w"],) = random_remap(crops["T1w"], (), 4)
        ref = model.forward_features(crops["T1w"]).latents["mu_s"].argmax(1)
        maps.append(ref[0].numpy())
        counts = np.bincount(ref.flatten().numpy(), minlength=int(model.latent))
        used = counts if used.size == 0 else used + counts
        for name in same:
            if name in crops:
                cls = model.forward_features(crops[name]).latents["mu_s"].argmax(1)
                same[name].append(float((cls == ref).float().mean()))
    stack = np.stack(maps)  # (sessions, *grid)
    mode = np.apply_along_axis(lambda v: np.bincount(v).argmax(), 0, stack)
    mirrors = [d for r in (1, 2, 3) for d in itertools.combinations((0, 1, 2), r)]
    return {
        "same_class_share": {f"T1w vs {n}": float(np.mean(v)) for n, v in same.items() if v},
        "place_share": float((stack == mode).mean()),
        "mode_unchanged_by_mirrors": float(np.mean([(np.flip(mode, d) == mode).mean() for d in mirrors])),
        "classes_used": int((used > 0).sum()),
        "largest_class_shares": (np.sort(used)[::-1][:5] / max(used.sum(), 1)).round(3).tolist(),
        "sessions": len(keys),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--agreement-only", action="store_true", help="only the class agreement and the places (step 1)")
    ap.add_argument("runs", type=Path, nargs="+")
    args = ap.parse_args()
    store = Store(args.eval)
    out = {"command": "python experiments/anatomy_mode.py --eval EVAL_STORE --out FILE.json RUN ...", "runs": {}}
    for run in args.runs:
        model, _ = model_from_checkpoint(run)
        model.eval()
        if not getattr(model, "categorical_anatomy", False):
            print(f"{run}: not a categorical anatomy code, skipped")
            continue
        row = {"agreement": agreement(model, store)}
        if args.agreement_only:
            out["runs"][run.name] = row
            print(run.name, row, flush=True)
            write_json(args.out, to_jsonable(out))
            continue
        df = embed_store(run, args.eval)  # subject_latent: the probabilities averaged; anatomy_mode: the mode
        for name, col in (("probabilities", "subject_latent"), ("mode", "anatomy_mode")):
            d = df.assign(subject_latent=df[col], contrast_latent=[np.zeros(0, np.float32)] * len(df))
            row[name] = summary_table(latent_analysis(d.drop(columns="anatomy_mode")))[0]
        out["runs"][run.name] = row
        print(run.name, row, flush=True)
        write_json(args.out, to_jsonable(out))


if __name__ == "__main__":
    main()
