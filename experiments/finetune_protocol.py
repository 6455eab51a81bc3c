"""Fine-tuning from pretrained weights: which protocol, which encoder learning rate? (a measured sweep)

On a labelled store that is neither the pretraining pool nor the demo's data, every arm is run
on the same few-shot draws for several seeds (``neurofm.analyze.experiments.paired_study``):

* segmentation (``--seg-shots`` labelled subjects): frozen encoder; full fine-tuning with and
  without a head warm-up (encoder held still for the first quarter of the steps), at encoder
  learning rates 0.1, 0.3 and 1 x the head's; scratch;
* classification and regression: linear probe (closed form with the one-standard-error penalty or the
  cross-validated best, and by gradient steps), frozen encoder + MLP head, full (warm-up, 0.3 x);
  scratch; the two floors;
* ``--seg-lrs 0.003 0.01``: segmentation's learning rate instead — at each rate, full fine-tuning with
  the default protocol against scratch at the same rate, paired per rate (few-shot runs at a rate too
  low for the budget can stay on the empty-prediction plateau); with ``--encoder-scales 0.1 0.3 1``,
  full fine-tuning at each of those encoder learning-rate ratios;
* ``--seg-fg-weights 1 10``: with ``--seg-lrs``, the same at each cross-entropy weight of the lesion class
  (``seg_fg_weight``), paired per weight;
* ``--head-pools mean meanmax``: for classification and regression, the demo's arms (frozen encoder +
  MLP head, scratch, the two floors) with each reduction of the head's learned pooling, paired per pooling.

    python experiments/finetune_protocol.py --run RUN --data STORE --out DIR [--seeds 3] [--steps 200]
    python experiments/finetune_protocol.py --run RUN --data STORE --out DIR --tasks seg --seeds 5 --seg-lrs 0.003 0.01
    python experiments/finetune_protocol.py --run RUN --data STORE --out DIR --tasks seg --seeds 5 --seg-lrs 0.01 \
        --encoder-scales 0.1 0.3 1
    python experiments/finetune_protocol.py --run RUN --data STORE --out DIR --tasks seg --seeds 5 --seg-lrs 0.01 \
        --seg-fg-weights 1 10
    python experiments/finetune_protocol.py --run RUN --data STORE --out DIR --tasks cls --seeds 5 --steps 100 \
        --head-pools mean meanmax

Writes ``DIR/results.json``: one row per task and arm (value, interval, paired difference from scratch).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from neurofm.analyze.experiments import Arm, floor_arms, paired_study
from neurofm.train.config import FinetuneConfig
from neurofm.utils import to_jsonable


def seg_arms(run: str) -> list[Arm]:
    arms = [Arm("frozen", run, "frozen")]
    for warm in (0.0, 0.25):
        for scale in (0.1, 0.3, 1.0):
            if warm == 0.0 and scale != 0.1:
                continue  # the first version's protocol only
            settings = {"head_warmup": warm, "backbone_lr_scale": scale}
            arms.append(Arm(f"full warm{warm:g} lr{scale:g}", run, "full", settings))
    return [*arms, Arm("scratch", "scratch"), Arm("random frozen", "random", "frozen")]


def global_arms(run: str) -> list[Arm]:
    return [
        Arm("linear", run, "linear"),
        Arm("linear best", run, "linear", {"linear_penalty": "best"}),
        Arm("linear sgd", run, "linear", {"linear_fit": "sgd"}),
        Arm("frozen", run, "frozen"),
        Arm("full warm0.25 lr0.3", run, "full", {"head_warmup": 0.25, "backbone_lr_scale": 0.3}),
        Arm("scratch", "scratch"),
        Arm("random linear", "random", "linear"),
        Arm("constant", "constant", ""),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seg-shots", type=int, default=4)
    ap.add_argument("--cls-shots", type=int, default=16)
    ap.add_argument("--reg-shots", type=int, default=24)
    ap.add_argument("--tasks", nargs="*", default=["seg", "cls", "reg"])
    ap.add_argument("--seg-lrs", type=float, nargs="*", default=[], help="sweep segmentation's learning rate")
    ap.add_argument(
        "--encoder-scales", type=float, nargs="*", default=[1.0], help="with --seg-lrs: the encoder's lr x these"
    )
    ap.add_argument(
        "--seg-fg-weights", type=float, nargs="*", default=[1.0], help="with --seg-lrs: the lesion cross-entropy weight"
    )
    ap.add_argument("--patch", type=int, default=32, help="training crop (voxels a side)")
    ap.add_argument("--head-pools", nargs="*", default=[], help="cls/reg: compare the head's pooling reductions")
    args = ap.parse_args()
    base = FinetuneConfig(
        task="seg",
        target="lesion",
        arch=args.run,
        contrasts=["T1w", "FLAIR"],
        steps=args.steps,
        lr=3e-3,
        patch=args.patch,
        fg_p=0.5,
        positive_only=True,
        num_workers=1,
        tta=False,
    )
    tasks = {
        "seg": ("lesion", args.seg_shots, seg_arms(args.run)),
        "cls": ("healthy", args.cls_shots, global_arms(args.run)),
        "reg": ("age", args.reg_shots, global_arms(args.run)),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    res_path = args.out / "results.json"
    results = json.loads(res_path.read_text()) if res_path.is_file() else {}
    studies = []
    for task in args.tasks:
        target, shots, arms = tasks[task]
        if task == "seg" and args.seg_lrs:
            for lr in args.seg_lrs:
                scales = args.encoder_scales
                full = [
                    Arm("full" if scales == [1.0] else f"full enc{s:g}", args.run, "full", {"backbone_lr_scale": s})
                    for s in scales
                ]
                arms = [*full, Arm("scratch", "scratch")]
                for w in args.seg_fg_weights:
                    cfg = replace(base, target=target, shots=shots, lr=lr, seg_fg_weight=w)
                    tag = f"lr{lr:g}" + (f"-fg{w:g}" if w != 1.0 else "")
                    studies.append((f"seg-{tag}", f"seg-{target}-{tag}", cfg, arms))
        elif task != "seg" and args.head_pools:
            arms = [Arm("frozen", args.run, "frozen"), Arm("scratch", "scratch"), *floor_arms(["frozen"])]
            for pool in args.head_pools:
                cfg = replace(base, task=task, target=target, shots=shots, head_pool=pool)
                studies.append((f"{task}-{pool}", f"{task}-{target}-{pool}", cfg, arms))
        else:
            studies.append((task, f"{task}-{target}", replace(base, task=task, target=target, shots=shots), arms))
    for key, label, cfg, arms in studies:
        rows = paired_study(args.data, args.out, cfg, arms, args.seeds, label)
        results[key] = rows
        res_path.write_text(json.dumps(to_jsonable(results), indent=2))
        for r in rows:
            line = f"{key} {r['init']:22s} {r['metric']} {r['value']:.3f}"
            if r.get("difference") is not None:
                lo, hi = r["difference_low"], r["difference_high"]
                line += f"  minus scratch {r['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}]"
            print(line)


if __name__ == "__main__":
    main()
