"""Collect the segmentation gain curve that ``experiments/seg_curve.sh`` ran (``experiments/rule_seg_curve.md``).

Reads each ``WORK/eval-RUN-step-N/results-seg-10.json`` (the demo's segmentation rows for one pretraining
checkpoint: pretrained in full and scratch, seeds 0-9, paired), adds the shipped
model's own 10-seed row on the same store and machine (``experiments/results_seg_augment.json``, flips, 4
subjects: another pretraining run of the same recipe) as the 10,000-step reference, prints the table and writes
the JSON.

    python experiments/seg_curve.py --work WORK --out experiments/results_seg_curve.json [--figure PNG]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POOLS = {"A": 300, "B": 75}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--figure", type=Path, help="also draw the curve here (PNG)")
    args = ap.parse_args()
    rows, scratch = [], None
    for folder in sorted(args.work.glob("eval-*-step-*")):
        if not folder.is_dir() or not (folder / "results-seg-10.json").is_file():
            continue
        run, step = folder.name.split("-")[1], int(folder.name.split("-")[-1])
        found = {r["init"]: r for r in json.loads((folder / "results-seg-10.json").read_text())["rows"]}
        pre, scr = found["pretrained full"], found["scratch"]
        if scratch is None:
            scratch = scr
        assert scr["per_seed"] == scratch["per_seed"], "every point is paired with the same scratch runs"
        diff = pre["difference_per_seed"]
        rows.append(
            {
                "run": run,
                "pool_subjects": POOLS[run],
                "step": step,
                "dice": pre["value"],
                "ci": [pre["ci_low"], pre["ci_high"]],
                "per_seed": pre["per_seed"],
                "minus_scratch": [pre["difference"], pre["difference_low"], pre["difference_high"]],
                "ahead_behind": [sum(d > 0 for d in diff), sum(d < 0 for d in diff)],
                "runs_below_0.1": sum(v < 0.1 for v in pre["per_seed"]),
            }
        )
    if scratch is None:
        sys.exit(f"no finished points under {args.work}")
    rows.sort(key=lambda r: (-r["pool_subjects"], r["step"]))
    made = json.loads(next(args.work.glob("eval-*/seg-lesion-pretrained-full-seed0/run.json")).read_text())
    demo_rows = {  # the shipped model's 10-seed rows: flips, 4 labelled subjects
        r["arm"]: r
        for r in json.loads((ROOT / "experiments/results_seg_augment.json").read_text())["rows"]
        if r["augment"] == "flips" and r["labelled_subjects"] == 4
    }
    shipped = demo_rows["pretrained full"]
    result = {
        "question": "the demo's segmentation gain (4 labelled subjects, 10 seeds, paired with scratch) against the "
        "pretraining steps and pool size of the demo's recipe (experiments/rule_seg_curve.md)",
        "commands": [
            "OMP_NUM_THREADS=2 bash experiments/seg_curve.sh WORK POOL_STORE DEMO_STORE",
            " ".join(["python", *sys.argv]).replace(str(args.work), "WORK"),
        ],
        "machine": made.get("machine"),
        "threads": made.get("threads"),
        "scratch": {
            "dice": scratch["value"],
            "ci": [scratch["ci_low"], scratch["ci_high"]],
            "per_seed": scratch["per_seed"],
        },
        "rows": rows,
        "reference_shipped": {
            "what": "fomo25-tiny-cmeans as it ships (same recipe, another pretraining run, 10,000 steps, code before "
            "crops were drawn from (seed, index)), its 10-seed row on the same store and machine",
            "dice": shipped["dice"],
            "per_seed": shipped["per_seed"],
            "minus_scratch": shipped["minus_scratch"],
            "scratch_per_seed_there": demo_rows["scratch"]["per_seed"],
        },
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"scratch {scratch['value']:.3f}")
    print("| pool | step | pretrained | minus scratch | ahead / behind | runs below 0.1 |")
    for r in rows:
        d, lo, hi = r["minus_scratch"]
        print(f"| {r['pool_subjects']} | {r['step']} | {r['dice']:.3f} | {d:+.3f} [{lo:+.3f}, {hi:+.3f}] | "
              f"{r['ahead_behind'][0]} / {r['ahead_behind'][1]} | {r['runs_below_0.1']} |")  # fmt: skip
    d, lo, hi = shipped["minus_scratch"]
    print(f"| 300 (shipped run) | 10000 | {shipped['dice']:.3f} | {d:+.3f} [{lo:+.3f}, {hi:+.3f}] | | |")
    if args.figure:
        draw(rows, shipped, args.figure)


def draw(rows: list[dict], shipped: dict, path: Path) -> None:
    """Pretrained − scratch Dice with its 95 % interval against the pretraining step, one line per pool."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=120)
    ax.axhline(0, color="0.6", lw=0.8)
    ax.axhline(0.05, color="0.6", lw=0.8, ls=":")
    ax.text(0.01, 0.053, "+0.05 (issue 11)", fontsize=8, color="0.4", va="bottom", transform=ax.get_yaxis_transform())
    for pool, colour, dx in ((300, "C0", 0), (75, "C1", 120)):
        mine = [r for r in rows if r["pool_subjects"] == pool]
        if not mine:
            continue
        x = [r["step"] + dx for r in mine]
        y = [r["minus_scratch"][0] for r in mine]
        err = [[r["minus_scratch"][0] - r["minus_scratch"][1] for r in mine],
               [r["minus_scratch"][2] - r["minus_scratch"][0] for r in mine]]  # fmt: skip
        ax.errorbar(x, y, yerr=err, color=colour, marker="o", capsize=3, label=f"{pool} subjects x 2 sessions")
    d, lo, hi = shipped["minus_scratch"]
    ax.errorbar([10000 - 120], [d], yerr=[[d - lo], [hi - d]], color="C0", marker="o", mfc="white", capsize=3,
                ls="none", label="the shipped model (another run, 300 subjects)")  # fmt: skip
    ax.set_xlabel("pretraining steps (batch 2, of a 10,000-step cosine)")
    ax.set_ylabel("Dice, pretrained − scratch")
    ax.set_title("Lesion Dice from 4 labelled subjects, paired over 10 seeds (95 % intervals)", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
