"""The paper's checks on the two latents.

* **Anatomy is shared across contrasts**: cosine similarity of subject (anatomy) latents
  between scans of one subject in different contrasts, against scans of different subjects.
* **Contrast lives in the contrast latent**: a linear probe predicts the contrast from each
  latent; it should succeed from the contrast latent and fail (near chance) from the anatomy
  latent.
* **How far apart one session's contrasts are** (:func:`contrast_gap`): the squared difference of
  two contrasts' latents of one session, each feature divided by its variance over all scans —
  0 when the contrasts give the same latent, 2 when they are as different as unrelated scans. A
  probe's accuracy saturates; this says how much is left to remove.
* **The swap check** (:func:`swap_check`): one scan's anatomy decoded with the contrast code
  of another crop must look like that anatomy in the other contrast, not like either input.
* **Image or places** (:func:`place_check`, a categorical anatomy code): when the crop moves by one
  bottleneck cell, does a position's class stay with the tissue or with the place in the crop? A
  code of places agrees across a pair's contrasts for free, since a pair's crops sit at one place.

Latents are centred on the dataset mean before cosines are taken: without it a shared offset
makes every pair look alike. Probes are logistic regressions scored by cross-validation grouped
by subject, so no subject is in both the training and the test folds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch


def _unit(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=0, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def latent_similarity(
    df: pd.DataFrame, column: str = "subject_latent", max_pairs: int = 20000, seed: int = 0
) -> dict[str, Any]:
    """Mean cosine between scans of the same subject in different contrasts, and between subjects.

    Returns ``within`` / ``across`` means, their difference, and the per-pair values (for plots).
    """
    x = np.stack(df[column].to_numpy()).astype(np.float64)
    if x.shape[1] == 0:
        return {}
    u = _unit(x)
    subj = df["subject"].to_numpy()
    con = df["contrast"].to_numpy()
    rng = np.random.default_rng(seed)
    n = len(df)
    i, j = np.triu_indices(n, k=1)
    if len(i) > max_pairs:
        keep = rng.choice(len(i), max_pairs, replace=False)
        # keep every within-subject pair: they are few and are what is being measured
        same = np.flatnonzero(subj[i] == subj[j])
        keep = np.union1d(keep, same)
        i, j = i[keep], j[keep]
    cos = (u[i] * u[j]).sum(1)
    within = cos[(subj[i] == subj[j]) & (con[i] != con[j])]
    across = cos[subj[i] != subj[j]]
    if len(within) == 0 or len(across) == 0:
        return {}
    return {
        "within": float(within.mean()),
        "across": float(across.mean()),
        "difference": float(within.mean() - across.mean()),
        "n_within": int(len(within)),
        "n_across": int(len(across)),
        "within_values": within.tolist(),
        "across_values": across.tolist(),
    }


def contrast_gap(df: pd.DataFrame, column: str = "subject_latent") -> dict[str, Any]:
    """Mean over pairs of scans of one session (one subject where there is no ``session`` column) in
    different contrasts of the squared difference of ``column``, each feature divided by its variance
    over all scans: 0 = the same latent whatever the contrast, 2 = as different as two unrelated scans."""
    x = np.stack(df[column].to_numpy()).astype(np.float64)
    if x.shape[1] == 0 or len(x) < 2:
        return {}
    var = x.var(axis=0)
    keep = var > 1e-12 * max(float(var.max()), 1e-30)  # constant features say nothing
    if not keep.any():
        return {}
    z = x[:, keep] / np.sqrt(var[keep])
    con = df["contrast"].to_numpy()
    by = ["subject", "session"] if "session" in df else ["subject"]
    gaps = []
    for rows in df.reset_index(drop=True).groupby(by, sort=False).indices.values():  # a session's scans: a few
        i, j = np.triu_indices(len(rows), k=1)
        i, j = rows[i], rows[j]
        other = con[i] != con[j]
        gaps.append(((z[i[other]] - z[j[other]]) ** 2).mean(1))
    d = np.concatenate(gaps) if gaps else np.zeros(0)
    if len(d) == 0:
        return {}
    return {"gap": float(d.mean()), "pairs": int(len(d))}


def contrast_probe(df: pd.DataFrame, column: str, folds: int = 5, seed: int = 0) -> dict[str, Any]:
    """Cross-validated accuracy of a linear probe predicting the contrast from ``column``.

    Folds are grouped by subject, so the probe is always tested on subjects it never saw; with scans
    of fewer than two subjects there is no such split and the result is empty. ``accuracy_low`` /
    ``accuracy_high`` is a 95 % interval of the accuracy from resampling subjects' held-out predictions
    (the test scans' spread; the folds' refits are not redone).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.stack(df[column].to_numpy()).astype(np.float64)
    y = df["contrast"].to_numpy()
    groups = df["subject"].to_numpy()
    if x.shape[1] == 0 or len(set(y)) < 2 or len(set(groups)) < 2:
        return {}
    k = min(folds, len(set(groups)))
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    pred = cross_val_predict(clf, x, y, groups=groups, cv=GroupKFold(n_splits=k))
    values, counts = np.unique(y, return_counts=True)
    index = {v: i for i, v in enumerate(values)}
    confusion = np.zeros((len(values), len(values)), int)  # rows: true contrast, columns: predicted
    np.add.at(confusion, ([index[v] for v in y], [index[v] for v in pred]), 1)
    low, high = share_interval(pred == y, [str(g) for g in groups], seed=seed)
    return {
        "accuracy": float((pred == y).mean()),
        "accuracy_low": low,
        "accuracy_high": high,
        "chance": float(counts.max() / counts.sum()),
        "classes": [str(v) for v in values],
        "confusion": confusion.tolist(),
        "most_confused": most_confused([str(v) for v in values], confusion),
        "n": int(len(y)),
        "folds": k,
    }


def most_confused(classes: list[str], confusion: np.ndarray) -> dict[str, Any]:
    """The pair of classes mistaken for each other most often (both directions) and its share of the errors."""
    c = np.asarray(confusion)
    errors = int(c.sum() - np.trace(c))
    if errors == 0:
        return {"pair": [], "errors": 0, "share": 0.0}
    both = c + c.T
    i, j = max(((i, j) for i in range(len(c)) for j in range(i + 1, len(c))), key=lambda p: both[p])
    return {"pair": sorted([classes[i], classes[j]]), "errors": int(both[i, j]), "share": float(both[i, j] / errors)}


def intensity_histogram(values: np.ndarray, bins: int = 40, lo: float = -4.0, hi: float = 6.0) -> np.ndarray:
    """The fraction of ``values`` in each of ``bins`` equal bins over [lo, hi], the outer two open (every value
    counted, however extreme)."""
    edges = np.linspace(lo, hi, bins + 1)
    edges[0], edges[-1] = -np.inf, np.inf
    return (np.histogram(values, bins=edges)[0] / max(np.size(values), 1)).astype(np.float32)


def intensity_histograms(
    store: Any, keys: list[str], bins: int = 40, lo: float = -4.0, hi: float = 6.0
) -> pd.DataFrame:
    """One row per scan (key, subject, session, contrast, ``intensity_histogram``): the fraction of the
    prepared volume's voxels in each of ``bins`` intensity bins. Probed like a latent, it is the reference
    for how far a scan's contrast can be read from its intensities alone: contrasts that differ only in a
    few voxels (e.g. a T1c without enhancing tissue and its T1w) are not told apart by it either."""
    rows = []
    for key in keys:
        rec = store.record(key)
        for name in rec["images"]:
            h = intensity_histogram(np.asarray(store.read(key, name), np.float32), bins, lo, hi)
            rows.append(
                {
                    "key": key,
                    "subject": rec["subject"],
                    "session": rec["session"],
                    "contrast": name,
                    "intensity_histogram": h,
                }
            )
    return pd.DataFrame(rows)


def code_usage(df: pd.DataFrame, column: str = "anatomy_mode", floor: float = 0.01) -> dict[str, Any]:
    """How a categorical anatomy code spreads over its classes, from each scan's share of positions per most likely
    class (:mod:`neurofm.analyze.embed`), averaged over scans: the number of classes, those holding at least
    ``floor`` of the positions, the perplexity ``exp(H)`` of the shares (the number of equally used classes with the
    same entropy) and the five largest shares. Empty when the column is missing or empty."""
    if column not in df or len(df) == 0 or len(df[column].iloc[0]) == 0:
        return {}
    share = np.stack(df[column].to_numpy()).astype(np.float64).mean(0)
    share = share / max(share.sum(), 1e-12)
    nz = share[share > 0]
    return {
        "classes": int(share.size),
        "classes_used": int((share >= floor).sum()),
        "floor": floor,
        "perplexity": float(np.exp(-(nz * np.log(nz)).sum())),
        "largest_shares": [float(v) for v in np.sort(share)[::-1][:5]],
    }


def latent_analysis(df: pd.DataFrame, seed: int = 0, reference: pd.DataFrame | None = None) -> dict[str, Any]:
    """Similarity and probes for both latents (see module docstring), and for the anatomy code's mode where
    ``df`` has a non-empty ``anatomy_mode`` column (:mod:`neurofm.analyze.embed`); with ``reference`` (from
    :func:`intensity_histograms`) the same probe on the scans' intensity histograms."""
    out: dict[str, Any] = {"scans": int(len(df)), "subjects": int(df["subject"].nunique())}
    columns = [("anatomy", "subject_latent"), ("contrast", "contrast_latent")]
    if "anatomy_mode" in df:  # a soft categorical anatomy code, read by its most likely class (analyze.embed)
        columns.insert(1, ("anatomy_mode", "anatomy_mode"))
    if "subject_latent_raw" in df:  # the checkpoint has an eraser: the anatomy vector before it (analyze.eraser)
        columns.insert(1, ("anatomy_raw", "subject_latent_raw"))
    for name, col in columns:
        sim = latent_similarity(df, col, seed=seed)
        probe = contrast_probe(df, col, seed=seed)
        if sim or probe:
            out[name] = {"similarity": sim, "contrast_probe": probe, "contrast_gap": contrast_gap(df, col)}
    usage = code_usage(df)
    if usage and "anatomy_mode" in out:
        out["anatomy_mode"]["code_usage"] = usage
    if reference is not None and len(reference) and df["contrast"].nunique() > 1:  # not for a stack model
        probe = contrast_probe(reference, "intensity_histogram", seed=seed)
        if probe:
            out["intensity"] = {"contrast_probe": probe}
    return out


#: the contrast gap's column in :func:`summary_table`, the column naming the probe's most confused pair,
#: and the name of the intensity-histogram reference row
GAP_COLUMN = "contrast gap (0 same, 2 unrelated)"
CONFUSED_COLUMN = "most confused contrasts"
INTENSITY_ROW = "(reference) intensity histogram"
#: the probe accuracy's 95 % interval over subjects, as the report prints it
INTERVAL_COLUMN = "probe accuracy, 95 % interval"
#: the row of a soft categorical anatomy code read by its most likely class at each position
MODE_ROW = "anatomy, most likely class"
#: the row of the anatomy vector before the checkpoint's eraser (neurofm.analyze.eraser), where it has one
RAW_ROW = "anatomy, before the eraser"
ROW_NAMES = {"intensity": INTENSITY_ROW, "anatomy_mode": MODE_ROW, "anatomy_raw": RAW_ROW}


def summary_table(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows for a report: latent, within/across similarity, probe accuracy vs chance."""
    rows = []
    for name in ("anatomy", "anatomy_raw", "anatomy_mode", "contrast", "intensity"):
        r = result.get(name)
        if not r:
            continue
        sim, probe, gap = r.get("similarity", {}), r.get("contrast_probe", {}), r.get("contrast_gap", {})
        rows.append(
            {
                "latent": ROW_NAMES.get(name, name),
                "cosine within subject": sim.get("within"),
                "cosine across subjects": sim.get("across"),
                "contrast probe accuracy": probe.get("accuracy"),
                INTERVAL_COLUMN: probe_interval(probe),
                "chance": probe.get("chance"),
                CONFUSED_COLUMN: _confused_text(probe.get("most_confused")),
                GAP_COLUMN: gap.get("gap"),
            }
        )
    return rows


def probe_interval(probe: dict[str, Any]) -> str | None:
    """A probe's accuracy interval as printed in reports and model cards, ``[low, high]``; None without one."""
    if "accuracy_low" not in probe:
        return None
    return f"[{probe['accuracy_low']:.3f}, {probe['accuracy_high']:.3f}]"


def _confused_text(m: dict[str, Any] | None) -> str | None:
    if not m or not m.get("pair"):
        return None
    return f"{'/'.join(m['pair'])}: {m['errors']} ({m['share']:.0%} of errors)"


@torch.no_grad()
def swap_check(
    model: Any,
    store: Any,
    keys: list[str],
    patch: int,
    seed: int = 0,
    device: str = "cpu",
    draws: int = 4,
    reps: int = 2000,
) -> dict[str, Any]:
    """Does the anatomy latent carry the anatomy and the contrast latent only the contrast?

    For every session with two contrasts a, b: crops ``x_a``, ``x_b`` at one place and ``x_a_ref``
    of scan a at another place, flipped front to back (so it shares no anatomy with ``x_a``). The
    anatomy of ``x_b`` is decoded with the contrast code of ``x_a_ref``. If the latents are
    disentangled the result is ``x_a`` — b's anatomy in a's contrast — and is nearer to ``x_a`` than
    to ``x_b`` (b's own intensities) and to ``x_a_ref`` (the crop the contrast code came from). The
    same with the contrast code of ``x_a`` itself (``copy``) shows what a copying latent would give.

    Each session gives ``draws`` such trials, each with its own pair of contrasts and place. The share
    of trials where ``x_a`` is the nearest comes with a 95 % bootstrap interval over subjects (all
    trials of a resampled subject go together), since one subject's sessions and crops are not
    independent.

    Returns:
        mean squared errors of the recombination to each target, the share of trials where ``x_a``
        is the nearest (``a_nearest``) with ``a_nearest_low`` / ``a_nearest_high``, ``passed`` (that
        share above one half and the mean error to ``x_a`` the smallest), ``verdict`` (``passed`` or
        ``failed`` when the interval lies wholly on that side of one half, else ``at the line``), and
        the numbers of sessions, subjects and trials; empty for a backbone without separate latents.
    """
    from neurofm.data.sampling import random_box

    if not getattr(model, "disentangles", False):
        return {}
    if draws < 1:
        raise ValueError(f"swap_check needs at least one draw per session, got {draws}")
    rng = np.random.default_rng(seed)
    errs: dict[str, list[float]] = {"to_a": [], "to_b": [], "to_a_ref": [], "copy_to_a": []}
    subjects: list[str] = []
    sessions = 0
    for key in keys:
        rec = store.record(key)
        names = sorted(rec["images"])
        if len(names) < 2:
            continue
        sessions += 1
        subject = str(rec.get("subject", key))
        shape = tuple(rec["shape"])
        crops: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for _ in range(draws):
            a, b = rng.choice(names, size=2, replace=False)
            box = random_box(shape, patch, rng)
            # the reference crop: as far from the first as the scan allows, and flipped front to back
            far = tuple(
                slice(s - sl.stop, s - sl.stop + (sl.stop - sl.start)) for sl, s in zip(box, shape, strict=True)
            )
            x_a, x_b = _crop(store, key, a, box, patch, device), _crop(store, key, b, box, patch, device)
            crops.append((x_a, x_b, _crop(store, key, a, far, patch, device, flip=True)))
        # the session's draws as one batch (the same errors as one trial at a time, to float rounding)
        x_a, x_b, x_ref = (torch.cat(c) for c in zip(*crops, strict=True))
        y = model.recombine(x_b, x_ref)
        y_copy = model.recombine(x_b, x_a)
        for name, err in (("to_a", y - x_a), ("to_b", y - x_b), ("to_a_ref", y - x_ref), ("copy_to_a", y_copy - x_a)):
            errs[name] += (err**2).flatten(1).mean(1).tolist()
        subjects += [subject] * draws
    if not errs["to_a"]:
        return {}
    e = {k: np.asarray(v) for k, v in errs.items()}
    nearest = (e["to_a"] < e["to_b"]) & (e["to_a"] < e["to_a_ref"])
    means = {f"mse_{k}": float(v.mean()) for k, v in e.items()}
    share = float(nearest.mean())
    low, high = share_interval(nearest, subjects, reps=reps, seed=seed)
    passed = bool(share > 0.5 and means["mse_to_a"] < min(means["mse_to_b"], means["mse_to_a_ref"]))
    verdict = "passed" if passed and low > 0.5 else "failed" if not passed and high < 0.5 else "at the line"
    return {
        **means,
        "a_nearest": share,
        "a_nearest_low": low,
        "a_nearest_high": high,
        "passed": passed,
        "verdict": verdict,
        "sessions": sessions,
        "subjects": len(set(subjects)),
        "trials": int(len(nearest)),
    }


@torch.no_grad()
def place_check(
    model: Any, store: Any, keys: list[str], patch: int, seed: int = 0, device: str = "cpu"
) -> dict[str, Any]:
    """Does a categorical anatomy code name the image or places in the crop?

    For every scan of ``keys``: a random ``patch``-voxel crop and the same crop moved by one bottleneck cell
    (``model.downsampling`` voxels) along a random axis, both encoded; over the positions the two crops share, the
    share whose most likely class is the same at the same tissue (``same_tissue``: the image's frame) and at the
    same place in the crop (``same_place``: the crop's frame), each with a 95 % interval from resampling subjects.
    A code of the image keeps its class with the tissue; a code of places (which zero padding lets a convolution
    build, and which agrees across a pair's contrasts for free) keeps it with the place; a constant code does both.
    Empty when the anatomy code is not categorical, or no scan is large enough to move a crop by a cell.
    """
    from neurofm.data.sampling import random_box

    cell = int(getattr(model, "downsampling", 0) or 0)
    if not getattr(model, "categorical_anatomy", False) or cell < 1 or patch % cell:
        return {}
    rng = np.random.default_rng(seed)
    tissue: list[float] = []
    place: list[float] = []
    subjects: list[str] = []
    for key in keys:
        rec = store.record(key)
        shape = tuple(rec["shape"])
        for name in sorted(rec["images"]):
            axes = [a for a in range(3) if shape[a] >= patch + cell]
            if not axes:
                continue
            axis = int(rng.choice(axes))
            box = list(random_box(shape, patch, rng))
            start = int(rng.integers(0, shape[axis] - patch - cell + 1))  # room to move forward
            box[axis] = slice(start, start + patch)
            moved = list(box)
            moved[axis] = slice(box[axis].start + cell, box[axis].stop + cell)
            x = torch.cat([_crop(store, key, name, tuple(b), patch, device) for b in (box, moved)])
            cls = model.forward_features(x).latents["mu_s"].argmax(1).cpu().numpy()  # (2, *grid)
            n = cls.shape[1 + axis]
            first = np.take(cls[0], np.arange(1, n), axis=axis)  # positions the moved crop also holds
            tissue.append(float((first == np.take(cls[1], np.arange(0, n - 1), axis=axis)).mean()))
            place.append(float((first == np.take(cls[1], np.arange(1, n), axis=axis)).mean()))
            subjects.append(str(rec.get("subject", key)))
    if not tissue:
        return {}
    out: dict[str, Any] = {"crops": len(tissue), "subjects": len(set(subjects)), "move_voxels": cell}
    for label, values in (("same_tissue", tissue), ("same_place", place)):
        out[label] = float(np.mean(values))
        out[f"{label}_low"], out[f"{label}_high"] = share_interval(np.asarray(values), subjects, seed=seed)
    return out


def places_text(places: dict[str, Any]) -> str:
    """:func:`place_check` in words."""
    if not places:
        return ""
    verdict = (
        "the code names places in the crop, not the image"
        if places["same_place_low"] > places["same_tissue_high"]
        else "the code follows the image"
        if places["same_tissue_low"] > places["same_place_high"]
        else "neither clearly"
    )
    return (
        f" When the crop moves by one bottleneck cell ({places['move_voxels']} voxels), "
        f"{places['same_tissue']:.0%} of positions keep their most likely class with the tissue and "
        f"{places['same_place']:.0%} with the place in the crop ({places['crops']} crops): {verdict}."
    )


def swap_verdict(swap: dict[str, Any]) -> str:
    """The swap check in words: passed / failed, and whether its interval leaves one half out."""
    said = "passed" if swap.get("passed") else "failed"
    if swap.get("verdict") == "at the line":
        return f"{said}, at the line: the interval contains 50 %"
    return said


def share_interval(hits: np.ndarray, groups: list[str], reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile 95 % interval of the share of ``hits``, resampling whole groups (subjects) with replacement."""
    labels, index = np.unique(np.asarray(groups), return_inverse=True)
    if len(labels) < 2:
        return float("nan"), float("nan")
    sums = np.bincount(index, weights=np.asarray(hits, float), minlength=len(labels))
    counts = np.bincount(index, minlength=len(labels)).astype(float)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(labels), size=(reps, len(labels)))
    shares = sums[pick].sum(axis=1) / counts[pick].sum(axis=1)
    low, high = np.percentile(shares, [2.5, 97.5])
    return float(low), float(high)


def _crop(store: Any, key: str, name: str, box: tuple[slice, ...], patch: int, device: str, flip: bool = False):
    """One scan's crop as a ``(1, 1, P, P, P)`` tensor (padded; flipped front to back on request)."""
    from neurofm.preprocess.transforms import pad_to

    arr = np.asarray(store.read(key, name, box), np.float32)
    arr = pad_to(arr, patch, float(arr.min()))
    arr = arr[:, ::-1] if flip else arr
    return torch.from_numpy(np.ascontiguousarray(arr))[None, None].to(device)
