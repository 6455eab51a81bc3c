"""Does the analysis probe read the contrast from the same whole-scan vectors the whole-scan critic sees?

    python experiments/critic_view_probe.py RUN [RUN ...] --data EVAL_STORE --sessions 80

Until 2026-12-04 the critic of ``objective.adversary_fit=scans`` read each scan centre-padded to the training store's
largest shape (``extra.scan_canvas`` in the run's ``run.json``) and tiled by ``patch^3`` windows over that canvas
(``neurofm.objectives.fomo25.scan_vectors`` without ``shapes``); it now tiles each scan's own shape. The analysis
reads each scan padded only up to the patch and tiled over its own shape (``neurofm.analyze.embed.scan_features``).
The two tilings cut different windows, with different amounts of padding. This script runs the analysis' grouped
probe (``contrast_probe``) on the same evaluation scans read both ways, with one model. Results:
``results_scan_critic_onehot.json`` ("critic_view").
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from neurofm.analyze.embed import embed_store
from neurofm.analyze.latent import contrast_probe
from neurofm.analyze.run import spread_sessions
from neurofm.models.registry import model_from_checkpoint
from neurofm.objectives.fomo25 import scan_vectors
from neurofm.preprocess.transforms import pad_to_shape
from neurofm.store import Store


@torch.no_grad()
def canvas_vectors(model: torch.nn.Module, patch: int, store: Store, df, canvas: list[int]) -> list[np.ndarray]:
    """Each row's scan read as the whole-scan critic read it until 2026-12-04: centre-padded with its minimum to
    ``canvas``, the canvas tiled."""
    out = []
    for key, contrast in zip(df["key"], df["contrast"], strict=True):
        v = np.asarray(store.read(key, contrast), np.float32)
        x = torch.from_numpy(pad_to_shape(v, canvas, float(v.min())))[None, None]
        out.append(scan_vectors(model, x, patch)[0].numpy().astype(np.float32))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--data", required=True)
    ap.add_argument("--sessions", type=int, default=80)
    ap.add_argument("--canvas", type=int, nargs=3, help="default: the run's extra.scan_canvas")
    args = ap.parse_args()
    store = Store(args.data)
    keys = spread_sessions(store, args.sessions)
    result = {}
    for run in args.runs:
        model, info = model_from_checkpoint(run)
        patch = int(info["run"].get("data", {}).get("patch", 32))
        canvas = args.canvas or info["run"].get("extra", {}).get("scan_canvas")
        if not canvas:
            raise SystemExit(f"{run}: no extra.scan_canvas in its run.json; give --canvas X Y Z")
        largest = np.max([store.record(k)["shape"] for k in keys], 0)  # an evaluation scan larger than the canvas
        canvas = [max(int(c), int(s)) for c, s in zip(canvas, largest, strict=True)]
        df = embed_store(run, args.data, keys=keys)
        df["critic_latent"] = canvas_vectors(model.eval(), patch, store, df, canvas)
        r = {"scans": len(df), "canvas": canvas}
        for name, col in (("analysis_tiling", "subject_latent"), ("critic_tiling", "critic_latent")):
            p = contrast_probe(df, col)
            r[name] = [round(p["accuracy"], 4), round(p["accuracy_low"], 4), round(p["accuracy_high"], 4)]
            r["chance"] = round(p["chance"], 4)
        result[run] = r
        print(run, json.dumps(r), flush=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
