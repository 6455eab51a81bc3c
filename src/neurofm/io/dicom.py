"""DICOM in: a folder of DICOM files becomes a BIDS tree that ``neurofm prepare`` reads as usual.

1. every file under the folder is read with pydicom (headers only); files that are not DICOM
   are listed and left alone;
2. files are grouped into series (``SeriesInstanceUID``), series into sessions (patient and study);
3. each series is identified from its description and tags: localisers (``ImageType`` LOCALIZER,
   or "localizer", "scout", "survey" in the description), derived series (``ImageType`` DERIVED,
   reformats, ADC / FA / trace maps), single-slice and 2D stacks (fewer than ``MIN_SLICES``) and
   series whose contrast cannot be told are **skipped with the reason**; the others get a
   contrast — T1w, T1c, T2w, FLAIR or PDw — from the description (``mprage``, ``flair``, ...),
   else from the timing (TR, TE, TI), and T1w with a contrast agent (``ContrastBolusAgent``, or
   "post", "+c", "gad" in the description) becomes T1c;
4. each kept series is converted by dcm2niix (the maintained converter; its binary ships in the
   ``dcm2niix`` wheel) and written as ``sub-<patient>/ses-<study date>/anat/..._<suffix>.nii.gz``
   with dcm2niix's JSON sidecar; a second series of one contrast in a session is skipped (the
   first by series number is kept);
5. ``dicom_conversion.tsv`` lists every series: what it became or why it was skipped.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from neurofm.errors import ConfigError, ManifestError
from neurofm.utils import atomic_write_text, stable_hash, write_json

MIN_SLICES = 10
LOCALIZER = re.compile(r"locali[sz]er|scout|survey|3[ -]?plane|\bloc\b|aahead", re.I)
DERIVED = re.compile(r"(?<![a-z0-9])(adc|fa|trace|mip|mpr|sub|tensor|colfa)(?![a-z0-9])|reformat|derived", re.I)
AGENT = re.compile(r"\bpost\b|\+ ?c\b|\bgad|\bgd\b|contrast|\bce\b|_ce_|\bc\+", re.I)
BY_NAME = [  # (pattern on description + protocol, contrast), first match wins
    (re.compile(r"flair|dark[ _-]?fluid|\bir[ _-]?t2", re.I), "FLAIR"),
    (re.compile(r"\bpd\b|pdw|proton[ _-]?dens|_pd_|\bpd[ _-]", re.I), "PDw"),
    (re.compile(r"t2(?!\*)|\bt2w|tse[ _-]?t2|space[ _-]?t2", re.I), "T2w"),
    (re.compile(r"t1|mprage|mp-rage|spgr|bravo|tfl|fspgr|mp2rage|vibe", re.I), "T1w"),
]


def looks_like_dicom_folder(path: Path) -> bool:
    """A folder with DICOM files (``DICM`` at byte 128) and no BIDS or nnU-Net layout."""
    if not path.is_dir() or any(path.glob("sub-*")) or (path / "dataset.json").is_file():
        return False
    for i, f in enumerate(p for p in path.rglob("*") if p.is_file()):
        if i > 200:
            break
        try:
            with open(f, "rb") as fh:
                fh.seek(128)
                if fh.read(4) == b"DICM":
                    return True
        except OSError:
            continue
    return False


@dataclass
class Series:
    uid: str
    files: list[Path] = field(default_factory=list)
    tags: dict[str, Any] = field(default_factory=dict)
    positions: set[tuple[float, ...]] = field(default_factory=set)  # distinct slice positions (ImagePositionPatient)

    @property
    def description(self) -> str:
        return _description(self.tags)


def _description(tags: dict[str, Any]) -> str:
    """Series description and protocol name (once when they are the same)."""
    parts = [str(tags.get(k) or "").strip() for k in ("SeriesDescription", "ProtocolName")]
    return " ".join(dict.fromkeys(p for p in parts if p))


def _ms(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def identify(tags: dict[str, Any], n_slices: int) -> tuple[str | None, str]:
    """(contrast, how) for a series, or (None, why it is skipped)."""
    desc = _description(tags)
    image_type = [str(t).upper() for t in (tags.get("ImageType") or [])]
    if "LOCALIZER" in image_type or LOCALIZER.search(desc):
        return None, "localizer"
    if "DERIVED" in image_type or DERIVED.search(desc):
        return None, "derived series"
    if n_slices < MIN_SLICES:
        return None, f"2D ({n_slices} slice{'s' if n_slices != 1 else ''})"
    contrast, how = None, ""
    for pattern, name in BY_NAME:
        if pattern.search(desc):
            contrast, how = name, f"description {desc.strip()!r}"
            break
    if contrast is None:
        tr, te, ti = _ms(tags.get("RepetitionTime")), _ms(tags.get("EchoTime")), _ms(tags.get("InversionTime"))
        if tr is None or te is None:
            return None, f"contrast not identified (description {desc.strip()!r}, no TR/TE)"
        if ti is not None and ti > 1500 and te > 70:
            contrast = "FLAIR"
        elif te < 30 and (tr < 1000 or (ti is not None and 500 < ti < 1300)):
            contrast = "T1w"
        elif tr > 2000 and te > 70:
            contrast = "T2w"
        elif tr > 2000 and te < 40:
            contrast = "PDw"
        else:
            return None, f"contrast not identified (TR {tr:g} ms, TE {te:g} ms)"
        how = f"timing TR {tr:g} ms, TE {te:g} ms" + (f", TI {ti:g} ms" if ti else "")
    if contrast == "T1w" and (str(tags.get("ContrastBolusAgent") or "").strip() or AGENT.search(desc)):
        contrast, how = "T1c", how + "; contrast agent"
    return contrast, how


def read_series(folder: Path) -> tuple[list[Series], list[dict[str, str]]]:
    """Group the DICOM files under ``folder`` by series; list the files that are not DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    wanted = ["SeriesInstanceUID", "StudyInstanceUID", "PatientID", "StudyDate", "SeriesNumber", "SeriesDescription",
              "ProtocolName", "ImageType", "EchoTime", "RepetitionTime", "InversionTime", "ContrastBolusAgent",
              "Modality", "ImagePositionPatient"]  # fmt: skip
    series: dict[str, Series] = {}
    other: list[dict[str, str]] = []
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=wanted)
        except (InvalidDicomError, OSError, ValueError, AttributeError) as e:
            other.append({"path": str(f), "reason": f"not a DICOM file ({type(e).__name__})"})
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid:
            other.append({"path": str(f), "reason": "no SeriesInstanceUID"})
            continue
        s = series.setdefault(uid, Series(uid))
        s.files.append(f)
        if not s.tags:
            s.tags = {k: _plain(ds.get(k)) for k in wanted if k != "ImagePositionPatient"}
        s.positions.add(tuple(round(float(v), 2) for v in (ds.get("ImagePositionPatient") or ())))
    return list(series.values()), other


def _plain(v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        return [str(x) for x in v]
    return str(v)


def _label(value: Any, fallback: str) -> str:
    text = re.sub(r"[^A-Za-z0-9]", "", str(value or ""))
    return text or fallback


def convert_series(series: Series, out_stem: Path) -> Path:
    """dcm2niix on one series' files; returns the NIfTI written at ``out_stem.nii.gz`` (and its ``.json``)."""
    from dcm2niix import bin as dcm2niix_bin

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in", Path(tmp) / "out"
        src.mkdir()
        dst.mkdir()
        for i, f in enumerate(series.files):
            (src / f"{i:05d}.dcm").symlink_to(f.resolve())
        res = subprocess.run([str(dcm2niix_bin), "-z", "y", "-b", "y", "-ba", "y", "-f", "series", "-o", str(dst),
                              str(src)], capture_output=True, text=True, timeout=600)  # fmt: skip
        made = sorted(dst.glob("*.nii.gz"))
        if res.returncode != 0 or not made:
            last = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ManifestError(f"dcm2niix could not convert series {series.description!r}: {last[0][:200]}")
        nii = made[0]  # several outputs (echoes, parts): the first, as the table says
        out_stem.parent.mkdir(parents=True, exist_ok=True)
        side = nii.with_name(nii.name.removesuffix(".nii.gz") + ".json")
        if side.is_file():
            shutil.move(str(side), out_stem.with_name(out_stem.name + ".json"))
        shutil.move(str(nii), out_stem.with_name(out_stem.name + ".nii.gz"))  # last: its presence means done
        return out_stem.with_name(out_stem.name + ".nii.gz")


def dicom_to_bids(src: str | Path, out: str | Path, progress: bool = True) -> tuple[Path, pd.DataFrame]:
    """Convert a folder of DICOM files into a BIDS tree at ``out`` (see module docstring); returns the tree and
    the table of every series (``dicom_conversion.tsv``)."""
    from rich.progress import track

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise ConfigError(f"{src}: no such folder")
    series, other = read_series(src)
    if not series:
        raise ManifestError(f"{src}: no DICOM series found ({len(other)} other files)")
    sessions: dict[tuple[str, str], list[Series]] = defaultdict(list)
    for s in series:
        sessions[(str(s.tags.get("PatientID") or ""), str(s.tags.get("StudyInstanceUID") or ""))].append(s)
    subjects: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    todo = []
    for (patient, study), group in sessions.items():
        sub = subjects.setdefault(patient, _label(patient, f"{len(subjects) + 1:03d}"))
        dates = {str(s.tags.get("StudyDate") or "") for s in group}
        ses = _label(next(iter(dates)) if len(dates) == 1 else "", f"{stable_hash(study) % 10**6:06d}")
        taken: dict[str, Series] = {}
        for s in sorted(group, key=lambda s: int(float(s.tags.get("SeriesNumber") or 0))):
            n = len(s.positions) or len(s.files)
            contrast, how = identify(s.tags, n)
            row = {"subject": f"sub-{sub}", "session": f"ses-{ses}", "series_number": s.tags.get("SeriesNumber"),
                   "description": s.description, "files": len(s.files)}  # fmt: skip
            if contrast is not None and contrast in taken:
                kept = taken[contrast].tags.get("SeriesNumber")
                contrast, how = None, f"another {contrast} in this session (series {kept} kept)"
            if contrast is None:
                rows.append({**row, "contrast": "", "skipped": how})
                continue
            taken[contrast] = s
            suffix = "ce-gadolinium_T1w" if contrast == "T1c" else contrast
            stem = out / f"sub-{sub}" / f"ses-{ses}" / "anat" / f"sub-{sub}_ses-{ses}_{suffix}"
            todo.append((s, stem, {**row, "contrast": contrast, "identified_by": how}))
    for s, stem, row in track(todo, description="dicom", disable=not progress):
        done = stem.with_name(stem.name + ".nii.gz")
        try:  # a re-run (a killed conversion) converts only what is not there yet
            row["path"] = str((done if done.is_file() else convert_series(s, stem)).relative_to(out))
        except (ManifestError, subprocess.TimeoutExpired, OSError) as e:
            row.update(contrast="", skipped=str(e))
        rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "dataset_description.json").is_file():
        write_json(out / "dataset_description.json", {"Name": f"DICOM from {src.name}", "BIDSVersion": "1.9.0",
                                                      "GeneratedBy": [{"Name": "neurofm (dcm2niix)"}]})  # fmt: skip
    table = pd.DataFrame(rows + [{"description": "", "skipped": o["reason"], "files": 1, "path": o["path"]}
                                 for o in other])  # fmt: skip
    atomic_write_text(out / "dicom_conversion.tsv", table.to_csv(sep="\t", index=False, na_rep="n/a"))
    return out, table
