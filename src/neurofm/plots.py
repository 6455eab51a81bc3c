"""Figure helpers every layer may use: a headless pyplot, saving, a display slice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, png: str | Path, dpi: int = 90) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure."""
    plt = pyplot()
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=dpi)
    plt.close(fig)
    return png


def mid_slice(v: Any) -> np.ndarray:
    """Middle axial slice of ``(1, X, Y, Z)`` or ``(X, Y, Z)`` (array or tensor), display orientation (anterior up)."""
    a = v.detach().float().cpu().numpy() if hasattr(v, "detach") else np.asarray(v, np.float32)
    a = a[0] if a.ndim == 4 else a
    return np.rot90(a[:, :, a.shape[2] // 2])
