"""Several pretrained models on one of the demo's rows, paired case by case with each other and with scratch.

``demo_seeds.py`` pairs one model against scratch. To compare trainings of a recipe (other pretraining seeds, other
pools) against each other, this runs each model's arms as the demo reads it (``neurofm.demo.demo_arms``) on the
same seeds and few-shot draws, scratch and the two floors once (with the first model's architecture; every model
given must share it), and reports every model against scratch and every pair of models against each other, each
difference with the demo's hierarchical bootstrap over seeds and cases (``neurofm.evaluate.metrics.paired_seeds``).

    python experiments/probe_pairs.py --task cls --data STORE --out DIR --seeds 10 \\
        --models shipped=fomo25-tiny-cmeans third-s0=RUN0 third-s1=RUN1

``--probe KEY=VALUE ...`` sets a closed-form probe's settings (``probe_windows``, ``probe_features``,
``linear_penalty``) on every linear arm, the random encoder's included; their runs are named with those settings, so
one DIR holds several read-outs beside one scratch.

``--scratch-arch MODEL`` trains scratch with another model's architecture (default: the first model's, as the random
encoder). The same trunk built from another model's settings can draw other initial weights (a pretext head built
and dropped moves the random stream), and scratch moves with them: a study that must pair with an earlier study's
scratch gives that study's first model here.

Writes ``DIR/probe-pairs-<task>-<seeds>.json`` (the probe's settings in the name where given): one row per model and
arm and per floor (value, interval, per-seed values, difference from scratch; a model's also from the random encoder)
and one per pair of models (difference, interval, seeds ahead).
Runs already in DIR are reused when their settings match (an interrupted study resumes).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from neurofm.analyze.experiments import Arm, arm_seed_rows
from neurofm.demo import DemoConfig, demo_arms, finetune_config
from neurofm.evaluate.metrics import paired_seeds
from neurofm.utils import to_jsonable, write_json

PROBE_KEYS = {"probe_windows", "probe_features", "linear_penalty"}


def _summary(res: dict[str, Any]) -> dict[str, Any]:
    keep = ("value", "ci_low", "ci_high", "per_seed", "difference", "difference_low", "difference_high")
    out = {k: res[k] for k in keep if k in res}
    if "difference_per_seed" in res:
        out["difference_per_seed"] = res["difference_per_seed"]
        out["ahead_on"] = int(sum(d > 0 for d in res["difference_per_seed"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", required=True, help="NAME=MODEL: a shipped model or a run folder")
    ap.add_argument("--task", choices=["seg", "cls", "reg"], default="cls")
    ap.add_argument("--data", type=Path, required=True, help="the demo's store (or another labelled store)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--probe", nargs="*", default=[], help="KEY=VALUE: a closed-form probe setting (linear arms)")
    ap.add_argument("--scratch-arch", help="the model whose architecture scratch takes (default: the first model)")
    args = ap.parse_args()
    probe = dict(p.split("=", 1) for p in args.probe)
    if set(probe) - PROBE_KEYS:
        raise SystemExit(f"--probe takes {', '.join(sorted(PROBE_KEYS))}, got {', '.join(sorted(probe))}")
    tag = "".join(f"-{v}" for _, v in sorted(probe.items()))
    models = dict(m.split("=", 1) for m in args.models)
    if len(models) != len(args.models) or any(not k or not v for k, v in models.items()):
        raise SystemExit("--models takes distinct NAME=MODEL pairs")
    target = dict(DemoConfig().tasks)[args.task]
    # the read-out is --probe's alone (not the demo's per-model default, neurofm.demo.read_out_of), and the arms the
    # probes' (no zero-shot arm: experiments/pretext_head_paired.py reads the classifier on a study's cases)
    demo = DemoConfig(seeds=args.seeds, tasks=[(args.task, target)], seed=args.first_seed, probe={}, zero_shot=False)
    label = f"{args.task}-{target}"

    def rows_of(folder: Path, base: Any, arm: Arm) -> list[list[dict[str, Any]]]:
        if arm.mode == "linear" and probe:  # the probe's read-out: its own runs, named by it
            arm = replace(arm, settings={**arm.settings, **probe})
            return arm_seed_rows(args.data, folder, base, arm, args.seeds, label + tag)
        return arm_seed_rows(args.data, folder, base, arm, args.seeds, label)

    first = next(iter(models.values()))
    floors_base = finetune_config(demo, first, args.task, target)
    floor_arms = [a for a in demo_arms(demo, first, args.task) if a.source in ("scratch", "random", "constant")]
    scratch_base = finetune_config(demo, args.scratch_arch, args.task, target) if args.scratch_arch else floors_base
    floor_rows = {
        a.name: rows_of(args.out / "floors", scratch_base if a.source == "scratch" else floors_base, a)
        for a in floor_arms
    }
    scratch = floor_rows["scratch"]
    model_rows: dict[tuple[str, str], list[list[dict[str, Any]]]] = {}
    for name, model in models.items():
        base = finetune_config(demo, model, args.task, target)
        for arm in demo_arms(demo, model, args.task):
            if arm.source == model:
                model_rows[(name, arm.name)] = rows_of(args.out / name, base, arm)

    rows = [
        {"arm": a, **_summary(paired_seeds(args.task, r, None if a == "scratch" else scratch))}
        for a, r in floor_rows.items()
    ]
    random = next(r for a, r in floor_rows.items() if a.startswith("random"))

    def against_random(r: list[list[dict[str, Any]]]) -> dict[str, Any]:  # the same read-out of fresh weights
        res = paired_seeds(args.task, r, random)
        return {k: res[k] for k in ("difference", "difference_low", "difference_high")}

    rows += [
        {
            "model": n,
            "source": models[n],
            "arm": a,
            **_summary(paired_seeds(args.task, r, scratch)),
            "minus_random": against_random(r),
        }
        for (n, a), r in model_rows.items()
    ]
    pairs = []
    for (ka, ra), (kb, rb) in itertools.combinations(model_rows.items(), 2):
        if ka[1] == kb[1]:  # the same arm of two models
            res = _summary(paired_seeds(args.task, ra, rb))
            pairs.append({"pair": f"{ka[0]} - {kb[0]}", "arm": ka[1], **res})
    for r in rows + pairs:
        name = r.get("pair") or f"{r.get('model', '')} {r['arm']}".strip()
        diff = (
            f"  diff {r['difference']:+.3f} [{r['difference_low']:+.3f}, {r['difference_high']:+.3f}]"
            if "difference" in r
            else ""
        )
        ahead = f", ahead on {r['ahead_on']}/{args.seeds}" if "ahead_on" in r else ""
        if "minus_random" in r:
            d = r["minus_random"]
            ahead += f"; - random {d['difference']:+.3f} [{d['difference_low']:+.3f}, {d['difference_high']:+.3f}]"
        value = "" if "pair" in r else f"{r['value']:.3f}"
        print(f"{name:40s} {value}{diff}{ahead}")
    first_seed = f"-from-{args.first_seed}" if args.first_seed else ""
    write_json(
        args.out / f"probe-pairs-{args.task}{tag}-{args.seeds}{first_seed}.json",
        {"command": " ".join(["python", *sys.argv]), "rows": to_jsonable(rows), "pairs": to_jsonable(pairs)},
    )


if __name__ == "__main__":
    main()
