"""Training step time and peak memory per preset, against the peers, in one run.

Every configuration runs in its own subprocess (so peak memory is its own) with the same
crop and batch, on random inputs (data loading is measured elsewhere):

* neurofm presets: fomo25, mae, ssl3d, mae-resencl, lamim16, lamim4 — the full objective
  (fomo25 encodes two scans per sample and decodes four volumes);
* peers: nnU-Net ResEnc-L from dynamic-network-architectures with a plain masked-MSE
  step and SGD (what nnssl runs), and MONAI's ViTAutoEnc with an L1 step and Adam.

Ratios are against the peer with the same backbone family (ResEnc-L for the CNNs, ViTAutoEnc
for lamim) and against ResEnc-L for all. On a GPU, ``--bf16``, ``--channels-last`` and
``--compile`` switch on the GPU mode.

    python benchmarks/bench_train.py [--crop 64] [--batch 2] [--vit-size base] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from _common import save, step_times

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

CONFIGS = ["peer:resencl", "peer:vitautoenc", "fomo25", "mae", "ssl3d", "mae-resencl", "lamim16", "lamim4"]


def build(name: str, crop: int, vit_size: str):
    """(model, step function taking a batch, batch factory, optimizer)."""
    import torch

    from neurofm.models.registry import create_model
    from neurofm.objectives import build_objective
    from neurofm.objectives.masking import block_mask
    from neurofm.train.optim import build_optimizer
    from neurofm.train.presets import get_preset

    if name == "peer:resencl":
        from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
        from torch import nn

        model = ResidualEncoderUNet(
            1,
            6,
            (32, 64, 128, 256, 320, 320),
            nn.Conv3d,
            3,
            (1, 2, 2, 2, 2, 2),
            (1, 3, 4, 6, 6, 6),
            1,
            (1, 1, 1, 1, 1),
            True,
            nn.InstanceNorm3d,
            {"eps": 1e-5, "affine": True},
            None,
            None,
            nn.LeakyReLU,
            {"inplace": True},
        )
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)

        def loss_fn(batch):
            x = batch["x"]
            m = block_mask(x.shape[0], tuple(x.shape[2:]), 16, 0.75, device=x.device)
            rec = model(x.masked_fill(m, 0.0))
            return (((rec - x) ** 2) * m).sum() / m.sum()

        return model, loss_fn, lambda b, dev: {"x": torch.randn(b, 1, crop, crop, crop, device=dev)}, opt
    if name == "peer:vitautoenc":
        from monai.networks.nets import ViTAutoEnc

        from neurofm.models.vit import VIT_SIZES

        model = ViTAutoEnc(
            in_channels=4,
            out_channels=4,
            img_size=crop,
            patch_size=16,
            proj_type="conv",
            **VIT_SIZES[vit_size],
        )
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def loss_fn(batch):
            return (model(batch["x"])[0] - batch["x"]).abs().mean()

        return model, loss_fn, lambda b, dev: {"x": torch.rand(b, 4, crop, crop, crop, device=dev)}, opt
    cfg = get_preset(name)
    if cfg.data.mode == "stack":  # the ViT's cube is the crop; its size from the command line
        cfg = cfg.override({"data.patch": crop, "model.kwargs.img_size": crop, "model.kwargs.size": vit_size})
    extra = {"regions": [f"r{i}" for i in range(104)], "dense_labels": list(range(4))}  # what a store would give
    model = create_model(cfg.model.name, **cfg.model_kwargs(extra))
    objective = build_objective(cfg.objective)
    opt = build_optimizer(model.parameters(), cfg.optim)

    def batch_fn(b, dev):
        return cfg.objective.example_batch(b, crop, extra, dev)

    return model, (lambda batch: objective(model, batch, 1.0)[0]), batch_fn, opt


def child(args: argparse.Namespace) -> None:
    import torch

    from neurofm.models.registry import count_parameters

    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model, loss_fn, batch_fn, opt = build(args.child, args.crop, args.vit_size)
    model = model.to(dev)
    if args.channels_last and dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last_3d)
    if args.compile:
        model = torch.compile(model)
    batch = batch_fn(args.batch, dev)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if (args.bf16 and dev.type == "cuda") else None

    def step():
        opt.zero_grad(set_to_none=True)
        if amp is not None:
            with amp:
                loss = loss_fn(batch)
        else:
            loss = loss_fn(batch)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = step_times(step, args.steps, cuda=dev.type == "cuda")
    peak = (
        torch.cuda.max_memory_allocated()
        if dev.type == "cuda"
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) * 1024
    )
    print(
        json.dumps(
            {
                "config": args.child,
                "parameters": count_parameters(model),
                "step_s": times[len(times) // 2],
                "peak_bytes": peak,
                "device": dev.type,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--vit-size", default="base", help="ViT size for lamim and the ViTAutoEnc peer (paper on GPUs)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--configs", nargs="+", default=CONFIGS)
    ap.add_argument("--cpu", action="store_true", help="stay on the CPU even if a GPU is present")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    rows = []
    flags = [
        f"--crop={args.crop}",
        f"--batch={args.batch}",
        f"--vit-size={args.vit_size}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
    ] + [
        f
        for f, on in (
            ("--cpu", args.cpu),
            ("--bf16", args.bf16),
            ("--channels-last", args.channels_last),
            ("--compile", args.compile),
        )
        if on
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    for cfg in args.configs:
        res = subprocess.run(
            [sys.executable, __file__, "--child", cfg, *flags], capture_output=True, text=True, env=env
        )
        if res.returncode != 0:
            print(f"{cfg}: failed\n{res.stderr[-1500:]}")
            rows.append(
                {
                    "config": cfg,
                    "error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed",
                }
            )
            continue
        row = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"{cfg:18s} {row['parameters'] / 1e6:8.1f} M params  {row['step_s']:7.3f} s/step  "
            f"peak {row['peak_bytes'] / 2**30:6.2f} GiB"
        )
    by = {r["config"]: r for r in rows if "error" not in r}
    for r in rows:
        if "error" in r:
            continue
        peer = (
            "peer:vitautoenc" if r["config"].startswith("lamim") or r["config"] == "peer:vitautoenc" else "peer:resencl"
        )
        for ref_name, key in ((peer, "vs_family_peer"), ("peer:resencl", "vs_resencl")):
            ref = by.get(ref_name)
            if ref:
                r[f"time_{key}"] = r["step_s"] / ref["step_s"]
                r[f"memory_{key}"] = r["peak_bytes"] / max(ref["peak_bytes"], 1)
                r[f"params_{key}"] = r["parameters"] / ref["parameters"]
    print("\nratios (time / memory / parameters) against the same-family peer:")
    for r in rows:
        if "time_vs_family_peer" in r:
            print(
                f"  {r['config']:18s} {r['time_vs_family_peer']:6.2f}x  {r['memory_vs_family_peer']:6.2f}x  "
                f"{r['params_vs_family_peer']:6.2f}x"
            )
    save(
        "train",
        {
            "crop": args.crop,
            "batch": args.batch,
            "vit_size": args.vit_size,
            "bf16": args.bf16,
            "channels_last": args.channels_last,
            "compile": args.compile,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
