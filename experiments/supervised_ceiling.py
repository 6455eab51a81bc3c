"""The backbone of a fine-tuned run as a pretrained run, so that the demo's arms can read it.

``neurofm finetune`` refuses a fine-tuned run as ``--from`` (a fine-tuned model is not a pretrained one). This
experiment needs exactly that: an encoder trained on the pretraining pool's own health labels, read by the demo's
health arm on other stores, as the ceiling of what any health pretext could give
(``rule_health_supervised_ceiling.md``). It takes the fine-tuned checkpoint's backbone tensors, puts them into a
freshly built model of the same recipe (the pretext parts, which no downstream arm reads, keep their fresh weights,
seeded), and writes a run folder as an importer does (``neurofm.io.checkpoint.write_run_folder``):

    python experiments/supervised_ceiling.py export SUP SUP_PRE   (a fine-tuned run folder: its latest checkpoint)

``experiments/probe_pairs.py --models sup=SUP_PRE`` then reads it like any pretrained run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from neurofm.io.checkpoint import WEIGHTS, load_state, load_weights, read_checkpoint, write_run_folder
from neurofm.models.registry import create_model


def export(src: str, out: Path, seed: int = 0) -> dict[str, int]:
    info = read_checkpoint(src)
    if info["model"]["name"] != "downstream":
        raise SystemExit(f"{src}: not a fine-tuned run (model {info['model']['name']!r})")
    spec = info["model"]["kwargs"]["backbone"]
    torch.manual_seed(seed)
    model = create_model(spec["name"], **spec["kwargs"])
    weights = load_weights(Path(info["folder"]) / WEIGHTS)
    backbone = {k[len("backbone.") :]: v for k, v in weights.items() if k.startswith("backbone.")}
    own = model.state_dict()
    bad = [k for k, v in backbone.items() if k not in own or tuple(own[k].shape) != tuple(v.shape)]
    if not backbone or bad:
        raise SystemExit(f"{src}: backbone tensors that do not fit a fresh {spec['name']}: {bad[:5]}")
    fresh = load_state(model, backbone, strict=False)
    run = info["run"]
    run_cfg = {
        "preset": run.get("arch"),
        "model": {"name": spec["name"], "kwargs": spec["kwargs"]},
        "data": {"patch": run.get("data", {}).get("patch") or run.get("patch"), "contrasts": run.get("contrasts")},
        "extra": {
            "preprocessing": run.get("extra", {}).get("preprocessing", {}),
            "supervised_from": {"task": run.get("task"), "target": run.get("target"), "split": run.get("split")},
        },
    }
    write_run_folder(out, model, run_cfg, {"step": int(info["meta"].get("step", 0))})
    return {"copied": len(backbone), "fresh": len(fresh)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="a fine-tuned run's backbone as a pretrained run folder")
    ex.add_argument("src", help="fine-tuned checkpoint folder or run")
    ex.add_argument("out", type=Path)
    ex.add_argument("--seed", type=int, default=0, help="seed of the fresh pretext weights")
    args = ap.parse_args()
    print(export(args.src, args.out, args.seed))


if __name__ == "__main__":
    main()
