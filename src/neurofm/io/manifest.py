"""Discover scans into one table type, whatever the dataset layout.

Three layouts are understood:

* **BIDS** — ``sub-*/[ses-*/]anat/*_{T1w,T2w,FLAIR,PDw,...}.nii[.gz]``; a T1w with a
  ``ce-`` entity is ``T1c``. ``participants.tsv`` (and ``sub-*/sub-*_sessions.tsv``)
  columns become labels. ``derivatives/*/`` holds masks (``*_desc-brain_mask``,
  ``*_label-lesion_mask``), label maps (``*_dseg``) and a ``volumes.csv`` of regional
  volumes.
* **nnU-Net raw** — ``dataset.json`` (``channel_names``), ``imagesTr/CASE_000X``,
  ``labelsTr/CASE``, optionally ``imagesTs/``.
* **a CSV/TSV table** — columns ``subject``, ``path`` and optionally ``session``,
  ``contrast``, ``role`` (``image`` or ``label``); every other column is a label.

The result is a :class:`Manifest`: one row per file with ``subject, session, role, name,
path`` (``name`` is the contrast of an image or the name of a label map) plus label
columns, and an optional table of regional volumes per session.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from neurofm.errors import ManifestError
from neurofm.io.nifti import is_nifti

BASE_COLUMNS = ["subject", "session", "role", "name", "path"]
ROLES = ("image", "label")

#: Contrasts neurofm knows by name, in the order used to pick a session's reference grid.
CONTRASTS = ("T1w", "T1c", "T2w", "FLAIR", "PDw")

_ALIASES = {
    "t1": "T1w",
    "t1w": "T1w",
    "mprage": "T1w",
    "t1-weighted": "T1w",
    "t1c": "T1c",
    "t1ce": "T1c",
    "t1gd": "T1c",
    "t1-ce": "T1c",
    "t1post": "T1c",
    "ce-t1w": "T1c",
    "t2": "T2w",
    "t2w": "T2w",
    "flair": "FLAIR",
    "t2flair": "FLAIR",
    "t2-flair": "FLAIR",
    "pd": "PDw",
    "pdw": "PDw",
    "t2star": "T2starw",
    "t2starw": "T2starw",
    "swi": "SWI",
    "dwi": "DWI",
    "adc": "ADC",
}

#: BIDS anatomical suffixes taken as images; anything else under anat/ is ignored.
BIDS_IMAGE_SUFFIXES = {"T1w", "T2w", "FLAIR", "PDw", "T2starw", "inplaneT1", "inplaneT2", "angio"}
_MISSING = {"", "n/a", "na", "nan", "none", "null"}


def canonical_contrast(name: str) -> str:
    """Map common spellings to neurofm's names (``t1`` -> ``T1w``, ``t1ce`` -> ``T1c``).

    Unknown names pass through unchanged, so any contrast can be used by name.
    """
    key = str(name).strip()
    return _ALIASES.get(key.lower(), key)


def session_key(subject: str, session: str) -> str:
    """The store's identifier of one session: ``sub-01_ses-02`` (or ``sub-01``)."""
    key = f"{subject}_{session}" if session else str(subject)
    return re.sub(r"[^A-Za-z0-9._-]", "-", key)


@dataclass
class SessionSpec:
    """All files of one subject's session, ready to be prepared together."""

    subject: str
    session: str
    images: dict[str, str]  # contrast -> path
    label_maps: dict[str, str] = field(default_factory=dict)  # label name -> path
    labels: dict[str, object] = field(default_factory=dict)  # participant/session labels
    volumes: dict[str, float] | None = None  # regional volumes (mm^3)

    @property
    def key(self) -> str:
        return session_key(self.subject, self.session)


@dataclass
class Manifest:
    """A table of scans: one row per file (see module docstring for the columns)."""

    table: pd.DataFrame
    source: str = "table"
    root: str = ""
    volumes: pd.DataFrame | None = None  # index (subject, session); one column per region
    ignored: list[str] = field(default_factory=list)  # files seen and deliberately skipped

    def __post_init__(self) -> None:
        for col in BASE_COLUMNS:
            if col not in self.table.columns:
                raise ManifestError(f"manifest is missing the column {col!r}")
        self.table = self.table.reset_index(drop=True)
        self.table["session"] = self.table["session"].fillna("").astype(str)
        self.table["subject"] = self.table["subject"].astype(str)

    def __len__(self) -> int:
        return len(self.table)

    @property
    def label_columns(self) -> list[str]:
        return [c for c in self.table.columns if c not in BASE_COLUMNS]

    @property
    def images(self) -> pd.DataFrame:
        return self.table[self.table["role"] == "image"]

    def validate(self, check_files: bool = True) -> Manifest:
        """Raise :class:`ManifestError` for bad roles, duplicates or missing files."""
        t = self.table
        if t.empty:
            raise ManifestError(f"no scans found in {self.root or 'the manifest'}")
        bad_roles = sorted(set(t["role"]) - set(ROLES))
        if bad_roles:
            raise ManifestError(f"unknown role(s) {bad_roles}; use one of {list(ROLES)}")
        if (t["subject"].str.strip() == "").any():
            raise ManifestError("some rows have an empty subject")
        dup = t[t.duplicated(["subject", "session", "role", "name"], keep=False)]
        if not dup.empty:
            groups = dup.groupby(["subject", "session", "role", "name"])["path"].apply(list)
            lines = [f"  {s}/{ses or '-'} {r} {n}: {', '.join(p)}" for (s, ses, r, n), p in groups.items()]
            raise ManifestError(
                "duplicate scans (same subject, session and contrast):\n"
                + "\n".join(lines[:10])
                + (f"\n  ... and {len(lines) - 10} more" if len(lines) > 10 else "")
                + "\nkeep one per session, or for BIDS runs pass duplicates='first' (--duplicates first)"
            )
        if check_files:
            missing = [p for p in t["path"] if not Path(p).is_file()]
            if missing:
                raise ManifestError(
                    f"{len(missing)} file(s) listed but not found, e.g.:\n  " + "\n  ".join(missing[:10])
                )
        return self

    def sessions(self) -> list[SessionSpec]:
        """Group rows into sessions (sorted by key). Sessions without an image are dropped."""
        out = []
        labels = self.label_columns
        for (subject, session), rows in self.table.groupby(["subject", "session"], sort=True):
            imgs = rows[rows["role"] == "image"]
            if imgs.empty:
                continue
            maps = rows[rows["role"] == "label"]
            lab = {}
            for c in labels:
                vals = rows[c].dropna()
                if len(vals):
                    lab[c] = _plain(vals.iloc[0])
            vol = None
            if self.volumes is not None:
                for key in ((subject, session), (subject, "")):
                    if key in self.volumes.index:
                        vol = {str(k): float(v) for k, v in self.volumes.loc[key].items()}
                        break
            out.append(
                SessionSpec(
                    subject=str(subject),
                    session=str(session),
                    images=dict(zip(imgs["name"], imgs["path"], strict=True)),
                    label_maps=dict(zip(maps["name"], maps["path"], strict=True)),
                    labels=lab,
                    volumes=vol,
                )
            )
        return out

    def summary(self) -> str:
        t = self.table
        imgs = self.images
        counts = imgs["name"].value_counts().to_dict()
        n_ses = t.groupby(["subject", "session"]).ngroups
        return (
            f"{self.source} dataset: {t['subject'].nunique()} subjects, {n_ses} sessions, "
            f"{len(imgs)} images ({', '.join(f'{k} {v}' for k, v in counts.items())}), "
            f"{int((t['role'] == 'label').sum())} label maps"
            + (f", labels: {', '.join(self.label_columns)}" if self.label_columns else "")
        )


def _plain(v: object) -> object:
    if isinstance(v, np.generic):
        return v.item()
    return v


def _strip_nii(name: str) -> str:
    return re.sub(r"\.nii(\.gz)?$", "", name, flags=re.IGNORECASE)


def parse_bids_name(name: str) -> tuple[dict[str, str], str]:
    """``sub-01_ses-1_ce-gd_T1w.nii.gz`` -> ({'sub': '01', 'ses': '1', 'ce': 'gd'}, 'T1w')."""
    parts = _strip_nii(name).split("_")
    entities = {}
    for p in parts[:-1]:
        if "-" in p:
            k, v = p.split("-", 1)
            entities[k] = v
    return entities, parts[-1]


def contrast_from_filename(name: str) -> str:
    """A scan's contrast from its BIDS-style file name: the suffix in neurofm's spelling, a T1w with a ``ce-``
    entity being T1c (``sub-01_ce-gd_T1w.nii.gz`` -> ``T1c``, ``x_flair.nii.gz`` -> ``FLAIR``)."""
    ent, suffix = parse_bids_name(name)
    return "T1c" if suffix == "T1w" and "ce" in ent else canonical_contrast(suffix)


def _read_tsv(path: Path) -> pd.DataFrame:
    sep = "," if path.suffix.lower() == ".csv" else "\t"
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except Exception as e:
        raise ManifestError(f"{path}: cannot read table ({e})") from None
    df.columns = [c.strip() for c in df.columns]
    return df.apply(lambda col: col.map(_coerce))


def _coerce(v: object) -> object:
    """Table cells arrive as text; give numbers back as numbers and 'n/a' as NaN."""
    if not isinstance(v, str):
        return v
    s = v.strip()
    if s.lower() in _MISSING:
        return np.nan
    try:
        f = float(s)
    except ValueError:
        return s
    return int(f) if f.is_integer() and re.fullmatch(r"[+-]?\d+", s) else f


def _labels_table(df: pd.DataFrame, key_cols: Iterable[str]) -> pd.DataFrame:
    return df[[c for c in df.columns if c not in set(BASE_COLUMNS) | set(key_cols)]]


def _neurofm_predictions(folder: Path) -> bool:
    """A derivative dataset that ``neurofm predict`` wrote (model predictions, not labels)."""
    desc = folder / "dataset_description.json"
    try:
        gen = json.loads(desc.read_text()).get("GeneratedBy") or []
    except (OSError, ValueError):
        return False
    return any(isinstance(g, dict) and g.get("Name") == "neurofm" for g in gen)


def discover_bids(root: str | Path, duplicates: str = "error", predictions: bool = False) -> Manifest:
    """Discover a BIDS dataset (see module docstring).

    Derivative datasets written by ``neurofm predict`` hold a model's predictions, not labels: they
    are left out (listed as ignored) unless ``predictions`` is set."""
    root = Path(root)
    rows, ignored = [], []
    subjects = sorted(p for p in root.glob("sub-*") if p.is_dir())
    if not subjects:
        raise ManifestError(f"{root}: no sub-* folders; not a BIDS dataset")
    for sub_dir in subjects:
        for anat in sorted([*sub_dir.glob("anat"), *sub_dir.glob("ses-*/anat")]):
            for f in sorted(anat.iterdir()):
                if not is_nifti(f):
                    continue
                ent, suffix = parse_bids_name(f.name)
                if suffix not in BIDS_IMAGE_SUFFIXES or "sub" not in ent:
                    ignored.append(str(f))
                    continue
                name = "T1c" if suffix == "T1w" and "ce" in ent else suffix
                rows.append(_bids_row(ent, "image", name, f))
    deriv = root / "derivatives"
    volume_tables = []
    if deriv.is_dir():
        skip = [d for d in deriv.iterdir() if d.is_dir() and not predictions and _neurofm_predictions(d)]
        for f in sorted(deriv.rglob("*")):
            if any(f.is_relative_to(d) for d in skip):
                if f.is_file() and is_nifti(f):
                    ignored.append(str(f))
                continue
            if f.is_file() and is_nifti(f) and f.name.startswith("sub-"):
                ent, suffix = parse_bids_name(f.name)
                if suffix == "mask":
                    name = ent.get("label") or ent.get("desc") or "mask"
                elif suffix == "dseg":
                    name = "dseg" if "desc" not in ent else f"dseg-{ent['desc']}"
                else:
                    ignored.append(str(f))
                    continue
                rows.append(_bids_row(ent, "label", name, f))
            elif f.is_file() and f.name.lower() in ("volumes.csv", "volumes.tsv"):
                volume_tables.append(_read_volumes(f))
    if not rows:
        raise ManifestError(f"{root}: no anatomical NIfTI files under sub-*/[ses-*/]anat/")
    table = pd.DataFrame(rows, columns=BASE_COLUMNS)
    if duplicates == "first":
        table = table.sort_values("path").drop_duplicates(["subject", "session", "role", "name"])
    elif duplicates != "error":
        raise ManifestError(f"duplicates should be 'error' or 'first', got {duplicates!r}")
    table = _join_bids_labels(root, table)
    volumes = pd.concat(volume_tables) if volume_tables else None
    if volumes is not None:
        volumes = volumes[~volumes.index.duplicated(keep="first")]
    return Manifest(table, source="bids", root=str(root), volumes=volumes, ignored=ignored).validate()


def _bids_row(ent: dict[str, str], role: str, name: str, path: Path) -> dict[str, str]:
    ses = ent.get("ses", "")
    return {
        "subject": f"sub-{ent['sub']}",
        "session": f"ses-{ses}" if ses else "",
        "role": role,
        "name": name,
        "path": str(path.resolve()),
    }


def _join_bids_labels(root: Path, table: pd.DataFrame) -> pd.DataFrame:
    part = root / "participants.tsv"
    if part.is_file():
        p = _read_tsv(part)
        if "participant_id" not in p.columns:
            raise ManifestError(f"{part}: no participant_id column")
        p = p.rename(columns={"participant_id": "subject"})
        p["subject"] = p["subject"].astype(str)
        p = p[["subject", *_labels_table(p, ["subject"]).columns]]
        table = table.merge(p, on="subject", how="left")
    ses_tables = []
    for f in sorted(root.glob("sub-*/sub-*_sessions.tsv")):
        s = _read_tsv(f)
        if "session_id" not in s.columns:
            continue
        s = s.rename(columns={"session_id": "session"})
        s["subject"] = f.parent.name
        ses_tables.append(s)
    if ses_tables:
        s = pd.concat(ses_tables, ignore_index=True)
        s["session"] = s["session"].astype(str)
        clash = [c for c in s.columns if c in table.columns and c not in ("subject", "session")]
        # Session-level values (e.g. age at the scan) override participant-level ones.
        table = table.merge(s, on=["subject", "session"], how="left", suffixes=("", "__ses"))
        for c in clash:
            table[c] = table[f"{c}__ses"].combine_first(table[c])
            table = table.drop(columns=f"{c}__ses")
    return table


def _read_volumes(path: Path) -> pd.DataFrame:
    """A regional-volume table (SynthSeg / FastSurfer style) indexed by (subject, session).

    The subject column may hold a BIDS id or a file name that contains ``sub-XX[_ses-YY]``.
    """
    df = _read_tsv(path)
    id_col = next((c for c in ("subject", "participant_id", "subject_id", "id") if c in df.columns), None)
    if id_col is None:
        raise ManifestError(f"{path}: no subject column (subject or participant_id)")
    ses_col = next((c for c in ("session", "session_id") if c in df.columns), None)
    subj, sess = [], []
    for i, v in enumerate(df[id_col].astype(str)):
        m = re.search(r"(sub-[A-Za-z0-9]+)", v)
        subj.append(m.group(1) if m else v)
        s = str(df[ses_col].iloc[i]) if ses_col else ""
        if not s or s == "nan":
            m2 = re.search(r"(ses-[A-Za-z0-9]+)", v)
            s = m2.group(1) if m2 else ""
        sess.append(s)
    values = df.drop(columns=[c for c in (id_col, ses_col) if c])
    values = values.apply(pd.to_numeric, errors="coerce").dropna(axis=1, how="all")
    values.index = pd.MultiIndex.from_arrays([subj, sess], names=["subject", "session"])
    return values.astype(float)


def discover_nnunet(root: str | Path) -> Manifest:
    """Discover an nnU-Net raw dataset (``dataset.json``, ``imagesTr``, ``labelsTr``)."""
    root = Path(root)
    meta_path = root / "dataset.json"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{root}: no dataset.json; not an nnU-Net raw dataset") from None
    except json.JSONDecodeError as e:
        raise ManifestError(f"{meta_path}: invalid JSON ({e})") from None
    channels = meta.get("channel_names") or meta.get("modality")
    if not isinstance(channels, dict) or not channels:
        raise ManifestError(f"{meta_path}: no channel_names")
    ending = meta.get("file_ending", ".nii.gz")
    names = {int(k): canonical_contrast(v) for k, v in channels.items()}
    rows, ignored = [], []
    pat = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})" + re.escape(ending) + "$")
    for folder in ("imagesTr", "imagesTs"):
        d = root / folder
        if not d.is_dir():
            continue
        for f in sorted(d.iterdir()):
            m = pat.match(f.name)
            if not m:
                ignored.append(str(f))
                continue
            ch = int(m.group("ch"))
            if ch not in names:
                raise ManifestError(f"{f}: channel {ch:04d} is not in dataset.json channel_names {channels}")
            rows.append(
                {
                    "subject": m.group("case"),
                    "session": "",
                    "role": "image",
                    "name": names[ch],
                    "path": str(f.resolve()),
                    "split": "train" if folder == "imagesTr" else "test",
                }
            )
    labels_dir = root / "labelsTr"
    if labels_dir.is_dir():
        for f in sorted(labels_dir.iterdir()):
            if f.name.endswith(ending):
                case = f.name[: -len(ending)]
                rows.append(
                    {
                        "subject": case,
                        "session": "",
                        "role": "label",
                        "name": "seg",
                        "path": str(f.resolve()),
                        "split": "train",
                    }
                )
    if not rows:
        raise ManifestError(f"{root}: no images in imagesTr/ or imagesTs/ ending in {ending}")
    table = pd.DataFrame(rows)
    return Manifest(table, source="nnunet", root=str(root), ignored=ignored).validate()


def read_manifest_table(path: str | Path) -> Manifest:
    """Read a CSV/TSV manifest. Relative paths are taken relative to the table's folder."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: no such manifest file")
    df = _read_tsv(path)
    rename = {"contrast": "name", "modality": "name", "participant_id": "subject", "session_id": "session"}
    df = df.rename(columns={k: v for k, v in rename.items() if k in df.columns and v not in df.columns})
    for col in ("subject", "path"):
        if col not in df.columns:
            raise ManifestError(f"{path}: needs a {col!r} column (found {list(df.columns)})")
    df["session"] = df["session"].fillna("").astype(str) if "session" in df.columns else ""
    df["role"] = df["role"].fillna("image").astype(str) if "role" in df.columns else "image"
    if "name" not in df.columns:
        df["name"] = "T1w"
    df["name"] = [
        canonical_contrast(n) if r == "image" else str(n) for n, r in zip(df["name"], df["role"], strict=True)
    ]
    df["subject"] = df["subject"].astype(str)
    df["path"] = [str((path.parent / str(p)).resolve()) for p in df["path"]]
    cols = BASE_COLUMNS + [c for c in df.columns if c not in BASE_COLUMNS]
    return Manifest(df[cols], source="table", root=str(path)).validate()


def discover(src: str | Path, duplicates: str = "error") -> Manifest:
    """Detect the layout of ``src`` (BIDS folder, nnU-Net raw folder, or CSV/TSV table)."""
    src = Path(src)
    if src.is_file():
        if src.suffix.lower() in (".csv", ".tsv"):
            return read_manifest_table(src)
        raise ManifestError(f"{src}: expected a folder (BIDS or nnU-Net raw) or a .csv/.tsv manifest")
    if not src.is_dir():
        raise ManifestError(f"{src}: no such file or folder")
    if (src / "dataset.json").is_file() and (src / "imagesTr").is_dir():
        return discover_nnunet(src)
    if any(src.glob("sub-*")):
        return discover_bids(src, duplicates=duplicates)
    raise ManifestError(
        f"{src}: not a dataset neurofm recognises; expected BIDS (sub-*/[ses-*/]anat/*.nii.gz), "
        "nnU-Net raw (dataset.json + imagesTr/), or a CSV/TSV manifest"
    )
