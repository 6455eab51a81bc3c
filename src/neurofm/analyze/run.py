"""``neurofm analyze``: the paper's analyses of a pretrained run, as figures, tables and JSON.

Always: the latent analysis (anatomy-latent similarity within vs across subjects; linear
probes of the contrast from each latent). On request, and more expensive because they
fine-tune: the ablation against other pretrained runs (e.g. plain mae), the label-efficiency
curve, and the FOMO25 protocol in miniature (train on some sites, test on others).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from neurofm.analyze import experiments, figures
from neurofm.analyze.embed import embed_store
from neurofm.analyze.latent import latent_analysis, summary_table
from neurofm.evaluate.report import Section, write_report
from neurofm.store import Store
from neurofm.train.config import FinetuneConfig
from neurofm.utils import to_jsonable, write_json


@dataclass
class AnalyzeConfig:
    """What ``neurofm analyze`` runs (see its ``--help``)."""

    max_sessions: int = 60  # sessions embedded for the latent analysis
    compare: dict[str, str] = field(default_factory=dict)  # ablation: name -> other pretrained run
    tasks: list[tuple[str, str]] = field(default_factory=lambda: [("seg", "lesion")])  # for the ablation
    label_efficiency: tuple[str, str] | None = None
    shots: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 20])
    fomo: bool = False
    train_sites: list[str] | None = None
    test_sites: list[str] | None = None
    fomo_scale: float = 1.0
    seeds: int = 1
    finetune: dict[str, Any] = field(default_factory=dict)  # FinetuneConfig settings (steps, patch, contrasts, ...)


def drop_values(d: Any) -> Any:
    """The analysis without its per-pair value lists (kept for figures, too long for JSON summaries)."""
    if isinstance(d, dict):
        return {k: drop_values(v) for k, v in d.items() if not k.endswith("_values")}
    return d


def score_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        if "skipped" in r:
            out.append({"task": r["task_label"], "init": "–", "metric": "skipped", "value": r["skipped"]})
            continue
        out.append(
            {
                "task": r["task_label"],
                "init": r["init"],
                "labelled subjects": r.get("x"),
                "metric": r["metric"],
                "value": r["value"],
                "95% CI": f"[{r['ci_low']:.3g}, {r['ci_high']:.3g}]" if r["ci_low"] == r["ci_low"] else "–",
                "test cases": r["cases"],
                "seeds": r["seeds"],
            }
        )
    return out


def spread_sessions(store: Store, limit: int) -> list[str]:
    """Up to ``limit`` session keys taken round-robin over subjects (first sessions of every subject, then
    second sessions, ...), so a small budget still spans many subjects, which the latent analysis needs."""
    by_subject: dict[str, list[str]] = {}
    for key in store.keys:
        by_subject.setdefault(str(store.record(key).get("subject", key)), []).append(key)
    rounds = max((len(v) for v in by_subject.values()), default=0)
    order = [keys[i] for i in range(rounds) for keys in by_subject.values() if i < len(keys)]
    return order[:limit]


def analyze(
    run: str | Path, data: str | Path, out: str | Path, cfg: AnalyzeConfig | None = None, progress: bool = True
) -> dict[str, Any]:
    """Run the analyses (see module docstring); returns the JSON summary, writes ``out/report.html``."""
    cfg = cfg or AnalyzeConfig()
    console = Console(stderr=True, soft_wrap=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    store = Store(data)
    result: dict[str, Any] = {"run": str(run), "data": str(data)}
    sections: list[Section] = []

    console.rule("latent analysis")
    keys = spread_sessions(store, cfg.max_sessions)
    df = embed_store(run, data, keys=keys, progress=progress)
    lat = latent_analysis(df)
    result["latent"] = drop_values(lat)
    png = figures.latent_figure(lat, out / "latent.png")
    sections.append(
        Section(
            "Latent analysis",
            text=(
                f"{lat.get('scans', 0)} scans of {lat.get('subjects', 0)} subjects. Cosine similarity of centred "
                "anatomy latents between scans of the same subject in other contrasts vs between subjects, and a "
                "linear probe (logistic regression, cross-validated by subject) predicting the contrast from each "
                "latent."
            ),
            images=[png.name] if png else [],
            tables=[summary_table(lat)],
        )
    )

    base = FinetuneConfig(task="seg", target="lesion", source="scratch", **cfg.finetune)
    inits = {"pretrained": str(run), "scratch": "scratch"}
    if cfg.compare:
        console.rule("ablation")
        ab_inits = {"recipe": str(run), **cfg.compare, "scratch": "scratch"}
        rows = experiments.compare_inits(data, out / "ablation", cfg.tasks, ab_inits, base, cfg.seeds, progress=False)
        result["ablation"] = rows
        png = figures.scores_figure(rows, out / "ablation.png", "recipe vs ablation vs scratch, same budget")
        sections.append(Section("Ablation", images=[png.name] if png else [], tables=[score_table(rows)]))
    if cfg.label_efficiency:
        console.rule("label efficiency")
        task, target = cfg.label_efficiency
        rows = experiments.label_efficiency(
            data, out / "label-efficiency", task, target, inits, base, cfg.shots, cfg.seeds
        )
        result["label_efficiency"] = rows
        png = figures.curve_figure(rows, out / "label_efficiency.png", title=f"{task} {target}: pretrained vs scratch")
        sections.append(Section("Label efficiency", images=[png.name] if png else [], tables=[score_table(rows)]))
    if cfg.fomo:
        console.rule("FOMO25 protocol in miniature")
        sites = sorted({str(r.get("labels", {}).get("site", "")) for r in store.records.values()})
        train = cfg.train_sites or sites[:1]
        rows = experiments.fomo_protocol(
            data, out / "fomo", inits, base, train, cfg.test_sites, cfg.fomo_scale, cfg.seeds
        )
        result["fomo"] = rows
        ok = [r for r in rows if "skipped" not in r]
        png = figures.scores_figure(ok, out / "fomo.png", f"fine-tuned on {', '.join(train)}, tested on other sites")
        sections.append(
            Section(
                "FOMO25 protocol in miniature",
                images=[png.name] if png else [],
                tables=[score_table(rows)],
                note=(
                    "Case counts follow FOMO25 (infarct 13 positive / 8 negative, 23 lesion segmentations, 200 ages), "
                    f"scaled by {cfg.fomo_scale} and limited to what the training sites hold."
                ),
            )
        )
    result["seconds"] = time.time() - t0
    write_json(out / "analysis.json", to_jsonable(result))
    write_report(out / "report.html", f"neurofm analyze: {Path(run).name}", sections)
    console.print(f"report: {out / 'report.html'}")
    return result
