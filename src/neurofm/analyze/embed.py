"""Per-scan features of a pretrained run (``neurofm embed``): subject (anatomy) and contrast latents.

Every scan of the store is cut into windows of the run's patch size; the model's latents are
averaged over space and windows. Dual-latent models give the subject latent mu_s and the
contrast latent mu_c; ResEnc gives the anatomy and the remaining bottleneck channels; the ViT
gives its pooled tokens (as ``subject``; no contrast part).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from neurofm.store import Store


@torch.no_grad()
def scan_features(
    model: torch.nn.Module, volume: np.ndarray, patch: int, overlap: float = 0.0, device: str | torch.device = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """(subject, contrast) feature vectors of one 1-channel scan ``(X, Y, Z)`` (or a ``(C, ...)`` stack)."""
    from neurofm.data.pretrain import pad_to
    from neurofm.infer.predictor import _windows

    arr = volume[None] if volume.ndim == 3 else volume
    arr = np.stack([pad_to(a, patch, float(a.min())) for a in arr])
    x = torch.from_numpy(arr)[None].float().to(device)
    subj, con = [], []
    for w in _windows(tuple(x.shape[2:]), patch, overlap):
        f = model.forward_features(x[(slice(None), slice(None), *w)])
        if "mu_s" in f:
            subj.append(f["mu_s"].mean(dim=(2, 3, 4)))
            con.append(f["mu_c"].mean(dim=(2, 3, 4)))
        elif "anatomy" in f:
            subj.append(f["anatomy"].mean(dim=(2, 3, 4)))
            con.append(torch.cat([f["health"], f["free"]], 1).mean(dim=(2, 3, 4)))
        else:
            subj.append(f["pooled"])
    s = torch.cat(subj).mean(0).cpu().numpy()
    c = torch.cat(con).mean(0).cpu().numpy() if con else np.zeros(0, np.float32)
    return s, c


def embed_store(
    run: str | Path, data: str | Path, *, keys: list[str] | None = None, device: str = "cpu", progress: bool = False
) -> pd.DataFrame:
    """One row per scan: key, subject, session, contrast, site, labels, ``subject_latent``, ``contrast_latent``."""
    from neurofm.train.checkpoint import build_model_from_checkpoint

    model, info = build_model_from_checkpoint(run)
    model = model.to(device).eval()
    patch = int(info["run"].get("data", {}).get("patch", 64))
    stack = info["model"]["name"] == "vit_autoenc"
    store = Store(data)
    rows: list[dict[str, Any]] = []
    todo = keys or store.keys
    from rich.progress import track

    for key in track(todo, description="embed", disable=not progress):
        rec = store.record(key)
        if stack:
            from neurofm.data.pretrain import minmax

            names = info["run"].get("data", {}).get("contrasts") or list(rec["images"])
            vols = [minmax(np.asarray(store.read(key, n), np.float32)) if n in rec["images"] else None for n in names]
            ref = next(v for v in vols if v is not None)
            stackv = np.stack([v if v is not None else np.zeros_like(ref) for v in vols])
            s, c = scan_features(model, stackv, patch, device=device)
            scans = [("stack", s, c)]
        else:
            scans = []
            for name in rec["images"]:
                s, c = scan_features(model, np.asarray(store.read(key, name), np.float32), patch, device=device)
                scans.append((name, s, c))
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
    from neurofm.utils import atomic_write

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
