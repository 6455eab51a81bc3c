"""On which scale is the anatomy latent's contrast offset small? The spreads the training terms and the probe see.

    python experiments/bias_scales.py RUN [RUN ...] --data EVAL_STORE --sessions 80 [--crops 4]

For every session of the first ``--sessions``: the whole-scan anatomy vector of each contrast (the analysis'
``neurofm.analyze.embed``), and the mean anatomy vectors of ``--crops`` crops of the run's patch size, each crop at
one random place shared by all of the session's contrasts (a pair's crops sit at the same place in training). Per
channel, it reports:

* ``scan_sd``: the spread of whole-scan vectors over scans (what the probe's ``StandardScaler`` divides by);
* ``offset``: the contrasts' whole-scan offsets (each contrast's mean less the mean over contrasts), RMS over
  contrasts: what a linear probe reads;
* ``crop_sd``: the spread of crop means over crops (what the crop-mean terms divide by:
  ``align_mean``, ``contrast_means``);
* ``paired_sd``: the spread of a crop mean about its own place's mean over contrasts, once each contrast's
  offset is taken out: what is left of a pair's difference besides the offset.

and, as medians over channels, ``offset / scan_sd`` (the probe's signal), ``offset / crop_sd`` (the same offset on
the crop-mean terms' scale; squared, about what those terms can still charge for it) and ``offset / paired_sd``
(on the scale of a pair's difference). Committed results: ``results_bias_scales.json``.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from crop_vs_scan_probe import crop_at, random_start  # experiments/ is on the path when a script runs

from neurofm.analyze.embed import embed_store
from neurofm.models.registry import model_from_checkpoint
from neurofm.store import Store


def paired_crops(run: str, store: Store, keys: list[str], patch: int, crops: int, seed: int):
    """``(vectors (N, C), place (N,), contrast (N,))``: crop means, one row per crop and contrast; ``place`` numbers
    the (session, position) a row's crop was cut at, the same for every contrast of the session."""
    model, _ = model_from_checkpoint(run)
    model.eval()
    rng = np.random.default_rng(seed)
    vecs, place, names = [], [], []
    counter = 0
    for key in keys:
        rec = store.record(key)
        vols = {n: np.asarray(store.read(key, n), np.float32) for n in rec["images"]}
        shape = next(iter(vols.values())).shape
        for _ in range(crops):
            start = random_start(shape, patch, rng)
            batch = [crop_at(v, start, patch) for v in vols.values()]
            with torch.no_grad():
                f = model.forward_features(torch.from_numpy(np.stack(batch))[:, None])
            vecs.append(f.anatomy.numpy())
            names += list(vols)
            place += [counter] * len(vols)
            counter += 1
    return np.concatenate(vecs), np.asarray(place), np.asarray(names)


def offsets(x: np.ndarray, contrast: np.ndarray) -> np.ndarray:
    """Each contrast's mean less the mean over contrasts, RMS over contrasts: ``(C,)``."""
    means = np.stack([x[contrast == c].mean(0) for c in np.unique(contrast)])
    return np.sqrt(((means - means.mean(0)) ** 2).mean(0))


def scales(run: str, data: str, sessions: int, crops: int, seed: int) -> dict[str, float]:
    store = Store(data)
    keys = store.keys[:sessions]
    df = embed_store(run, data, keys=keys)
    scan = np.stack(df["subject_latent"].to_numpy()).astype(np.float64)
    contrast = df["contrast"].to_numpy()
    _, info = model_from_checkpoint(run)
    patch = int(info["run"].get("data", {}).get("patch", 32))
    x, place, names = paired_crops(run, store, keys, patch, crops, seed)
    x = x.astype(np.float64)
    offset = offsets(scan, contrast)
    eps = 1e-12
    scan_sd, crop_sd = scan.std(0) + eps, x.std(0) + eps
    # a crop mean about its place's mean over contrasts, each contrast's offset (on crops) taken out
    centred = x.copy()
    for p in np.unique(place):
        rows = place == p
        centred[rows] -= x[rows].mean(0)
    for c in np.unique(names):
        rows = names == c
        centred[rows] -= centred[rows].mean(0)
    paired_sd = centred.std(0) + eps
    crop_offset = offsets(x, names)
    used = scan_sd > 1e-6 * scan_sd.max()  # classes the code never uses carry no signal either way

    def med(v: np.ndarray) -> float:
        return float(np.median(v[used]))

    return {
        "scans": len(df),
        "crops": len(x),
        "channels_used": int(used.sum()),
        "offset_over_scan_sd": med(offset / scan_sd),
        "offset_over_crop_sd": med(offset / crop_sd),
        "offset_over_paired_sd": med(offset / paired_sd),
        "crop_offset_over_offset": med(crop_offset / (offset + eps)),
        "crop_sd_over_scan_sd": med(crop_sd / scan_sd),
        "paired_sd_over_scan_sd": med(paired_sd / scan_sd),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--data", required=True)
    ap.add_argument("--sessions", type=int, default=80)
    ap.add_argument("--crops", type=int, default=4, help="crop places per session")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    result = {}
    for run in args.runs:
        result[run] = scales(run, args.data, args.sessions, args.crops, args.seed)
        print(run, json.dumps(result[run]), flush=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
