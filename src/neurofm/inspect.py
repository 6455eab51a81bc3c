"""Human-readable descriptions of stores and run folders (``neurofm inspect``)."""

from __future__ import annotations

from pathlib import Path

from neurofm.errors import NeurofmError


def describe(path: str | Path) -> str:
    path = Path(path)
    if (path / "store.json").is_file():
        return describe_store(path)
    if (path / "run.json").is_file() or (path / "checkpoints").is_dir():
        from neurofm.train.checkpoint import describe_run

        return describe_run(path)
    raise NeurofmError(f"{path}: neither a store (store.json) nor a run folder (run.json)")


def describe_store(path: Path) -> str:
    from neurofm.store import Store

    store = Store(path)
    m = store.manifest
    lines = [store.summary(), f"settings: {store.config}"]
    if not m.empty:
        labels = [c.removeprefix("label:") for c in m.columns if c.startswith("label:")]
        if labels:
            lines.append(f"labels: {', '.join(labels)}")
        maps = sorted({x for v in m["label_maps"] for x in str(v).split(",") if x})
        if maps:
            lines.append(f"label maps: {', '.join(maps)}")
        with_vol = int(m.drop_duplicates("key")["has_volumes"].sum())
        lines.append(f"sessions with regional volumes: {with_vol}")
    fails = store.failures()
    lines.append(f"failures: {len(fails)}" + (f" (see {path / 'failures.csv'})" if len(fails) else ""))
    return "\n".join(lines)
