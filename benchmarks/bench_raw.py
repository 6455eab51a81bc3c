"""Raw heads: seconds per volume for brain extraction (deepbet, neurofm's extractor) and N4, in one run.

One synthetic head per resolution (``neurofm synth``, skull and neck included), its T1w and FLAIR;
each step timed after a warm-up call (which loads the networks), with the Dice of each mask against
the generator's brain mask beside it.

    python benchmarks/bench_raw.py [--resolution 2 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from _common import save, timeit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    import numpy as np

    from neurofm.io.nifti import load_scan
    from neurofm.preprocess import brain, transforms
    from neurofm.preprocess.bias import correct_bias
    from neurofm.synth import SynthConfig, synthesize

    rows: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for res in args.resolution:
            bids = synthesize(Path(tmp) / f"r{res}", SynthConfig(subjects=1, seed=7, resolution=res), progress=False)
            anat = (
                next(bids.glob("sub-*/anat")) if any(bids.glob("sub-*/anat")) else next(bids.glob("sub-*/ses-*/anat"))
            )
            truth_path = next((bids / "derivatives").rglob("*_desc-brain_mask.nii.gz"))
            truth = load_scan(truth_path, kind="label")
            for contrast in ("T1w", "FLAIR"):
                found = [p for p in anat.glob(f"*_{contrast}.nii.gz") if "_ce-" not in p.name]
                if not found:
                    continue
                scan = load_scan(found[0])
                gt = transforms.resample(
                    truth.data[0].astype(np.float32), truth.affine, (scan.shape, scan.affine), order=1
                )
                key = f"{res}mm_{contrast}"
                rows[f"{key}_shape"] = "x".join(map(str, scan.shape))
                methods = {"neurofm": lambda s=scan, c=contrast: brain.neurofm_mask(s, c)}
                if brain.deepbet_available():
                    methods["deepbet"] = lambda s=scan: brain.deepbet_mask(s)
                for name, fn in methods.items():
                    t = timeit(fn, repeat=args.repeat)
                    mask = fn()
                    dice = 2 * (mask & (gt > 0.5)).sum() / max(mask.sum() + (gt > 0.5).sum(), 1)
                    rows[f"{key}_{name}_s"] = t["median_s"]
                    rows[f"{key}_{name}_dice"] = float(dice)
                rows[f"{key}_n4_s"] = timeit(lambda s=scan: correct_bias(s, "n4"), repeat=args.repeat)["median_s"]
    for k, v in rows.items():
        print(f"{k:28s} {v:10.4g}" if isinstance(v, float) else f"{k:28s} {v}")
    save("raw", {"resolution": args.resolution, **rows})


if __name__ == "__main__":
    main()
