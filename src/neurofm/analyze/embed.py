"""Per-scan features of a pretrained run (``neurofm embed``): anatomy and contrast parts.

Every scan of the store is cut into windows of the run's patch size; the backbone's
:class:`~neurofm.models.base.Features` are averaged over windows. A backbone with an anatomy
and a contrast part (dual-latent: the latent means mu_s / mu_c; ResEnc: the anatomy channels
and the rest of the bottleneck) gives both; one without (the ViT) gives its pooled vector as
the anatomy column and no contrast part. A backbone that takes all contrasts at once is
embedded once per session (``contrast`` = ``stack``).

A soft categorical anatomy code (``model.kwargs.anatomy_code=categorical``) is also read by its
mode (``anatomy_mode``): the share of the scan's bottleneck positions whose most likely class is
each class. Its class probabilities (``subject_latent``) carry how sure the code is as well as
which class it names; the mode carries only the latter.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from neurofm.data.sampling import stack_contrasts, window_slices
from neurofm.models.registry import model_from_checkpoint
from neurofm.preprocess.transforms import minmax, pad_to
from neurofm.store import Store
from neurofm.utils import atomic_write


@torch.no_grad()
def scan_features(
    model: torch.nn.Module,
    volume: np.ndarray,
    patch: int,
    overlap: float = 0.0,
    device: str | torch.device = "cpu",
    batch: int = 8,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(anatomy, contrast, anatomy mode) feature vectors of one 1-channel scan ``(X, Y, Z)`` (or a ``(C, ...)``
    stack). The mode is empty unless the model's anatomy code is soft categorical (module docstring). The windows
    go through the model ``batch`` at a time (the same vectors as one at a time, to float rounding; on two CPU
    threads a batch of 8 tiny-model windows took a third of the time of 8 single ones)."""
    if batch < 1:
        raise ValueError(f"scan_features needs a batch of at least one window, got {batch}")
    arr = volume[None] if volume.ndim == 3 else volume
    arr = np.stack([pad_to(a, patch, float(a.min())) for a in arr])
    x = torch.from_numpy(arr)[None].float().to(device)
    soft_classes = getattr(model, "categorical_anatomy", False) and not getattr(model, "hard_anatomy", False)
    anat, con, mode = [], [], []
    wins = window_slices(tuple(x.shape[2:]), patch, overlap)  # every window is patch^3: the scan is padded to it
    for i in range(0, len(wins), batch):
        f = model.forward_features(torch.cat([x[(slice(None), slice(None), *w)] for w in wins[i : i + batch]]))
        anat.append(f.anatomy if f.anatomy is not None else f.pooled)
        if f.contrast is not None:
            con.append(f.contrast)
        if soft_classes:
            probs = f.latents["mu_s"]  # (B, classes, X, Y, Z); every window has the same number of positions
            mode.append(F.one_hot(probs.argmax(1), probs.shape[1]).float().mean(dim=(1, 2, 3)))
    a = torch.cat(anat).mean(0).cpu().numpy()
    c = torch.cat(con).mean(0).cpu().numpy() if con else np.zeros(0, np.float32)
    m = torch.cat(mode).mean(0).cpu().numpy() if mode else np.zeros(0, np.float32)
    return a, c, m


def embed_store(
    run: str | Path,
    data: str | Path,
    *,
    keys: list[str] | None = None,
    device: str = "cpu",
    progress: bool = False,
    erase: bool = True,
) -> pd.DataFrame:
    """One row per scan: key, subject, session, contrast, site, labels, ``subject_latent``, ``contrast_latent`` and
    ``anatomy_mode`` (empty unless the anatomy code is soft categorical). When the checkpoint has an eraser
    (:mod:`neurofm.analyze.eraser`) and ``erase`` holds, ``subject_latent`` is the vector after it,
    ``subject_latent_raw`` the vector before, and ``attrs["eraser"]`` says what the eraser was fitted on (with
    ``unseen``: the contrasts and sites of these scans it was not fitted on, which are also warned about)."""
    from neurofm.analyze.eraser import load_eraser, unseen, unseen_text

    model, info = model_from_checkpoint(run)
    eraser = load_eraser(info["folder"]) if erase else None
    model = model.to(device).eval()
    run_data = info["run"].get("data", {})
    patch = int(run_data.get("patch", 64))
    scale = minmax if run_data.get("intensity") == "minmax" else None  # the intensities the model was trained on
    store = Store(data)
    rows: list[dict[str, Any]] = []
    todo = keys or store.keys
    from rich.progress import track

    for key in track(todo, description="embed", disable=not progress):
        rec = store.record(key)
        vols = {n: np.asarray(store.read(key, n), np.float32) for n in rec["images"]}
        if scale is not None:
            vols = {n: scale(v) for n, v in vols.items()}
        if model.input_mode == "stack":
            names = run_data.get("contrasts") or list(rec["images"])
            stackv, _ = stack_contrasts(vols, names)
            scans = [("stack", *scan_features(model, stackv, patch, device=device))]
        else:
            scans = [(name, *scan_features(model, v, patch, device=device)) for name, v in vols.items()]
        for name, s, c, m in scans:
            rows.append(
                {
                    "key": key,
                    "subject": rec["subject"],
                    "session": rec["session"],
                    "contrast": name,
                    **{k: v for k, v in rec.get("labels", {}).items() if isinstance(v, str | int | float)},
                    "subject_latent": s.astype(np.float32),
                    "contrast_latent": c.astype(np.float32),
                    "anatomy_mode": m.astype(np.float32),
                }
            )
    df = pd.DataFrame(rows)
    if eraser is not None and len(df):
        raw = np.stack(df["subject_latent"].to_numpy())
        df["subject_latent_raw"] = list(raw)
        df["subject_latent"] = list(eraser(raw).astype(np.float32))
        found = unseen(eraser.info, df)
        df.attrs["eraser"] = {**eraser.info, "unseen": found} if found else eraser.info
        if found:
            print(f"warning: {info['folder']}: {unseen_text(found)}", file=sys.stderr)
    return df


#: the vector columns of an embedding table and the prefix of their columns in a CSV (s0, s1, ..., c0, ..., m0, ...;
#: r0, ... the anatomy vector before an eraser, where the checkpoint has one)
VECTOR_COLUMNS = {"subject_latent": "s", "contrast_latent": "c", "anatomy_mode": "m", "subject_latent_raw": "r"}


def save_embeddings(df: pd.DataFrame, out: str | Path) -> Path:
    """Parquet keeps the vectors as list columns; CSV spreads them over s0.. / c0.. / m0.. columns."""
    out = Path(out)
    vectors = [c for c in VECTOR_COLUMNS if c in df]
    if out.suffix == ".csv":
        parts = [df.drop(columns=vectors).reset_index(drop=True)]
        for col in vectors:
            width = len(df[col].iloc[0])
            if width:
                names = [f"{VECTOR_COLUMNS[col]}{i}" for i in range(width)]
                parts.append(pd.DataFrame(np.stack(df[col]), columns=names))
        flat = pd.concat(parts, axis=1)
        return atomic_write(out, lambda p: flat.to_csv(p, index=False))
    d = df.copy()
    for col in vectors:
        d[col] = [list(map(float, v)) for v in d[col]]
    return atomic_write(out, lambda p: d.to_parquet(p, index=False))


def load_embeddings(path: str | Path) -> pd.DataFrame:
    """What :func:`save_embeddings` wrote; a vector a file lacks (a file from before ``anatomy_mode``, a model
    without a contrast part) comes back as empty vectors."""
    path = Path(path)
    if path.suffix == ".csv":
        df = pd.read_csv(path)
        for col, prefix in VECTOR_COLUMNS.items():
            cols = [c for c in df.columns if c.startswith(prefix) and c[1:].isdigit()]
            df[col] = list(df[cols].to_numpy(np.float32)) if cols else [np.zeros(0, np.float32)] * len(df)
            df = df.drop(columns=cols)
        return df
    df = pd.read_parquet(path)
    for col in VECTOR_COLUMNS:
        df[col] = [np.asarray(v, np.float32) for v in df[col]] if col in df else [np.zeros(0, np.float32)] * len(df)
    return df
