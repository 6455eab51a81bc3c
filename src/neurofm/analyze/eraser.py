"""An eraser of the contrast from the anatomy vector: LEACE (Belrose et al. 2023, "LEACE: Perfect linear concept
erasure in closed form"), fitted on a pool's whole-scan anatomy vectors against each scan's contrast.

After the eraser, every contrast's mean anatomy vector on the scans it was fitted on is the same, which is exactly
the condition under which no linear classifier does better than a constant one; among the affine maps that do this
it moves the vectors least (in the metric of their covariance), so the rest of what the vector holds is kept. On
other scans of the same kind of data the condition holds to within what the fit's sample leaves; `neurofm analyze`
measures it there, beside the vector before the eraser.

The fit uses the `concept-erasure` package (EleutherAI) on each channel standardised first, as the analysis' probe
standardises it, without covariance shrinkage (which pulls small channels towards the mean variance: a categorical
code's class shares vary by 1e-7 to 1e-4). The result is stored as one affine map in the vector's own units,
``x' = x - (x - centre) @ matrix``, in ``eraser.safetensors`` beside the checkpoint's weights, with what it was fitted
on in the file's metadata. :func:`neurofm.analyze.embed.embed_store` applies it to the ``subject_latent`` of every
scan (what ``neurofm embed`` writes and ``neurofm analyze`` reads) and keeps the vector before it as
``subject_latent_raw``. Fine-tuning does not read it: a downstream model's features are the network's own.

An eraser holds only for the kind of scans it was fitted on. Its metadata names the contrasts (and, where the
store's records carry a ``site`` label, the sites) it saw; :func:`unseen` names those of another table it did not,
and ``embed``/``analyze`` warn about them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neurofm.errors import ConfigError
from neurofm.utils import atomic_write

#: the eraser's file in a checkpoint folder
ERASER = "eraser.safetensors"


@dataclass
class Eraser:
    """``x' = x - (x - centre) @ matrix`` on vectors ``(N, C)``; ``info`` says what it was fitted on."""

    centre: np.ndarray  # (C,)
    matrix: np.ndarray  # (C, C)
    info: dict[str, Any] = field(default_factory=dict)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64)
        if x.shape[-1] != self.centre.shape[0]:
            fitted = self.centre.shape[0]
            raise ConfigError(f"the eraser was fitted on {fitted} channels, the vectors have {x.shape[-1]}")
        return x - (x - self.centre) @ self.matrix


def fit_eraser(x: np.ndarray, labels: list[str] | np.ndarray, svd_tol: float = 0.01) -> Eraser:
    """The LEACE eraser of ``labels`` (one per row) from vectors ``x`` ``(N, C)`` (see module docstring)."""
    from concept_erasure import LeaceFitter

    x = np.asarray(x, np.float64)
    labels = np.asarray(labels).astype(str)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ConfigError(f"the eraser needs vectors (N, C) with C > 0, got shape {x.shape}")
    if len(labels) != len(x):
        raise ConfigError(f"{len(x)} vectors but {len(labels)} labels")
    classes = sorted(set(labels.tolist()))
    if len(classes) < 2:
        raise ConfigError(f"the eraser needs scans of at least two contrasts, got {classes}")
    if len(x) <= x.shape[1]:
        raise ConfigError(f"{len(x)} scans cannot fit an eraser of {x.shape[1]} channels: give more than {x.shape[1]}")
    mean = x.mean(0)
    scale = x.std(0)
    scale = np.where(scale > 10 * np.finfo(np.float64).eps * np.maximum(np.abs(mean), 1.0), scale, 1.0)
    xs = torch.from_numpy((x - mean) / scale)
    z = torch.nn.functional.one_hot(torch.tensor([classes.index(v) for v in labels]), len(classes)).double()
    fitter = LeaceFitter(x.shape[1], len(classes), dtype=torch.float64, shrinkage=False, svd_tol=svd_tol)
    leace = fitter.update(xs, z).eraser
    left, right = leace.proj_left.numpy(), leace.proj_right.numpy()
    bias = leace.bias.numpy() if leace.bias is not None else np.zeros(x.shape[1])
    # in standardised units x_s' = x_s - (x_s - bias) @ right.T @ left.T; back in the vectors' own units:
    matrix = (right.T @ left.T) / scale[:, None] * scale[None, :]
    counts = {c: int((labels == c).sum()) for c in classes}
    info = {"method": "leace", "scans": int(len(x)), "channels": int(x.shape[1]), "contrasts": counts}
    info["rank"] = int(np.linalg.matrix_rank(right.T @ left.T, tol=1e-9))
    return Eraser(mean + scale * bias, matrix, info)


def unseen(info: dict[str, Any] | None, df: Any) -> dict[str, list[str]]:
    """The contrasts (``contrasts``) and sites (``sites``, where the eraser recorded them) of an embedding table
    ``df`` that an eraser described by ``info`` was not fitted on; empty when it saw them all. Its equal class means
    say nothing about a contrast it never saw, and a site's scanner can move the anatomy vector in ways the pool's
    sites did not."""
    found: dict[str, list[str]] = {}
    for column, key in (("contrast", "contrasts"), ("site", "sites")):
        fitted = (info or {}).get(key)
        if fitted and column in df:
            new = sorted(set(df[column].dropna().astype(str)) - {str(v) for v in fitted})
            if new:
                found[key] = new
    return found


def unseen_text(found: dict[str, list[str]]) -> str:
    """A warning sentence for :func:`unseen`'s result, or "" when there is nothing to warn about."""
    parts = [f"{k} {', '.join(v)}" for k, v in found.items() if v]
    if not parts:
        return ""
    return (
        f"the eraser was not fitted on {' and '.join(parts)} of these scans: the anatomy rows do not show that it "
        "removes the contrast there (fit it on a pool that holds them: neurofm erase RUN --data POOL)"
    )


def fitted_on(info: dict[str, Any]) -> str:
    """The contrasts and sites an eraser's ``info`` records, as "; contrasts A, B; sites x, y" ("" when none)."""
    return "".join(f"; {k} {', '.join(info[k])}" for k in ("contrasts", "sites") if isinstance(info.get(k), dict))


def save_eraser(eraser: Eraser, folder: str | Path) -> Path:
    """Write ``eraser`` into a checkpoint ``folder`` as :data:`ERASER`, atomically."""
    from safetensors.torch import save_file

    tensors = {"centre": torch.from_numpy(eraser.centre.copy()), "matrix": torch.from_numpy(eraser.matrix.copy())}
    meta = {"info": json.dumps(eraser.info, sort_keys=True)}
    return atomic_write(Path(folder) / ERASER, lambda p: save_file(tensors, str(p), metadata=meta))


def load_eraser(folder: str | Path) -> Eraser | None:
    """The eraser of a checkpoint ``folder``, or None when it has none."""
    from safetensors import safe_open

    path = Path(folder) / ERASER
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            centre, matrix = f.get_tensor("centre").double().numpy(), f.get_tensor("matrix").double().numpy()
            info = json.loads((f.metadata() or {}).get("info", "{}"))
    except Exception as e:  # a damaged file names itself, whatever the reader raised
        raise ConfigError(f"{path}: not a readable eraser ({e})") from None
    if centre.ndim != 1 or matrix.shape != (centre.shape[0], centre.shape[0]):
        raise ConfigError(f"{path}: centre {tuple(centre.shape)} and matrix {tuple(matrix.shape)} do not fit")
    return Eraser(centre, matrix, info)


def erase_run(run: str | Path, data: str | Path, max_sessions: int = 120, progress: bool = False) -> dict[str, Any]:
    """Fit the eraser of a pretrained ``run`` (a run or checkpoint folder) on up to ``max_sessions`` sessions of the
    store ``data``, spread over its subjects, and write it into the run's checkpoint folder. The store should be
    the pretraining pool, not the scans the eraser will be judged on. Returns what was fitted, and the contrast
    probe on the fitting scans before the eraser (after it, on the same scans, a cross-validated probe falls below
    chance: the eraser is judged by ``neurofm analyze`` on other subjects)."""
    from neurofm.analyze.embed import embed_store
    from neurofm.analyze.latent import contrast_probe
    from neurofm.analyze.run import spread_sessions
    from neurofm.io.checkpoint import resolve_checkpoint
    from neurofm.pretrained import ROOT
    from neurofm.store import Store

    folder = resolve_checkpoint(run)
    if folder.resolve().is_relative_to(ROOT.resolve()):
        raise ConfigError(
            f"{run}: a model that ships with neurofm is read-only; copy its folder ({folder.parent.parent}) and erase "
            "the copy"
        )
    if max_sessions < 1:
        raise ConfigError(f"--max-sessions should be >= 1, got {max_sessions}")
    store = Store(data)
    df = embed_store(folder, data, keys=spread_sessions(store, max_sessions), progress=progress, erase=False)
    if not len(df):
        raise ConfigError(f"{data}: no scans to fit the eraser on")
    if set(df["contrast"]) == {"stack"}:
        raise ConfigError(f"{run}: the model reads all contrasts at once, so its anatomy vector has no contrast")
    x = np.stack(df["subject_latent"].to_numpy())
    eraser = fit_eraser(x, df["contrast"].to_numpy())
    eraser.info.update(store=Path(data).name, sessions=int(df["key"].nunique()), subjects=int(df["subject"].nunique()))
    if "site" in df and df["site"].notna().any():  # which scanners it saw, so that others can be warned about
        sites = df.drop_duplicates("key")["site"].dropna().astype(str)
        eraser.info["sites"] = {k: int(v) for k, v in sorted(sites.value_counts().items())}
    before = contrast_probe(df, "subject_latent")
    path = save_eraser(eraser, folder)
    return {"path": str(path), **eraser.info, "probe_before": before.get("accuracy"), "chance": before.get("chance")}
