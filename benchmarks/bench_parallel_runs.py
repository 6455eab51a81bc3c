"""Fine-tuning runs one after another on every thread, or several at once on a share of the threads each.

``neurofm demo --jobs`` (and ``experiments/demo_seeds.py --jobs``) trains its fine-tuning runs several at once, each
in a worker process on the threads / jobs (auto: one single-threaded run per thread). This measures what that
rests on: the demo's training steps (fomo25-tiny's backbone with the demo's heads, channels-last as
``trainer.memory_format=auto`` trains them on a CPU; age regression 8 crops, lesion segmentation 2 crops, each of
two contrasts, 32^3), side by side in one run:

* one process on all T threads;
* J processes at once, each on T / J threads (J = 2, 4, ... up to T).

Each configuration reports the median step of each process and the steps per second of all of them together;
the ratio to one process on T threads is what ``--jobs J`` gains in training (above 1: faster). Every process
starts from the same weights and inputs.

    python benchmarks/bench_parallel_runs.py [--steps 12] [--threads T]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from _common import save, step_times

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

CASES = {"reg": 8, "seg": 2}  # the demo's crops per step of each task


def worker(task: str, steps: int, warmup: int) -> None:
    """Time ``steps`` training steps of the demo's ``task`` in this process (threads as OMP_NUM_THREADS says)."""
    import torch

    from bench_memory_format import finetune_case

    torch.manual_seed(0)
    model, loss_fn, opt = finetune_case(task, CASES[task])
    model.to(memory_format=torch.channels_last_3d)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    for _ in range(warmup):
        step()
    print(json.dumps({"median_s": statistics.median(step_times(step, steps)), "threads": torch.get_num_threads()}))


def together(task: str, jobs: int, threads: int, steps: int, warmup: int) -> list[dict]:
    """``jobs`` worker processes at once, each on ``threads`` threads: what each measured."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--worker", task, "--steps", str(steps), "--warmup", str(warmup)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(jobs)]
    out = []
    for p in procs:
        text, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"a worker failed ({p.returncode})")
        out.append(json.loads(text.strip().splitlines()[-1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="T (default: torch.get_num_threads())")
    ap.add_argument("--worker", choices=sorted(CASES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.warmup)
        return

    import torch

    total = args.threads or torch.get_num_threads()
    splits = [j for j in range(2, total + 1) if total % j == 0] or [2]
    rows = []
    for task in CASES:
        one = together(task, 1, total, args.steps, args.warmup)[0]
        base = 1.0 / one["median_s"]
        print(f"{task}: one process on {total} threads  {one['median_s']:.3f} s a step", flush=True)
        for jobs in splits:
            each = max(1, total // jobs)
            got = together(task, jobs, each, args.steps, args.warmup)
            rate = sum(1.0 / g["median_s"] for g in got)
            row = {
                "task": task,
                "crops": CASES[task],
                "threads": total,
                "jobs": jobs,
                "threads_each": each,
                "one_process_step_s": one["median_s"],
                "step_s_each": [g["median_s"] for g in got],
                "steps_per_s_one_process": base,
                "steps_per_s_together": rate,
                "together_over_one_process": rate / base,
            }
            rows.append(row)
            print(
                f"{task}: {jobs} processes on {each} thread(s) each  "
                f"{statistics.median(row['step_s_each']):.3f} s a step each  "
                f"{row['together_over_one_process']:.2f}x the steps per second",
                flush=True,
            )
    save("parallel_runs", {"rows": rows})


if __name__ == "__main__":
    main()
