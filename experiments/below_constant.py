"""Finished fine-tuning runs against the constant predictor on their own held-out cases, paired seed by seed.

Issue 11 asks that both age arms read below the constant predictor (the training subjects' mean age). For each arm
(a folder pattern with ``{seed}``) and seed this reads the run's predictions and settings (``run.json``), computes
the constant's rows on the same split (:func:`neurofm.evaluate.scoring.constant_rows`, the demo's floor), checks
that they name the same cases, and reports arm − constant with the demo's interval (a bootstrap over seeds and
cases) and on how many seeds the arm is below. The runs are read as they are, whatever code made them.

    python experiments/below_constant.py --data DEMO_STORE --seeds 10 \\
        --arm scratch=E4/reg-age-scratch-seed{seed} --arm LP-FT=LPFT600/reg-age-pretrained-lpft-seed{seed} \
        --pair LP-FT,scratch   # also LP-FT minus scratch, paired
"""

from __future__ import annotations

import argparse
from pathlib import Path

from neurofm.analyze.experiments import run_config
from neurofm.evaluate.metrics import paired_seeds
from neurofm.evaluate.scoring import constant_rows, read_predictions
from neurofm.store import Store
from neurofm.utils import write_json


def arm_spec(spec: str) -> tuple[str, str]:
    """``--arm NAME=FOLDER``: the arm's name and its folder pattern, which must hold ``{seed}``."""
    name, sep, pattern = spec.partition("=")
    if not sep or "{seed}" not in pattern:
        raise argparse.ArgumentTypeError(f"--arm takes NAME=FOLDER_WITH_{{seed}}, not {spec!r}")
    return name, pattern


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="the store the runs were trained on")
    ap.add_argument("--arm", type=arm_spec, action="append", required=True, help="NAME=FOLDER pattern with {seed}")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument(
        "--pair", action="append", default=[], help="A,B: also arm A minus arm B, paired on the same seeds and cases"
    )
    ap.add_argument("--out", type=Path, help="write the rows here as JSON")
    args = ap.parse_args()
    store = Store(args.data)
    rows, preds_of = {}, {}
    for name, pattern in args.arm:
        arm, const, task = [], [], None
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            folder = Path(pattern.format(seed=seed))
            cfg = run_config(folder)
            preds, floor = read_predictions(folder / "predictions.csv"), constant_rows(store, cfg)
            if [r["key"] for r in preds] != [r["key"] for r in floor]:
                raise SystemExit(f"{folder}: its held-out cases are not the split its settings draw")
            arm.append(preds)
            const.append(floor)
            task = cfg.task
        preds_of[name] = (task, arm)
        r = paired_seeds(task, arm, const)
        below = sum(d < 0 for d in r["difference_per_seed"])
        rows[name] = {**r, "constant": paired_seeds(task, const)["value"], "below_on": below}
        print(
            f"{name}: {r['value']:.2f} vs the constant {rows[name]['constant']:.2f}: {r['difference']:+.2f} "
            f"[{r['difference_low']:+.2f}, {r['difference_high']:+.2f}], below on {below} of {args.seeds} seeds"
        )
    pairs = {}
    for spec in args.pair:
        a, b = (n.strip() for n in spec.split(","))
        (task, arm), (_, ref) = preds_of[a], preds_of[b]
        r = paired_seeds(task, arm, ref)
        ahead, ref_value = sum(d < 0 for d in r["difference_per_seed"]), paired_seeds(task, ref)["value"]
        pairs[f"{a} - {b}"] = {**r, "reference_value": ref_value, "lower_on": ahead}
        print(
            f"{a} - {b}: {r['value']:.2f} - {ref_value:.2f} = {r['difference']:+.2f} "
            f"[{r['difference_low']:+.2f}, {r['difference_high']:+.2f}], lower on {ahead} of {args.seeds} seeds"
        )
    if args.out:
        arms = " ".join(f"--arm {n}=..." for n, _ in args.arm) + "".join(f" --pair {p}" for p in args.pair)
        command = f"python experiments/below_constant.py --data STORE --seeds {args.seeds} {arms}"
        write_json(args.out, {"command": command, "rows": rows, "pairs": pairs})


if __name__ == "__main__":
    main()
