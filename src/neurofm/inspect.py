"""Human-readable descriptions of stores and run folders (``neurofm inspect``): the model card."""

from __future__ import annotations

import json
from pathlib import Path

from neurofm.errors import NeurofmError
from neurofm.io.checkpoint import latest_checkpoint
from neurofm.utils import read_json


def describe(path: str | Path) -> str:
    from neurofm.io.checkpoint import resolve_run

    path = resolve_run(path)
    if (path / "store.json").is_file():
        return describe_store(path)
    if (path / "run.json").is_file() or (path / "checkpoints").is_dir():
        card = path / "MODEL_CARD.md"  # a model that ships with neurofm: its card follows
        return describe_run(path) + ("\n\n" + card.read_text() if card.is_file() else "")
    from neurofm.pretrained import shipped

    names = ", ".join(shipped()) or "none"
    raise NeurofmError(f"{path}: neither a store (store.json) nor a run folder (run.json) (models that ship: {names})")


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


def describe_run(run: str | Path) -> str:
    """The model card of a run: recipe, parameters, data, steps, losses (an imported run: its source)."""
    from neurofm.train.presets import PRESET_HELP

    run = Path(run)
    cfg = read_json(run / "run.json") if (run / "run.json").is_file() else {}
    ck = latest_checkpoint(run)
    lines = [f"run: {run}"]
    if cfg.get("preset"):
        base = cfg["preset"].removesuffix("-tiny")
        lines.append(f"recipe: {cfg['preset']}" + (f" — {PRESET_HELP[base]}" if base in PRESET_HELP else ""))
    if cfg.get("objective"):
        obj = {k: v for k, v in cfg["objective"].items() if k != "kind"}
        lines.append(f"objective: {cfg['objective']['kind']} {json.dumps(obj)}")
    if cfg.get("model"):
        lines.append(f"model: {cfg['model']['name']} {json.dumps(cfg['model'].get('kwargs', {}))}")
    extra, d = cfg.get("extra", {}), cfg.get("data", {})
    if extra.get("imported_from"):
        lines.append(f"imported from: {extra['imported_from']}")
        src, pre = extra.get("source") or {}, extra.get("preprocessing") or {}
        if src.get("tool", "none") != "none":
            what = [src["tool"], src.get("architecture") or "?", f"trainer {src.get('trainer') or '?'}"]
            if src.get("patch"):
                what.append(f"patch {'x'.join(map(str, src['patch']))}")
            lines.append("source plan: " + ", ".join(what))
        lines.append(
            f"preprocessing: {pre.get('spacing')} mm, {pre.get('normalize')}, patch {d.get('patch')}^3"
            + ("" if src.get("spacing") else " (spacing not in the source: given or 1 mm)")
        )
    if "mode" in d:
        lines.append(
            f"data: {extra.get('store', '?')} ({extra.get('sessions', '?')} sessions), mode {d['mode']}, "
            f"patch {d['patch']}^3, batch {d['batch_size']}, contrasts {d['contrasts'] or 'all'}"
        )
    if cfg.get("optim"):
        o = cfg["optim"]
        steps = cfg.get("trainer", {}).get("max_steps", -1)
        budget = f"{steps} steps" if steps and steps > 0 else f"{o['epochs']} epochs x {d['steps_per_epoch']} steps"
        lines.append(f"optimiser: {o['name']} lr {o['lr']} ({o['schedule']}), {budget}")
    skipped = sorted((run / "skipped").glob("*.json"))
    if skipped:
        lines.append(f"skipped sessions (data could not be read): {len(skipped)}, listed in {run / 'skipped'}")
    if ck is None:
        lines.append("checkpoints: none yet")
    else:
        spec = read_json(ck / "model.json")
        meta = read_json(ck / "meta.json")
        lines.append(f"parameters: {spec.get('parameters', 0):,}")
        when = f", {meta['time']}" if meta.get("time") else ""
        lines.append(f"latest checkpoint: {ck.name} (step {meta['step']}, epoch {meta['epoch']}{when})")
        if meta.get("losses"):
            lines.append("losses: " + ", ".join(f"{k} {v:.4g}" for k, v in meta["losses"].items()))
        from neurofm.analyze.eraser import fitted_on, load_eraser

        eraser = load_eraser(ck)
        if eraser is not None:
            i = eraser.info
            lines.append(
                f"eraser (neurofm erase): {i.get('method', '?')} of the contrast from the anatomy vector, "
                f"{i.get('rank', '?')} of {i.get('channels', '?')} directions, fitted on {i.get('scans', '?')} scans "
                f"of {i.get('subjects', '?')} subjects of {i.get('store', '?')}{fitted_on(i)}"
            )
    return "\n".join(lines)
