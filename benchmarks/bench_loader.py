"""Data loading against model consumption: can the loader keep the model fed?

Builds a small synthetic store (``neurofm synth`` + ``prepare``) and measures, for the
fomo25 pair loader at the given crop and batch, samples per second with 0, 1 and 2 worker
processes, then the samples per second that a fomo25 training step consumes on this
device. A ratio loader / model above 1 means the loader is not the bottleneck.

    python benchmarks/bench_loader.py [--crop 64] [--batch 2] [--resolution 2]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import save

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=2)
    ap.add_argument("--subjects", type=int, default=6)
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--model-steps", type=int, default=3)
    args = ap.parse_args()

    import torch

    from neurofm.data.pretrain import pretrain_loader
    from neurofm.models.registry import create_model
    from neurofm.objectives import build_objective
    from neurofm.preprocess import PrepareConfig, prepare
    from neurofm.synth import SynthConfig, synthesize
    from neurofm.tasks.pretrain import prepare_data
    from neurofm.train.optim import build_optimizer
    from neurofm.train.presets import get_preset

    tmp = Path(tempfile.mkdtemp(prefix="neurofm-bench-loader-"))
    try:
        synthesize(
            tmp / "bids", SynthConfig(subjects=args.subjects, resolution=args.resolution), workers=2, progress=False
        )
        prepare(tmp / "bids", tmp / "store", PrepareConfig(spacing=float(args.resolution)), workers=2, progress=False)
        rows = []
        for w in args.workers:
            cfg = get_preset("fomo25").override(
                [
                    f"data.patch={args.crop}",
                    f"data.batch_size={args.batch}",
                    f"data.num_workers={w}",
                    f"data.steps_per_epoch={args.batches + 5}",
                ]
            )
            cfg, index = prepare_data(cfg, tmp / "store")
            it = iter(pretrain_loader(tmp / "store", index, cfg.data, cfg.data_needs(), cfg.trainer.seed))
            for _ in range(3):
                next(it)  # workers started, first crops read
            t = time.perf_counter()
            for _ in range(args.batches):
                next(it)
            dt = time.perf_counter() - t
            rows.append({"workers": w, "samples_per_s": args.batches * args.batch / dt})
            print(f"loader, {w} workers: {rows[-1]['samples_per_s']:.1f} samples/s")
            del it
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        recipe = get_preset("fomo25")
        model = create_model(recipe.model.name, **recipe.model.kwargs).to(dev)
        objective = build_objective(recipe.objective)
        opt = build_optimizer(model.parameters(), recipe.optim)
        batch = recipe.objective.example_batch(args.batch, args.crop, {}, dev)
        for i in range(args.model_steps + 1):
            if i == 1:
                t = time.perf_counter()
            opt.zero_grad()
            objective(model, batch, 1.0)[0].backward()
            opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        model_sps = args.model_steps * args.batch / (time.perf_counter() - t)
        print(f"fomo25 step on {dev.type}: consumes {model_sps:.1f} samples/s")
        for r in rows:
            r["loader_over_model"] = r["samples_per_s"] / model_sps
        save(
            "loader",
            {
                "crop": args.crop,
                "batch": args.batch,
                "resolution_mm": args.resolution,
                "device": dev.type,
                "model_samples_per_s": model_sps,
                "loader": rows,
            },
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
