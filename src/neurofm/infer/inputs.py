"""What ``neurofm predict`` is given: one case from CONTRAST=path pairs, or every session of a dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from neurofm.errors import ConfigError, ScanError
from neurofm.io.manifest import canonical_contrast, contrast_from_filename, discover
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
            name = contrast_from_filename(Path(item).name)
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


ENGINES = ("torch", "onnx")


def load_predictor(run: str | Path, engine: str = "torch", ensemble: list[str] | None = None, **kwargs: Any):
    """The predictor of a fine-tuned run (``torch``), or of its ONNX export on onnxruntime (``onnx``: an export
    folder, or a run folder, exported once into ``RUN/export-onnx``). ``ensemble``: more fine-tuned runs of the
    same task (or, with ``onnx``, their exports) whose predictions are averaged."""
    if engine not in ENGINES:
        raise ConfigError(f"--engine should be one of {ENGINES}, got {engine!r}")
    run = Path(run)
    if engine == "onnx":  # PyTorch is imported only to export a run that has no ONNX export yet
        from neurofm.infer.runtime import OnnxPredictor

        pred = OnnxPredictor(onnx_folder(run), **kwargs)
        for other in ensemble or []:
            pred.add_export(onnx_folder(Path(other)))
        return pred
    if (run / "neurofm-export.json").is_file():
        raise ConfigError(f"{run} is an exported model; run it with --engine onnx")
    from neurofm.infer.predictor import Predictor
    from neurofm.models.registry import model_from_checkpoint

    pred = Predictor.from_run(run, **kwargs)
    for other in ensemble or []:
        model, info = model_from_checkpoint(other)
        pred.add_member(model, info["run"].get("task_info") or {})
    return pred


def onnx_folder(run: Path) -> Path:
    """An ONNX export folder as given, or a fine-tuned run's export in ``RUN/export-onnx`` (made once)."""
    if (run / "neurofm-export.json").is_file():
        return run
    folder = run / "export-onnx"
    if not (folder / "neurofm-export.json").is_file():
        if not (run / "run.json").is_file() and not (run / "checkpoints").is_dir():
            raise ConfigError(f"{run}: neither an exported model (neurofm-export.json) nor a fine-tuned run")
        from neurofm.models.exporters import export_run

        export_run(run, "onnx", folder)
    return folder


def predict_inputs(
    run: str | Path,
    inputs: list[str],
    out: str | Path | None,
    *,
    tta: bool = True,
    lcc: bool = False,
    overlap: float = 0.5,
    reference: str | None = None,
    progress: bool = True,
    engine: str = "torch",
    probabilities: bool = False,
    ensemble: list[str] | None = None,
    brain_extraction: str | None = None,
) -> pd.DataFrame:
    """Predict one case (``CONTRAST=path`` pairs) or every session of a dataset (see ``neurofm predict``).

    A BIDS dataset gets its predictions as a BIDS derivative dataset (:func:`predict_bids`); other
    datasets get ``OUT/<session>_seg.nii.gz`` masks and ``OUT/predictions.csv``."""
    from rich.progress import track

    predictor = load_predictor(run, engine, ensemble, tta=tta, lcc=lcc, overlap=overlap)
    if brain_extraction is not None:  # otherwise the run's own setting (its store's), as it was trained
        from neurofm.preprocess.brain import check_method

        predictor.preprocessing = {**predictor.preprocessing, "brain_extraction": check_method(brain_extraction)}
    if out is None:
        root = Path(inputs[0]) if len(inputs) == 1 else None
        if root is None or not (root / "dataset_description.json").is_file():
            raise ConfigError("give --out (the default, DATASET/derivatives/neurofm-RUN, is for a BIDS dataset)")
        out = root / "derivatives" / f"neurofm-{Path(run).resolve().name}"
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
        manifest = discover(inputs[0])
        if manifest.source == "bids":
            return predict_bids(predictor, manifest, out, run, reference, progress, probabilities)
        sessions = manifest.sessions()
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
    table.attrs["written"] = str(out / "predictions.csv")
    return table


def _bids_prefix(subject: str, session: str) -> tuple[Path, str]:
    """(``sub-X/[ses-Y/]anat``, ``sub-X[_ses-Y]``) of a session."""
    sub = subject if subject.startswith("sub-") else f"sub-{subject}"
    if session:
        ses = session if session.startswith("ses-") else f"ses-{session}"
        return Path(sub) / ses / "anat", f"{sub}_{ses}"
    return Path(sub) / "anat", sub


def predict_bids(
    predictor: Any,
    manifest: Any,
    out: Path,
    run: str | Path,
    reference: str | None = None,
    progress: bool = True,
    probabilities: bool = False,
) -> pd.DataFrame:
    """Predictions over a BIDS dataset as a BIDS derivative dataset in ``out``.

    ``dataset_description.json`` names the model; segmentation writes
    ``sub-*/[ses-*/]anat/sub-*[_ses-*]_desc-<target>_mask.nii.gz`` on the reference scan's grid (a
    JSON sidecar names its sources and the model; ``_desc-<target>_probseg.nii.gz`` too with
    ``probabilities``); every task writes ``predictions.tsv`` (one row per session: a value or class
    and probabilities, a mask and its volume, or the reason it failed). A session that fails is listed
    and the others go on; a re-run skips the sessions already done and retries the failed ones.
    """
    from rich.progress import track

    from neurofm import __version__
    from neurofm.utils import read_json, write_json

    info = predictor.info
    target = str(info.get("target", "prediction")).replace("_", "")
    model = str(Path(run).resolve())
    write_json(
        out / "dataset_description.json",
        {
            "Name": f"neurofm {info['task']} of {info.get('target')} ({Path(run).name})",
            "BIDSVersion": "1.9.0",
            "DatasetType": "derivative",
            "GeneratedBy": [
                {
                    "Name": "neurofm",
                    "Version": __version__,
                    "Description": f"{info['task']} of {info.get('target')} by the fine-tuned model {model}",
                }
            ],
            "SourceDatasets": [{"URL": Path(manifest.root).resolve().as_uri()}],
        },
    )
    done_dir = out / ".neurofm" / "rows"
    rows: list[dict[str, Any]] = []
    sessions = manifest.sessions()
    for s in track(sessions, description="predict", disable=not progress):
        folder, prefix = _bids_prefix(s.subject, s.session)
        base = {"participant_id": folder.parts[0], "session_id": folder.parts[1] if s.session else "n/a"}
        done = done_dir / f"{s.key}.json"
        if done.is_file():
            row = read_json(done)
            if not row.get("error"):
                rows.append(row)
                continue
        files = {c: p for c, p in s.images.items() if c in predictor.contrasts}
        if not files:
            row = {**base, "error": f"none of the model's contrasts {predictor.contrasts}"}
        else:
            mask = out / folder / f"{prefix}_desc-{target}_mask.nii.gz"
            prob = out / folder / f"{prefix}_desc-{target}_probseg.nii.gz" if probabilities else None
            try:
                got = predictor.predict_files(
                    files, out, case_id=s.key, reference=reference, mask_path=mask, prob_path=prob
                )
                row = {**base, **{k: v for k, v in got.items() if k != "case"}}
                if info["task"] == "seg":
                    row["mask"] = str(mask.relative_to(out))
                    sources = [f"bids:raw:{Path(files[c]).resolve().relative_to(Path(manifest.root).resolve())}"
                               for c in predictor.contrasts if c in files]  # fmt: skip
                    write_json(mask.with_name(mask.name.replace(".nii.gz", ".json")), {
                        "Sources": sources, "Model": model, "Reference": got.get("reference"),
                        "Description": f"{target} mask on the grid of the {got.get('reference')} scan",
                    })  # fmt: skip
                    if prob is not None:
                        row["probabilities"] = str(prob.relative_to(out))
                row.pop("error", None)
            except (ScanError, ConfigError) as e:  # one bad session does not stop the others
                row = {**base, "error": str(e)}
        write_json(done, row)
        rows.append(row)
    table = pd.DataFrame(rows)
    atomic_write_text(out / "predictions.tsv", table.to_csv(sep="\t", index=False, na_rep="n/a"))
    table.attrs["written"] = str(out / "predictions.tsv")
    return table
