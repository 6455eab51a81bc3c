"""Per-scan features (``neurofm embed`` / ``analyze``): a scan's windows one at a time against in batches.

``scan_features`` cuts a scan into windows of the model's patch and averages the backbone's anatomy and
contrast vectors over them. Until 2026-12-05 it sent each window through the model alone; it now sends
``batch`` at a time (default 8). This times both on the same scan and model, as ratios to one at a time,
and checks that the vectors agree (to float rounding).

    python benchmarks/bench_embed.py [--model fomo25-tiny-cswap] [--shape 43 52 44] [--batches 1 2 4 8 16]

The default shape is a demo scan prepared at 4 mm (2 x 2 x 2 windows of 32^3); ``--shape 176 208 176
--model RUN`` a 1 mm brain with a larger model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _common import save, timeit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fomo25-tiny-cswap", help="a shipped model or a run folder")
    ap.add_argument("--shape", type=int, nargs=3, default=[43, 52, 44])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    import numpy as np
    import torch

    from neurofm.analyze.embed import scan_features
    from neurofm.data.sampling import window_slices
    from neurofm.models.registry import model_from_checkpoint

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, info = model_from_checkpoint(args.model)
    model = model.to(dev).eval()
    patch = int(info["run"].get("data", {}).get("patch", 64))
    vol = np.random.default_rng(0).normal(size=args.shape).astype(np.float32)
    padded = tuple(max(s, patch) for s in args.shape)
    windows = len(window_slices(padded, patch, 0.0))

    def run(b: int):
        out = scan_features(model, vol, patch, device=dev, batch=b)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return out

    ref = run(1)
    rows = []
    for b in sorted({1, *args.batches}):  # one at a time is the reference
        t = timeit(lambda b=b: run(b), repeat=args.repeat)
        got = run(b)
        diff = max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(ref[:2], got[:2], strict=True))
        rows.append({"batch": b, **t, "max_abs_vector_difference": diff})
    base = rows[0]["median_s"]
    for r in rows:
        r["time_vs_one_at_a_time"] = r["median_s"] / base
        print(
            f"batch {r['batch']:>3}: {r['median_s'] * 1e3:8.1f} ms per scan ({windows} windows), "
            f"{r['time_vs_one_at_a_time']:.2f}x one at a time, "
            f"vectors differ by at most {r['max_abs_vector_difference']:.1e}"
        )
    save(
        "embed",
        {
            "model": args.model,
            "shape": args.shape,
            "patch": patch,
            "windows": windows,
            "device": dev.type,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
