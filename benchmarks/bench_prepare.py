"""``prepare`` throughput: volumes per second from ~256^3 scans to a 1 mm store.

Builds a BIDS folder of head-like 256^3 int16 scans at 0.94 mm (a 240 mm field of view,
as many scanners write), stored LPS so that reorientation, anti-aliased resampling,
cropping, z-scoring and compression all run, then prepares it with 1 and 2 workers.

    python benchmarks/bench_prepare.py [--volumes 8] [--size 256]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from _common import save

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def make_dataset(root: Path, volumes: int, size: int) -> None:
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    grid = np.indices((size,) * 3, dtype=np.float32)
    r = np.sqrt(sum(((g - size / 2) / (size * 0.36)) ** 2 for g in grid))
    head = np.clip(1.0 - r, 0, None) ** 0.3
    texture = gaussian_filter(rng.normal(size=(size,) * 3).astype(np.float32), 2)
    vox = 240.0 / size
    affine = np.diag([-vox, -vox, vox, 1.0])  # LPS
    affine[:3, 3] = [120.0, 120.0, -120.0]
    for i in range(volumes):
        data = (head * (800 + 200 * texture) + rng.normal(0, 15, head.shape)).clip(0, 32000).astype(np.int16)
        path = root / f"sub-{i:03d}" / "anat" / f"sub-{i:03d}_T1w.nii.gz"
        path.parent.mkdir(parents=True)
        nib.save(nib.Nifti1Image(data, affine), str(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--volumes", type=int, default=8)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()

    from neurofm.preprocess import PrepareConfig, prepare

    tmp = Path(tempfile.mkdtemp(prefix="neurofm-bench-prepare-"))
    try:
        t = time.perf_counter()
        make_dataset(tmp / "bids", args.volumes, args.size)
        print(f"built {args.volumes} scans of {args.size}^3 in {time.perf_counter() - t:.1f} s")
        runs = []
        for w in args.workers:
            out = tmp / f"store-{w}"
            t = time.perf_counter()
            rep = prepare(tmp / "bids", out, PrepareConfig(spacing=1.0), workers=w, progress=False)
            dt = time.perf_counter() - t
            assert rep.ok and rep.prepared == args.volumes, rep.summary()
            size = sum(f.stat().st_size for f in (out / "arrays").rglob("*.b2nd"))
            runs.append({"workers": w, "seconds": dt, "volumes_per_s": args.volumes / dt, "store_bytes": size})
            print(f"workers={w}: {args.volumes / dt:.2f} volumes/s ({dt:.1f} s for {args.volumes})")
        base = runs[0]["volumes_per_s"]
        for r in runs:
            r["speedup_vs_1_worker"] = r["volumes_per_s"] / base
        src = sum(f.stat().st_size for f in (tmp / "bids").rglob("*.nii.gz"))
        save(
            "prepare",
            {
                "volumes": args.volumes,
                "input_shape": [args.size] * 3,
                "input_spacing_mm": 240 / args.size,
                "input_bytes": src,
                "runs": runs,
            },
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
