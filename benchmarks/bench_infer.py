"""Whole-scan inference: neurofm's predictor against MONAI's sliding_window_inference.

The same segmentation model (a fomo25 backbone with its U-Net decoder), the same window,
overlap and Gaussian weighting, on one brain-sized volume: MONAI called directly, then
neurofm's Predictor without and with mirror TTA (8 flips). A ratio near 1 without TTA means
the predictor adds no overhead of its own.

    python benchmarks/bench_infer.py [--shape 96 112 96] [--window 64] [--overlap 0.5] [--tiny]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _common import save

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=[96, 112, 96])
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--overlap", type=float, default=0.5)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="tiny backbone (fast smoke run)")
    ap.add_argument("--bf16", action="store_true", help="GPU: bf16 autocast")
    args = ap.parse_args()

    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference

    from neurofm.infer.predictor import Predictor
    from neurofm.models.downstream import DownstreamModel

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kw = {"features": [8, 16, 32, 64, 128], "latent": 32} if args.tiny else {}
    model = DownstreamModel({"name": "dual_latent_unet", "kwargs": kw}, "seg", 2, ["T1w"]).to(dev).eval()
    vol = np.random.default_rng(0).normal(size=args.shape).astype(np.float32)
    x = torch.from_numpy(vol)[None, None].to(dev)
    present = torch.ones(1, 1, dtype=torch.bool, device=dev)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if (args.bf16 and dev.type == "cuda") else None

    def timed(fn):
        times = []
        for _ in range(args.repeat + 1):
            t = time.perf_counter()
            if amp is not None:
                with amp:
                    fn()
            else:
                fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return sorted(times[1:])[len(times[1:]) // 2]

    @torch.no_grad()
    def monai_plain():
        sliding_window_inference(
            x,
            (args.window,) * 3,
            4,
            lambda t: torch.softmax(model(t, present.expand(t.shape[0], -1)), 1),
            overlap=args.overlap,
            mode="gaussian",
        )

    info = {"task": "seg", "contrasts": ["T1w"], "classes": [0, 1], "patch": args.window}
    ours = Predictor(model, info, device=dev, tta=False, overlap=args.overlap)
    ours_tta = Predictor(model, info, device=dev, tta=True, overlap=args.overlap)
    rows = {
        "monai_sliding_window_s": timed(monai_plain),
        "neurofm_s": timed(lambda: ours.predict({"T1w": vol})),
        "neurofm_tta8_s": timed(lambda: ours_tta.predict({"T1w": vol})),
    }
    rows["neurofm_over_monai"] = rows["neurofm_s"] / rows["monai_sliding_window_s"]
    rows["tta_over_plain"] = rows["neurofm_tta8_s"] / rows["neurofm_s"]
    for k, v in rows.items():
        print(f"{k:24s} {v:8.3f}")
    save(
        "infer",
        {
            "shape": args.shape,
            "window": args.window,
            "overlap": args.overlap,
            "device": dev.type,
            "tiny": args.tiny,
            "bf16": args.bf16,
            **rows,
        },
    )


if __name__ == "__main__":
    main()
