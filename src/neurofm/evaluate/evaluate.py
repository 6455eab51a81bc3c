"""``neurofm evaluate``: score a fine-tuned run on a store (its held-out subjects, or all cases)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from neurofm.data.finetune import build_cases
from neurofm.errors import CheckpointError
from neurofm.store import Store
from neurofm.utils import read_json, write_json


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
    from neurofm.evaluate.metrics import summarize
    from neurofm.infer.predictor import Predictor
    from neurofm.tasks.finetune import case_rows, write_predictions

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
            positive_only=cfg.get("finetune", {}).get("positive_only", False),
        )
        same = Path(cfg["extra"]["store"]).resolve() == Path(data).resolve()
        use_test = split == "test" or (split == "auto" and same)
        cases = [c for c in cs.cases if c.subject in set(cfg["test_subjects"])] if use_test else cs.cases
        if cs.task == "cls" and [str(c) for c in cs.classes] != [str(c) for c in info["classes"]]:
            raise CheckpointError(f"the store's classes {cs.classes} differ from the run's {info['classes']}")
        predictor = Predictor.from_run(fold, device=device, tta=tta, overlap=overlap, lcc=lcc)
        rows.extend(case_rows(predictor, store, cs, cases, f))
        if not use_test:
            break  # every fold's model would score the same cases: the first one speaks for the run
    summary = {
        "run": str(run),
        "data": str(Path(data).resolve()),
        "task": info.get("task"),
        "target": info.get("target"),
        "cases": len(rows),
        "metrics": summarize(info["task"], rows, reps=bootstrap),
    }
    out = Path(out) if out else run / f"eval-{Path(data).resolve().name}"
    out.mkdir(parents=True, exist_ok=True)
    write_predictions(out / "predictions.csv", rows)
    write_json(out / "summary.json", summary)
    return summary
