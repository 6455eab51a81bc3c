"""``neurofm demo``: the embedded default end to end, offline, on a 2-core CPU in 7-15 minutes (AVX-512 kernels; about
25 with AVX2 kernels, README).

1. synth — synthetic subjects on the real ICBM 2009c / CerebrA anatomy (2 mm, 3 sites);
2. prepare — RAS, 4 mm (so a 32³ crop holds most of a brain), crop, z-score, blosc2 store;
3. pretrained model — a fomo25-tiny model that ships with neurofm (pretrained on a separate
   pool of synthetic subjects, none of them the demo's), one for every task or one per task, or, with
   ``pretrain_steps``, the default's recipe pretrained here from nothing on a freshly synthesised pool
   disjoint from the demo's subjects;
4. fine-tune — lesion segmentation, health classification and age regression from a few
   labelled subjects: the pretrained model, scratch with the same architecture and budget, a
   frozen random encoder and the constant predictor, on the same few-shot draws for several
   seeds; the paired difference from scratch with its 95 % interval;
5. analyze — anatomy-latent similarity, contrast probes and the swap check, of each model used;
6. report — HTML with the figures and the tables.

The stages that synthesise, prepare, pretrain and fine-tune reuse their output if it is already there, so an
interrupted demo resumes; the latent analysis and the report are made again.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

if TYPE_CHECKING:
    from neurofm.analyze.experiments import Arm
    from neurofm.train.config import FinetuneConfig

SHIPPED = "fomo25-tiny-cmeans"  # chosen over fomo25-tiny-synth on the demo's 10 seeds (docs/finetuning.md)
# the model each task fine-tunes by default, each chosen on subjects the choice was not made on: segmentation from
# fomo25-tiny-cshift, ahead of scratch and of fomo25-tiny-cmeans (experiments/rule_per_task_default.md); brain age
# from fomo25-tiny-cswap, whose probe reads it better than fomo25-tiny-cmeans's (experiments/rule_age_model.md);
# health from fomo25-tiny-cmeans-health, read through its health pretext's classifier (HEALTH_READ_OUT), ahead of
# scratch and of the random encoder on three stores (experiments/rule_health_pretext_logit.md): weak supervision
# by its pretraining pool's health labels, where fomo25-tiny-cmeans is label-free
DEFAULT_MODELS = {"seg": "fomo25-tiny-cshift", "cls": "fomo25-tiny-cmeans-health", "reg": "fomo25-tiny-cswap"}
# the closed-form probe's read-out of a model with a pooled health pretext head, for the pretext's own target: the
# head's classifier's logits of each case (probe_features=pretext-logit), on 32^3 windows tiled over each scan
HEALTH_READ_OUT = {"probe_windows": "tiles", "probe_features": "pretext-logit"}
# what the arm "pretrained zero-shot" is, as the demo prints and reports it
ZERO_SHOT_TEXT = (
    "pretrained zero-shot reads {model}'s health pretext classifier as its pretraining left it, on the same test "
    "cases and {patch}^3 tiles, with no labelled subject (the pretraining pool's labels taught it: weak supervision)"
)
RECIPE = "fomo25-cmeans-tiny"  # fomo25-tiny-cmeans's recipe (SHIPPED): what pretrain_steps > 0 trains from nothing


@dataclass
class DemoConfig:
    subjects: int = 40
    sessions: int = 2
    workers: int = 2
    spacing: float = 4.0  # mm: a 32^3 crop holds most of a brain
    # a shipped model or a run folder for every task, or one per task ({"seg": ..., ...}; a task left out takes
    # its DEFAULT_MODELS entry); ignored when pretrain_steps > 0
    pretrained: str | dict[str, str] = field(default_factory=lambda: dict(DEFAULT_MODELS))
    pretrain_steps: int = 0  # > 0: pretrain the shipped recipe from nothing on a separate synthetic pool
    pool_subjects: int = 100  # subjects of that pool (two sessions each)
    patch: int = 32
    # fine-tuning steps per model and task (or one number for all) of every arm trained by gradient steps (for
    # cls that is scratch, for reg scratch and LP-FT: the linear probes are fitted in closed form), scratch's where
    # scratch_steps says otherwise
    finetune_steps: int | dict[str, int] = field(default_factory=lambda: {"seg": 200, "cls": 100, "reg": 100})
    # per task, the steps of the scratch arm where they differ from finetune_steps: a baseline given more steps
    # than the pretrained model it is compared with. Scratch's age kept falling from 100 to 600 steps of 8 crops and
    # sat at the constant predictor at 200 on the demo's store; since experiments/rule_scratch_300.md (written
    # first) it takes 300 and age's LP-FT 100, which the demo's 15 minutes pay for (over 10 seeds: scratch 9.81
    # against the constant's 11.66, LP-FT 6.45, 0.66x scratch)
    scratch_steps: dict[str, int] = field(default_factory=lambda: {"reg": 300})
    # learning rate per task (or one number for all): at 3e-3, 200 segmentation steps left one few-shot run
    # in five on the empty-prediction plateau in either arm; 1e-2 did not. Scratch cls/reg (the only arms trained
    # by steps there) did better at 1e-3 than at 3e-3 over 10 seeds, by a rule written first (docs/finetuning.md)
    finetune_lr: float | dict[str, float] = field(default_factory=lambda: {"seg": 1e-2, "cls": 1e-3, "reg": 1e-3})
    # segmentation's cross-entropy weight of the lesion class: at 1, 200 steps from 4 labelled subjects left some
    # runs of either arm on the empty-prediction plateau; chosen on another store (docs/finetuning.md)
    seg_fg_weight: float = 10.0
    # crops per fine-tuning step per task (or one number for all) of every arm trained by gradient steps. At 2 x 100
    # steps scratch's age had not fitted its training crops; at 8 it got below the constant predictor on a store made
    # for the purpose (on the demo's own store it stays at it; experiments/rule_scratch_batch.md, written first).
    # Health's scratch gained 0.002 AUROC at 8 and the demo's 15 minutes could not pay for both, so cls keeps 2
    finetune_batch: int | dict[str, int] = field(default_factory=lambda: {"seg": 2, "cls": 2, "reg": 8})
    # training augmentation per task (or one for all) of the arms trained by gradient steps: flips or nnunet
    finetune_augment: str | dict[str, str] = "flips"
    seg_fg_p: float = 0.5  # the share of segmentation crops centred on a lesion voxel (nnU-Net's is 0.33)
    shots: dict[str, int] = field(default_factory=lambda: {"seg": 4, "cls": 16, "reg": 24})  # labelled subjects
    # the pretrained protocol per task, fixed before the demo's data is seen on the shipped model's evaluation
    # set (docs/finetuning.md): cls/reg read the frozen encoder with a linear probe fitted in closed form
    # (since 2026-12-06, by experiments/rule_demo_lpft_arm.md: age is also read by the model fine-tuned in full from
    # its probe, LP-FT, pretrained_head_init below)
    modes: dict[str, list[str]] = field(
        default_factory=lambda: {"seg": ["full"], "cls": ["linear"], "reg": ["linear", "full"]}
    )
    head_warmup: float = 0.25
    # cls/reg arms trained by steps: how the head's output layer starts, PyTorch's default or zero (the constant
    # predictor; docs/finetuning.md)
    head_init: str = "default"
    # per task (cls/reg), how the head of the pretrained model fine-tuned in full starts, where it differs from
    # head_init: "probe" is LP-FT, training from the closed-form linear probe (docs/finetuning.md); that arm is
    # then called "pretrained lp-ft"
    pretrained_head_init: dict[str, str] = field(default_factory=lambda: {"reg": "probe"})
    # per task (cls/reg), the closed-form probe's read-out where it differs from the probe's defaults (the scan
    # whole, every fused feature): probe_windows, probe_features (docs/finetuning.md). It is the linear arms' (the
    # random encoder is read the same way) and LP-FT's, not scratch's. None: each model's own (read_out_of): a model
    # with a pooled health pretext head is read through that head's classifier for its target (HEALTH_READ_OUT)
    probe: dict[str, dict[str, str]] | None = None
    # cls: a model with a pooled health pretext head for the target (as read_out_of gives it HEALTH_READ_OUT) is also
    # read zero-shot, its classifier as its pretraining left it, with no labelled subject: the arm "pretrained
    # zero-shot" (linear_fit=zero-shot; scored on the same test cases as the others)
    zero_shot: bool = True
    seeds: int = 3
    floors: bool = True
    contrasts: list[str] = field(default_factory=lambda: ["T1w", "FLAIR"])
    tasks: list[tuple[str, str]] = field(
        default_factory=lambda: [("seg", "lesion"), ("cls", "healthy"), ("reg", "age")]
    )
    latent_sessions: int = 40
    seed: int = 0
    # fine-tuning runs trained at once, each in a worker process on this process's CPU threads / jobs (1: one after
    # another here, on all of them). 0: auto, one single-threaded run per CPU thread (torch.get_num_threads(); at
    # most one per 2 GiB of memory) on a CPU, one at a time on a GPU. A run of the tiny models does not keep two threads
    # busy: on 2 AVX2 cores the demo's fine-tuning took 21.5 min as two single-threaded runs at once against 28.3 one
    # after another on two threads (1.32x; a training step alone 0.99-1.32x, benchmarks/bench_parallel_runs.py)
    jobs: int = 0


def _check(cfg: DemoConfig) -> None:
    """Refuse settings the demo cannot finish with before any work is done."""
    from neurofm.errors import ConfigError
    from neurofm.io.checkpoint import resolve_checkpoint

    run_jobs(cfg.jobs)  # a negative --jobs
    need = max(cfg.shots.values()) + 2
    if cfg.subjects < need:
        shots = ", ".join(f"{t} {n}" for t, n in cfg.shots.items())
        raise ConfigError(
            f"--subjects {cfg.subjects} is too few for labelled sets of {shots} subjects plus held-out ones: "
            f"use at least {need}, or lower --shots"
        )
    if cfg.pretrain_steps <= 0:
        for model in dict.fromkeys(models_by_task(cfg).values()):
            resolve_checkpoint(model)  # a missing model is said now, not after synth and prepare


def models_by_task(cfg: DemoConfig) -> dict[str, str]:
    """The pretrained model each task of ``cfg.tasks`` fine-tunes (``cfg.pretrained``, one or per task)."""
    return {task: str(_per_task(cfg.pretrained, task, DEFAULT_MODELS.get(task, SHIPPED))) for task, _ in cfg.tasks}


def models_text(models: dict[str, str]) -> str:
    """``"NAME"`` when every task takes one model, else ``"seg NAME, cls NAME2, ..."``."""
    if len(set(models.values())) == 1:
        return next(iter(models.values()))
    return ", ".join(f"{task} {model}" for task, model in models.items())


def run_demo(out: str | Path = "neurofm-demo", cfg: DemoConfig | None = None) -> Path:
    """Run every stage (see module docstring); returns the path of the HTML report."""
    import torch

    from neurofm.analyze import figures
    from neurofm.analyze.embed import embed_store
    from neurofm.analyze.latent import intensity_histograms, latent_analysis, summary_table, swap_check
    from neurofm.analyze.run import drop_values, eraser_text, score_table, spread_sessions
    from neurofm.evaluate.report import Section, write_report
    from neurofm.inspect import describe_run, describe_store
    from neurofm.io.checkpoint import resolve_run
    from neurofm.models.registry import model_from_checkpoint
    from neurofm.preprocess import PrepareConfig, prepare
    from neurofm.store import Store
    from neurofm.synth.montage import montage
    from neurofm.utils import machine, to_jsonable, write_json

    cfg = cfg or DemoConfig()
    _check(cfg)
    console = Console(stderr=True, soft_wrap=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t_all = time.time()

    def stage(name: str, title: str) -> float:
        console.rule(f"[bold]{name}[/] — {title}")
        return time.time()

    t = stage("1/6 synth", f"{cfg.subjects} synthetic subjects x {cfg.sessions} sessions on the ICBM 2009c anatomy")
    bids = _synth(out / "bids", cfg.subjects, cfg.sessions, cfg.seed, cfg.workers)
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

    if cfg.pretrain_steps > 0:
        title = f"{RECIPE} from nothing: {cfg.pretrain_steps} steps on {cfg.pool_subjects} other synthetic subjects"
        t = stage("3/6 pretrain", title)
        run = _pretrain_pool(out, cfg, console)
        figures.training_curves(run, fig_dir / "pretrain_curves.png", "fomo25-tiny pretraining")
        models = {task: str(run) for task, _ in cfg.tasks}
    else:
        models = models_by_task(cfg)
        t = stage("3/6 pretrained model", f"{models_text(models)}, shipped with neurofm (no pretraining here)")
    distinct = list(dict.fromkeys(models.values()))
    for model in distinct:
        console.print(describe_run(resolve_run(model)))
    times["pretrain"] = time.time() - t

    shots = ", ".join(f"{k} {v}" for k, v in cfg.shots.items())
    t = stage("4/6 fine-tune", f"labelled subjects {shots}; {cfg.seeds} seeds; pretrained, scratch and two floors")
    read_outs = {task: read_out_text(read_out_of(cfg, models[task], task)) for task, _ in cfg.tasks if task != "seg"}
    read_outs = {task: text for task, text in read_outs.items() if text}
    for task, text in read_outs.items():
        console.print(f"  {task}: the probes read {models[task]} {text}; scratch is trained as always")
    zero_shot = [t for t, _ in cfg.tasks if cfg.zero_shot and reads_health_head(cfg, models[t], t)]
    for task in zero_shot:
        console.print(f"  {task}: {ZERO_SHOT_TEXT.format(model=models[task], patch=cfg.patch)}")
    rows = finetune_rows(cfg, models, store, out / "finetune")
    figures.scores_figure(rows, fig_dir / "scores.png", f"labelled subjects: {shots}; mean over {cfg.seeds} seeds")
    figures.difference_figure(rows, fig_dir / "differences.png")
    scores = score_table(rows)
    console.print(score_text(rows))
    times["finetune"] = time.time() - t

    t = stage("5/6 analyze", "anatomy-latent similarity across contrasts, contrast probes, swap check")
    keys = spread_sessions(Store(store), cfg.latent_sessions)
    reference = intensity_histograms(Store(store), keys)
    analyses: dict[str, dict[str, Any]] = {}
    for i, model in enumerate(distinct):
        df = embed_store(model, store, keys=keys, progress=True)
        lat = latent_analysis(df, reference=reference)
        png = "latent.png" if i == 0 else f"latent-{i + 1}.png"
        figures.latent_figure(lat, fig_dir / png)
        net, info = model_from_checkpoint(model)
        swap = swap_check(net.eval(), Store(store), keys, int(info["run"].get("data", {}).get("patch", cfg.patch)))
        if len(distinct) > 1:
            console.print(f"  {_model_label(model, models)}:")
        console.print(_latent_text(summary_table(lat), swap))
        analyses[model] = {"latent": lat, "swap": swap, "figure": f"figures/{png}", "eraser": df.attrs.get("eraser")}
    times["analyze"] = time.time() - t

    t = stage("6/6 report", "HTML with figures and tables")
    made_on = machine()
    jobs, threads = run_jobs(cfg.jobs)
    run_threads = threads or torch.get_num_threads()
    times["report"] = time.time() - t
    times["total"] = time.time() - t_all
    pre_text = (
        f"{RECIPE} pretrained here for {cfg.pretrain_steps} steps on {cfg.pool_subjects} other synthetic subjects "
        "(no labels; none of them is a fine-tuning or test subject)."
        if cfg.pretrain_steps > 0
        else " ".join(
            f"{_model_label(m, models)}: <code>{m}</code>, which ships with neurofm; its model card "
            f"(<code>neurofm inspect {m}</code>) gives the data, the command and the steps."
            for m in distinct
        )
        + " None of the pretraining subjects is a fine-tuning or test subject here."
    )
    sections = [
        Section(
            "Data",
            text=f"<code>neurofm synth</code>: {cfg.subjects} subjects x {cfg.sessions} sessions, 3 sites, "
            f"2 mm, prepared at {cfg.spacing:g} mm; healthy subjects and patients with tumours, infarcts or "
            "white-matter hyperintensities.",
            images=["figures/synth_montage.png"],
        ),
        Section(
            "Pretrained model",
            text=pre_text,
            images=["figures/pretrain_curves.png"] if cfg.pretrain_steps > 0 else [],
        ),
        *(
            Section(
                "Latent analysis" + (f" — {_model_label(m, models)}" if len(distinct) > 1 else ""),
                images=[a["figure"]],
                tables=[summary_table(a["latent"]), [a["swap"]] if a["swap"] else []],
                note="swap check: one scan's anatomy decoded with the contrast code of another crop of another "
                "contrast; mse_to_a is the error to that anatomy in that contrast, which disentangled latents make "
                "the smallest." + eraser_text(a["eraser"], a["latent"]),
            )
            for m, a in analyses.items()
        ),
        Section(
            "Fine-tuning: does pretraining help with few labels?",
            text=f"Labelled subjects {shots}; inputs {', '.join(cfg.contrasts)}; steps "
            + steps_text(cfg)
            + " of "
            + ", ".join(f"{t} {_batch(cfg, t)}" for t, _ in cfg.tasks)
            + " crops at learning rates "
            + ", ".join(f"{t} {_lr(cfg, t):g}" for t, _ in cfg.tasks)
            + " for every arm trained by gradient steps (linear probes "
            "are fitted in closed form, their penalty cross-validated over the labelled subjects); segmentation's "
            f"cross-entropy weighs lesion voxels {cfg.seg_fg_weight:g}x background; every other "
            "subject is a "
            f"test case (all sessions). {cfg.seeds} seeds, "
            "each a few-shot draw and an initialisation shared by all arms; values are means over seeds, differences "
            "are paired (same cases, same seed) against scratch; 95 % intervals from a bootstrap over seeds and cases. "
            "Floors: a frozen randomly initialised encoder with the same head, and the constant predictor "
            "(training mean, class frequencies, or background everywhere). "
            + "".join(f"The {task} probes read {models[task]} {text}. " for task, text in read_outs.items())
            + "".join(f"{task}: {ZERO_SHOT_TEXT.format(model=models[task], patch=cfg.patch)}. " for task in zero_shot)
            + f"Each run trained on {run_threads} CPU thread(s) of {_machine_text(made_on)}"
            + (f", {jobs} runs at once" if jobs > 1 else "")
            + ": the values repeat to the last digit on this machine at that count, not at another count "
            "(--jobs and OMP_NUM_THREADS set it) and not always on another processor.",
            images=["figures/scores.png", "figures/differences.png"],
            tables=[scores],
        ),
        Section("Timings (s)", tables=[[{k: round(v, 1) for k, v in times.items()}]]),
    ]
    page = write_report(
        out / "report.html", "neurofm demo", sections, intro="The embedded default, end to end, offline, on a CPU."
    )
    write_json(
        out / "demo.json",
        to_jsonable(
            {
                "pretrained": models,
                "scores": rows,
                "latent": {m: {"latent": drop_values(a["latent"]), "swap": a["swap"]} for m, a in analyses.items()},
                "times": times,
                "threads": run_threads,
                "jobs": jobs,
                "machine": made_on,
            }
        ),
    )
    console.rule("done")
    console.print(f"total {times['total'] / 60:.1f} min")
    console.print(f"report: {page.resolve()}")
    return page


def _machine_text(m: dict[str, Any]) -> str:
    gpu = f"; GPU {m['gpu']}" if m.get("gpu") else ""
    return f"{m['cpu']} ({m['cpu_capability']} kernels{gpu})"


def _per_task(value: Any, task: str, default: Any) -> Any:
    """A setting given for all tasks (one number) or per task (a dict)."""
    return value.get(task, default) if isinstance(value, dict) else value


def _model_label(model: str, models: dict[str, str]) -> str:
    """``"the pretrained model"`` or, per task, ``"the model of seg, cls"``."""
    if len(set(models.values())) == 1:
        return "the pretrained model"
    return "the model of " + ", ".join(task for task, m in models.items() if m == model)


def finetune_config(cfg: DemoConfig, run: str | Path, task: str, target: str) -> FinetuneConfig:
    """The fine-tuning settings of the demo's ``task`` rows (seed ``cfg.seed``; the study adds one per seed):
    scratch and the random floor take the architecture of ``run``, the pretrained model."""
    from neurofm.train.config import FinetuneConfig

    return FinetuneConfig(
        task=task,
        target=target,
        source="scratch",
        arch=str(run),
        contrasts=cfg.contrasts,
        shots=cfg.shots.get(task, 8),
        steps=_steps(cfg, task),
        batch_size=_batch(cfg, task),
        lr=_lr(cfg, task),
        head_warmup=cfg.head_warmup,
        head_init=cfg.head_init if task != "seg" else "default",
        patch=cfg.patch,
        fg_p=cfg.seg_fg_p,
        seg_fg_weight=cfg.seg_fg_weight if task == "seg" else 1.0,
        augment=str(_per_task(cfg.finetune_augment, task, "flips")),
        positive_only=True,
        # crops are read in this process: a batch of 8 takes about 10 ms, less than a worker process costs to start
        # and to run beside the two threads that train (the same crops either way: each is drawn from its index)
        num_workers=0,
        tta=False,
        seed=cfg.seed,
    )


def read_out_of(cfg: DemoConfig, model: str, task: str) -> dict[str, str]:
    """The closed-form probe's settings for ``task`` read from ``model``: ``cfg.probe``'s where it is set, else the
    model's own: :data:`HEALTH_READ_OUT` for a cls task whose target is the label a pooled health pretext head of
    the model was trained on (its run's ``data.health_label``) and whose classifier it can read
    (``reads_pretext_logits``), none otherwise (the probe's defaults)."""
    if cfg.probe is not None:
        return dict(cfg.probe.get(task, {}))
    return dict(HEALTH_READ_OUT) if reads_health_head(cfg, model, task) else {}


def reads_health_head(cfg: DemoConfig, model: str, task: str) -> bool:
    """Whether ``model`` has a pooled health pretext classifier (``reads_pretext_logits``) for ``task``'s target: a
    cls task whose target is the label that head was trained on (its run's ``data.health_label``)."""
    if task != "cls":
        return False
    from neurofm.errors import CheckpointError
    from neurofm.io.checkpoint import read_checkpoint
    from neurofm.models.registry import model_class

    try:
        info = read_checkpoint(model)
    except CheckpointError:  # no such model: the fine-tuning says so
        return False
    reads = getattr(model_class(info["model"]["name"]), "reads_pretext_logits", None)
    label = info["run"].get("data", {}).get("health_label", "healthy")
    has_head = reads is not None and reads(info["model"].get("kwargs", {}))
    return bool(has_head and dict(cfg.tasks).get(task) == label)


def read_out_text(read_out: dict[str, str]) -> str:
    """How a probe reads its model, in words (empty for the probe's defaults)."""
    if not read_out:
        return ""
    parts = []
    if read_out.get("probe_features") == "pretext-logit":
        parts.append("through its health pretext's own classifier (its logits of each case, calibrated)")
    elif read_out.get("probe_features") not in (None, "all"):
        parts.append(f"on its {read_out['probe_features']} features")
    if read_out.get("probe_windows") == "tiles":
        parts.append("on 32^3 windows tiled over each scan")
    rest = {k: v for k, v in read_out.items() if k not in ("probe_features", "probe_windows")}
    parts += [f"{k}={v}" for k, v in rest.items()]
    return ", ".join(parts)


def set_lp_ft(cfg: DemoConfig, tasks: list[str]) -> None:
    """Read exactly ``tasks`` (of cls, reg) also by the pretrained model fine-tuned in full from its closed-form
    probe (LP-FT): the arm "pretrained lp-ft" beside the task's other modes; the other tasks lose that arm."""
    from neurofm.errors import ConfigError

    bad = sorted(set(tasks) - {"cls", "reg"})
    if bad:
        raise ConfigError(f"--lp-ft takes cls and reg (a head to start from a probe) or none, got {', '.join(bad)}")
    modes, starts = dict(cfg.modes), dict(cfg.pretrained_head_init)
    for task in ("cls", "reg"):
        had = starts.pop(task, None) == "probe"
        task_modes = [m for m in modes.get(task, ["linear"]) if not (had and m == "full")]
        if task in tasks:
            task_modes, starts[task] = [*task_modes, "full"], "probe"
        modes[task] = task_modes
    cfg.modes, cfg.pretrained_head_init = modes, starts


def set_scratch_steps(cfg: DemoConfig, text: str) -> None:
    """``--scratch-steps``: ``"reg=300"`` gives the scratch arm of those tasks that many steps (a task at its other
    arms' steps keeps none of its own), ``"none"`` every task's the other arms' steps."""
    from neurofm.errors import ConfigError

    if text.strip() == "none":
        cfg.scratch_steps = {}
        return
    tasks = {t: _steps(cfg, t) for t, _ in cfg.tasks}
    given = parse_per_task(text, tasks, int, "--scratch-steps")
    if min(given.values()) < 1:
        raise ConfigError(f"--scratch-steps takes steps of 1 or more, got {text!r}")
    cfg.scratch_steps = {t: n for t, n in given.items() if n != tasks[t]}


def demo_arms(cfg: DemoConfig, model: str, task: str) -> list[Arm]:
    """The arms of one task: ``model`` read as ``cfg.modes`` says, scratch (for ``cfg.scratch_steps[task]`` steps
    where given) and (``cfg.floors``) the two floors; with ``cfg.pretrained_head_init`` for the task, the pretrained
    model fine-tuned in full starts its head that way (``probe``: the arm "pretrained lp-ft"); with ``cfg.zero_shot``,
    a model with a pooled health pretext classifier for the target is also read by that classifier as it is (the arm
    "pretrained zero-shot", after the pretrained arms)."""
    from neurofm.analyze import experiments
    from neurofm.analyze.experiments import Arm

    arms = experiments.standard_arms(model, task, cfg.modes.get(task, ["full"]), cfg.floors)
    read_out = read_out_of(cfg, model, task) if task != "seg" else {}
    if read_out:  # the probes (and LP-FT's, from the probe) read the model so; scratch has no probe
        lpft = cfg.pretrained_head_init.get(task) == "probe"
        arms = [
            replace(a, settings={**a.settings, **read_out})
            if a.mode == "linear" or (lpft and (a.source, a.mode) == (model, "full"))
            else a
            for a in arms
        ]
    if cfg.zero_shot and reads_health_head(cfg, model, task):  # beside the probe: the classifier with no label
        first = next(i for i, a in enumerate(arms) if a.source != model)
        zero = {**HEALTH_READ_OUT, "linear_fit": "zero-shot"}
        arms.insert(first, Arm("pretrained zero-shot", model, "linear", zero))
    if task in cfg.scratch_steps:
        steps = {"steps": int(cfg.scratch_steps[task])}
        arms = [replace(a, settings={**a.settings, **steps}) if a.source == "scratch" else a for a in arms]
    start = cfg.pretrained_head_init.get(task)
    if not start or task == "seg":
        return arms
    name = f"pretrained {'lp-ft' if start == 'probe' else 'full'}"
    lpft = {"head_init": start}
    return [
        replace(a, name=name, settings={**a.settings, **lpft}) if (a.source, a.mode) == (model, "full") else a
        for a in arms
    ]


def finetune_rows(
    cfg: DemoConfig,
    run: str | Path | dict[str, str],
    store: str | Path,
    out: str | Path,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """The demo's fine-tuning rows: per task of ``cfg.tasks``, the pretrained model (``run``: one for every task,
    or per task) read as ``cfg.modes`` says, scratch and the two floors (both with that model's architecture),
    paired over ``cfg.seeds`` seeds; a finished run in ``out`` is reused when its settings and the code that made
    it match (others are trained again). With ``cfg.jobs`` other than 1 (:func:`run_jobs`), every task's runs are
    trained first, that many at once in worker processes, the longest first."""
    from neurofm.analyze import experiments

    studies = []
    for task, target in cfg.tasks:
        model = str(run[task] if isinstance(run, dict) else run)
        studies.append((model, finetune_config(cfg, model, task, target), demo_arms(cfg, model, task)))
    jobs, threads = run_jobs(cfg.jobs)
    if jobs > 1:
        runs = []
        for _, task_cfg, arms in studies:
            runs += experiments.study_runs(out, task_cfg, arms, cfg.seeds, f"{task_cfg.task}-{task_cfg.target}")
        console = Console(stderr=True, soft_wrap=True)
        if progress:
            console.print(f"  fine-tuning runs {jobs} at once, on {threads} CPU thread(s) each")
        log = (lambda line: console.print(f"  {line}")) if progress else None
        experiments.train_runs(store, runs, jobs, threads, redo_stale=True, log=log)
    rows = []
    for model, task_cfg, arms in studies:
        label = f"{task_cfg.task}-{task_cfg.target}"
        task_rows = experiments.paired_study(
            store, out, task_cfg, arms, cfg.seeds, label, progress=progress, redo_stale=True, threads=threads
        )
        rows += [{**r, "model": model} for r in task_rows]
    return rows


def run_jobs(jobs: int) -> tuple[int, int | None]:
    """(fine-tuning runs at once, CPU threads of each; None: this process's) for ``DemoConfig.jobs`` (0: auto)."""
    import torch

    from neurofm.errors import ConfigError

    if jobs < 0:
        raise ConfigError(f"--jobs should be 0 (auto) or more, got {jobs}")
    total = torch.get_num_threads()
    if jobs == 0:
        if torch.cuda.is_available():
            return 1, None
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        jobs = max(1, min(total, memory // (2 * 1024**3)))
    if jobs == 1:
        return 1, None
    return jobs, max(1, total // jobs)


def parse_shots(text: str, default: dict[str, int]) -> dict[str, int]:
    """``"4"`` -> every task 4; ``"seg=2,cls=8"`` -> those tasks, the others as ``default``."""
    return parse_per_task(text, default, int, "--shots")


def parse_per_task(text: str, default: dict[str, Any], cast: Any = int, flag: str = "--shots") -> dict[str, Any]:
    """A per-task setting: ``"4"`` -> every task of ``default`` 4; ``"seg=2,cls=8"`` -> those tasks, the others as
    ``default``; each value read by ``cast``."""
    from neurofm.errors import ConfigError

    try:
        if "=" not in text:
            return {t: cast(text) for t in default}
        given = {k.strip(): cast(v) for k, v in (p.split("=") for p in text.split(",") if p.strip())}
    except ValueError:
        raise ConfigError(f"{flag} takes a value or TASK=VALUE pairs (e.g. seg=2,cls=8), got {text!r}") from None
    unknown = set(given) - set(default)
    if unknown:
        raise ConfigError(f"{flag} names unknown tasks {sorted(unknown)}; the demo's are {sorted(default)}")
    return {**default, **given}


def _steps(cfg: DemoConfig, task: str) -> int:
    return int(_per_task(cfg.finetune_steps, task, 200))


def steps_text(cfg: DemoConfig) -> str:
    """The fine-tuning steps per task, scratch's where they differ: ``"seg 200, cls 100, reg 100 (scratch 300)"``."""
    return ", ".join(
        f"{t} {_steps(cfg, t)}" + (f" (scratch {cfg.scratch_steps[t]})" if t in cfg.scratch_steps else "")
        for t, _ in cfg.tasks
    )


def _batch(cfg: DemoConfig, task: str) -> int:
    return int(_per_task(cfg.finetune_batch, task, 2))


def _lr(cfg: DemoConfig, task: str) -> float:
    return float(_per_task(cfg.finetune_lr, task, 3e-3))


def _synth(bids: Path, subjects: int, sessions: int, seed: int, workers: int, first_subject: int = 1) -> Path:
    from neurofm.synth import SynthConfig, synthesize

    if not (bids / "participants.tsv").is_file():
        if bids.exists():
            shutil.rmtree(bids)
        synthesize(
            bids,
            SynthConfig(
                subjects=subjects,
                sessions=sessions,
                seed=seed,
                resolution=2,
                sites=3,
                missing_rate=0.05,
                first_subject=first_subject,
            ),
            workers=workers,
        )
    return bids


def _pretrain_pool(out: Path, cfg: DemoConfig, console: Console) -> Path:
    """The shipped recipe pretrained on a pool of other synthetic subjects (another seed, named sub-1001 ...: none is a
    demo subject)."""
    from neurofm.io.checkpoint import checkpoint_step, latest_checkpoint
    from neurofm.preprocess import PrepareConfig, prepare
    from neurofm.tasks.pretrain import pretrain

    pool = _synth(out / "pool-bids", cfg.pool_subjects, 2, cfg.seed + 1000, cfg.workers, first_subject=1001)
    pool_store = out / "pool-store"
    console.print(prepare(pool, pool_store, PrepareConfig(spacing=cfg.spacing), workers=cfg.workers).summary())
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
        resume = ck is not None
        pretrain(None if resume else pool_store, run, RECIPE, overrides=overrides, resume=resume, progress=True)
    return run


def _latent_text(rows: list[dict[str, Any]], swap: dict[str, Any]) -> str:
    from neurofm.analyze.latent import CONFUSED_COLUMN, GAP_COLUMN, INTENSITY_ROW, MODE_ROW, RAW_ROW, swap_verdict

    def f(x: Any) -> str:
        return "n/a" if x is None else f"{x:.2f}"

    def confused(r: dict[str, Any]) -> str:
        return f", most confused {r[CONFUSED_COLUMN]}" if r.get(CONFUSED_COLUMN) else ""

    erased = any(r["latent"] == RAW_ROW for r in rows)  # the model has an eraser (neurofm erase)
    names = {
        MODE_ROW: "anatomy latent read by its most likely class",
        RAW_ROW: "anatomy latent before the eraser",
        "anatomy": "anatomy latent after the eraser" if erased else "anatomy latent",
    }
    lines = [
        f"  {names.get(r['latent'], r['latent'] + ' latent')}: "
        f"cosine same subject {f(r['cosine within subject'])} vs other subjects "
        f"{f(r['cosine across subjects'])}; contrast probe {f(r['contrast probe accuracy'])} "
        f"(chance {f(r['chance'])}{confused(r)}); contrast gap {f(r.get(GAP_COLUMN))} (0 same, 2 unrelated)"
        for r in rows
        if r["latent"] != INTENSITY_ROW
    ]
    lines += [
        f"  reference: the same probe on each scan's intensity histogram {f(r['contrast probe accuracy'])}{confused(r)}"
        for r in rows
        if r["latent"] == INTENSITY_ROW
    ]
    if swap:
        lines.append(
            f"  swap check: {swap_verdict(swap)} — the recombination is nearest to the anatomy in the other contrast "
            f"in {swap['a_nearest']:.0%} [{swap['a_nearest_low']:.0%}, {swap['a_nearest_high']:.0%}] of "
            f"{swap['trials']} trials ({swap['sessions']} sessions; passes above 50 %)"
        )
    return "\n".join(lines)


def score_text(rows: list[dict[str, Any]]) -> str:
    """The fine-tuning rows as the demo prints them: value, interval and the paired difference from scratch."""
    from neurofm.analyze.run import model_names

    lines = []
    names = model_names(rows)  # the tasks fine-tune different models: say which
    for i, r in enumerate(rows):
        if "skipped" in r:
            lines.append(f"  {r['task_label']}: skipped ({r['skipped']})")
            continue
        line = (
            f"  {r['task_label']:14s} {r['init']:20s} {r['metric']} {r['value']:.3f} "
            f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
        )
        if r.get("difference") is not None:
            line += f"   minus scratch {r['difference']:+.3f} [{r['difference_low']:+.3f}, {r['difference_high']:+.3f}]"
        if names and names[i]:
            line += f"   ({names[i]})"
        lines.append(line)
    return "\n".join(lines)
