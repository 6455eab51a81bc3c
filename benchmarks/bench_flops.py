"""Achieved GFLOP/s of a training step against the processor's peak.

FLOPs of one fomo25 (or ResEnc-L) training step — forward and backward — are counted with
``torch.utils.flop_counter``; the step is timed; the ratio to the device's peak is the
utilisation. CPU peak: cores x clock x FLOPs per cycle (32 for fp32 with AVX2 FMA, 64 with
AVX-512); GPU peak: the dense bf16 figure of known devices.

    python benchmarks/bench_flops.py [--crop 64] [--batch 2] [--model fomo25|resencl]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from _common import save, step_times

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

GPU_PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def cpu_peak_gflops() -> tuple[float, dict]:
    flags, mhz = "", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = line
            if line.startswith("cpu MHz"):
                mhz.append(float(line.split(":")[1]))
    except OSError:
        pass
    per_cycle = 64 if "avx512f" in flags else 32 if ("avx2" in flags and "fma" in flags) else 8
    ghz = (max(mhz) if mhz else 2000.0) / 1000
    cores = len(os.sched_getaffinity(0))
    return cores * ghz * per_cycle, {"cores": cores, "ghz": ghz, "flops_per_cycle": per_cycle}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--model", choices=["fomo25", "resencl"], default="fomo25")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--bf16", action="store_true")
    args = ap.parse_args()

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from neurofm.models.registry import create_model
    from neurofm.train.presets import get_preset

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    recipe = get_preset("fomo25" if args.model == "fomo25" else "ssl3d")
    model = create_model(recipe.model.name, **recipe.model.kwargs).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(args.batch, 1, args.crop, args.crop, args.crop, device=dev)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if (args.bf16 and dev.type == "cuda") else None

    def step():
        opt.zero_grad()
        if amp is not None:
            with amp:
                loss = model(x).float().pow(2).mean()
        else:
            loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    times = step_times(step, args.steps, cuda=dev.type == "cuda")
    dt = times[len(times) // 2]
    achieved = flops / dt / 1e9
    if dev.type == "cuda":
        gpu = torch.cuda.get_device_name(0)
        peak = next((v * 1000 for k, v in GPU_PEAK_BF16_TFLOPS.items() if k in gpu), float("nan"))
        peak_info = {"gpu": gpu, "peak_basis": "dense bf16"}
    else:
        peak, peak_info = cpu_peak_gflops()
        peak_info["peak_basis"] = "fp32 FMA"
    print(
        f"{args.model}: {flops / 1e9:.1f} GFLOP per step, {dt:.3f} s -> {achieved:.1f} GFLOP/s "
        f"of {peak:.0f} peak ({100 * achieved / peak:.1f} %)"
    )
    save(
        "flops",
        {
            "model": args.model,
            "crop": args.crop,
            "batch": args.batch,
            "device": dev.type,
            "gflop_per_step": flops / 1e9,
            "step_s": dt,
            "achieved_gflops": achieved,
            "peak_gflops": peak,
            "utilisation": achieved / peak,
            **peak_info,
        },
    )


if __name__ == "__main__":
    main()
