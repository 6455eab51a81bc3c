"""Pretrain the model that ships with neurofm, measure it, and package it with its model card.

One command (about two hours on a 2-core CPU at the default 30,000 steps)::

    .venv/bin/python scripts/make_pretrained.py --work runs/shipped

1. ``neurofm synth`` a pool of unlabelled subjects (seed 1000: none of them is a subject of the
   demo, whose seed is 0, or of the evaluation set, seed 3000), prepared at 4 mm;
2. ``neurofm pretrain --preset PRESET`` (``fomo25-tiny`` unless ``--preset``) on it for ``--steps`` steps;
3. ``neurofm analyze`` (latents, contrast probes, swap check) on a separate evaluation set;
4. copies the weights and descriptions (no optimizer state, no machine paths) to
   ``src/neurofm/pretrained/<name>/`` and writes its ``MODEL_CARD.md`` (a section of the card it replaces that it does
   not write itself, such as a model's own results, is kept at the end).

``--erase`` also fits ``neurofm erase`` on the pool (120 sessions) before step 3, so the analysis reads the anatomy
vector after the eraser (and before it), and packages ``eraser.safetensors`` with the weights.

``--refresh-analysis --name NAME`` trains nothing: it measures a packaged model again with the current
``neurofm analyze`` and rewrites its ``analysis.json`` and its card's analysis table; with ``--erase`` it first fits
the eraser on the pool (made in ``--work`` if missing) on a copy of the packaged checkpoint and puts it beside the
packaged weights.

Every stage reuses what is already in ``--work``, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEUROFM = [sys.executable, "-m", "neurofm.cli"]
DEFAULT_NAME = "fomo25-tiny-synth"  # the recipe's plain form (the demo fine-tunes -cshift and -cmeans)
DEFAULT_PRESET = "fomo25-tiny"
ANALYSIS_HEADING = "## What `neurofm analyze` measured"
CARRY = ("model.safetensors", "model.json", "transfer.json", "preprocessing.json", "run.json", "meta.json")
ERASE_SESSIONS = 120  # pool sessions `neurofm erase` fits on (--erase)


def sh(*args: object) -> None:
    print("+ neurofm", " ".join(map(str, args)), flush=True)
    subprocess.run([*NEUROFM, *map(str, args)], check=True)


def synth_and_prepare(work: Path, name: str, subjects: int, seed: int, workers: int) -> Path:
    """Subjects are numbered from seed + 1 (sub-1001, ...), so no name is shared with the demo's sub-001, ..."""
    bids, store = work / f"{name}-bids", work / f"{name}-store"
    if not (bids / "participants.tsv").is_file():
        shutil.rmtree(bids, ignore_errors=True)
        synth = ["synth", bids, "--subjects", subjects, "--sessions", 2, "--seed", seed, "--resolution", 2]
        synth += ["--first-subject", seed + 1]
        sh(*synth, "--sites", 3, "--missing-rate", 0.05, "--workers", workers, "--no-progress")
    sh("prepare", bids, store, "--spacing", 4, "--workers", workers, "--no-progress")
    return store


def scrub(run_cfg: dict, pool_command: str) -> dict:
    """The run config without this machine's paths (the store becomes the command that makes it)."""
    extra = dict(run_cfg.get("extra", {}))
    extra["store"] = pool_command
    return {**run_cfg, "extra": extra}


def analysis_table(analysis: dict) -> str:
    """The card's table of what ``neurofm analyze`` measured (its ``analysis.json``)."""
    from neurofm.analyze.eraser import fitted_on
    from neurofm.analyze.latent import probe_interval, swap_verdict
    from neurofm.analyze.run import usage_of

    lat = analysis.get("latent", {})

    def latent(part: str, key: str, sub: str) -> str:
        v = lat.get(part, {}).get(key, {}).get(sub)
        return "n/a" if v is None else f"{v:.3f}"

    def probe(part: str) -> str:
        interval = probe_interval(lat.get(part, {}).get("contrast_probe", {}))
        interval = f" {interval}" if interval else ""
        return f"{latent(part, 'contrast_probe', 'accuracy')}{interval} ({latent(part, 'contrast_probe', 'chance')})"

    def confused(part: str) -> str:
        m = lat.get(part, {}).get("contrast_probe", {}).get("most_confused") or {}
        return f"{'/'.join(m['pair'])}, {m['errors']} errors ({m['share']:.0%})" if m.get("pair") else "n/a"

    swap = analysis.get("swap", {})
    checks = [
        (
            "anatomy latent, centred cosine same subject / other subjects",
            f"{latent('anatomy', 'similarity', 'within')} / {latent('anatomy', 'similarity', 'across')}",
        ),
        ("anatomy latent, within minus across", latent("anatomy", "similarity", "difference")),
        (
            "contrast probe from the anatomy latent (chance)",
            probe("anatomy"),
        ),
        (
            "contrast probe from the contrast latent (chance)",
            probe("contrast"),
        ),
        ("contrast probe from the contrast latent, most confused pair", confused("contrast")),
    ]
    if lat.get("anatomy_mode"):  # a soft categorical anatomy code, also read by its most likely class
        checks[3:3] = [
            (
                "anatomy latent's most likely class, within minus across",
                latent("anatomy_mode", "similarity", "difference"),
            ),
            (
                "contrast probe from the anatomy latent's most likely class (chance)",
                probe("anatomy_mode"),
            ),
        ]
    usage = usage_of(lat)  # a categorical code, soft (read by its most likely class) or one-hot
    if usage:
        checks.insert(
            5 if lat.get("anatomy_mode") else 3,
            (
                f"anatomy code: classes holding ≥ {usage['floor']:.0%} of positions, perplexity, largest shares",
                f"{usage['classes_used']} of {usage['classes']}, {usage['perplexity']:.1f}, "
                + " / ".join(f"{v:.2f}" for v in usage["largest_shares"][:3]),
            ),
        )
    if lat.get("anatomy_raw"):  # the model has an eraser (neurofm erase): the anatomy rows read the vector after it
        checks = [(k.replace("anatomy latent,", "anatomy latent after the eraser,"), v) for k, v in checks]
        checks = [(k.replace("the anatomy latent (", "the anatomy latent after the eraser ("), v) for k, v in checks]
        raw_gap = latent("anatomy_raw", "similarity", "difference")
        checks += [
            ("anatomy latent before the eraser, within minus across", raw_gap),
            ("contrast probe from the anatomy latent before the eraser (chance)", probe("anatomy_raw")),
        ]
        e = analysis.get("eraser") or {}
        if e:
            checks.append(
                (
                    "eraser (`neurofm erase`, fitted on the pretraining pool)",
                    f"{e.get('method', '?').upper()}, {e.get('rank', '?')} of {e.get('channels', '?')} directions, "
                    f"{e.get('scans', '?')} scans of {e.get('subjects', '?')} subjects{fitted_on(e)}",
                )
            )
    places = analysis.get("places")
    if places:
        checks.append(
            (
                "anatomy code, crop moved one cell: positions keeping their class with the tissue / with the place",
                f"{places['same_tissue']:.2f} [{places['same_tissue_low']:.2f}, {places['same_tissue_high']:.2f}] / "
                f"{places['same_place']:.2f} [{places['same_place_low']:.2f}, {places['same_place_high']:.2f}] "
                f"of {places['crops']} crops",
            )
        )
    checks += [
        (
            "reference: the same probe on each scan's intensity histogram (most confused pair)",
            f"{latent('intensity', 'contrast_probe', 'accuracy')} ({confused('intensity')})",
        ),
        (
            "swap check: recombination nearest to the anatomy in the other contrast",
            f"{swap.get('a_nearest', float('nan')):.2f} [{swap.get('a_nearest_low', float('nan')):.2f}, "
            f"{swap.get('a_nearest_high', float('nan')):.2f}] of {swap.get('trials', swap.get('sessions', 0))} trials "
            f"in {swap.get('sessions', 0)} sessions ({swap_verdict(swap)})",
        ),
    ]
    return "| check | value |\n| --- | --- |\n" + "\n".join(f"| {k} | {v} |" for k, v in checks)


def model_card(name: str, args: argparse.Namespace, run_cfg: dict, meta: dict, analysis: dict, pool_cmd: str) -> str:
    losses = ", ".join(f"{k} {v:.4g}" for k, v in meta.get("losses", {}).items())
    model = f"`{run_cfg['model']['name']}` {json.dumps(run_cfg['model']['kwargs'])}"
    d, o = run_cfg["data"], run_cfg["optim"]
    sets = "".join(f" --set {x}" for x in args.extra) if args.extra else ""
    named = "" if name == DEFAULT_NAME else f" --name {name}"
    named += "" if args.preset == DEFAULT_PRESET else f" --preset {args.preset}"
    command = f"--work WORK{named} --steps {args.steps} --pool-subjects {args.pool_subjects}{sets}"
    if args.package_step is not None:
        command += f" --package-step {args.package_step}"
    if args.erase:
        command += " --erase"
    of = (
        f" (the checkpoint at step {meta['step']} of a {args.steps}-step schedule)"
        if meta["step"] != args.steps
        else ""
    )
    # the memory layout it trained in (run.json's layout, by trainer.memory_format): another rounds otherwise
    layout = run_cfg.get("layout")
    layout_text = (
        f" It trained in the `{layout}` memory layout; a remake where `trainer.memory_format=auto` picks the other "
        f"adds `--set trainer.memory_format={layout}` to follow it."
        if layout
        else ""
    )
    how = (
        "pretrained on synthetic multi-contrast heads made by\n`neurofm synth` from the ICBM 2009c / CerebrA anatomy, "
        "with one label: the pool's health labels, read by a\nhealth pretext beside the self-supervised terms "
        "(`objective.w_health`; weak supervision by the pool's metadata, not a\nlabel-free objective)."
        if float(run_cfg.get("objective", {}).get("w_health", 0) or 0) > 0
        else "pretrained without labels on synthetic multi-contrast heads made by\n`neurofm synth` from the ICBM "
        "2009c / CerebrA anatomy."
    )
    return f"""# {name}

fomo25-tiny ({model}), {how}

## Data
{args.pool_subjects} synthetic subjects x 2 sessions (T1w, T1c, T2w, FLAIR, PDw; 3 site intensity models;
5 % of non-T1w scans missing), seed {args.pool_seed}, prepared at 4 mm:

    {pool_cmd}

None of them is a subject of `neurofm demo` (seed 0, sub-001 ...) or of the evaluation set below
(seed {args.eval_seed}, sub-{args.eval_seed + 1} ...); the pool's subjects are sub-{args.pool_seed + 1} ...
The synthetic heads come from one template: the model has seen no real scan.

## Training
    .venv/bin/python scripts/make_pretrained.py {command}

Recipe `{args.preset}` ({d["patch"]}^3 crops, batch {d["batch_size"]}, AdamW lr {o["lr"]}, cosine), {meta["step"]}
steps{of}; objective `{json.dumps(run_cfg["objective"])}`. Wall time {args.train_minutes:.0f} min on a CPU
({args.threads}) for the whole schedule. Losses logged at that step: {losses}.{layout_text}

{ANALYSIS_HEADING} (evaluation set: {args.eval_subjects} other subjects x 2 sessions)
{analysis_table(analysis)}

## Use
    neurofm finetune --from {name} --data STORE --task seg --target lesion --out ft/
    neurofm inspect {name}

Inputs must be prepared at 4 mm (`neurofm prepare --spacing 4`) and z-scored, as here.
"""


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="folder for the data and the run")
    ap.add_argument("--name", default=DEFAULT_NAME)
    ap.add_argument("--preset", default=DEFAULT_PRESET, help="the fomo25 recipe, e.g. fomo25-cmeans-tiny")
    ap.add_argument("--steps", type=int, default=30000)
    ap.add_argument("--pool-subjects", type=int, default=300)
    ap.add_argument("--pool-seed", type=int, default=1000)
    ap.add_argument("--eval-subjects", type=int, default=40)
    ap.add_argument("--eval-seed", type=int, default=3000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--package-step",
        type=int,
        default=None,
        help="package the run's checkpoint at this step (it must have been kept: trainer.checkpoint_every and "
        "trainer.keep_checkpoints) instead of the last one; it is the one analysed and described",
    )
    ap.add_argument(
        "--set", nargs="+", action="extend", default=[], dest="extra", help="more recipe overrides (repeatable)"
    )
    ap.add_argument(
        "--erase",
        action="store_true",
        help=f"fit neurofm erase on {ERASE_SESSIONS} pool sessions before the analysis and package the eraser",
    )
    ap.add_argument(
        "--refresh-analysis",
        action="store_true",
        help="train nothing: analyze the packaged model --name again and rewrite its analysis.json and its card's "
        "analysis table (the rest of the card is kept)",
    )
    return ap


def analyze(work: Path, run: Path | str, out: Path, args: argparse.Namespace) -> dict:
    """``neurofm analyze`` on the evaluation set (made in ``work`` if missing); its ``analysis.json``."""
    evaluation = synth_and_prepare(work, "eval", args.eval_subjects, args.eval_seed, args.workers)
    sh("analyze", run, "--data", evaluation, "--out", out, "--max-sessions", 2 * args.eval_subjects)
    analysis = json.loads((out / "analysis.json").read_text())
    analysis.update(
        run=args.name, data=f"neurofm synth, {args.eval_subjects} subjects x 2 sessions, seed {args.eval_seed}"
    )
    return analysis


def card_with_analysis(card: str, analysis: dict) -> str:
    """``card`` with the table of its analysis section (heading kept) made from ``analysis``."""
    lines = card.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith(ANALYSIS_HEADING))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    section = f"{lines[start].rstrip()}\n{analysis_table(analysis)}\n\n"
    return "".join(lines[:start]) + section + "".join(lines[end:])


def sections(card: str) -> dict[str, str]:
    """A card's ``## `` sections by heading line (the text before the first one under ``""``)."""
    out: dict[str, str] = {}
    heading = ""
    for line in card.splitlines(keepends=True):
        if line.startswith("## "):
            heading = line.rstrip()
        out[heading] = out.get(heading, "") + line
    return out


def with_kept_sections(new: str, old: str | None) -> str:
    """``new`` with every section of ``old`` (the card being replaced) that ``new`` does not write, appended in its
    order: what was written by hand on a card (a model's own results and read-out) survives a remake."""
    if not old:
        return new
    written = sections(new)
    kept = [text for heading, text in sections(old).items() if heading and heading not in written]
    return new.rstrip("\n") + "\n" + "".join("\n" + text.rstrip("\n") + "\n" for text in kept) if kept else new


def refresh_analysis(work: Path, args: argparse.Namespace) -> None:
    """The packaged model measured by the current ``neurofm analyze``; its card's other sections are kept."""
    dest = ROOT / "src" / "neurofm" / "pretrained" / args.name
    card = dest / "MODEL_CARD.md"
    if not card.is_file():
        raise SystemExit(f"no packaged model {args.name} (looked for {card.relative_to(ROOT)})")
    text = card.read_text()
    if ANALYSIS_HEADING not in text:
        raise SystemExit(f"{card.relative_to(ROOT)} has no section {ANALYSIS_HEADING!r} to rewrite")
    if args.erase:
        pool = synth_and_prepare(work, "pool", args.pool_subjects, args.pool_seed, args.workers)
        ck = checkpoint_to_package(dest, None)
        copy = work / f"erase-{args.name}" / ck.name
        shutil.rmtree(copy.parent, ignore_errors=True)
        shutil.copytree(ck, copy)
        sh("erase", copy, "--data", pool, "--max-sessions", ERASE_SESSIONS, "--no-progress")
        from neurofm.analyze.eraser import ERASER
        from neurofm.utils import atomic_write_bytes

        atomic_write_bytes(ck / ERASER, (copy / ERASER).read_bytes())
    analysis = analyze(work, dest, work / f"analysis-{args.name}", args)
    from neurofm.utils import atomic_write_text, write_json

    atomic_write_text(card, card_with_analysis(text, analysis))
    write_json(dest / "analysis.json", analysis)
    print(f"rewrote {card.relative_to(ROOT)}'s analysis table and {args.name}/analysis.json")


def checkpoint_to_package(run: Path, step: int | None) -> Path:
    """The run's last checkpoint, or the one written at ``step``; a clear error where there is none."""
    from neurofm.io.checkpoint import is_complete, latest_checkpoint

    ck = latest_checkpoint(run) if step is None else run / "checkpoints" / f"step-{step:07d}"
    if ck is None or not is_complete(ck):
        at = "" if step is None else f" at step {step}"
        raise SystemExit(
            f"{run}: no checkpoint{at} (trainer.checkpoint_every must write one there and trainer.keep_checkpoints "
            "keep it)"
        )
    return ck


def swap_in(stage: Path, dest: Path) -> None:
    """Put the finished folder ``stage`` where ``dest`` is: two renames, the old folder removed last."""
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    stage.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def main() -> None:
    from neurofm.utils import write_json

    args = parser().parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.refresh_analysis:
        return refresh_analysis(work, args)
    pool = synth_and_prepare(work, "pool", args.pool_subjects, args.pool_seed, args.workers)
    pool_cmd = (
        f"neurofm synth POOL --subjects {args.pool_subjects} --sessions 2 --seed {args.pool_seed} --resolution 2 "
        f"--first-subject {args.pool_seed + 1} --sites 3 --missing-rate 0.05 "
        "&& neurofm prepare POOL POOL_STORE --spacing 4"
    )
    run = work / "run"
    # the training's wall time, kept beside the run: packaging again from a finished run trains nothing
    timing = work / "train_minutes.json"
    t0 = time.time()
    sets = [f"trainer.max_steps={args.steps}", "trainer.checkpoint_every=1000", "data.num_workers=1", *args.extra]
    if (run / "run.json").is_file():
        sh("pretrain", "--out", run, "--resume", "--max-steps", args.steps, "--no-progress")
    else:
        sh(
            "pretrain",
            "--preset",
            args.preset,
            "--data",
            pool,
            "--out",
            run,
            "--no-progress",
            *sum((["--set", s] for s in sets), []),
        )
    minutes = (time.time() - t0) / 60
    spent = json.loads(timing.read_text()) if timing.is_file() else {"minutes": 0.0}
    args.train_minutes = spent["minutes"] + minutes
    write_json(timing, {"minutes": args.train_minutes})
    threads = os.environ.get("OMP_NUM_THREADS")
    args.threads = f"OMP_NUM_THREADS={threads}" if threads else f"{os.cpu_count()} cores"
    ck = checkpoint_to_package(run, args.package_step)
    tag = "" if args.package_step is None else f"-step{args.package_step}"
    if args.erase:
        sh("erase", ck, "--data", pool, "--max-sessions", ERASE_SESSIONS, "--no-progress")
    analysis = analyze(work, ck, work / f"analysis{tag}", args)
    dest = ROOT / "src" / "neurofm" / "pretrained" / args.name
    # built beside the model's folder and swapped in whole: a killed packaging leaves the old model intact
    stage = dest.with_name(f".{args.name}.staging")
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "checkpoints" / ck.name).mkdir(parents=True)
    run_cfg = scrub(json.loads((run / "run.json").read_text()), pool_cmd)
    for f in CARRY:
        src = ck / f
        if f == "run.json":
            (stage / "checkpoints" / ck.name / f).write_text(
                json.dumps(scrub(json.loads(src.read_text()), pool_cmd), indent=2) + "\n"
            )
        else:
            shutil.copy(src, stage / "checkpoints" / ck.name / f)
    if args.erase:
        from neurofm.analyze.eraser import ERASER

        shutil.copy(ck / ERASER, stage / "checkpoints" / ck.name / ERASER)
    (stage / "checkpoints" / "last").write_text(ck.name + "\n")
    (stage / "run.json").write_text(json.dumps(run_cfg, indent=2) + "\n")
    meta = json.loads((ck / "meta.json").read_text())
    old_card = dest / "MODEL_CARD.md"
    card = model_card(args.name, args, run_cfg, meta, analysis, pool_cmd)
    (stage / "MODEL_CARD.md").write_text(with_kept_sections(card, old_card.read_text() if old_card.is_file() else None))
    write_json(stage / "analysis.json", analysis)
    swap_in(stage, dest)
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()) / 1e6
    print(f"packaged {dest.relative_to(ROOT)} ({size:.1f} MB)")


if __name__ == "__main__":
    main()
