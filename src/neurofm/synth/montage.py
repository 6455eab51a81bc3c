"""A montage PNG of subjects x contrasts, for a quick look at a BIDS dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from neurofm.io.manifest import CONTRASTS, discover
from neurofm.io.nifti import load_scan
from neurofm.preprocess import transforms


def axial_slice(path: str, z_mm: float = 10.0, mask: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The axial slice nearest world z = ``z_mm`` at 1 mm in-plane, RAS, display-ready (rows = A->P)."""
    scan = load_scan(path)
    grid = transforms.target_grid(scan.shape, scan.affine, (1.0, 1.0, 1.0))
    # a one-slice grid at z_mm: sample only what is shown
    shape = (grid[0][0], grid[0][1], 1)
    aff = grid[1].copy()
    aff[2, 3] = z_mm
    img = transforms.resample(scan.data[0], scan.affine, (shape, aff), anti_alias=False)[:, :, 0]
    seg = None
    if mask:
        m = load_scan(mask, kind="label")
        seg = transforms.resample(m.data[0], m.affine, (shape, aff), order=0)[:, :, 0]
    return np.rot90(img), (np.rot90(seg) if seg is not None else None)


def montage(bids: str | Path, png: str | Path, subjects: int = 4, z_mm: float = 12.0) -> Path:
    """Save a grid of axial slices: one row per subject (patients first), one column per contrast."""
    from neurofm.plots import pyplot, save_figure

    plt = pyplot()
    m = discover(bids)
    sessions = m.sessions()
    firsts = {}
    for s in sessions:  # one session per subject
        firsts.setdefault(s.subject, s)
    sessions = list(firsts.values())
    # show a mix: every diagnosis present, then the rest
    seen, chosen = set(), []
    for s in sessions:
        dx = s.labels.get("diagnosis", "")
        if dx not in seen:
            seen.add(dx)
            chosen.append(s)
    chosen += [s for s in sessions if s not in chosen]
    chosen = chosen[:subjects]
    cols = [c for c in CONTRASTS if any(c in s.images for s in chosen)]
    fig, axes = plt.subplots(len(chosen), len(cols), figsize=(2.1 * len(cols), 2.5 * len(chosen)), squeeze=False)
    for i, s in enumerate(chosen):
        for j, c in enumerate(cols):
            ax = axes[i][j]
            ax.axis("off")
            if c not in s.images:
                ax.set_title(f"{c}: missing", fontsize=8)
                continue
            img, seg = axial_slice(s.images[c], z_mm, s.label_maps.get("lesion") if c == "FLAIR" else None)
            lo, hi = np.percentile(img[img > 0], [1, 99.5]) if (img > 0).any() else (0, 1)
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
            if seg is not None and seg.any():
                ax.contour(seg > 0, levels=[0.5], colors="red", linewidths=0.6)
            if i == 0:
                ax.set_title(c, fontsize=10)
            if j == 0:
                lab = s.labels
                ax.text(
                    -0.05,
                    0.5,
                    f"{s.subject}\n{lab.get('diagnosis', '')}\n{lab.get('age', '')} y, {lab.get('site', '')}",
                    transform=ax.transAxes,
                    ha="right",
                    va="center",
                    fontsize=8,
                )
    fig.suptitle("neurofm synth: axial slices (red: lesion mask on FLAIR)", fontsize=10)
    return save_figure(fig, png, dpi=80)
