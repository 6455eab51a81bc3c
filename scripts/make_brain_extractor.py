"""Train neurofm's brain extractor, measure it beside deepbet, and package it with its model card.

One command (CPU; about an hour at the defaults)::

    .venv/bin/python scripts/make_brain_extractor.py --work runs/brain-extract

1. ``neurofm synth`` training heads (seed 5000: subjects sub-5001 ..., none of the demo's or of the
   evaluation set's) with skull, scalp and neck, every contrast, lesions included; a CSV manifest
   gives each session's generator brain mask as the label ``brainmask`` (not as a crop mask);
2. ``neurofm prepare`` at 4 mm (the backbone's spacing) with ``--brain-extraction none`` (the whole
   head, z-scored over its foreground: what the extractor sees at run time);
3. ``neurofm finetune --task seg --target brainmask --from fomo25-tiny-synth`` with every contrast and
   contrast dropout, so that each contrast alone gives a mask;
4. ``neurofm export --format onnx`` (the extractor runs on onnxruntime, without PyTorch);
5. on separate synthetic heads (seed 6000) at their native 2 mm: Dice against the generator's mask and
   seconds per volume, for neurofm's extractor on every contrast and deepbet beside it;
6. copies the run, its ONNX export and a ``MODEL_CARD.md`` to ``src/neurofm/pretrained/<name>/``.

Every stage reuses what is already in ``--work``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
NEUROFM = [sys.executable, "-m", "neurofm.cli"]
CARRY = ("model.safetensors", "model.json", "transfer.json", "preprocessing.json", "run.json", "meta.json")
CONTRASTS = ["T1w", "T1c", "T2w", "FLAIR", "PDw"]


def sh(*args: object) -> None:
    print("+ neurofm", " ".join(map(str, args)), flush=True)
    subprocess.run([*NEUROFM, *map(str, args)], check=True)


def synth(work: Path, name: str, subjects: int, seed: int, workers: int) -> Path:
    bids = work / f"{name}-bids"
    if not (bids / "participants.tsv").is_file():
        shutil.rmtree(bids, ignore_errors=True)
        sh("synth", bids, "--subjects", subjects, "--seed", seed, "--first-subject", seed + 1, "--resolution", 2,
           "--sites", 3, "--workers", workers, "--no-progress")  # fmt: skip
    return bids


def brain_mask_manifest(bids: Path) -> Path:
    """A CSV manifest: the session's scans as images and its generator brain mask as the label ``brainmask``."""
    from neurofm.io.manifest import discover_bids

    table = discover_bids(bids).table
    images = table[table["role"] == "image"][["subject", "session", "name", "path"]].assign(role="image")
    rows = [images]
    for (sub, ses), _ in images.groupby(["subject", "session"]):
        sub_dir = sub if str(sub).startswith("sub-") else f"sub-{sub}"
        ses_dir = f"ses-{ses}" if ses and not str(ses).startswith("ses-") else str(ses)
        found = sorted((bids / "derivatives").glob(f"*/{sub_dir}/{ses_dir}/anat/*_desc-brain_mask.nii*"))
        if found:
            rows.append(pd.DataFrame([{"subject": sub, "session": ses, "name": "brainmask", "path": str(found[0]),
                                       "role": "label"}]))  # fmt: skip
    out = bids.parent / f"{bids.name}-brainmask.csv"
    pd.concat(rows).to_csv(out, index=False)
    return out


def evaluate(bids: Path, export: Path, deepbet: bool) -> pd.DataFrame:
    """Dice of each extractor against the generator's brain mask on every scan, on the scan's own grid."""
    from neurofm.io.manifest import discover_bids
    from neurofm.io.nifti import load_scan
    from neurofm.preprocess import brain, transforms

    man = discover_bids(bids)
    rows = []
    for s in man.sessions():
        gt_path = next((p for n, p in s.label_maps.items() if n == "brain"), None)
        if gt_path is None:
            continue
        gt = load_scan(gt_path, kind="label")
        for contrast, path in s.images.items():
            scan = load_scan(path)
            truth = transforms.resample(gt.data[0].astype(np.float32), gt.affine, (scan.shape, scan.affine), order=1)
            truth = truth > 0.5
            methods = [("neurofm", lambda sc, c: brain.neurofm_mask(sc, c, folder=export))]
            if deepbet:
                methods.append(("deepbet", lambda sc, c: brain.deepbet_mask(sc)))
            for method, fn in methods:
                t = time.perf_counter()
                mask = fn(scan, contrast)
                sec = time.perf_counter() - t
                dice = 2 * (mask & truth).sum() / max(mask.sum() + truth.sum(), 1)
                rows.append({"session": s.key, "contrast": contrast, "method": method, "dice": float(dice),
                             "seconds": sec, "shape": "x".join(map(str, scan.shape))})  # fmt: skip
    return pd.DataFrame(rows)


def model_card(name: str, args: argparse.Namespace, res: pd.DataFrame, meta: dict, summary: dict) -> str:
    table = res.groupby(["contrast", "method"])["dice"].agg(["mean", "min", "count"]).unstack("method")
    lines = ["| contrast | " + " | ".join(f"{m} Dice mean (min)" for m in table["mean"].columns) + " |"]
    lines.append("| --- |" + " --- |" * len(table["mean"].columns))
    for c in table.index:
        cells = [f"{table['mean'].loc[c, m]:.3f} ({table['min'].loc[c, m]:.3f})" for m in table["mean"].columns]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    secs = res.groupby("method")["seconds"].median()
    timing = ", ".join(f"{m} {v:.2f} s" for m, v in secs.items())
    return f"""# {name}

neurofm's brain extractor: fomo25-tiny's encoder (from the shipped `fomo25-tiny-synth`) with a U-Net
segmentation decoder, fine-tuned to segment the brain in whole synthetic heads (skull, scalp and neck
included) of every contrast. `neurofm prepare --brain-extraction neurofm` and `neurofm brain-extract
--method neurofm` run it from its ONNX export on onnxruntime (no PyTorch needed); `auto` uses it for
sessions without a T1w or T1c (deepbet takes those).

## Data
{args.subjects} synthetic subjects (seed {args.seed}, sub-{args.seed + 1} ..., 3 site intensity models,
tumours / infarcts / white-matter lesions in 60 %, bias fields, thick slices, mixed orientations),
T1w, T1c, T2w, FLAIR, PDw; the label is the generator's brain mask. Prepared at {args.spacing} mm
without a brain mask (the crop is the head's foreground; the z-score is taken over it).
The heads come from one template (ICBM 2009c): the model has seen no real scan.

## Training
    .venv/bin/python scripts/make_brain_extractor.py --work WORK --steps {args.steps} --subjects {args.subjects}

`neurofm finetune --task seg --target brainmask --from fomo25-tiny-synth --contrasts {",".join(CONTRASTS)}
--patch {args.patch} --steps {args.steps} --set contrast_dropout={args.dropout}` ({meta.get("step")} steps);
held-out Dice on the prepared {args.spacing} mm grid: {summary.get("dice", float("nan")):.3f}.

## Measured on other synthetic heads (seed {args.eval_seed}, {args.eval_subjects} subjects, native 2 mm grids)
Dice against the generator's brain mask on each scan's own grid:

{chr(10).join(lines)}

Median seconds per volume on the CPU that made it (1 thread): {timing}.

## Limits
Trained and measured on synthetic heads only; deepbet (trained on thousands of real T1w scans) is the
default wherever a T1w or T1c exists.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--name", default="neurofm-brain-extract")
    ap.add_argument("--subjects", type=int, default=40)
    ap.add_argument("--seed", type=int, default=5000)
    ap.add_argument("--eval-subjects", type=int, default=8)
    ap.add_argument("--eval-seed", type=int, default=6000)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--patch", type=int, default=48)
    ap.add_argument("--spacing", type=float, default=4.0)  # the pretrained backbone's spacing
    ap.add_argument("--dropout", type=float, default=0.6)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-deepbet", action="store_true", help="measure neurofm's extractor only")
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)

    bids = synth(work, "train", args.subjects, args.seed, args.workers)
    store = work / "train-store"
    sh("prepare", brain_mask_manifest(bids), store, "--spacing", args.spacing, "--brain-extraction", "none",
       "--workers", args.workers, "--no-progress")  # fmt: skip
    run = work / "run"
    if not (run / "summary.json").is_file():
        shutil.rmtree(run, ignore_errors=True)
        sh("finetune", "--data", store, "--task", "seg", "--target", "brainmask", "--from", "fomo25-tiny-synth",
           "--contrasts", ",".join(CONTRASTS), "--patch", args.patch, "--steps", args.steps, "--out", run,
           "--set", f"contrast_dropout={args.dropout}", "--set", "fg_p=0", "--no-tta", "--no-progress",
           "--workers", 1)  # fmt: skip
    export = run / "export-onnx"
    if not (export / "neurofm-export.json").is_file():
        sh("export", run, "--format", "onnx", "--out", export)
    summary = json.loads((run / "summary.json").read_text())
    eval_bids = synth(work, "eval", args.eval_subjects, args.eval_seed, args.workers)
    done = work / "evaluation.csv"
    if done.is_file() and done.stat().st_mtime > (export / "model.onnx").stat().st_mtime:
        res = pd.read_csv(done)  # measured already, on this export
    else:
        res = evaluate(eval_bids, export, deepbet=not args.no_deepbet)
        res.to_csv(done, index=False)
    print(res.groupby(["contrast", "method"])[["dice", "seconds"]].mean().round(3).to_string())

    from neurofm.io.checkpoint import latest_checkpoint

    ck = latest_checkpoint(run)
    dest = ROOT / "src" / "neurofm" / "pretrained" / args.name
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "checkpoints" / ck.name).mkdir(parents=True)
    store_cmd = f"scripts/make_brain_extractor.py --subjects {args.subjects} --seed {args.seed}"

    def paths_out(v: object) -> object:  # no paths of this machine in the package
        if isinstance(v, dict):
            return {k: paths_out(x) for k, x in v.items()}
        if isinstance(v, list):
            return [paths_out(x) for x in v]
        if isinstance(v, str) and v.startswith("/"):
            for base, name in ((ROOT / "src" / "neurofm", "neurofm"), (work, "WORK")):
                if v == str(base) or v.startswith(str(base) + "/"):
                    return name + v[len(str(base)) :]
        return v

    def scrub(cfg: dict) -> dict:
        extra = {**cfg.get("extra", {}), "store": store_cmd}
        return paths_out({**cfg, "extra": extra, "source": "fomo25-tiny-synth"})

    for f in CARRY:
        if f == "run.json":
            text = json.dumps(scrub(json.loads((ck / f).read_text())), indent=2) + "\n"
            (dest / "checkpoints" / ck.name / f).write_text(text)
        else:
            shutil.copy(ck / f, dest / "checkpoints" / ck.name / f)
    (dest / "checkpoints" / "last").write_text(ck.name + "\n")
    (dest / "run.json").write_text(json.dumps(scrub(json.loads((run / "run.json").read_text())), indent=2) + "\n")
    shutil.copytree(export, dest / "export-onnx")
    export_json = dest / "export-onnx" / "neurofm-export.json"
    export_json.write_text(json.dumps(paths_out(json.loads(export_json.read_text())), indent=2) + "\n")
    import onnx

    graph = onnx.load(str(dest / "export-onnx" / "model.onnx"))
    for prop in graph.metadata_props:  # the same description rides in the graph's metadata
        if prop.key == "neurofm":
            prop.value = json.dumps(paths_out(json.loads(prop.value)))
    onnx.save(graph, str(dest / "export-onnx" / "model.onnx"))
    meta = json.loads((ck / "meta.json").read_text())
    seg = summary.get("metrics", summary)
    dice = seg.get("dice", {}).get("value") if isinstance(seg.get("dice"), dict) else seg.get("dice")
    (dest / "MODEL_CARD.md").write_text(model_card(args.name, args, res, meta, {"dice": dice or float("nan")}))
    (dest / "evaluation.json").write_text(
        json.dumps(
            res.groupby(["contrast", "method"])[["dice", "seconds"]].mean().reset_index().to_dict("records"), indent=2
        )
        + "\n"
    )
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()) / 1e6
    print(f"packaged {dest.relative_to(ROOT)} ({size:.1f} MB)")


if __name__ == "__main__":
    main()
