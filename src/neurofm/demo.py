"""``neurofm demo``: the embedded default, end to end, offline, on a CPU."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from rich.console import Console


def run_demo(out: str | Path = "neurofm-demo", workers: int = 2) -> Path:
    """Build a small BIDS tree from the real T1 scan that ships with nibabel and prepare it.

    Returns the store folder.
    """
    from neurofm.inspect import describe_store
    from neurofm.preprocess import PrepareConfig, prepare

    console = Console(stderr=True, soft_wrap=True)
    out = Path(out)
    bids = out / "bids"
    src = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"
    img = nib.load(str(src))
    data = np.asarray(img.dataobj, dtype=np.float32)
    for i, flip in enumerate((False, True)):
        anat = bids / f"sub-{i + 1:02d}" / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        d, aff = data, img.affine
        if flip:  # the same anatomy stored with two axes flipped, as another scanner might
            d = np.ascontiguousarray(d[::-1, ::-1])
            aff = aff @ np.array(
                [[-1, 0, 0, d.shape[0] - 1], [0, -1, 0, d.shape[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1]]
            )
        nib.save(nib.Nifti1Image(d, aff), str(anat / f"sub-{i + 1:02d}_T1w.nii.gz"))
    console.rule("prepare")
    store = out / "store"
    if store.exists() and not (store / "store.json").exists():
        shutil.rmtree(store)
    report = prepare(bids, store, PrepareConfig(spacing=1.0), workers=workers)
    console.print(report.summary())
    console.print(describe_store(store))
    console.print(f"store: {store}")
    return store
