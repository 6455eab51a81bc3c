"""Run every benchmark, then write results/summary.md (one table) next to the JSON files.

python benchmarks/run_all.py            # CPU sizes (about 10 minutes on 2 cores)
python benchmarks/run_all.py --gpu      # GPU mode: larger crops, paper-size models, bf16
python benchmarks/run_all.py --only store prepare
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

CPU = {
    "store": [],
    "prepare": ["--volumes", "6"],
    "synth": ["--subjects", "3"],
    "loader": ["--crop", "64"],
    "train": ["--crop", "64", "--batch", "2", "--vit-size", "base", "--steps", "3", "--warmup", "1"],
    "infer": ["--shape", "96", "112", "96", "--window", "64"],
    "flops": ["--crop", "64"],
    "export": [],
    "raw": ["--resolution", "2"],
    "embed": [],
    "memory_format": [],
    "bootstrap": [],
    "parallel_runs": [],
}
GPU = {
    **CPU,
    "loader": ["--crop", "128", "--resolution", "1", "--subjects", "4"],
    "train": ["--crop", "128", "--batch", "2", "--vit-size", "paper", "--steps", "10", "--bf16", "--channels-last"],
    "infer": ["--shape", "176", "208", "176", "--window", "128", "--bf16"],
    "flops": ["--crop", "128", "--bf16"],
}


def summary_md(results: dict[str, dict]) -> str:
    lines = ["# neurofm benchmarks", ""]
    m = next(iter(results.values()), {}).get("machine", {})
    lines.append(
        f"Machine: {m.get('cpu', '?')}, {m.get('cpu_count', '?')} CPUs, torch {m.get('torch', '?')}"
        + (f", GPU {m['gpu']}" if m.get("gpu") else "")
        + "\n"
    )
    lines += ["| benchmark | measure | value |", "| --- | --- | --- |"]

    def row(b, k, v):
        lines.append(f"| {b} | {k} | {v} |")

    if "store" in results:
        for r in results["store"]["layouts"]:
            row(
                "store",
                f"{r['layout']}: 96³ crop / whole volume",
                f"{r['crop96_s'] * 1e3:.1f} ms / "
                f"{r['whole_s'] * 1e3:.1f} ms ({r['crop96_vs_whole']:.2f}), ratio {r['compression_ratio']:.2f}x",
            )
    if "prepare" in results:
        for r in results["prepare"]["runs"]:
            row("prepare", f"256³ → 1 mm, {r['workers']} worker(s)", f"{r['volumes_per_s']:.2f} volumes/s")
    if "synth" in results:
        for r in results["synth"]["runs"]:
            row("synth", f"{r['resolution_mm']} mm, 5 contrasts", f"{r['seconds_per_subject']:.2f} s/subject")
    if "loader" in results:
        L = results["loader"]
        for r in L["loader"]:
            row(
                "loader",
                f"fomo25 pairs {L['crop']}³, {r['workers']} workers",
                f"{r['samples_per_s']:.1f} samples/s = {r['loader_over_model']:.1f}x what the model consumes",
            )
    if "export" in results:
        E = results["export"]
        row(
            "export",
            f"fomo25 seg, {'x'.join(map(str, E['shape']))} whole scan, onnxruntime / PyTorch",
            f"{E['onnxruntime_over_torch']:.2f}x time, max prob diff {E['max_abs_prob_difference']:.1e}, "
            f"ONNX {E['seg_onnx_MB']:.0f} MB",
        )
    if "raw" in results:
        R = results["raw"]
        for key in sorted({k.rsplit("_", 2)[0] for k in R if k.endswith("_n4_s")}):
            parts = [f"{m} {R[f'{key}_{m}_s']:.2f} s (Dice {R[f'{key}_{m}_dice']:.3f})"
                     for m in ("deepbet", "neurofm") if f"{key}_{m}_s" in R]  # fmt: skip
            row("raw head", f"{key.replace('_', ' ')} {R.get(f'{key}_shape', '')}",
                ", ".join(parts) + f"; N4 {R[f'{key}_n4_s']:.2f} s")  # fmt: skip
    if "train" in results:
        for r in results["train"]["rows"]:
            if "error" in r:
                row("train", r["config"], "failed: " + r["error"])
                continue
            rel = (
                f"{r['time_vs_family_peer']:.2f}x time, {r['memory_vs_family_peer']:.2f}x memory of its peer"
                if "time_vs_family_peer" in r
                else ""
            )
            row(
                "train step",
                f"{r['config']} ({r['parameters'] / 1e6:.1f} M)",
                f"{r['step_s']:.3f} s, {r['peak_bytes'] / 2**30:.2f} GiB; {rel}",
            )
    if "infer" in results:
        r = results["infer"]
        row(
            "inference",
            f"{r['shape']} window {r['window']}, overlap {r['overlap']}",
            f"MONAI {r['monai_sliding_window_s']:.2f} s, neurofm {r['neurofm_s']:.2f} s "
            f"({r['neurofm_over_monai']:.2f}x), with 8-flip TTA {r['neurofm_tta8_s']:.2f} s",
        )
    if "embed" in results:
        r = results["embed"]
        for b in r["rows"][1:]:
            row(
                "embed",
                f"{r['model']}, {'x'.join(map(str, r['shape']))} scan, {r['windows']} windows, batch {b['batch']}",
                f"{b['time_vs_one_at_a_time']:.2f}x the time of one window at a time "
                f"(vectors differ by at most {b['max_abs_vector_difference']:.1e})",
            )
    if "memory_format" in results:
        for r in results["memory_format"]["rows"]:
            row(
                "memory layout",
                r["case"],
                f"contiguous / channels-last {r['contiguous_over_channels_last']:.2f}x (auto: {r['auto']})",
            )
    if "parallel_runs" in results:
        for r in results["parallel_runs"]["rows"]:
            row(
                "parallel runs",
                f"the demo's {r['task']} step ({r['crops']} crops): {r['jobs']} processes on {r['threads_each']} "
                f"thread(s) each against one on {r['threads']}",
                f"{r['together_over_one_process']:.2f}x the steps per second",
            )
    if "bootstrap" in results:
        for r in results["bootstrap"]["rows"]:
            row(
                "bootstrap",
                f"{r['task']}, {r['cases']} cases",
                f"the libraries per resample / neurofm's counting {r['libraries_over_neurofm']:.0f}x "
                f"(bounds differ by at most {r['max_abs_bound_difference']:.1e})",
            )
    if "flops" in results:
        r = results["flops"]
        row(
            "GFLOP/s",
            f"{r['model']} step, {r['crop']}³ x {r['batch']}",
            f"{r['achieved_gflops']:.1f} of {r['peak_gflops']:.0f} peak ({100 * r['utilisation']:.1f} %)",
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--only", nargs="+")
    args = ap.parse_args()
    plan = GPU if args.gpu else CPU
    names = args.only or list(plan)
    results = {}
    for name in names:
        t = time.time()
        print(f"== {name}", flush=True)
        res = subprocess.run([sys.executable, str(HERE / f"bench_{name}.py"), *plan[name]], cwd=HERE)
        if res.returncode != 0:
            print(f"{name} failed ({res.returncode})")
            continue
        results[name] = json.loads((RESULTS / f"{name}.json").read_text())
        print(f"   {time.time() - t:.0f} s")
    for name in plan:  # include earlier results of benchmarks not rerun
        if name not in results and (RESULTS / f"{name}.json").is_file():
            results[name] = json.loads((RESULTS / f"{name}.json").read_text())
    md = summary_md(results)
    (RESULTS / "summary.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
