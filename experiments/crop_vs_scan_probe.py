"""The analysis' contrast probe on single crops against whole scans: does a latent that hides the contrast crop by crop
still tell it once a scan's windows are averaged?

    python experiments/crop_vs_scan_probe.py RUN [RUN ...] --data EVAL_STORE --sessions 80

For every scan of the first sessions: the whole-scan anatomy vector (``neurofm.analyze.embed``: windows averaged) and
the mean anatomy vector of one crop of the run's patch size at a random place inside the volume (one draw per scan,
seeded). The same grouped, cross-validated probe (``neurofm.analyze.latent.contrast_probe``) reads both
(rule_refit_critic.md).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from neurofm.analyze.embed import embed_store
from neurofm.analyze.latent import contrast_probe
from neurofm.models.registry import model_from_checkpoint
from neurofm.store import Store


def crop_vectors(run: str, store: Store, df, patch: int, seed: int) -> list[np.ndarray]:
    model, _ = model_from_checkpoint(run)
    model.eval()
    rng = np.random.default_rng(seed)
    out = []
    for key, name in zip(df["key"], df["contrast"], strict=True):
        v = np.asarray(store.read(key, name), np.float32)
        start = [int(rng.integers(0, max(1, s - patch + 1))) for s in v.shape]
        crop = v[tuple(slice(a, a + patch) for a in start)]
        crop = np.pad(crop, [(0, patch - s) for s in crop.shape])
        with torch.no_grad():
            f = model.forward_features(torch.from_numpy(crop)[None, None])
        out.append(f.anatomy[0].numpy())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--data", required=True)
    ap.add_argument("--sessions", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    store = Store(args.data)
    result = {}
    for run in args.runs:
        df = embed_store(run, args.data, keys=store.keys[: args.sessions])
        _, info = model_from_checkpoint(run)
        patch = int(info["run"].get("data", {}).get("patch", 32))
        df["crop_latent"] = crop_vectors(run, store, df, patch, args.seed)
        scan, crop = contrast_probe(df, "subject_latent"), contrast_probe(df, "crop_latent")
        result[run] = {
            "scans": len(df),
            "chance": scan["chance"],
            "whole_scan": [scan["accuracy"], scan["accuracy_low"], scan["accuracy_high"]],
            "one_crop": [crop["accuracy"], crop["accuracy_low"], crop["accuracy_high"]],
        }
        print(run, json.dumps(result[run]))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
