"""``neurofm synth`` time per subject (5 contrasts, one session) at 1 mm and 2 mm.

The template is loaded once per process and not counted; the time covers the warp,
ageing, lesions, five contrasts with bias/resolution/noise, the ground-truth maps, and
writing compressed NIfTI.

    python benchmarks/bench_synth.py [--subjects 4]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from _common import save

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", type=int, default=4)
    ap.add_argument("--resolutions", type=int, nargs="+", default=[2, 1])
    args = ap.parse_args()

    from neurofm.synth.generator import SynthConfig, plan_subjects, render_subject
    from neurofm.synth.template import load_template

    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="neurofm-bench-synth-"))
    try:
        for res in args.resolutions:
            t = time.perf_counter()
            template = load_template(res)
            load_s = time.perf_counter() - t
            cfg = SynthConfig(subjects=args.subjects, resolution=res, healthy_fraction=0.25)
            plans = plan_subjects(cfg, template)
            times = []
            for p in plans:
                t = time.perf_counter()
                render_subject(p, asdict(cfg), str(tmp / f"r{res}"))
                times.append(time.perf_counter() - t)
                print(f"{res} mm  {p.subject} {p.diagnosis:8s} {times[-1]:.2f} s")
            rows.append(
                {
                    "resolution_mm": res,
                    "template_load_s": load_s,
                    "seconds_per_subject": sum(times) / len(times),
                    "per_subject": times,
                    "diagnoses": [p.diagnosis for p in plans],
                    "contrasts": 5,
                }
            )
            print(f"{res} mm: {rows[-1]['seconds_per_subject']:.2f} s per subject (template load {load_s:.1f} s, once)")
        save("synth", {"subjects": args.subjects, "runs": rows})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
