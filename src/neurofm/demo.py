"""``neurofm demo``: the embedded default end to end, offline, on a 2-core CPU in about 9 minutes.

1. synth — synthetic subjects on the real ICBM 2009c / CerebrA anatomy (2 mm, 3 sites);
2. prepare — RAS, 4 mm (so a 32³ crop holds most of a brain), crop, z-score, blosc2 store;
3. pretrain — fomo25-tiny on every session (no labels used);
4. fine-tune — lesion segmentation, health classification and age regression from a few
   labelled subjects, pretrained against scratch with the same budget, tested on the others;
5. analyze — anatomy-latent similarity and contrast probes;
6. report — HTML with the figures and the scores with bootstrap 95 % intervals.

Every stage reuses its output if it is already there, so an interrupted demo resumes.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console


@dataclass
class DemoConfig:
    subjects: int = 40
    sessions: int = 2
    workers: int = 2
    spacing: float = 4.0  # mm: a 32^3 crop holds most of a brain, so a 2-core CPU finishes in ~9 minutes
    pretrain_steps: int = 1500
    patch: int = 32
    finetune_steps: int = 300
    finetune_lr: float = 3e-3
    shots: dict[str, int] = field(default_factory=lambda: {"seg": 8, "cls": 16, "reg": 24})  # labelled subjects
    seeds: int = 1
    contrasts: list[str] = field(default_factory=lambda: ["T1w", "FLAIR"])
    tasks: list[tuple[str, str]] = field(
        default_factory=lambda: [("seg", "lesion"), ("cls", "healthy"), ("reg", "age")]
    )
    latent_sessions: int = 20
    seed: int = 0


def run_demo(out: str | Path = "neurofm-demo", cfg: DemoConfig | None = None) -> Path:
    """Run every stage (see module docstring); returns the path of the HTML report."""
    from neurofm.analyze import experiments, figures
    from neurofm.analyze.embed import embed_store
    from neurofm.analyze.latent import latent_analysis, summary_table
    from neurofm.analyze.run import drop_values, score_table, spread_sessions
    from neurofm.evaluate.report import Section, write_report
    from neurofm.inspect import describe_run, describe_store
    from neurofm.io.checkpoint import checkpoint_step, latest_checkpoint
    from neurofm.preprocess import PrepareConfig, prepare
    from neurofm.synth import SynthConfig, synthesize
    from neurofm.synth.montage import montage
    from neurofm.tasks.pretrain import pretrain
    from neurofm.train.config import FinetuneConfig
    from neurofm.utils import to_jsonable, write_json

    cfg = cfg or DemoConfig()
    console = Console(stderr=True, soft_wrap=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t_all = time.time()

    def stage(name: str, title: str) -> float:
        console.rule(f"[bold]{name}[/] — {title}")
        return time.time()

    t = stage("1/6 synth", f"{cfg.subjects} synthetic subjects x {cfg.sessions} sessions on the ICBM 2009c anatomy")
    bids = out / "bids"
    if not (bids / "participants.tsv").is_file():
        if bids.exists():
            shutil.rmtree(bids)
        synthesize(
            bids,
            SynthConfig(
                subjects=cfg.subjects, sessions=cfg.sessions, seed=cfg.seed, resolution=2, sites=3, missing_rate=0.05
            ),
            workers=cfg.workers,
        )
    fig_dir = out / "figures"
    fig_dir.mkdir(exist_ok=True)
    montage(bids, fig_dir / "synth_montage.png", subjects=5)
    times["synth"] = time.time() - t

    t = stage("2/6 prepare", f"RAS, {cfg.spacing:g} mm, foreground crop, z-score, blosc2 store")
    store = out / "store"
    report = prepare(bids, store, PrepareConfig(spacing=cfg.spacing), workers=cfg.workers)
    console.print(report.summary())
    console.print(describe_store(store))
    times["prepare"] = time.time() - t

    t = stage("3/6 pretrain", f"fomo25-tiny, {cfg.pretrain_steps} steps on every session, no labels")
    run = out / "pretrain"
    ck = latest_checkpoint(run)
    if ck is None or checkpoint_step(ck) < cfg.pretrain_steps:
        overrides = [
            f"trainer.max_steps={cfg.pretrain_steps}",
            f"data.patch={cfg.patch}",
            "data.num_workers=1",
            f"trainer.checkpoint_every={max(50, cfg.pretrain_steps // 4)}",
            f"trainer.seed={cfg.seed}",
        ]
        pretrain(
            store if ck is None else None, run, "fomo25-tiny", overrides=overrides, resume=ck is not None, progress=True
        )
    console.print(describe_run(run))
    figures.training_curves(run, fig_dir / "pretrain_curves.png", "fomo25-tiny pretraining")
    if (run / "figures" / "reconstructions.png").is_file():
        shutil.copy(run / "figures" / "reconstructions.png", fig_dir / "reconstructions.png")
    times["pretrain"] = time.time() - t

    shots = ", ".join(f"{k} {v}" for k, v in cfg.shots.items())
    t = stage("4/6 fine-tune", f"few labelled subjects ({shots}), pretrained vs scratch, same budget")
    base = FinetuneConfig(
        task="seg",
        target="lesion",
        source="scratch",
        arch="fomo25-tiny",
        contrasts=cfg.contrasts,
        steps=cfg.finetune_steps,
        lr=cfg.finetune_lr,
        patch=cfg.patch,
        fg_p=0.5,
        positive_only=True,
        num_workers=1,
        tta=False,
        seed=cfg.seed,
    )
    rows = []
    for task, target in cfg.tasks:
        rows += experiments.compare_inits(
            store,
            out / "finetune",
            [(task, target)],
            {"pretrained": str(run), "scratch": "scratch"},
            replace(base, shots=cfg.shots.get(task, 8)),
            seeds=cfg.seeds,
            progress=True,
        )
    figures.scores_figure(rows, fig_dir / "scores.png", f"labelled subjects: {shots}; pretrained vs scratch")
    score_table = score_table(rows)
    console.print(_score_text(score_table))
    times["finetune"] = time.time() - t

    t = stage("5/6 analyze", "anatomy-latent similarity across contrasts, contrast probes")
    from neurofm.store import Store

    keys = spread_sessions(Store(store), cfg.latent_sessions)
    lat = latent_analysis(embed_store(run, store, keys=keys, progress=True))
    figures.latent_figure(lat, fig_dir / "latent.png")
    console.print(_latent_text(summary_table(lat)))
    times["analyze"] = time.time() - t

    t = stage("6/6 report", "HTML with figures and scores")
    times["report"] = time.time() - t
    times["total"] = time.time() - t_all
    sections = [
        Section(
            "Data",
            text=f"<code>neurofm synth</code>: {cfg.subjects} subjects x {cfg.sessions} sessions, 3 sites, "
            f"2 mm, prepared at {cfg.spacing:g} mm; healthy subjects and patients with tumours, infarcts or "
            "white-matter hyperintensities.",
            images=["figures/synth_montage.png"],
        ),
        Section(
            "Pretraining",
            text=f"fomo25-tiny for {cfg.pretrain_steps} steps on every session (no labels): "
            "masked reconstruction, subject and contrast latents, cross-contrast swap.",
            images=["figures/pretrain_curves.png", "figures/reconstructions.png"],
            note="reconstructions: input, masked input, reconstruction, the other contrast of the same session, "
            "and the swap (the anatomy rendered in that other contrast)",
        ),
        Section("Latent analysis", images=["figures/latent.png"], tables=[summary_table(lat)]),
        Section(
            "Fine-tuning: does pretraining help with few labels?",
            text=f"{cfg.shots} labelled subjects per task, inputs {', '.join(cfg.contrasts)}, {cfg.finetune_steps} "
            "steps from the pretrained encoder or from scratch (same architecture and budget); every other "
            "subject is a test case (all sessions). Intervals: bootstrap over test cases.",
            images=["figures/scores.png"],
            tables=[score_table],
        ),
        Section("Timings (s)", tables=[[{k: round(v, 1) for k, v in times.items()}]]),
    ]
    page = write_report(
        out / "report.html", "neurofm demo", sections, intro="The embedded default, end to end, offline, on a CPU."
    )
    write_json(out / "demo.json", to_jsonable({"scores": rows, "latent": drop_values(lat), "times": times}))
    console.rule("done")
    console.print(f"total {times['total'] / 60:.1f} min")
    console.print(f"report: {page.resolve()}")
    return page


def _latent_text(rows: list[dict[str, Any]]) -> str:
    def f(x: Any) -> str:
        return "n/a" if x is None else f"{x:.2f}"

    return "\n".join(
        f"  {r['latent']} latent: cosine same subject {f(r['cosine within subject'])} vs other subjects "
        f"{f(r['cosine across subjects'])}; contrast probe {f(r['contrast probe accuracy'])} (chance {f(r['chance'])})"
        for r in rows
    )


def _score_text(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        v = r["value"]
        lines.append(
            f"  {r['task']:14s} {r['init']:10s} {r['metric']}: {v:.3f} {r.get('95% CI', '')} "
            f"({r['test cases']} test cases)"
            if isinstance(v, float)
            else f"  {r['task']}: {v}"
        )
    return "\n".join(lines)
