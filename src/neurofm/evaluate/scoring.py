"""Scoring fine-tuned models: one row per held-out case, the per-case CSV, ``neurofm evaluate``.

:func:`score_cases` is what fine-tuning and evaluation both call: it predicts whole store
volumes and returns one row per case (seg: Dice / NSD / HD95 and volumes; cls: the class
probabilities; reg: the prediction), which :func:`~neurofm.evaluate.metrics.summarize`
turns into metrics with intervals.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from neurofm.data.finetune import Case, CaseSet, build_cases
from neurofm.errors import CheckpointError
from neurofm.evaluate.metrics import per_site, reliability_figure, segmentation_case, selective, summarize
from neurofm.infer.predictor import Predictor
from neurofm.store import Store
from neurofm.utils import atomic_write_text, read_json, write_json


def score_cases(predictor: Any, store: Store, cs: CaseSet, cases: list[Case], fold: int = 0) -> list[dict[str, Any]]:
    """Predict held-out cases on whole store volumes and score each (seg) or keep its prediction."""
    rows = []
    lut = None
    if cs.task == "seg":
        lut = np.zeros(max(cs.classes) + 1, np.int64)
        lut[cs.classes] = np.arange(len(cs.classes))
    for c in cases:
        images = {k: np.asarray(store.read(c.key, k), np.float32) for k in c.contrasts}
        res = predictor.predict(images)
        row: dict[str, Any] = {
            "fold": fold,
            "key": c.key,
            "subject": c.subject,
            "session": c.session,
            "site": c.site,
            "contrasts": ",".join(c.contrasts),
        }
        if cs.task == "seg":
            truth = lut[np.asarray(store.read(c.key, c.target), np.int64)]
            spacing = store.record(c.key)["spacing"]
            row.update(segmentation_case(res.labels, truth, spacing, classes=len(cs.classes)))
            vox = float(np.prod(spacing))
            row.update(
                volume_true_mm3=float((truth > 0).sum()) * vox, volume_pred_mm3=float((res.labels > 0).sum()) * vox
            )
        elif cs.task == "cls":
            row.update(target=int(c.target), prediction=int(np.argmax(res.probs)), prob=[float(p) for p in res.probs])
        else:
            row.update(target=float(c.target), prediction=float(res.value))
        row.update({f"uncertainty_{k}": v for k, v in (res.uncertainty or {}).items()})
        rows.append(row)
    return rows


def write_predictions(path: Path, rows: list[dict[str, Any]]) -> None:
    df = pd.DataFrame(rows)
    if "prob" in df.columns:
        df["prob"] = [json.dumps(p) for p in df["prob"]]
    atomic_write_text(path, df.to_csv(index=False))


def read_predictions(path: Path) -> list[dict[str, Any]]:
    df = pd.read_csv(path)
    rows = df.to_dict("records")
    for r in rows:
        if isinstance(r.get("prob"), str):
            r["prob"] = json.loads(r["prob"])
    return rows


def fold_dirs(run: Path) -> list[Path]:
    folds = sorted(p for p in run.glob("fold-*") if (p / "run.json").is_file())
    if folds:
        return folds
    if (run / "run.json").is_file():
        return [run]
    raise CheckpointError(f"{run}: not a fine-tuned run (no run.json)")


def evaluate_run(
    run: str | Path,
    data: str | Path,
    out: str | Path | None = None,
    split: str = "auto",
    tta: bool = True,
    overlap: float = 0.5,
    lcc: bool = False,
    bootstrap: int = 1000,
    device: str = "cpu",
) -> dict[str, Any]:
    """Predict and score. ``split``: ``test`` (the run's held-out subjects; needs the run's store),
    ``all`` (every case of ``data`` with the target), or ``auto`` (test on the run's own store, else all).

    Writes ``predictions.csv`` and ``summary.json`` to ``out`` (default ``RUN/eval-<store name>``).
    """
    run = Path(run)
    store = Store(data)
    rows = []
    info: dict[str, Any] = {}
    for f, fold in enumerate(fold_dirs(run)):
        cfg = read_json(fold / "run.json")
        info = cfg["task_info"]
        cs = build_cases(
            store,
            info["task"],
            info["target"],
            info["contrasts"],
            positive_only=cfg.get("positive_only", False),
        )
        same = Path(cfg["extra"]["store"]).resolve() == Path(data).resolve()
        use_test = split == "test" or (split == "auto" and same)
        held_out = held_out_subjects(cfg)
        cases = [c for c in cs.cases if c.subject in held_out] if use_test else cs.cases
        if cs.task == "cls" and [str(c) for c in cs.classes] != [str(c) for c in info["classes"]]:
            raise CheckpointError(f"the store's classes {cs.classes} differ from the run's {info['classes']}")
        predictor = Predictor.from_run(fold, device=device, tta=tta, overlap=overlap, lcc=lcc)
        rows.extend(score_cases(predictor, store, cs, cases, f))
        if not use_test:
            break  # every fold's model would score the same cases: the first one speaks for the run
    summary = {
        "run": str(run),
        "data": str(Path(data).resolve()),
        "task": info.get("task"),
        "target": info.get("target"),
        "cases": len(rows),
        "metrics": summarize(info["task"], rows, reps=bootstrap),
        "selective": selective(info["task"], rows),
        "per_site": per_site(info["task"], rows),
    }
    out = Path(out) if out else run / f"eval-{Path(data).resolve().name}"
    out.mkdir(parents=True, exist_ok=True)
    write_predictions(out / "predictions.csv", rows)
    write_json(out / "summary.json", summary)
    reliability_figure(rows, out / "reliability.png")
    return summary


def held_out_subjects(run_cfg: dict[str, Any]) -> set[str]:
    """The test subjects a fine-tuning fold drew, from its ``run.json`` (under ``split``; runs written
    before 2026-12-03 kept them at the top level)."""
    return set((run_cfg.get("split") or run_cfg)["test_subjects"])


def config_splits(cs: Any, cfg: Any) -> list:
    """The (train, test) splits a :class:`~neurofm.train.config.FinetuneConfig` asks of a case set."""
    from neurofm.data.finetune import make_splits

    return make_splits(
        cs,
        seed=cfg.seed,
        shots=cfg.shots,
        folds=cfg.folds,
        train_sites=cfg.train_sites,
        test_sites=cfg.test_sites,
        train_subjects=cfg.train_subjects,
        test_fraction=cfg.test_fraction,
    )


def constant_rows(store: Store, cfg: Any) -> list[dict[str, Any]]:
    """The constant predictor's rows on the held-out cases of a fine-tuning config's splits: the
    training mean (reg), the training class frequencies (cls), background everywhere (seg).

    ``cfg`` is a :class:`~neurofm.train.config.FinetuneConfig`; the splits are the ones
    :func:`~neurofm.tasks.finetune.finetune` draws for it, so the rows pair with its predictions.
    """
    cs = build_cases(store, cfg.task, cfg.target, cfg.contrasts, positive_only=cfg.positive_only)
    splits = config_splits(cs, cfg)
    rows = []
    for f, (train, test) in enumerate(splits):
        if cs.task == "reg":
            mean = float(np.mean([c.target for c in train]))
        if cs.task == "cls":
            freq = np.bincount([c.target for c in train], minlength=cs.n_out).astype(float)
            freq /= freq.sum()
        for c in test:
            row: dict[str, Any] = {"fold": f, "key": c.key, "subject": c.subject, "session": c.session, "site": c.site}
            if cs.task == "seg":  # background everywhere: perfect only where the truth is empty too
                values = store.record(c.key).get("label_maps", {}).get(c.target, {}).get("values", [])
                empty = not any(v > 0 for v in values)
                row.update(dice=float(empty), nsd=float(empty), hd95=0.0 if empty else float("nan"))
            elif cs.task == "cls":
                row.update(target=int(c.target), prediction=int(np.argmax(freq)), prob=[float(p) for p in freq])
            else:
                row.update(target=float(c.target), prediction=mean)
            rows.append(row)
    return rows
