"""``neurofm demo``: the embedded default, end to end, offline, on a CPU."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console


def run_demo(out: str | Path = "neurofm-demo", workers: int = 2, subjects: int = 12) -> Path:
    """Synthesise subjects from real anatomy and prepare them into a store. Returns the store folder."""
    from neurofm.inspect import describe_store
    from neurofm.preprocess import PrepareConfig, prepare
    from neurofm.synth import SynthConfig, synthesize
    from neurofm.synth.montage import montage

    console = Console(stderr=True, soft_wrap=True)
    out = Path(out)
    console.rule("1. synth: synthetic subjects on the ICBM 2009c anatomy")
    bids = synthesize(out / "bids", SynthConfig(subjects=subjects, sessions=2, resolution=2), workers=workers)
    console.print(f"montage: {montage(bids, out / 'synth_montage.png')}")
    console.rule("2. prepare: RAS, 2 mm, crop, z-score, blosc2 store")
    store = out / "store"
    report = prepare(bids, store, PrepareConfig(spacing=2.0), workers=workers)
    console.print(report.summary())
    console.print(describe_store(store))
    console.print(f"store: {store}")
    return store
