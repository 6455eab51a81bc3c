"""LP-FT (``head_init=probe``) against the runs of a finished ``demo_seeds.py`` study, paired seed by seed.

``experiments/rule_lpft.md`` asks whether fine-tuning from the closed-form probe keeps the age gain against a scratch
arm given 600 steps. The reference folder holds a ``demo_seeds.py`` study: its scratch, its closed-form probe and, with
``--modes reg=linear+full``, its full fine-tune. For each seed this runs the pretrained model fine-tuned in full with
the reference full fine-tune's settings (read from its ``run.json``; without one, scratch's with the probe's pretrained
model as the source) and ``head_init=probe``, in ``--out``, checks
that it drew the same training subjects, and pairs it with each reference arm on the same held-out cases (the
demo's interval: a bootstrap over seeds and cases). The reference runs are read as they are, whatever code made
them (their settings are compared and must differ only in ``head_init``, and from scratch's also in ``source``).

    python experiments/lpft_age.py --reference E3 --data FIFTH_STORE --out LPFT --seeds 10
    python experiments/lpft_age.py --reference E1 --data DEMO_STORE --out LPFT_DEMO --seeds 10   # no full fine-tune
    python experiments/lpft_age.py --reference CLS --data DEMO_STORE --out LPFT_CLS --label cls-healthy --seeds 10
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from neurofm.analyze.experiments import arm_rows, run_config, stale_settings
from neurofm.evaluate.metrics import paired_seeds
from neurofm.evaluate.scoring import read_predictions
from neurofm.utils import write_json

REFERENCE_ARMS = {"scratch": "scratch", "full fine-tune": "pretrained-full", "probe": "pretrained-linear"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", type=Path, required=True, help="a demo_seeds.py study with modes linear+full")
    ap.add_argument("--data", type=Path, required=True, help="the store that study ran on")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--label", default="reg-age")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--first-seed", type=int, default=0)
    args = ap.parse_args()
    lpft, refs = [], {k: [] for k in REFERENCE_ARMS}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        full = args.reference / f"{args.label}-pretrained-full-seed{seed}"
        scratch = not full.is_dir()
        if scratch:
            refs.pop("full fine-tune", None)
            full = args.reference / f"{args.label}-scratch-seed{seed}"
            probe = json.loads((args.reference / f"{args.label}-pretrained-linear-seed{seed}/run.json").read_text())
        cfg = run_config(full)
        cfg = dataclasses.replace(cfg, head_init="probe", bootstrap=50)
        if scratch:
            cfg = dataclasses.replace(cfg, source=probe["source"])
        expected = {"head_init", "source"} if scratch else {"head_init"}
        differ = set(stale_settings(full, cfg)) - {"code", "threads"}
        if differ != expected:
            raise SystemExit(f"{full}: settings differ from LP-FT's in {sorted(differ)}, not only {sorted(expected)}")
        folder = args.out / f"{args.label}-pretrained-lpft-seed{seed}"
        lpft.append(arm_rows(args.data, folder, cfg))
        drawn = json.loads((folder / "run.json").read_text())["split"]
        for arm, tag in REFERENCE_ARMS.items():
            if arm not in refs:
                continue
            ref = args.reference / f"{args.label}-{tag}-seed{seed}"
            if json.loads((ref / "run.json").read_text())["split"] != drawn:
                raise SystemExit(f"{ref} drew other subjects than {folder}")
            refs[arm].append(read_predictions(ref / "predictions.csv"))
        print(f"seed {seed}: LP-FT {paired_seeds(cfg.task, [lpft[-1]], None, reps=10)['value']:.3f}", flush=True)
    task = cfg.task
    rows = {"LP-FT": {k: paired_seeds(task, lpft, ref) for k, ref in refs.items()}}
    others = [arm for arm in ("full fine-tune", "probe") if arm in refs]
    rows.update({arm: paired_seeds(task, refs[arm], refs["scratch"]) for arm in others})
    rows["scratch"] = paired_seeds(task, refs["scratch"], None)
    for arm, r in rows.items():
        if arm == "LP-FT":
            for ref, p in r.items():
                print(f"LP-FT {p['value']:.2f} vs {ref}: {p['difference']:+.2f} [{p['difference_low']:+.2f}, "
                      f"{p['difference_high']:+.2f}]")  # fmt: skip
        else:
            print(f"{arm} {r['value']:.2f}")
    command = f"python experiments/lpft_age.py --reference REFERENCE --data STORE --out OUT --seeds {args.seeds}" + (
        f" --first-seed {args.first_seed}" if args.first_seed else ""
    )
    write_json(args.out / f"results-lpft-{args.seeds}.json", {"command": command, "steps": cfg.steps, "rows": rows})


if __name__ == "__main__":
    main()
