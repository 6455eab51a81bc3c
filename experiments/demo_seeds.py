"""The demo's fine-tuning rows for chosen tasks, over more seeds than the demo runs.

The same arms and settings as ``neurofm demo`` (``neurofm.demo.finetune_config``: the pretrained model
read as the demo reads it, scratch, a frozen random encoder and the constant predictor), paired on the
same few-shot draws, seeds F .. F+N-1 (``--first-seed`` F, default 0). Pointed at a demo's ``finetune`` folder,
it reuses the demo's finished runs (their settings are compared first) and adds the missing seeds.

    python experiments/demo_seeds.py --data DEMO/store --out DEMO/finetune --tasks reg --seeds 10
    python experiments/demo_seeds.py --pretrained fomo25-tiny-synth --data STORE --out DIR --tasks cls --seeds 10
    python experiments/demo_seeds.py --data STORE --out DIR --tasks seg --shots seg=2 --seeds 10
    python experiments/demo_seeds.py --data STORE --out DIR --tasks seg --first-seed 10 --seeds 10  # seeds 10-19
    python experiments/demo_seeds.py --data STORE --out DIR --tasks seg --augment nnunet --seeds 10
    python experiments/demo_seeds.py --data STORE --out DIR --tasks cls reg --lr cls=0.001,reg=0.001 --seeds 10
    python experiments/demo_seeds.py --data STORE --out DIR --tasks cls --shots cls=64 --steps cls=400 --seeds 10
    python experiments/demo_seeds.py --data STORE --out DIR --tasks cls reg --head-init zero --seeds 10
    python experiments/demo_seeds.py --data STORE --out DIR --tasks reg --batch reg=8 --steps reg=300 --seeds 10
    python experiments/demo_seeds.py --data STORE --out DIR --tasks reg --modes reg=linear+full --seeds 10
    python experiments/demo_seeds.py --data STORE --out DIR --tasks reg --steps reg=100 --scratch-steps reg=300 \
        --seeds 10   # scratch given three times the pretrained model's steps
    python experiments/demo_seeds.py --data STORE --out DIR --tasks cls --seeds 10 \
        --pair "pretrained zero-shot,pretrained linear"   # also that difference, paired
    python experiments/demo_seeds.py --data STORE --out DIR --tasks reg --modes reg=linear+full \
        --pretrained-head-init reg=probe --seeds 10   # the pretrained model fine-tuned in full from its probe

Writes ``DIR/results-<tasks>-<seeds>[-shots-<shots>].json``: one row per task and arm (value, interval,
paired difference from scratch, per-seed values) and the command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from neurofm.demo import (
    DemoConfig,
    finetune_rows,
    models_by_task,
    models_text,
    parse_per_task,
    parse_shots,
    score_text,
    set_scratch_steps,
)
from neurofm.models.downstream import MODES
from neurofm.train.config import HEAD_INITS
from neurofm.utils import to_jsonable, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--pretrained",
        help="a shipped model or a run folder for every task, or per task as seg=NAME,cls=NAME "
        f"(default: the demo's, {models_text(models_by_task(DemoConfig()))})",
    )
    ap.add_argument("--data", type=Path, required=True, help="the demo's store (or another labelled store)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tasks", nargs="+", default=["seg", "cls", "reg"], choices=["seg", "cls", "reg"])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--first-seed", type=int, default=0, help="the first seed (10: a replication on fresh seeds)")
    ap.add_argument("--no-floors", action="store_true", help="leave out the frozen random encoder and the constant")
    ap.add_argument("--lr", help="learning rate per task of the trained arms, e.g. reg=0.001 (default: demo's)")
    ap.add_argument("--augment", help="training augmentation of the trained arms, flips or nnunet (default: demo's)")
    ap.add_argument("--shots", help="labelled subjects per task as the demo takes them, e.g. seg=2 (default: demo's)")
    ap.add_argument("--steps", help="fine-tuning steps per task of the trained arms, e.g. cls=200 (default: demo's)")
    ap.add_argument(
        "--scratch-steps",
        help="steps of the scratch arm per task where they differ, e.g. reg=300, or none (default: demo's)",
    )
    ap.add_argument("--batch", help="crops per step per task of the trained arms, e.g. reg=8 (default: demo's)")
    ap.add_argument("--modes", help="how the pretrained model is read per task, e.g. reg=linear+full (default: demo's)")
    ap.add_argument(
        "--head-init",
        choices=[h for h in HEAD_INITS if h != "probe"],  # every arm takes it, and a linear probe cannot start LP-FT
        help="cls/reg heads: how the output layer starts (LP-FT, head_init=probe: experiments/lpft_age.py)",
    )
    ap.add_argument(
        "--pretrained-head-init",
        help="per task, how the head of the pretrained model fine-tuned in full starts, e.g. reg=probe (LP-FT)",
    )
    ap.add_argument(
        "--pair",
        action="append",
        default=[],
        help="also A - B of two arms of each task, paired on the same seeds and cases, as the rows name them, e.g. "
        "'pretrained zero-shot,pretrained linear' (repeatable)",
    )
    ap.add_argument(
        "--jobs",
        type=int,
        default=0,
        help="fine-tuning runs at once, each in a worker process on this process's threads / jobs (1: one after "
        "another, on all of them; default 0: the demo's auto, one single-threaded run per CPU thread)",
    )
    args = ap.parse_args()
    tasks = [(t, target) for t, target in DemoConfig().tasks if t in args.tasks]
    demo = DemoConfig(seeds=args.seeds, tasks=tasks, seed=args.first_seed, jobs=args.jobs)
    if args.pretrained:
        demo.pretrained = parse_per_task(args.pretrained, models_by_task(demo), str, "--pretrained")
    if args.shots:
        demo.shots = parse_shots(args.shots, demo.shots)
    if args.augment:
        demo.finetune_augment = args.augment
    if args.steps:
        before = dict(demo.finetune_steps)  # type: ignore[arg-type]
        demo.finetune_steps = parse_per_task(args.steps, before, int, "--steps")
        # a task whose steps --steps changes gives them to scratch too, unless --scratch-steps says otherwise
        demo.scratch_steps = {t: n for t, n in demo.scratch_steps.items() if demo.finetune_steps[t] == before[t]}
    if args.scratch_steps:
        set_scratch_steps(demo, args.scratch_steps)
    if args.lr:
        demo.finetune_lr = parse_per_task(args.lr, dict(demo.finetune_lr), float, "--lr")  # type: ignore[arg-type]
    if args.batch:
        demo.finetune_batch = parse_per_task(args.batch, dict(demo.finetune_batch), int, "--batch")  # type: ignore[arg-type]
    if args.modes:
        demo.modes = parse_per_task(args.modes, dict(demo.modes), lambda v: v.split("+"), "--modes")
        bad = sorted({m for ms in demo.modes.values() for m in ms} - set(MODES))
        if bad:
            raise SystemExit(f"--modes: unknown mode(s) {bad}; choose from {MODES}")
    if args.head_init:
        demo.head_init = args.head_init
    if args.pretrained_head_init:
        demo.pretrained_head_init = parse_per_task(
            args.pretrained_head_init, {"cls": "", "reg": ""}, str, "--pretrained-head-init"
        )
    demo.floors = not args.no_floors
    rows = finetune_rows(demo, models_by_task(demo), args.data, args.out, progress=False)
    print(score_text(rows))
    pairs = arm_pairs(demo, models_by_task(demo), args.data, args.out, args.pair)
    for p in pairs:
        interval = f"[{p['difference_low']:+.3f}, {p['difference_high']:+.3f}]"
        print(f"  {p['task_label']}: {p['a']} - {p['b']} {p['difference']:+.3f} {interval}, ahead on {p['ahead']}")
    shots = f"-shots-{args.shots.replace('=', '').replace(',', '-')}" if args.shots else ""
    first = f"-from-{args.first_seed}" if args.first_seed else ""
    aug = f"-{args.augment}" if args.augment else ""
    aug += f"-lr-{args.lr.replace('=', '').replace(',', '-')}" if args.lr else ""
    aug += f"-steps-{args.steps.replace('=', '').replace(',', '-')}" if args.steps else ""
    aug += f"-scratch-steps-{args.scratch_steps.replace('=', '').replace(',', '-')}" if args.scratch_steps else ""
    aug += f"-batch-{args.batch.replace('=', '').replace(',', '-')}" if args.batch else ""
    aug += f"-modes-{args.modes.replace('=', '').replace(',', '-').replace('+', '-')}" if args.modes else ""
    aug += f"-head-{args.head_init}" if args.head_init else ""
    aug += f"-pretrained-head-{args.pretrained_head_init.replace('=', '')}" if args.pretrained_head_init else ""
    name = f"results-{'-'.join(args.tasks)}-{args.seeds}{first}{shots}{aug}.json"
    record = {"command": " ".join(["python", *sys.argv]), "rows": to_jsonable(rows)}
    if pairs:
        record["pairs"] = to_jsonable(pairs)
    write_json(args.out / name, record)


def arm_pairs(
    demo: DemoConfig, models: dict[str, str], data: Path, out: Path, pairs: list[str]
) -> list[dict[str, Any]]:
    """``"A,B"``: arm A - arm B of each task that has both, paired seed by seed on the same cases: the finished runs of
    the study just made, read back as the study reads them (``arm_seed_rows``, the arms and settings of
    ``finetune_rows``)."""
    from neurofm.analyze.experiments import arm_seed_rows
    from neurofm.demo import demo_arms, finetune_config, run_jobs
    from neurofm.evaluate.metrics import paired_seeds

    threads = run_jobs(demo.jobs)[1]  # the threads finetune_rows trained the runs on
    done = []
    for pair in pairs:
        a, b = (name.strip() for name in pair.split(","))
        found = []
        for task, target in demo.tasks:
            arms = {arm.name: arm for arm in demo_arms(demo, models[task], task)}
            found += list(arms)
            if a not in arms or b not in arms:
                continue
            base, label = finetune_config(demo, models[task], task, target), f"{task}-{target}"
            runs = [
                arm_seed_rows(data, out, base, arms[n], demo.seeds, label, redo_stale=True, threads=threads)
                for n in (a, b)
            ]
            res = paired_seeds(task, *runs)
            better = (lambda d: d < 0) if task == "reg" else (lambda d: d > 0)
            keep = ("difference", "difference_low", "difference_high", "difference_per_seed")
            done.append({"task_label": label, "a": a, "b": b, **{k: res[k] for k in keep},
                         "ahead": sum(better(d) for d in res["difference_per_seed"])})  # fmt: skip
        if not any(r["a"] == a and r["b"] == b for r in done):
            raise SystemExit(f"--pair {pair!r}: no task has both arms; they are {sorted(set(found))}")
    return done


if __name__ == "__main__":
    main()
