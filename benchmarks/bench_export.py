"""Deployment: export sizes, and whole-scan prediction on onnxruntime against PyTorch in one run.

The fomo25 backbone (the paper's size, or --tiny) with a segmentation decoder, a
classification head and a regression head, each exported to ONNX and TorchScript; then one
brain-sized volume (two contrasts) predicted whole (sliding windows, Gaussian weighting) with
the PyTorch model (MONAI's sliding window) and with the ONNX graph on onnxruntime (neurofm's
PyTorch-free runtime: numpy windows), with the same number of threads. Reported as ratios
(onnxruntime / PyTorch) with the largest probability difference and the mask agreement.

    python benchmarks/bench_export.py [--shape 96 112 96] [--window 64] [--tiny]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from _common import save

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=[96, 112, 96])
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="tiny backbone (fast smoke run)")
    args = ap.parse_args()

    import numpy as np
    import torch

    from neurofm.infer.predictor import OnnxPredictor, Predictor
    from neurofm.io.checkpoint import write_run_folder
    from neurofm.models.downstream import DownstreamModel
    from neurofm.models.exporters import export_run

    threads = torch.get_num_threads()
    kw = {"features": [8, 16, 32, 64, 128], "latent": 32} if args.tiny else {}
    contrasts = ["T1w", "FLAIR"]
    rng = np.random.default_rng(0)
    vol = {c: rng.normal(size=args.shape).astype(np.float32) for c in contrasts}
    rows: dict[str, object] = {"threads": threads}
    with tempfile.TemporaryDirectory() as tmp:
        for task, n_out in (("seg", 2), ("cls", 2), ("reg", 1)):
            torch.manual_seed(0)
            model = DownstreamModel({"name": "dual_latent_unet", "kwargs": kw}, task, n_out, contrasts).eval()
            info = {"task": task, "target": "x", "contrasts": contrasts, "classes": list(range(n_out)),
                    "patch": args.window, "target_mean": 0.0, "target_std": 1.0}  # fmt: skip
            cfg = {"model": {"name": "downstream"}, "data": {"contrasts": contrasts, "patch": args.window},
                   "task_info": info, "extra": {"preprocessing": {"spacing": 1.0}}}  # fmt: skip
            run = write_run_folder(Path(tmp) / task, model, cfg, {"step": 0})
            weights = (run / "checkpoints" / "step-0000000" / "model.safetensors").stat().st_size
            rows[f"{task}_safetensors_MB"] = weights / 2**20
            for fmt in ("onnx", "torchscript"):
                t = time.perf_counter()
                path = export_run(run, fmt, Path(tmp) / f"{task}-{fmt}")
                rows[f"{task}_{fmt}_export_s"] = time.perf_counter() - t
                rows[f"{task}_{fmt}_MB"] = path.stat().st_size / 2**20
            if task != "seg":
                continue
            torch_pred = Predictor(model, info, tta=False, sw_batch=2)
            onnx_pred = OnnxPredictor(Path(tmp) / "seg-onnx", threads=threads, tta=False, sw_batch=2)

            def timed(pred):
                times, out = [], None
                for _ in range(args.repeat + 1):
                    t = time.perf_counter()
                    out = pred.predict(vol)
                    times.append(time.perf_counter() - t)
                return sorted(times[1:])[len(times[1:]) // 2], out

            rows["torch_whole_scan_s"], a = timed(torch_pred)
            rows["onnxruntime_whole_scan_s"], b = timed(onnx_pred)
            rows["onnxruntime_over_torch"] = rows["onnxruntime_whole_scan_s"] / rows["torch_whole_scan_s"]
            rows["max_abs_prob_difference"] = float(np.abs(a.probs - b.probs).max())
            rows["mask_agreement"] = float((a.labels == b.labels).mean())
    for k, v in rows.items():
        print(f"{k:28s} {v:10.4g}" if isinstance(v, float) else f"{k:28s} {v}")
    save("export", {"shape": args.shape, "window": args.window, "tiny": args.tiny, **rows})


if __name__ == "__main__":
    main()
