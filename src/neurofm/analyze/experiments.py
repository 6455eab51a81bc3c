"""Fine-tuning experiments that answer "does pretraining help, and by how much?" (SPEC §5).

An *arm* is one way to get a model for a task: a source (a pretrained run, ``scratch``, a
frozen ``random`` encoder, or the ``constant`` predictor) and a fine-tuning mode. Every arm
of a study is run on the same splits: seed ``s`` draws the few-shot subjects (and the
initialisation) once for all arms, so arms are compared *paired*, case by case.

* :func:`paired_study` — arms x seeds on one task; each arm's headline metric (mean over seeds)
  and its difference from the reference arm (scratch), with hierarchical-bootstrap 95 %
  intervals (:func:`~neurofm.evaluate.metrics.paired_seeds`);
* :func:`compare_inits` — the same for several tasks;
* :func:`label_efficiency` — a study per number of labelled subjects;
* :func:`fomo_protocol` — FOMO25 in miniature: fine-tune on cases from some sites with the
  challenge's case counts (scaled to what the data has), test on the others.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neurofm.data.finetune import Case, build_cases
from neurofm.errors import ConfigError, NeurofmError, StoreError
from neurofm.evaluate.metrics import HEADLINE, paired_seeds, per_site
from neurofm.evaluate.scoring import constant_rows, read_predictions
from neurofm.store import Store
from neurofm.tasks.finetune import finetune
from neurofm.train.config import FinetuneConfig
from neurofm.utils import code_fingerprint, to_jsonable

#: FOMO25's fine-tuning case counts: infarct classification, meningioma segmentation, brain age
FOMO_TASKS = [("cls", "infarct", {1: 13, 0: 8}), ("seg", "lesion", 23), ("reg", "age", 200)]


@dataclass
class Arm:
    """One way to get a model: ``source`` (a pretrained run, ``scratch``, ``random`` or ``constant``), a mode,
    and any other fine-tuning settings of its own (e.g. ``{"backbone_lr_scale": 0.3}``)."""

    name: str
    source: str
    mode: str = "full"
    settings: dict[str, Any] = field(default_factory=dict)


def standard_arms(pretrained: str, task: str, modes: list[str] | None = None, floors: bool = True) -> list[Arm]:
    """Pretrained in each mode (linear is cls/reg only), scratch, and the two floors: a frozen random
    encoder and the constant predictor. The random encoder gets the pretrained arms' lightest head: a
    linear probe where they include one, else the trained head / decoder of ``frozen``."""
    modes = [m for m in (modes or ["linear", "frozen", "full"]) if not (task == "seg" and m == "linear")]
    arms = [Arm(f"pretrained {m}", pretrained, m) for m in modes] + [Arm("scratch", "scratch", "full")]
    return arms + (floor_arms(modes) if floors else [])


def floor_arms(modes: list[str]) -> list[Arm]:
    """The two floors: a frozen random encoder with the lightest head among ``modes`` (a linear probe
    where they include one, else the trained head / decoder of ``frozen``) and the constant predictor."""
    floor = "linear" if "linear" in modes else "frozen"
    return [Arm(f"random {floor}", "random", floor), Arm("constant", "constant", "")]


#: settings that do not change what a fine-tuning run computes (the loader draws the same samples with any
#: number of workers) or only how its intervals are summarised
NOT_RESULT = frozenset({"num_workers", "trainer", "bootstrap"})


def _finished_run(folder: Path) -> dict[str, Any]:
    """The ``run.json`` of a finished run (a cross-validated run keeps one per fold; fold 0's settings are all's)."""
    path = folder / "run.json" if (folder / "run.json").is_file() else folder / "fold-0" / "run.json"
    return json.loads(path.read_text())


def run_config(folder: Path) -> FinetuneConfig:
    """The settings the finished run in ``folder`` was made with, read from its ``run.json`` (the trainer's at
    their defaults): a run to pair with, or to vary one setting of."""
    done = _finished_run(folder)
    names = {f.name for f in dataclasses.fields(FinetuneConfig)} - {"trainer"}
    return FinetuneConfig(**{k: v for k, v in done.items() if k in names})


def stale_settings(folder: Path, cfg: FinetuneConfig, threads: int | None = None) -> list[str]:
    """The settings in which the finished run in ``folder`` differs from ``cfg`` (empty: it is this run).

    A setting the run's ``run.json`` does not record (written before the setting existed) counts as its
    default, which is what that run used. A run made by other neurofm code (or before runs recorded theirs,
    :func:`~neurofm.utils.code_fingerprint`) is stale too, as ``code``: the same settings need not give the
    same numbers under other code. So is one trained with another number of CPU threads (``threads``; set
    ``OMP_NUM_THREADS``): sums split over other threads round differently, and on a few labelled subjects
    that can change the result, not only its last digits (2 subjects, seed 4: Dice 0.085 on 1 thread,
    0.000 on 2); and one trained with another ``trainer.memory_format`` (the layout rounds otherwise).

    ``threads``: the CPU threads the run is wanted on (default: this process's, ``torch.get_num_threads()``)."""
    done = _finished_run(folder)
    stale = []
    for f in dataclasses.fields(cfg):
        if f.name in NOT_RESULT:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        want, got = to_jsonable(getattr(cfg, f.name)), done.get(f.name, to_jsonable(default))
        if f.name == "train_subjects" and want is not None:
            want = sorted(want)
        if want != got:
            stale.append(f.name)
    if done.get("code") != code_fingerprint():
        stale.append("code")
    if done.get("threads") != (threads or torch.get_num_threads()):
        stale.append("threads")
    # the memory layout moves the numbers at float rounding too (trainer.memory_format; the other trainer settings
    # do not change what a run computes)
    if (done.get("trainer") or {}).get("memory_format", "auto") != cfg.trainer.memory_format:
        stale.append("trainer.memory_format")
    return stale


def _threads_hint(folder: Path, threads: int | None = None) -> str:
    made = _finished_run(folder).get("threads")
    if made is None:
        return "; threads: its run.json does not record them"
    if threads:
        return f"; threads: made on {made} CPU threads, wanted on {threads}"
    now = torch.get_num_threads()
    return f"; threads: made on {made} CPU threads, this process has {now} (OMP_NUM_THREADS={made} reuses it)"


def _clear_stale(folder: Path, cfg: FinetuneConfig, redo_stale: bool, threads: int | None = None) -> bool:
    """Whether ``folder`` holds a finished run of ``cfg`` (on ``threads``); one made otherwise is refused, or with
    ``redo_stale`` removed."""
    if not (folder / "summary.json").is_file():
        return False
    stale = stale_settings(folder, cfg, threads)
    if stale and not redo_stale:
        raise ConfigError(
            f"{folder} holds a finished run with other settings ({', '.join(stale)}"
            f"{'; code: made by other neurofm code' if 'code' in stale else ''}"
            f"{_threads_hint(folder, threads) if 'threads' in stale else ''}): remove it, or choose another output "
            "folder"
        )
    if stale:
        shutil.rmtree(folder)
    return not stale


def arm_rows(
    data: str | Path,
    folder: Path,
    cfg: FinetuneConfig,
    progress: bool = False,
    redo_stale: bool = False,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """The held-out per-case rows of one arm and seed.

    A finished fine-tuning run in ``folder`` is reused (an interrupted study resumes) when its settings are
    ``cfg``'s; one made with other settings is refused, or with ``redo_stale`` removed and trained again.
    ``threads``: the CPU threads its run was made on by :func:`train_runs` (default: this process's, which
    trains a missing run here)."""
    if cfg.source == "constant":
        return constant_rows(Store(data), cfg)
    if not _clear_stale(folder, cfg, redo_stale, threads):
        with cpu_threads(threads):
            finetune(data, folder, cfg, progress=progress)
    return read_predictions(folder / "predictions.csv")


@contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """PyTorch's CPU threads and the BLAS and OpenMP pools' at ``n`` inside (None: as they are)."""
    if not n:
        yield
        return
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(n):
            yield
    finally:
        torch.set_num_threads(before)


def _run_cost(cfg: FinetuneConfig) -> float:
    """A rough relative cost of a fine-tuning run, to start the longest first: crops trained (a segmentation crop
    about 1.5 a classification or regression one's, with its decoder and whole-scan evaluation); closed-form
    probes none."""
    if cfg.mode == "linear" and cfg.linear_fit in ("closed", "zero-shot"):
        return 0.0
    return cfg.steps * cfg.batch_size * (1.5 if cfg.task == "seg" else 1.0)


def _start_worker(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)  # for anything started from the worker
    torch.set_num_threads(threads)
    from threadpoolctl import threadpool_limits

    threadpool_limits(threads)  # NumPy's BLAS too: kept for the worker's life


def _train_in_worker(data: str, folder: Path, cfg: FinetuneConfig) -> float:
    t = time.time()
    finetune(data, folder, cfg, progress=False)
    return time.time() - t


def train_runs(
    data: str | Path,
    runs: list[tuple[Path, FinetuneConfig]],
    jobs: int = 1,
    threads: int | None = None,
    redo_stale: bool = False,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> int:
    """Train the runs (folder, settings; :func:`study_runs`) that are not finished yet, ``jobs`` at a time, each on
    ``threads`` CPU threads (None: this process's); returns how many were trained.

    A finished run is kept when its settings, code and threads match (:func:`arm_rows`: with ``redo_stale`` one that
    does not is trained again, else refused). With ``jobs`` > 1 each run trains in a worker process of its own
    (spawned, so nothing of this process's threads or state is shared), the longest first; a run trained so gives
    the same numbers as one trained here on the same threads, since a run's result depends on its settings, code,
    threads and processor only. A run that fails does not stop the others: the failures are raised together at the
    end, each with its folder, and the runs that finished are kept (a rerun trains only the failed ones). ``log``
    gets a line per run trained."""
    if jobs > 1 and not threads:
        threads = max(1, torch.get_num_threads() // jobs)
    todo = [
        (Path(f), c) for f, c in runs if c.source != "constant" and not _clear_stale(Path(f), c, redo_stale, threads)
    ]
    todo.sort(key=lambda r: -_run_cost(r[1]))
    say = log or (lambda _: None)
    if jobs <= 1 or len(todo) <= 1:
        for i, (folder, cfg) in enumerate(todo):
            t = time.time()
            with cpu_threads(threads):
                finetune(data, folder, cfg, progress=progress)
            say(f"[{i + 1}/{len(todo)}] {folder.name} ({time.time() - t:.0f} s)")
        return len(todo)
    failed: list[str] = []
    pool = ProcessPoolExecutor(
        max_workers=min(jobs, len(todo)),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker,
        initargs=(threads,),
    )
    with pool:
        futures = {pool.submit(_train_in_worker, str(data), f, c): f for f, c in todo}
        for i, fut in enumerate(as_completed(futures)):
            folder = futures[fut]
            try:
                say(f"[{i + 1}/{len(todo)}] {folder.name} ({fut.result():.0f} s)")
            except Exception as e:  # noqa: BLE001 - every failure is reported with its run below
                why = f"{type(e).__name__}: {e}"
                if isinstance(e, BrokenProcessPool):  # not the run's own error: its process was killed
                    why = "its worker process ended abruptly (killed, for instance for memory; try fewer --jobs)"
                failed.append(f"{folder}: {why}")
                say(f"[{i + 1}/{len(todo)}] {folder.name} FAILED: {why}")
    if failed:
        raise NeurofmError(
            f"{len(failed)} of {len(todo)} fine-tuning runs failed (the others finished and are kept):\n  "
            + "\n  ".join(failed)
        )
    return len(todo)


def arm_seed_rows(
    data: str | Path,
    out: str | Path,
    base: FinetuneConfig,
    arm: Arm,
    seeds: int,
    label: str,
    progress: bool = False,
    redo_stale: bool = False,
    threads: int | None = None,
) -> list[list[dict[str, Any]]]:
    """One arm on seeds ``base.seed .. base.seed + seeds - 1``: each seed's per-case rows (:func:`arm_rows`).

    The arm's settings go over ``base``; each seed's run is ``out/<label>-<arm>-seed<S>``, named by the seed it runs
    (not its place in the study), so a study from another first seed never mistakes another seed's run for its own.
    """
    runs = []
    for seed in range(seeds):
        folder, cfg = seed_run(out, base, arm, seed, label)
        runs.append(arm_rows(data, folder, cfg, progress, redo_stale, threads))
    return runs


def seed_run(out: str | Path, base: FinetuneConfig, arm: Arm, seed: int, label: str) -> tuple[Path, FinetuneConfig]:
    """The folder and settings of ``arm``'s run on seed ``base.seed + seed`` (see :func:`arm_seed_rows`)."""
    cfg = replace(base, **{**arm.settings, "source": arm.source, "mode": arm.mode or "full"})
    cfg = replace(cfg, seed=base.seed + seed, bootstrap=50)
    return Path(out) / f"{label}-{arm.name.replace(' ', '-')}-seed{cfg.seed}", cfg


def study_runs(
    out: str | Path, base: FinetuneConfig, arms: list[Arm], seeds: int, label: str
) -> list[tuple[Path, FinetuneConfig]]:
    """The fine-tuning runs (folder, settings) of :func:`paired_study` with these arguments: every arm but the
    constant predictor, on every seed."""
    return [seed_run(out, base, arm, s, label) for arm in arms if arm.source != "constant" for s in range(seeds)]


def paired_study(
    data: str | Path,
    out: str | Path,
    base: FinetuneConfig,
    arms: list[Arm],
    seeds: int,
    label: str,
    reference: str = "scratch",
    x: Any = None,
    progress: bool = False,
    redo_stale: bool = False,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Every arm on seeds ``base.seed .. base.seed + seeds - 1``; one result row per arm (see module docstring).

    Scratch and pretrained arms share ``base.arch`` as their architecture; pass the pretrained run
    folder there to compare the same network with and without pretraining. Finished runs in ``out`` are
    reused when their settings match (:func:`arm_rows`; ``redo_stale`` retrains those that do not). ``threads``:
    the runs were trained beforehand on that many CPU threads each (:func:`study_runs`, :func:`train_runs`).
    """
    per_arm = {
        arm.name: arm_seed_rows(data, out, base, arm, seeds, label, progress, redo_stale, threads) for arm in arms
    }
    ref = per_arm.get(reference)
    rows = []
    for arm in arms:
        res = paired_seeds(base.task, per_arm[arm.name], ref if ref is not None and arm.name != reference else None)
        rows.append(
            {
                "task_label": label,
                "task": base.task,
                "target": base.target,
                "init": arm.name,
                "source": arm.source,
                "mode": arm.mode,
                "x": x,
                "reference": reference if "difference" in res else None,
                **res,
                # every seed's held-out cases by site: the domain-shift view (and, for cls, calibration per site)
                "per_site": per_site(base.task, [r for seed_rows in per_arm[arm.name] for r in seed_rows]),
            }
        )
    return rows


def compare_inits(
    data: str | Path,
    out: str | Path,
    tasks: list[tuple[str, str]],
    arms: list[Arm] | dict[str, str],
    base: FinetuneConfig,
    seeds: int = 1,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """The same tasks, subjects and budget for every arm (a ``{name: source}`` mapping means full fine-tuning)."""
    if isinstance(arms, dict):
        arms = [Arm(name, source, "full") for name, source in arms.items()]
    rows = []
    for task, target in tasks:
        task_arms = [a for a in arms if not (task == "seg" and a.mode == "linear")]
        cfg = replace(base, task=task, target=target)
        rows += paired_study(data, Path(out), cfg, task_arms, seeds, f"{task}-{target}", progress=progress)
    return rows


def label_efficiency(
    data: str | Path,
    out: str | Path,
    task: str,
    target: str,
    arms: list[Arm] | dict[str, str],
    base: FinetuneConfig,
    shots: list[int],
    seeds: int = 1,
    progress: bool = False,
) -> list[dict]:
    """Score against labelled subjects (nested subsets: a larger n keeps the smaller n's subjects)."""
    if isinstance(arms, dict):
        arms = [Arm(name, source, "full") for name, source in arms.items()]
    n_subj = len({c.subject for c in build_cases(Store(data), task, target, base.contrasts).cases})
    rows = []
    for n in shots:
        if n >= n_subj:
            continue
        cfg = replace(base, task=task, target=target, shots=n)
        rows += paired_study(data, Path(out), cfg, arms, seeds, f"{task}-{target}-n{n}", x=n, progress=progress)
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
    arms: list[Arm] | dict[str, str],
    base: FinetuneConfig,
    train_sites: list[str],
    test_sites: list[str] | None = None,
    scale: float = 1.0,
    seeds: int = 1,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """FOMO25 in miniature (see module docstring): train on ``train_sites``, test on the others.

    The training subjects are drawn once (as the challenge fixes its cases); the seeds vary the
    initialisation and training."""
    if isinstance(arms, dict):
        arms = [Arm(name, source, "full") for name, source in arms.items()]
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
            task_arms = [a for a in arms if not (task == "seg" and a.mode == "linear")]
            label = f"fomo-{task}-{target}"
            rows += paired_study(data, Path(out), cfg, task_arms, seeds, label, x=len(chosen), progress=progress)
        except (ConfigError, StoreError) as e:
            rows.append({"task_label": f"fomo-{task}-{target}", "skipped": str(e)})
    return rows


__all__ = [
    "HEADLINE",
    "Arm",
    "arm_seed_rows",
    "compare_inits",
    "fomo_protocol",
    "label_efficiency",
    "paired_study",
    "standard_arms",
]
