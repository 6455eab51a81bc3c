"""``neurofm``: one command line, thin subcommands, heavy imports only when a verb runs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from neurofm.demo import DemoConfig, models_by_task, models_text
from neurofm.errors import NeurofmError

DEMO_MODELS = models_text(models_by_task(DemoConfig()))  # the demo's default pretrained model(s), for --help
# the demo's default fine-tuning steps and crops per step, per task, for --help
DEMO_BUDGET = "; crops a step: ".join(
    ", ".join(f"{task} {n}" for task, n in per_task.items())  # type: ignore[union-attr]
    for per_task in (DemoConfig().finetune_steps, DemoConfig().finetune_batch)
)
# the scratch arm's steps where they differ from the other arms', for --help
DEMO_SCRATCH = ", ".join(f"{t} {n}" for t, n in DemoConfig().scratch_steps.items()) or "none"

app = typer.Typer(
    name="neurofm",
    help="Self-supervised foundation models for 3D multi-contrast brain MRI.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True, soft_wrap=True)  # progress, notes and errors
results = Console(soft_wrap=True)  # what a command produces: tables, model cards


def _version(value: bool) -> None:
    if value:
        from neurofm import __version__

        typer.echo(f"neurofm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Self-supervised foundation models for 3D multi-contrast brain MRI."""


@app.command()
def prepare(
    src: Annotated[Path, typer.Argument(help="BIDS folder, nnU-Net raw folder, or CSV/TSV manifest.")],
    out: Annotated[Path, typer.Argument(help="Store folder to create (or resume).")],
    spacing: Annotated[str, typer.Option(help="Target voxel size in mm: one number or three, e.g. 1 or 1,1,2.")] = "1",
    margin: Annotated[int, typer.Option(help="Background voxels kept around the foreground box.")] = 4,
    normalize: Annotated[str, typer.Option(help="zscore (within the foreground) or none.")] = "zscore",
    mask_images: Annotated[bool, typer.Option(help="Zero voxels outside the dataset's brain mask.")] = False,
    skull_stripped: Annotated[
        bool, typer.Option(help="Scans are brain-extracted: non-zero voxels are the brain mask where none is given.")
    ] = False,
    brain_extraction: Annotated[
        str,
        typer.Option(
            help="Sessions without a brain mask: auto (deepbet on a T1w/T1c, else neurofm's extractor), deepbet, "
            "neurofm or none (crop and z-score over the whole head)."
        ),
    ] = "auto",
    bias_correction: Annotated[str, typer.Option(help="n4 (SimpleITK's N4 on every scan) or none.")] = "none",
    workers: Annotated[int, typer.Option("--workers", "-j", help="Parallel worker processes.")] = 1,
    shard: Annotated[str, typer.Option(help="Take part i of n of the sessions, e.g. 0/8 (job arrays).")] = "0/1",
    duplicates: Annotated[str, typer.Option(help="Repeated scans of one contrast: error, or first.")] = "error",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    space_check: Annotated[
        bool, typer.Option(help="Refuse to start when the output's device has less free space than an estimate.")
    ] = True,
) -> None:
    """Preprocess a dataset into a compressed, chunked store (RAS, resampled, cropped, z-scored).

    Exit status: 0 when every scan was prepared, 1 when some failed (see OUT/failures.csv).
    """
    from neurofm.preprocess import PrepareConfig
    from neurofm.preprocess import prepare as prepare_store

    sp = tuple(float(x) for x in spacing.split(",")) if "," in spacing else float(spacing)
    cfg = PrepareConfig(
        spacing=sp, margin=margin, normalize=normalize, mask_images=mask_images, skull_stripped=skull_stripped,
        brain_extraction=brain_extraction, bias_correction=bias_correction,
    )  # fmt: skip
    report = prepare_store(
        src, out, cfg, workers=workers, shard=shard, progress=progress, duplicates=duplicates, space_check=space_check
    )
    console.print(report.summary())
    if not report.ok:
        from rich.table import Table

        table = Table("path", "reason", title=f"{len(report.failures)} scans could not be used")
        for _, row in report.failures.head(20).iterrows():
            table.add_row(str(row["path"]), str(row["reason"]))
        console.print(table)
        console.print(f"full list: {Path(out) / 'failures.csv'}")
        raise typer.Exit(1)


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Folder for the BIDS dataset.")],
    subjects: Annotated[int, typer.Option(help="Number of subjects.")] = 20,
    sessions: Annotated[int, typer.Option(help="Sessions (visits) per subject.")] = 1,
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same bytes.")] = 0,
    resolution: Annotated[int, typer.Option(help="Working resolution in mm: 1 or 2.")] = 2,
    pathology: Annotated[
        str, typer.Option(help="Lesion kinds for patients: tumour,infarct,wmh (empty: none).")
    ] = "tumour,infarct,wmh",
    sites: Annotated[int, typer.Option(help="Number of scanner sites (intensity, resolution, orientation).")] = 3,
    healthy_fraction: Annotated[float, typer.Option(help="Share of subjects without a lesion.")] = 0.4,
    missing_rate: Annotated[float, typer.Option(help="Probability that a non-T1w contrast is missing.")] = 0.0,
    first_subject: Annotated[
        int, typer.Option(help="Number of the first subject (sub-001); e.g. 1001 keeps a pool's names apart.")
    ] = 1,
    workers: Annotated[int, typer.Option("--workers", "-j", help="Parallel worker processes.")] = 1,
    montage: Annotated[Path | None, typer.Option(help="Also save a montage PNG of a few subjects x contrasts.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Build a BIDS dataset of synthetic multi-contrast subjects on real anatomy (ICBM 2009c + CerebrA)."""
    from neurofm.synth import SynthConfig, synthesize

    cfg = SynthConfig(
        subjects=subjects,
        sessions=sessions,
        seed=seed,
        resolution=resolution,
        pathology=tuple(pathology.split(",")) if pathology else (),
        sites=sites,
        healthy_fraction=healthy_fraction,
        missing_rate=missing_rate,
        first_subject=first_subject,
    )
    with _guarded(out, "writing the synthetic dataset"):
        synthesize(out, cfg, workers=workers, progress=progress)
    console.print(f"wrote {subjects} subjects x {sessions} sessions to {out}")
    if montage is not None:
        from neurofm.synth.montage import montage as make_montage

        console.print(f"montage: {make_montage(out, montage)}")


def _preset_help() -> str:
    from neurofm.train.presets import PRESET_HELP

    return "Recipe: " + "; ".join(f"{k} ({v})" for k, v in PRESET_HELP.items()) + ". Add -tiny for a CPU-sized version."


@app.command()
def pretrain(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder (checkpoints, logs, figures).")],
    preset: Annotated[str | None, typer.Option(help=_preset_help())] = None,
    data: Annotated[
        Path | None, typer.Option(help="Store made by `neurofm prepare` (default on --resume: the run's).")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a setting: section.key=value (repeatable).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="YAML file of settings (applied after the preset, before --set).")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in --out from its newest complete checkpoint.")
    ] = False,
    devices: Annotated[str | None, typer.Option(help="Devices per node (e.g. 4) or auto.")] = None,
    num_nodes: Annotated[int | None, typer.Option(help="Number of nodes (DDP).")] = None,
    accelerator: Annotated[str | None, typer.Option(help="auto, cpu or gpu.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many optimiser steps.")] = None,
    progress: Annotated[
        bool | None,
        typer.Option(help="Progress: a bar on a terminal, a line per 5 % of the steps in a log (default: terminals)."),
    ] = None,
) -> None:
    """Pretrain a recipe on a store: neurofm pretrain --preset fomo25 --data STORE --out RUN."""
    from neurofm.tasks.pretrain import pretrain as pretrain_run

    overrides = list(set_ or [])
    if devices is not None:
        overrides.append(f"trainer.devices={devices}")
    if num_nodes is not None:
        overrides.append(f"trainer.num_nodes={num_nodes}")
    if accelerator is not None:
        overrides.append(f"trainer.accelerator={accelerator}")
    if max_steps is not None:
        overrides.append(f"trainer.max_steps={max_steps}")
    with _guarded(
        out, "writing checkpoints and logs", f"free space and continue: neurofm pretrain --out {out} --resume"
    ):
        folder = pretrain_run(data, out, preset, config=config, overrides=overrides, resume=resume, progress=progress)
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank != 0:  # DDP: every rank runs this command; one reports
        return
    from neurofm.inspect import describe_run

    results.print(describe_run(folder))
    console.print(f"run: {folder}")


def _csv(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _finetune_preset_help() -> str:
    from neurofm.train.presets import FINETUNE_PRESETS

    return "Fine-tuning preset: " + "; ".join(f"{k} ({v['help']})" for k, v in FINETUNE_PRESETS.items()) + "."


@app.command()
def finetune(
    data: Annotated[Path, typer.Option(help="Store with the labelled cases (neurofm prepare).")],
    task: Annotated[str, typer.Option(help="seg, cls or reg.")],
    target: Annotated[str, typer.Option(help="Label map (seg) or label column (cls/reg), e.g. lesion, infarct, age.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the fine-tuned run and its evaluation.")],
    from_: Annotated[str | None, typer.Option("--from", help="Pretrained run folder, or 'scratch' (default).")] = None,
    preset: Annotated[str, typer.Option(help=_finetune_preset_help())] = "full",
    config: Annotated[
        Path | None, typer.Option(help="YAML/JSON file of settings (after the preset, before the flags).")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a setting: key=value, e.g. warmup_fraction=0.2.")
    ] = None,
    arch: Annotated[
        str | None, typer.Option(help="With --from scratch: the recipe whose backbone to train [fomo25].")
    ] = None,
    contrasts: Annotated[
        str | None, typer.Option(help="Input contrasts, e.g. T1w,FLAIR (default: all in the store).")
    ] = None,
    mode: Annotated[
        str | None,
        typer.Option(
            help="linear (probe, fitted in closed form; --set linear_fit=sgd: by steps; linear_fit=zero-shot with "
            "probe_features=pretext-logit: a pretrained health pretext classifier read as it is), frozen (encoder "
            "frozen) or full [the preset's]."
        ),
    ] = None,
    shots: Annotated[
        int | None, typer.Option(help="Train on this many subjects (few-shot); the rest are the test set.")
    ] = None,
    folds: Annotated[int | None, typer.Option(help="k-fold cross-validation over subjects [0: off].")] = None,
    train_sites: Annotated[str | None, typer.Option(help="Fine-tune on these sites only (comma list).")] = None,
    test_sites: Annotated[str | None, typer.Option(help="Test on these sites (default: the other sites).")] = None,
    positive_only: Annotated[
        bool | None, typer.Option(help="Segmentation: only cases whose mask has foreground [no].")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Optimiser steps per model [300].")] = None,
    patch: Annotated[int | None, typer.Option(help="Crop size (default: the pretraining patch).")] = None,
    infer_patch: Annotated[
        int | None, typer.Option(help="Segmentation window at evaluation (default: --patch).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size [2].")] = None,
    lr: Annotated[
        float | None, typer.Option(help="Learning rate of the head/decoder (encoder: x backbone-lr-scale) [1e-3].")
    ] = None,
    backbone_lr_scale: Annotated[
        float | None, typer.Option(help="Encoder learning rate relative to --lr (full mode) [1.0].")
    ] = None,
    head_warmup: Annotated[
        float | None,
        typer.Option(help="Full mode from pretrained weights: share of the steps with the encoder held still [0.25]."),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the subsets, folds and training [0].")] = None,
    augment: Annotated[
        str | None,
        typer.Option(
            help="Training augmentation: flips (mirrors), nnunet (nnU-Net's default: rotation, scaling, noise, blur, "
            "brightness, contrast, low resolution, gamma, mirrors) or none [flips]."
        ),
    ] = None,
    workers: Annotated[int | None, typer.Option("--workers", "-j", help="Data-loader worker processes [2].")] = None,
    tta: Annotated[bool | None, typer.Option(help="Mirror test-time augmentation at evaluation [yes].")] = None,
    lcc: Annotated[bool | None, typer.Option(help="Keep the largest connected component (seg) [no].")] = None,
    bootstrap: Annotated[int | None, typer.Option(help="Bootstrap resamples for the 95 % intervals [1000].")] = None,
    calibration: Annotated[
        float | None,
        typer.Option(help="cls: share of the training subjects held out to fit a temperature (0: none) [0]."),
    ] = None,
    devices: Annotated[str | None, typer.Option(help="Devices (e.g. 1, 4, auto).")] = None,
    progress: Annotated[bool | None, typer.Option(help="Progress bar (default: on terminals).")] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue a stopped run in --out (same settings) from each split's last checkpoint.")
    ] = False,
) -> None:
    """Fine-tune a pretrained run (or a from-scratch baseline) and evaluate it on held-out subjects.

    Settings resolve preset -> --config file -> flags -> --set; the resolved config is saved as RUN/run.json.
    """
    from neurofm.tasks.finetune import finetune as finetune_run
    from neurofm.train.config import FinetuneConfig

    flags = {
        "task": task,
        "target": target,
        "source": from_,
        "arch": arch,
        "contrasts": _csv(contrasts),
        "mode": mode,
        "shots": shots,
        "folds": folds,
        "train_sites": _csv(train_sites),
        "test_sites": _csv(test_sites),
        "positive_only": positive_only,
        "steps": steps,
        "patch": patch,
        "infer_patch": infer_patch,
        "batch_size": batch_size,
        "lr": lr,
        "backbone_lr_scale": backbone_lr_scale,
        "head_warmup": head_warmup,
        "seed": seed,
        "augment": augment,
        "num_workers": workers,
        "tta": tta,
        "lcc": lcc,
        "bootstrap": bootstrap,
        "calibration": calibration,
    }
    values = {k: v for k, v in flags.items() if v is not None}
    if devices:
        values["trainer"] = {"devices": int(devices) if devices.isdigit() else devices}
    cfg = FinetuneConfig.resolve(preset, config, set_, values=values)
    with _guarded(out, "writing the fine-tuned model and its predictions", "free space and run it again with --resume"):
        summary = finetune_run(data, out, cfg, progress=progress, resume=resume)
    _print_metrics(summary)
    console.print(f"per-case predictions: {out / 'predictions.csv'}; summary: {out / 'summary.json'}")


def _print_metrics(summary: dict) -> None:
    from rich.table import Table

    table = Table("metric", "value", "95 % interval", title=f"{summary['task']} on {summary['target']}")
    for k, v in summary["metrics"].items():
        table.add_row(k, f"{v['value']:.4g}", f"[{v['ci_low']:.3g}, {v['ci_high']:.3g}] (n={v['n']})")
    results.print(table)


@app.command()
def evaluate(
    run: Annotated[Path, typer.Argument(help="A fine-tuned run folder.")],
    data: Annotated[Path, typer.Option(help="Store to evaluate on.")],
    out: Annotated[Path | None, typer.Option(help="Output folder (default RUN/eval-<store>).")] = None,
    split: Annotated[str, typer.Option(help="test (the run's held-out subjects), all, or auto.")] = "auto",
    tta: Annotated[bool, typer.Option(help="Mirror test-time augmentation.")] = True,
    lcc: Annotated[bool, typer.Option(help="Keep the largest connected component (seg).")] = False,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95 % intervals.")] = 1000,
) -> None:
    """Score a fine-tuned run on a store: per-case CSV and a summary with bootstrap 95 % intervals."""
    from neurofm.evaluate.scoring import evaluate_run

    with _guarded(out or run, "writing the evaluation"):
        _print_metrics(evaluate_run(run, data, out, split=split, tta=tta, lcc=lcc, bootstrap=bootstrap))


@app.command()
def predict(
    run: Annotated[Path, typer.Argument(help="A fine-tuned run folder, or an exported one (--engine onnx).")],
    inputs: Annotated[
        list[str], typer.Argument(help="CONTRAST=scan.nii.gz pairs for one case, or a dataset folder / CSV.")
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output folder (a BIDS dataset: default DATASET/derivatives/neurofm-RUN)."),
    ] = None,
    tta: Annotated[bool, typer.Option(help="Mirror test-time augmentation.")] = True,
    lcc: Annotated[bool, typer.Option(help="Keep the largest connected component (seg).")] = False,
    overlap: Annotated[float, typer.Option(help="Sliding-window overlap.")] = 0.5,
    probabilities: Annotated[
        bool, typer.Option(help="Segmentation of a BIDS dataset: also write the probability maps (_probseg).")
    ] = False,
    ensemble: Annotated[
        str | None,
        typer.Option(
            help="More fine-tuned runs of the same task (comma list, e.g. other seeds): averaged, with spread."
        ),
    ] = None,
    reference: Annotated[str | None, typer.Option(help="Contrast whose grid the mask is written on.")] = None,
    progress: Annotated[bool, typer.Option(help="Progress bar for datasets.")] = True,
    engine: Annotated[
        str, typer.Option(help="torch, or onnx (onnxruntime: an export folder, or the run exported once).")
    ] = "torch",
    brain_extraction: Annotated[
        str | None,
        typer.Option(help="Inputs without a brain mask: auto, deepbet, neurofm or none (default: as the run's data)."),
    ] = None,
) -> None:
    """Predict whole scans straight from NIfTI: masks on each input's own grid, a table for cls/reg. A BIDS
    dataset gets a BIDS derivative dataset (sub-*/anat/*_desc-TARGET_mask.nii.gz, predictions.tsv)."""
    from neurofm.infer.inputs import predict_inputs

    with _guarded(out or Path(inputs[0]), "writing predictions"):
        table = predict_inputs(
            run,
            inputs,
            out,
            tta=tta,
            lcc=lcc,
            overlap=overlap,
            reference=reference,
            progress=progress,
            engine=engine,
            probabilities=probabilities,
            ensemble=_csv(ensemble),
            brain_extraction=brain_extraction,
        )
    failed = int(table["error"].notna().sum()) if "error" in table else 0
    console.print(
        f"{len(table)} case(s) -> {table.attrs.get('written', out)}" + (f"; {failed} failed" if failed else "")
    )


@app.command("brain-extract")
def brain_extract(
    inputs: Annotated[list[Path], typer.Argument(help="NIfTI scans (raw heads).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    method: Annotated[
        str, typer.Option(help="auto (deepbet on T1w/T1c, else neurofm's extractor), deepbet or neurofm.")
    ] = "auto",
    contrast: Annotated[
        str | None, typer.Option(help="Contrast of every input (default: from BIDS names, else T1w).")
    ] = None,
    brain: Annotated[bool, typer.Option(help="Also write the extracted brain (scan zeroed outside the mask).")] = False,
    progress: Annotated[bool, typer.Option(help="Progress bar.")] = True,
) -> None:
    """Brain masks of raw heads, each on its input's own grid (NAME_mask.nii.gz), with the intracranial volume.

    Exit status: 0 when every input was done, 1 when some failed (see OUT/brain_extraction.csv).
    """
    from neurofm.preprocess.brain import extract_files

    with _guarded(out, "writing brain masks"):
        table = extract_files(inputs, out, method, contrast=contrast, brain=brain, progress=progress)
    failed = table[table["error"].notna()] if "error" in table else table.iloc[:0]
    console.print(f"{len(table) - len(failed)} of {len(table)} scan(s) -> {table.attrs['written']}")
    for _, row in failed.iterrows():
        console.print(f"[red]failed[/] {row['input']}: {row['error']}", highlight=False)
    if len(failed):
        raise typer.Exit(1)


@app.command()
def embed(
    run: Annotated[Path, typer.Argument(help="A pretrained run folder.")],
    data: Annotated[Path, typer.Option(help="Store to embed.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .parquet (vectors as lists) or .csv (columns).")],
    progress: Annotated[bool, typer.Option(help="Progress bar.")] = True,
) -> None:
    """Per-scan features: the subject (anatomy) and contrast latents of a pretrained model.

    A run with an eraser (`neurofm erase`) gives the anatomy vector after it, and the one before it as
    subject_latent_raw (r0, r1, ... in a CSV)."""
    from neurofm.analyze.embed import embed_store, save_embeddings

    with _guarded(out.parent, "writing the embeddings"):
        df = embed_store(run, data, progress=progress)
        console.print(f"{len(df)} scans -> {save_embeddings(df, out)}")


@app.command()
def erase(
    run: Annotated[Path, typer.Argument(help="A pretrained run or checkpoint folder; the eraser is written there.")],
    data: Annotated[Path, typer.Option(help="Store to fit on: the pretraining pool, not the scans it is judged on.")],
    max_sessions: Annotated[int, typer.Option(help="Sessions embedded, spread over the store's subjects.")] = 120,
    progress: Annotated[bool, typer.Option(help="Progress bar.")] = True,
) -> None:
    """Fit a LEACE eraser of the contrast from the anatomy vector and write it beside the weights.

    After it, every contrast's mean anatomy vector on the fitting scans is the same, so no linear probe reads the
    contrast there; `embed` and `analyze` then read the erased vector (and keep the one before it). Fine-tuning is
    not affected. Judge it with `neurofm analyze` on other subjects."""
    from neurofm.analyze.eraser import erase_run

    with _guarded(run, "writing the eraser"):
        r = erase_run(run, data, max_sessions=max_sessions, progress=progress)
    counts = ", ".join(f"{k} {v}" for k, v in r["contrasts"].items())
    probe = (
        f"; contrast probe on these scans before it {r['probe_before']:.3f} (chance {r['chance']:.3f})"
        if r.get("probe_before") is not None
        else ""
    )
    console.print(
        f"fitted on {r['scans']} scans of {r['subjects']} subjects ({counts}); removed {r['rank']} of "
        f"{r['channels']} directions{probe} -> {r['path']}",
        highlight=False,
    )


def _pair(text: str) -> tuple[str, str]:
    name, _, value = text.partition("=")
    if not value:
        from neurofm.errors import ConfigError

        raise ConfigError(f"--compare takes NAME=RUN (e.g. mae=runs/mae), got {text!r}")
    return name, value


def _task(text: str) -> tuple[str, str]:
    task, _, target = text.partition(":")
    if not target:
        from neurofm.errors import ConfigError

        raise ConfigError(f"tasks are written TASK:TARGET, e.g. seg:lesion or cls:infarct; got {text!r}")
    return task, target


@app.command()
def analyze(
    run: Annotated[Path, typer.Argument(help="A pretrained run folder.")],
    data: Annotated[Path, typer.Option(help="Store to analyse on.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for figures, analysis.json and report.html.")],
    compare: Annotated[
        list[str] | None, typer.Option(help="Ablation: NAME=RUN of another pretrained run (repeatable).")
    ] = None,
    task: Annotated[
        list[str] | None, typer.Option(help="Ablation tasks, TASK:TARGET (repeatable; default seg:lesion).")
    ] = None,
    label_efficiency: Annotated[str | None, typer.Option(help="TASK:TARGET for the label-efficiency curve.")] = None,
    shots: Annotated[str, typer.Option(help="Labelled subjects for the curve.")] = "1,2,5,10,20",
    fomo: Annotated[
        bool, typer.Option(help="FOMO25 in miniature: fine-tune on --train-sites, test on the rest.")
    ] = False,
    train_sites: Annotated[str | None, typer.Option(help="Sites to fine-tune on (default: the first).")] = None,
    fomo_scale: Annotated[float, typer.Option(help="Scale FOMO25's case counts (13/8, 23, 200).")] = 1.0,
    seeds: Annotated[
        int, typer.Option(help="Seeds per point (few-shot draw x initialisation), paired across arms.")
    ] = 5,
    modes: Annotated[str, typer.Option(help="Fine-tuning modes of the pretrained arms.")] = "linear,frozen,full",
    floors: Annotated[
        bool, typer.Option(help="Add a frozen random encoder and the constant predictor to every table.")
    ] = True,
    steps: Annotated[int, typer.Option(help="Fine-tuning steps per model.")] = 150,
    patch: Annotated[int | None, typer.Option(help="Fine-tuning crop (default: the pretraining patch).")] = None,
    contrasts: Annotated[str | None, typer.Option(help="Fine-tuning contrasts.")] = None,
    max_sessions: Annotated[int, typer.Option(help="Sessions embedded for the latent analysis.")] = 60,
    progress: Annotated[bool, typer.Option(help="Progress bars.")] = True,
) -> None:
    """The paper's analyses: latent similarity, contrast probes, swap check (and, for a categorical anatomy code, its
    class usage and the place check); optionally ablation, label efficiency, FOMO25 — each fine-tuning table paired
    over seeds against scratch, with a random-encoder and a constant floor."""
    from neurofm.analyze.run import AnalyzeConfig
    from neurofm.analyze.run import analyze as run_analyze

    ft = {"steps": steps, "patch": patch, "contrasts": _csv(contrasts), "num_workers": 1, "tta": False}
    cfg = AnalyzeConfig(
        max_sessions=max_sessions,
        compare=dict(_pair(c) for c in compare or []),
        tasks=[_task(t) for t in task] if task else [("seg", "lesion")],
        label_efficiency=_task(label_efficiency) if label_efficiency else None,
        shots=[int(x) for x in shots.split(",")],
        fomo=fomo,
        train_sites=_csv(train_sites),
        fomo_scale=fomo_scale,
        seeds=seeds,
        modes=_csv(modes) or ["full"],
        floors=floors,
        finetune=ft,
    )
    with _guarded(out, "writing the analysis"):
        result = run_analyze(run, data, out, cfg, progress=progress)
    from neurofm.analyze.latent import places_text, summary_table
    from neurofm.analyze.run import usage_of, usage_text

    for r in summary_table(result.get("latent", {})):
        results.print(r)
    for line in (usage_text(usage_of(result.get("latent", {}))), places_text(result.get("places", {}))):
        if line:
            results.print(line.strip())


# run_all.py's, in its order
BENCHMARKS = (
    *("store", "prepare", "synth", "loader", "train", "infer", "flops", "export", "raw", "embed"),
    *("memory_format", "bootstrap", "parallel_runs"),
)


@app.command()
def bench(
    gpu: Annotated[bool, typer.Option(help="GPU sizes: 128^3 crops, paper-size models, bf16.")] = False,
    only: Annotated[str | None, typer.Option(help=f"Comma list of benchmarks ({','.join(BENCHMARKS)}).")] = None,
) -> None:
    """Run the benchmark suite of a source checkout (benchmarks/run_all.py) and print its table."""
    import subprocess

    import neurofm
    from neurofm.errors import NeurofmError

    script = Path(neurofm.__file__).resolve().parents[2] / "benchmarks" / "run_all.py"
    if not script.is_file():
        raise NeurofmError("the benchmarks live in the source checkout (benchmarks/run_all.py); run from a clone")
    unknown = [b for b in _csv(only) or [] if b not in BENCHMARKS]
    if unknown:
        raise NeurofmError(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    args = [sys.executable, str(script)] + (["--gpu"] if gpu else []) + (["--only", *_csv(only)] if only else [])
    raise typer.Exit(subprocess.run(args).returncode)


@app.command(name="import")
def import_(
    kind: Annotated[
        str,
        typer.Argument(help="nnssl or nnunet (ResEnc-L, Primus checkpoints) or monai (ViTAutoEnc state dict)."),
    ],
    src: Annotated[Path, typer.Argument(help="The checkpoint file (.pth/.pt), e.g. checkpoint_final.pth.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder to create.")],
    num_heads: Annotated[
        int | None, typer.Option(help="Attention heads (ViT: default hidden/64; Primus: from its size).")
    ] = None,
    spacing: Annotated[
        float | None, typer.Option(help="Voxel size the weights were trained at, mm (default: the plan's, else 1).")
    ] = None,
) -> None:
    """Import weights into a neurofm run folder, with the source's plan (never unpickles code)."""
    from neurofm.inspect import describe_run
    from neurofm.models.importers import import_weights

    with _guarded(out, "writing the imported run"):
        results.print(describe_run(import_weights(kind, src, out, num_heads=num_heads, spacing=spacing)))


@app.command(name="export")
def export_(
    run: Annotated[Path, typer.Argument(help="A pretrained run folder (ResEnc or Primus backbone).")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="File to write (.pth), or a folder for FOLDER/checkpoint_final.pth.")
    ],
    format_: Annotated[
        str,
        typer.Option(
            "--format",
            help="nnssl (a pretrained run, for nnssl / nnU-Net fine-tuning), onnx or torchscript (a fine-tuned run).",
        ),
    ] = "nnssl",
) -> None:
    """Export a run: --format nnssl writes network_weights + nnssl_adaptation_plan; onnx / torchscript write the
    fine-tuned model as a graph with its preprocessing and labels (OUT is then a folder)."""
    from neurofm.models.exporters import export_run

    with _guarded(out.parent if out.suffix else out, "writing the exported weights"):
        console.print(f"wrote {export_run(run, format_, out)}")


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="A store folder or a run folder.")],
    verify: Annotated[
        bool, typer.Option(help="Store: check every array's checksum and decompress every chunk (exit 1 if damaged).")
    ] = False,
) -> None:
    """Describe a store (sessions, contrasts, failures) or a run (model card)."""
    from neurofm.inspect import describe

    typer.echo(describe(path))
    if verify:
        from neurofm.store import Store

        checked, bad = Store(path).verify(progress=sys.stderr.isatty())
        for row in bad:
            console.print(f"damaged: {row['key']} {row['name']}: {row['path']}: {row['reason']}", highlight=False)
        console.print(f"verified {checked} arrays: {len(bad)} damaged")
        if bad:
            raise typer.Exit(1)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for everything the demo writes.")] = Path("neurofm-demo"),
    workers: Annotated[int, typer.Option("--workers", "-j", help="Parallel worker processes.")] = 2,
    subjects: Annotated[int, typer.Option(help="Synthetic subjects.")] = 40,
    sessions: Annotated[int, typer.Option(help="Sessions (visits) per synthetic subject.")] = 2,
    pretrained: Annotated[
        str | None,
        typer.Option(
            help="The pretrained model (one that ships with neurofm, or a run folder) for every task, or per task, "
            f"e.g. seg=NAME,cls=NAME2 (the others keep the default); default: {DEMO_MODELS}."
        ),
    ] = None,
    pretrain_steps: Annotated[
        int,
        typer.Option(
            help="> 0: pretrain fomo25-tiny-cmeans's recipe (fomo25-cmeans-tiny) from nothing instead, on a "
            "separate synthetic pool, and fine-tune it for every task."
        ),
    ] = 0,
    pool_subjects: Annotated[int, typer.Option(help="Subjects of that pool (two sessions each).")] = 100,
    finetune_steps: Annotated[
        int | None,
        typer.Option(
            help=f"Fine-tuning steps of every arm trained by steps, scratch's included (default: {DEMO_BUDGET})."
        ),
    ] = None,
    scratch_steps: Annotated[
        str | None,
        typer.Option(
            help="Steps of the scratch arm per task where they differ from the other arms', e.g. reg=300, or none "
            f"(default: {DEMO_SCRATCH})."
        ),
    ] = None,
    seeds: Annotated[
        int, typer.Option(help="Seeds (few-shot draw x initialisation) per task, paired across arms.")
    ] = 3,
    shots: Annotated[
        str | None,
        typer.Option(help="Labelled subjects: one number for every task, or per task, e.g. seg=2,cls=8,reg=8."),
    ] = None,
    spacing: Annotated[float, typer.Option(help="Voxel size of the store in mm.")] = 4.0,
    lp_ft: Annotated[
        str | None,
        typer.Option(
            "--lp-ft",
            help="Tasks (cls, reg; comma-separated) whose pretrained model is also fine-tuned in full from its "
            "closed-form probe (LP-FT), a row beside the probe's; default reg, none for no task. Each adds a run per "
            "seed (reg: about a minute on 2 cores).",
        ),
    ] = None,
    zero_shot: Annotated[
        bool,
        typer.Option(
            help="Also read a model with a health pretext classifier (the default health model) by that classifier "
            "as it is, with no labelled subject: the row 'pretrained zero-shot'."
        ),
    ] = True,
    jobs: Annotated[
        int,
        typer.Option(
            help="Fine-tuning runs trained at once, each in a worker process on the CPU threads / jobs (1: one after "
            "another, on every thread). 0: one single-threaded run per CPU thread (one at a time on a GPU). The runs' "
            "numbers move with their threads at float rounding, so a finished run made otherwise is trained again.",
        ),
    ] = 0,
) -> None:
    """The embedded default end to end, offline, on a CPU (7-15 min on 2 cores with AVX-512, about 25 with AVX2):
    synth -> prepare -> the shipped pretrained models -> fine-tune (pretrained, scratch, two floors; paired over
    seeds) -> analyze -> HTML report."""
    from neurofm.demo import parse_per_task, parse_shots, run_demo, set_lp_ft, set_scratch_steps

    cfg = DemoConfig(
        subjects=subjects,
        sessions=sessions,
        workers=workers,
        pretrain_steps=pretrain_steps,
        pool_subjects=pool_subjects,
        seeds=seeds,
        spacing=spacing,
        zero_shot=zero_shot,
        jobs=jobs,
    )
    if shots is not None:
        cfg.shots = parse_shots(shots, cfg.shots)
    if pretrained is not None:
        cfg.pretrained = parse_per_task(pretrained, models_by_task(cfg), str, "--pretrained")
    if finetune_steps is not None:
        cfg.finetune_steps, cfg.scratch_steps = finetune_steps, {}
    if scratch_steps is not None:
        set_scratch_steps(cfg, scratch_steps)
    if lp_ft is not None:
        set_lp_ft(cfg, [t.strip() for t in lp_ft.split(",") if t.strip() and t.strip() != "none"])
    with _guarded(out, "running the demo", "free space and run the demo again: finished stages are kept"):
        run_demo(out, cfg)  # its last line says where the report is


def _guarded(folder: Path, what: str, then: str = "free space and run the same command again"):
    """A full disk inside the block becomes one line naming ``folder`` and ``what`` (neurofm.faults)."""
    from neurofm.faults import disk_guard

    return disk_guard(folder, what, then)


def main() -> None:
    """Console entry point: user errors become one red line and exit status 2."""
    try:
        app()
    except NeurofmError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
