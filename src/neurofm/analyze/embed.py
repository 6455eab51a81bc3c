"""Per-scan features of a pretrained run (``neurofm embed``): anatomy and contrast parts.

Every scan of the store is cut into windows of the run's patch size; the backbone's
:class:`~neurofm.models.base.Features` are averaged over windows. A backbone with an anatomy
and a contrast part (dual-latent: the latent means mu_s / mu_c; ResEnc: the anatomy channels
and the rest of the bottleneck) gives both; one without (the ViT) gives its pooled vector as
the anatomy column and no contrast part. A backbone that takes all contrasts at once is
embedded once per session (``contrast`` = ``stack``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from neurofm.data.sampling import stack_contrasts, window_slices
from neurofm.models.registry import model_from_checkpoint
from neurofm.preprocess.transforms import minmax, pad_to
from neurofm.store import Store
from neurofm.utils import atomic_write


@torch.no_grad()
def scan_features(
    model: torch.nn.Module, volume: np.ndarray, patch: int, overlap: float = 0.0, device: str | torch.device = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """(anatomy, contrast) feature vectors of one 1-channel scan ``(X, Y, Z)`` (or a ``(C, ...)`` stack)."""
    arr = volume[None] if volume.ndim == 3 else volume
    arr = np.stack([pad_to(a, patch, float(a.min())) for a in arr])
    x = torch.from_numpy(arr)[None].float().to(device)
    anat, con = [], []
    for w in window_slices(tuple(x.shape[2:]), patch, overlap):
        f = model.forward_features(x[(slice(None), slice(None), *w)])
        anat.append(f.anatomy if f.anatomy is not None else f.pooled)
        if f.contrast is not None:
            con.append(f.contrast)
    a = torch.cat(anat).mean(0).cpu().numpy()
    c = torch.cat(con).mean(0).cpu().numpy() if con else np.zeros(0, np.float32)
    return a, c


def embed_store(
    run: str | Path, data: str | Path, *, keys: list[str] | None = None, device: str = "cpu", progress: bool = False
) -> pd.DataFrame:
    """One row per scan: key, subject, session, contrast, site, labels, ``subject_latent``, ``contrast_latent``."""
    model, info = model_from_checkpoint(run)
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
        for name, s, c in scans:
            rows.append(
                {
                    "key": key,
                    "subject": rec["subject"],
                    "session": rec["session"],
                    "contrast": name,
                    **{k: v for k, v in rec.get("labels", {}).items() if isinstance(v, str | int | float)},
                    "subject_latent": s.astype(np.float32),
                    "contrast_latent": c.astype(np.float32),
                }
            )
    return pd.DataFrame(rows)


def save_embeddings(df: pd.DataFrame, out: str | Path) -> Path:
    """Parquet keeps the vectors as list columns; CSV spreads them over s0.. / c0.. columns."""
    out = Path(out)
    if out.suffix == ".csv":
        s = pd.DataFrame(
            np.stack(df["subject_latent"]), columns=[f"s{i}" for i in range(len(df["subject_latent"].iloc[0]))]
        )
        clen = len(df["contrast_latent"].iloc[0])
        parts = [df.drop(columns=["subject_latent", "contrast_latent"]).reset_index(drop=True), s]
        if clen:
            parts.append(pd.DataFrame(np.stack(df["contrast_latent"]), columns=[f"c{i}" for i in range(clen)]))
        flat = pd.concat(parts, axis=1)
        return atomic_write(out, lambda p: flat.to_csv(p, index=False))
    d = df.copy()
    d["subject_latent"] = [list(map(float, v)) for v in d["subject_latent"]]
    d["contrast_latent"] = [list(map(float, v)) for v in d["contrast_latent"]]
    return atomic_write(out, lambda p: d.to_parquet(p, index=False))


def load_embeddings(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if path.suffix == ".csv":
        df = pd.read_csv(path)
        s_cols = [c for c in df.columns if c.startswith("s") and c[1:].isdigit()]
        c_cols = [c for c in df.columns if c.startswith("c") and c[1:].isdigit()]
        df["subject_latent"] = list(df[s_cols].to_numpy(np.float32))
        df["contrast_latent"] = list(df[c_cols].to_numpy(np.float32)) if c_cols else [np.zeros(0, np.float32)] * len(df)
        return df.drop(columns=s_cols + c_cols)
    df = pd.read_parquet(path)
    df["subject_latent"] = [np.asarray(v, np.float32) for v in df["subject_latent"]]
    df["contrast_latent"] = [np.asarray(v, np.float32) for v in df["contrast_latent"]]
    return df
