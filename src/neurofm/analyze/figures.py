"""Figures of the analyses: training curves, latent similarity and probes, scores, label-efficiency curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from neurofm.plots import pyplot, save_figure


def read_metrics(run: str | Path) -> Any:
    """All logged metrics of a run (resumed runs add versions), one row per step."""
    import pandas as pd

    files = sorted(Path(run).glob("logs/csv/version_*/metrics.csv"))
    if not files:
        return pd.DataFrame()
    df = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
    return df.groupby("step", as_index=False).last().sort_values("step")


#: logged beside the loss terms but not terms: the KL weight's ramp, the refitted critic's accuracy on its buffer
NOT_TERMS = ("kl_weight", "critic_accuracy")


def training_curves(run: str | Path, png: str | Path, title: str = "") -> Path | None:
    """Total loss and each term against the step."""
    df = read_metrics(run)
    if df.empty or "loss" not in df.columns:
        return None
    plt = pyplot()
    terms = [c for c in df.columns if c.startswith("loss/") and not c.endswith(NOT_TERMS)]
    fig, axes = plt.subplots(1, 2 if terms else 1, figsize=(10 if terms else 5, 3.4), squeeze=False)
    d = df.dropna(subset=["loss"])
    axes[0][0].plot(d["step"], d["loss"], lw=1)
    axes[0][0].set(xlabel="step", ylabel="loss", title=title or "total loss")
    if terms:
        ax = axes[0][1]
        for t in terms:
            dd = df.dropna(subset=[t])
            ax.plot(dd["step"], dd[t], lw=1, label=t.split("/", 1)[1])
        ax.set(xlabel="step", ylabel="term", title="loss terms", yscale="log")
        ax.legend(fontsize=7)
    return save_figure(fig, png)


def latent_figure(result: dict, png: str | Path) -> Path | None:
    """Within- vs across-subject cosine of the anatomy latent, and the contrast probes."""
    anat = result.get("anatomy", {}).get("similarity")
    if not anat:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    ax = axes[0]
    bins = np.linspace(-1, 1, 41)
    ax.hist(
        anat["across_values"], bins=bins, density=True, alpha=0.6, label=f"different subjects ({anat['across']:.2f})"
    )
    ax.hist(
        anat["within_values"],
        bins=bins,
        density=True,
        alpha=0.6,
        label=f"same subject, other contrast ({anat['within']:.2f})",
    )
    ax.set(xlabel="cosine similarity of anatomy latents", ylabel="density", title="anatomy is shared across contrasts")
    ax.legend(fontsize=7)
    ax = axes[1]
    names, acc, chance = [], [], []
    colors = []
    labels = {
        "intensity": "intensity histogram\n(reference)",
        "anatomy_mode": "anatomy latent,\nmost likely class",
        "anatomy_raw": "anatomy latent,\nbefore the eraser",
    }
    bars = (
        ("anatomy", "tab:blue"),
        ("anatomy_raw", "cornflowerblue"),
        ("anatomy_mode", "lightsteelblue"),
        ("contrast", "tab:orange"),
        ("intensity", "tab:gray"),
    )
    if result.get("anatomy_raw"):  # the checkpoint has an eraser: the anatomy bar reads the vector after it
        labels["anatomy"] = "anatomy latent,\nafter the eraser"
    for latent, color in bars:
        p = result.get(latent, {}).get("contrast_probe")
        if p:
            names.append(labels.get(latent, f"{latent} latent"))
            acc.append(p["accuracy"])
            chance.append(p["chance"])
            colors.append(color)
    ax.bar(names, acc, color=colors)
    for k, c in enumerate(chance):
        ax.hlines(c, k - 0.4, k + 0.4, colors="k", linestyles="--", label="chance" if k == 0 else None)
    ax.set(ylim=(0, 1.05), ylabel="accuracy", title="which contrast? linear probe (grouped CV)")
    ax.tick_params(axis="x", labelsize=7 if len(names) > 3 else 9)
    ax.legend(fontsize=7)
    return save_figure(fig, png)


def scores_figure(rows: list[dict], png: str | Path, title: str = "pretrained vs scratch") -> Path | None:
    """One panel per task: the headline metric with its 95 % interval, per initialisation."""
    if not rows:
        return None
    plt = pyplot()
    tasks = list(dict.fromkeys(r["task_label"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.3 * len(tasks), 3.2), squeeze=False)
    for ax, t in zip(axes[0], tasks, strict=True):
        sub = [r for r in rows if r["task_label"] == t]
        x = np.arange(len(sub))
        vals = [r["value"] for r in sub]
        err = [[max(r["value"] - r["ci_low"], 0) for r in sub], [max(r["ci_high"] - r["value"], 0) for r in sub]]
        colours = {
            "scratch": "tab:gray",
            "random frozen": "lightgray",
            "random linear": "lightgray",
            "constant": "whitesmoke",
        }
        ax.bar(x, vals, yerr=err, capsize=4, edgecolor="k", color=[colours.get(r["init"], "tab:green") for r in sub])
        ax.set_xticks(x, [r["init"] for r in sub], fontsize=8, rotation=30, ha="right")
        ax.set_title(f"{t}\n{sub[0]['metric']}", fontsize=9)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, png)


def difference_figure(rows: list[dict], png: str | Path) -> Path | None:
    """One panel per task: each arm's paired difference from scratch (mean over seeds, 95 % interval, the seeds
    as dots); above zero is better for Dice and AUROC, below zero for MAE."""
    rows = [r for r in rows if r.get("difference") is not None]
    if not rows:
        return None
    plt = pyplot()
    tasks = list(dict.fromkeys(r["task_label"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.4 * len(tasks), 3.2), squeeze=False)
    for ax, t in zip(axes[0], tasks, strict=True):
        sub = [r for r in rows if r["task_label"] == t]
        y = np.arange(len(sub))
        d = [r["difference"] for r in sub]
        err = [
            [max(r["difference"] - r["difference_low"], 0) for r in sub],
            [max(r["difference_high"] - r["difference"], 0) for r in sub],
        ]
        ax.errorbar(d, y, xerr=err, fmt="o", color="k", capsize=4)
        for k, r in enumerate(sub):
            ax.plot(r["difference_per_seed"], [k] * len(r["difference_per_seed"]), ".", color="tab:blue", alpha=0.6)
        ax.axvline(0, color="gray", lw=1, ls="--")
        ax.set_yticks(y, [r["init"] for r in sub], fontsize=8)
        better = "lower" if sub[0]["metric"] in ("mae", "rmse", "hd95") else "higher"
        ax.set_title(f"{t}\n{sub[0]['metric']} minus scratch ({better} is better)", fontsize=9)
    fig.suptitle("paired differences from scratch (same seeds and cases)", fontsize=10)
    return save_figure(fig, png)


def curve_figure(rows: list[dict], png: str | Path, xlabel: str = "labelled subjects", title: str = "") -> Path | None:
    """Score against the number of labelled subjects (or another x), one line per initialisation."""
    if not rows:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for init in dict.fromkeys(r["init"] for r in rows):
        sub = sorted((r for r in rows if r["init"] == init), key=lambda r: r["x"])
        xs = [r["x"] for r in sub]
        ax.plot(xs, [r["value"] for r in sub], marker="o", label=init)
        ax.fill_between(xs, [r["ci_low"] for r in sub], [r["ci_high"] for r in sub], alpha=0.2)
    ax.set(xlabel=xlabel, ylabel=rows[0]["metric"], title=title, xscale="log")
    ax.legend(fontsize=8)
    return save_figure(fig, png)
