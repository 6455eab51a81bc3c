"""``neurofm analyze``: the paper's analyses of a pretrained run, as figures, tables and JSON.

Always: the latent analysis (anatomy-latent similarity within vs across subjects; linear
probes of the contrast from each latent) and, for a backbone with separate anatomy and
contrast latents, the swap check. On request, and more expensive because they fine-tune:
the ablation against other pretrained runs (e.g. plain mae), the label-efficiency curve, and
the FOMO25 protocol in miniature (train on some sites, test on others). Every fine-tuning
table is paired over seeds with a scratch reference and two floors (a frozen random encoder
and the constant predictor); see :mod:`neurofm.analyze.experiments`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from neurofm.analyze import experiments, figures
from neurofm.analyze.embed import embed_store
from neurofm.analyze.eraser import unseen_text
from neurofm.analyze.latent import (
    RAW_ROW,
    code_usage,
    intensity_histograms,
    latent_analysis,
    place_check,
    places_text,
    summary_table,
    swap_check,
)
from neurofm.evaluate.report import Section, write_report
from neurofm.models.registry import model_from_checkpoint
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
    seeds: int = 5
    modes: list[str] = field(default_factory=lambda: ["linear", "frozen", "full"])  # the pretrained arms
    floors: bool = True  # a frozen random encoder and the constant predictor on every table
    finetune: dict[str, Any] = field(default_factory=dict)  # FinetuneConfig settings (steps, patch, contrasts, ...)


def drop_values(d: Any) -> Any:
    """The analysis without its per-pair value lists (kept for figures, too long for JSON summaries)."""
    if isinstance(d, dict):
        return {k: drop_values(v) for k, v in d.items() if not k.endswith("_values")}
    return d


def _interval(lo: float | None, hi: float | None) -> str:
    return f"[{lo:.3g}, {hi:.3g}]" if lo is not None and lo == lo and hi == hi else "–"


def model_names(rows: list[dict[str, Any]]) -> list[str] | None:
    """Per row, the folder name of the pretrained model it fine-tuned ("" for scratch and the floors), when the
    tasks fine-tune different models (the demo's rows); None when one model (or none) serves them all."""
    if len({r.get("model") for r in rows}) <= 1:
        return None
    return [Path(r["model"]).name if r.get("init", "").startswith("pretrained") else "" for r in rows]


def score_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Report rows: each arm's headline metric (mean over seeds) and its paired difference from scratch."""
    out = []
    names = model_names(rows)
    counts = any(r.get("x") is not None for r in rows)  # label-efficiency rows: the labelled subjects of each
    for i, r in enumerate(rows):
        if "skipped" in r:
            out.append({"task": r["task_label"], "init": "–", "metric": "skipped", "value": r["skipped"]})
            continue
        out.append(
            {
                "task": r["task_label"],
                "init": r["init"],
                **({"model": names[i]} if names else {}),
                **({"labelled subjects": r.get("x")} if counts else {}),
                "metric": r["metric"],
                "value": r["value"],
                "95% CI": _interval(r["ci_low"], r["ci_high"]),
                "minus scratch": r.get("difference"),
                "difference 95% CI": _interval(r.get("difference_low"), r.get("difference_high")),
                "seeds": r["seeds"],
                "test cases": r["cases"],
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


def domain_shift_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per task, arm and test site: the headline metric of that site's held-out cases over every seed
    (and for classification the site's ECE): how a model fine-tuned on some sites holds up on each other one."""
    out = []
    for r in rows:
        for site in r.get("per_site", []):
            out.append({"task": r["task_label"], "init": r["init"], **site})
    return out


def usage_of(lat: dict[str, Any]) -> dict[str, Any]:
    """The code usage of a categorical anatomy code in a latent analysis: read from the soft code's most likely
    class, or from a hard (one-hot) code's own class shares; empty for any other code."""
    return lat.get("anatomy_mode", {}).get("code_usage") or lat.get("anatomy", {}).get("code_usage") or {}


def usage_text(usage: dict[str, Any]) -> str:
    """A sentence on how many of its classes a categorical anatomy code uses (:func:`latent.code_usage`)."""
    if not usage:
        return ""
    top = ", ".join(f"{v:.0%}" for v in usage["largest_shares"][:3])
    return (
        f" The code's most likely class uses {usage['classes_used']} of its {usage['classes']} classes "
        f"(≥ {usage['floor']:.0%} of positions; perplexity {usage['perplexity']:.1f}); the largest hold {top}."
    )


def eraser_text(info: dict[str, Any] | None, lat: dict[str, Any]) -> str:
    """A sentence on the model's eraser (:mod:`neurofm.analyze.eraser`; ``info``: what it was fitted on, as
    :func:`embed_store` records it), where it has one; the analysis report and the demo's say it."""
    if not info or "anatomy_raw" not in lat:
        return ""
    where = f" of {info['store']}" if info.get("store") else ""
    return (
        f" The model carries an eraser of the contrast from the anatomy vector (LEACE, fitted on {info.get('scans')} "
        f"scans{where}): the anatomy rows read the vector after it, and the row '{RAW_ROW}' the vector as the "
        "network gives it." + (f" Warning: {unseen_text(info['unseen'])}." if info.get("unseen") else "")
    )


def analyze(
    run: str | Path, data: str | Path, out: str | Path, cfg: AnalyzeConfig | None = None, progress: bool = True
) -> dict[str, Any]:
    """Run the analyses (see module docstring); returns the JSON summary, writes ``out/report.html``."""
    from neurofm.io.checkpoint import resolve_checkpoint

    cfg = cfg or AnalyzeConfig()
    console = Console(stderr=True, soft_wrap=True)
    resolve_checkpoint(run)  # a missing run or store is said before anything is written
    store = Store(data)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    result: dict[str, Any] = {"run": str(run), "data": str(data)}
    sections: list[Section] = []

    console.rule("latent analysis")
    keys = spread_sessions(store, cfg.max_sessions)
    df = embed_store(run, data, keys=keys, progress=progress)
    lat = latent_analysis(df, reference=intensity_histograms(store, keys))
    model, info = model_from_checkpoint(run)
    if getattr(model, "hard_anatomy", False) and "anatomy" in lat:  # a one-hot code's latent is its class shares
        # read before any eraser: the erased vector is no longer the class shares
        shares = "subject_latent_raw" if "subject_latent_raw" in df else "subject_latent"
        lat["anatomy"]["code_usage"] = code_usage(df, shares)
    result["latent"] = drop_values(lat)
    if df.attrs.get("eraser"):  # what the anatomy rows read through (neurofm.analyze.eraser)
        result["eraser"] = df.attrs["eraser"]
    png = figures.latent_figure(lat, out / "latent.png")
    sections.append(
        Section(
            "Latent analysis",
            text=(
                f"{lat.get('scans', 0)} scans of {lat.get('subjects', 0)} subjects. Cosine similarity of centred "
                "anatomy latents between scans of the same subject in other contrasts vs between subjects, and a "
                "linear probe (logistic regression, cross-validated by subject) predicting the contrast from each "
                "latent, with its most confused pair of contrasts. A categorical anatomy code is read twice: by its "
                "class probabilities (the anatomy row) and by the share of positions whose most likely class is each "
                "class (its mode), which leaves out how sure the code is. The same probe on each scan's intensity "
                "histogram is the reference: contrasts it cannot tell apart differ in few voxels."
                + usage_text(usage_of(lat))
                + eraser_text(result.get("eraser"), lat)
            ),
            images=[png.name] if png else [],
            tables=[summary_table(lat)],
        )
    )

    patch = int(info["run"].get("data", {}).get("patch", 64))
    places = place_check(model.eval(), store, keys, patch)
    if places:
        result["places"] = places
        sections[-1].text += places_text(places)
    if model.disentangles:
        console.rule("swap check")
        swap = swap_check(model.eval(), store, keys, patch)
        result["swap"] = swap
        sections.append(
            Section(
                "Swap check",
                text=(
                    "The anatomy of scan b decoded with the contrast code of scan a taken from another crop (far away "
                    "and flipped front to back). Disentangled latents give b's anatomy in a's contrast: nearest to "
                    "x_a, not to x_b (b's own intensities) or to the crop the code came from. 'copy' uses the contrast "
                    "code of x_a's own crop, which a contrast latent that copies its input would also pass. Each "
                    "session gives four trials (pairs of contrasts and places drawn at random); the share of trials "
                    "nearest to x_a has a 95 % interval from resampling subjects, and the check is 'at the line' "
                    "when that interval contains one half."
                ),
                tables=[[{k: v for k, v in swap.items()}]],
            )
        )

    base = FinetuneConfig(task="seg", target="lesion", source="scratch", arch=str(run), **cfg.finetune)
    if cfg.compare:
        console.rule("ablation")
        floors = experiments.floor_arms(["frozen"]) if cfg.floors else []
        ab = [
            experiments.Arm("recipe", str(run)),
            *(experiments.Arm(name, path) for name, path in cfg.compare.items()),
            experiments.Arm("scratch", "scratch"),
            *floors,
        ]
        rows = experiments.compare_inits(data, out / "ablation", cfg.tasks, ab, base, cfg.seeds, progress=False)
        result["ablation"] = rows
        png = figures.scores_figure(rows, out / "ablation.png", "recipe vs ablation vs scratch, same budget")
        sections.append(Section("Ablation", images=[png.name] if png else [], tables=[score_table(rows)]))
    if cfg.label_efficiency:
        console.rule("label efficiency")
        task, target = cfg.label_efficiency
        rows = experiments.label_efficiency(
            data,
            out / "label-efficiency",
            task,
            target,
            experiments.standard_arms(str(run), task, cfg.modes, cfg.floors),
            base,
            cfg.shots,
            cfg.seeds,
        )
        result["label_efficiency"] = rows
        png = figures.curve_figure(rows, out / "label_efficiency.png", title=f"{task} {target}: pretrained vs scratch")
        sections.append(Section("Label efficiency", images=[png.name] if png else [], tables=[score_table(rows)]))
    if cfg.fomo:
        console.rule("FOMO25 protocol in miniature")
        sites = sorted({str(r.get("labels", {}).get("site", "")) for r in store.records.values()})
        train = cfg.train_sites or sites[:1]
        fomo_arms = experiments.standard_arms(str(run), "cls", cfg.modes, cfg.floors)
        rows = experiments.fomo_protocol(
            data, out / "fomo", fomo_arms, base, train, cfg.test_sites, cfg.fomo_scale, cfg.seeds
        )
        result["fomo"] = rows
        ok = [r for r in rows if "skipped" not in r]
        shift = domain_shift_table(ok)
        result["domain_shift"] = shift
        png = figures.scores_figure(ok, out / "fomo.png", f"fine-tuned on {', '.join(train)}, tested on other sites")
        sections.append(
            Section(
                "FOMO25 protocol in miniature",
                images=[png.name] if png else [],
                tables=[score_table(rows), shift] if shift else [score_table(rows)],
                note=(
                    "Case counts follow FOMO25 (infarct 13 positive / 8 negative, 23 lesion segmentations, 200 ages), "
                    f"scaled by {cfg.fomo_scale} and limited to what the training sites hold. The training subjects "
                    "are fixed; the seeds vary the initialisation and training."
                ),
            )
        )
    result["seconds"] = time.time() - t0
    write_json(out / "analysis.json", to_jsonable(result))
    write_report(out / "report.html", f"neurofm analyze: {Path(run).name}", sections)
    console.print(f"report: {out / 'report.html'}")
    return result
