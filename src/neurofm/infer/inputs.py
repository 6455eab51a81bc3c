"""What ``neurofm predict`` is given: one case from CONTRAST=path pairs, or every session of a dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from neurofm.errors import ConfigError, ScanError
from neurofm.io.manifest import canonical_contrast, discover, parse_bids_name
from neurofm.utils import atomic_write_text


def parse_case(inputs: list[str], model_contrasts: list[str]) -> dict[str, str]:
    """``T1w=a.nii.gz FLAIR=b.nii.gz`` (or bare BIDS file names, or one file for a one-contrast model)."""
    files: dict[str, str] = {}
    for item in inputs:
        if "=" in item:
            name, path = item.split("=", 1)
            name = canonical_contrast(name)
        else:
            path = item
            ent, suffix = parse_bids_name(Path(item).name)
            name = "T1c" if suffix == "T1w" and "ce" in ent else canonical_contrast(suffix)
            if name not in model_contrasts and len(model_contrasts) == 1 and len(inputs) == 1:
                name = model_contrasts[0]
            if name not in model_contrasts:
                raise ConfigError(
                    f"cannot tell the contrast of {item}; write it as CONTRAST={item} "
                    f"(the model takes {model_contrasts})"
                )
        if name in files:
            raise ConfigError(f"contrast {name} given twice")
        files[name] = path
    return files


def predict_inputs(
    run: str | Path,
    inputs: list[str],
    out: str | Path,
    *,
    tta: bool = True,
    lcc: bool = False,
    overlap: float = 0.5,
    reference: str | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    from rich.progress import track

    from neurofm.infer.predictor import Predictor

    predictor = Predictor.from_run(run, tta=tta, lcc=lcc, overlap=overlap)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    single = len(inputs) >= 1 and all("=" in i or Path(i).name.lower().endswith((".nii", ".nii.gz")) for i in inputs)
    if single:
        files = parse_case(inputs, predictor.contrasts)
        stem = Path(next(iter(files.values()))).name.split(".")[0]
        case = stem.rsplit("_", 1)[0] if "_" in stem and stem.startswith("sub-") else stem  # drop the BIDS suffix
        rows.append(predictor.predict_files(files, out, case_id=case, reference=reference))
    else:
        if len(inputs) != 1:
            raise ConfigError("give CONTRAST=file pairs for one case, or a single dataset folder / CSV")
        sessions = discover(inputs[0]).sessions()
        for s in track(sessions, description="predict", disable=not progress):
            files = {c: p for c, p in s.images.items() if c in predictor.contrasts}
            if not files:
                rows.append({"case": s.key, "error": f"none of {predictor.contrasts}"})
                continue
            try:
                rows.append(predictor.predict_files(files, out, case_id=s.key, reference=reference))
            except ScanError as e:  # one bad scan does not stop the others
                rows.append({"case": s.key, "error": str(e)})
    table = pd.DataFrame(rows)
    atomic_write_text(out / "predictions.csv", table.to_csv(index=False))
    return table
