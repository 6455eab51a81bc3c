"""Figures drawn from a model in training: reconstructions (input / masked / reconstruction / swap)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from neurofm.data.pretrain import PretrainDataset, SessionIndex
from neurofm.plots import mid_slice, pyplot, save_figure


def reconstruction_figure(
    module: Any, store_root: str | Path, index: SessionIndex, png: str | Path, samples: int = 3
) -> Path:
    """Run the objective on a few fixed crops and save input / masked / reconstruction (/ swap) panels."""
    plt = pyplot()
    cfg = module.cfg
    dcfg = dataclasses.replace(cfg.data, augment=False)
    # prefer sessions with two contrasts, so the swap has a real target
    order = sorted(range(len(index.keys)), key=lambda i: -len(index.contrasts[i]))[:samples]
    ds = PretrainDataset(store_root, index, dcfg, length=len(index.keys), seed=1234, needs=cfg.data_needs())
    order = [next(j for j, (s, _) in enumerate(ds.items) if s == i) for i in order]
    batch = torch.utils.data.default_collate([ds[i] for i in order])
    device = next(module.model.parameters()).device
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    module.eval()
    module.objective.eval()
    with torch.no_grad():
        _, _, out = module.objective(module.model, batch, progress=1e9)
    module.objective.train()
    module.train()
    cols = [("input", "input"), ("masked", "masked input"), ("reconstruction", "reconstruction")]
    if "swap" in out:
        cols += [("target_b", "other contrast"), ("swap", "swap: anatomy -> other contrast")]
    n = out["input"].shape[0]
    fig, axes = plt.subplots(n, len(cols), figsize=(2.3 * len(cols), 2.4 * n), squeeze=False)
    for i in range(n):
        ref = out["input"][i]
        lo, hi = float(ref.min()), float(ref.max())
        for j, (key, title) in enumerate(cols):
            ax = axes[i][j]
            own_scale = key == "target_b"  # the other contrast is shown on its own intensity scale
            ax.imshow(
                mid_slice(out[key][i]), cmap="gray", vmin=None if own_scale else lo, vmax=None if own_scale else hi
            )
            ax.axis("off")
            if i == 0:
                ax.set_title(title, fontsize=9)
    fig.suptitle(f"{cfg.preset}: reconstructions on fixed crops", fontsize=10)
    return save_figure(fig, png)
