"""Fine-tuning experiments that answer "does pretraining help, and by how much?".

* :func:`compare_inits` — the same tasks, labelled subjects and budget from each
  initialisation (pretrained runs, and scratch), over several seeds;
* :func:`label_efficiency` — score against the number of labelled subjects;
* :func:`fomo_protocol` — FOMO25 in miniature: fine-tune on cases from some sites, test
  on the others, with the challenge's case counts (scaled down to what the data has).

Every point pools the held-out predictions of its seeds; the interval is a bootstrap over
those cases. Per-seed values are kept too.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from neurofm.data.finetune import Case, build_cases
from neurofm.errors import ConfigError, StoreError
from neurofm.evaluate.metrics import summarize
from neurofm.evaluate.scoring import read_predictions
from neurofm.store import Store
from neurofm.tasks.finetune import finetune
from neurofm.train.config import FinetuneConfig

#: the headline metric per task and whether higher is better
HEADLINE = {"seg": ("dice", True), "cls": ("auroc", True), "reg": ("mae", False)}
#: FOMO25's fine-tuning case counts: infarct classification, meningioma segmentation, brain age
FOMO_TASKS = [("cls", "infarct", {1: 13, 0: 8}), ("seg", "lesion", 23), ("reg", "age", 200)]


def headline(task: str, metrics: dict[str, dict[str, float]]) -> tuple[str, dict[str, float]]:
    name, _ = HEADLINE[task]
    m = metrics.get(name, {})
    if task == "cls" and (not m or m.get("value") != m.get("value")):  # AUROC undefined: one class in the test set
        name, m = "balanced_accuracy", metrics.get("balanced_accuracy", {})
    return name, m


def run_points(
    data: str | Path,
    out: Path,
    base: FinetuneConfig,
    inits: dict[str, str],
    seeds: int,
    label: str,
    x: Any = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Fine-tune ``base`` from every initialisation and seed; one pooled result row per initialisation."""
    rows = []
    for init, source in inits.items():
        cases: list[dict[str, Any]] = []
        per_seed = []
        for seed in range(seeds):
            cfg = replace(base, source=source, seed=base.seed + seed, bootstrap=50)
            folder = out / f"{label}-{init}-seed{seed}"
            done = folder / "summary.json"  # a finished point is reused, so an interrupted study resumes
            summary = json.loads(done.read_text()) if done.is_file() else finetune(data, folder, cfg, progress=progress)
            per_seed.append(headline(base.task, summary["metrics"])[1].get("value"))
            cases.extend(read_predictions(folder / "predictions.csv"))
        metrics = summarize(base.task, cases, reps=1000, seed=base.seed)
        name, m = headline(base.task, metrics)
        rows.append(
            {
                "task_label": label,
                "task": base.task,
                "target": base.target,
                "init": init,
                "x": x,
                "metric": name,
                "value": m.get("value"),
                "ci_low": m.get("ci_low"),
                "ci_high": m.get("ci_high"),
                "cases": len(cases),
                "seeds": seeds,
                "per_seed": per_seed,
                "all_metrics": {k: v["value"] for k, v in metrics.items()},
            }
        )
    return rows


def compare_inits(
    data: str | Path,
    out: str | Path,
    tasks: list[tuple[str, str]],
    inits: dict[str, str],
    base: FinetuneConfig,
    seeds: int = 1,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Same tasks, subjects and budget from each initialisation ("scratch" trains from random weights)."""
    rows = []
    for task, target in tasks:
        cfg = replace(base, task=task, target=target)
        rows += run_points(data, Path(out), cfg, inits, seeds, f"{task}-{target}", progress=progress)
    return rows


def label_efficiency(
    data: str | Path,
    out: str | Path,
    task: str,
    target: str,
    inits: dict[str, str],
    base: FinetuneConfig,
    shots: list[int],
    seeds: int = 1,
    progress: bool = False,
) -> list[dict]:
    """Score against labelled subjects (nested subsets: a larger n keeps the smaller n's subjects)."""
    n_subj = len({c.subject for c in build_cases(Store(data), task, target, base.contrasts).cases})
    rows = []
    for n in shots:
        if n >= n_subj:
            continue
        cfg = replace(base, task=task, target=target, shots=n)
        rows += run_points(data, Path(out), cfg, inits, seeds, f"{task}-{target}-n{n}", x=n, progress=progress)
    return rows


def select_counts(cases: list[Case], counts: dict[int, int] | int, seed: int) -> set[str]:
    """Subjects giving the wanted case counts per class (or in total), as far as the data allows."""
    rng = np.random.default_rng(seed)
    subjects = sorted({c.subject for c in cases})
    order = list(rng.permutation(subjects))
    first = {}
    for c in cases:
        first.setdefault(c.subject, c)
    if isinstance(counts, int):
        return set(order[:counts])
    chosen: set[str] = set()
    for cls, n in counts.items():
        members = [s for s in order if int(first[s].target) == cls]
        chosen |= set(members[:n])
    return chosen


def fomo_protocol(
    data: str | Path,
    out: str | Path,
    inits: dict[str, str],
    base: FinetuneConfig,
    train_sites: list[str],
    test_sites: list[str] | None = None,
    scale: float = 1.0,
    seeds: int = 1,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """FOMO25 in miniature (see module docstring): train on ``train_sites``, test on the others."""
    store = Store(data)
    rows = []
    for task, target, counts in FOMO_TASKS:
        try:  # a target or site the data lacks (e.g. no infarcts) is skipped, with the reason
            cs = build_cases(store, task, target, base.contrasts, positive_only=task == "seg")
            pool = [c for c in cs.cases if c.site in train_sites]
            if not pool:
                raise ConfigError(f"no {target} case at the training sites {train_sites}")
            wanted = (
                {k: max(1, round(v * scale)) for k, v in counts.items()}
                if isinstance(counts, dict)
                else max(2, round(counts * scale))
            )
            chosen = select_counts(pool, wanted, base.seed)
            cfg = replace(
                base,
                task=task,
                target=target,
                train_sites=train_sites,
                test_sites=test_sites,
                train_subjects=sorted(chosen),
                shots=None,
                positive_only=task == "seg",
            )
            rows += run_points(
                data, Path(out), cfg, inits, seeds, f"fomo-{task}-{target}", x=len(chosen), progress=progress
            )
        except (ConfigError, StoreError) as e:
            rows.append({"task_label": f"fomo-{task}-{target}", "skipped": str(e)})
    return rows
