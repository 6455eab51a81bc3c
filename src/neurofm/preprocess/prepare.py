"""``neurofm prepare``: turn a dataset into a store, once, deterministically.

Per session (all contrasts of one subject's visit together):

1. read every scan (a bad one is recorded in the failures table and skipped); with
   ``--bias-correction n4`` remove each scan's bias field (``neurofm.preprocess.bias``);
2. reorient the reference scan (first of T1w, T1c, T2w, FLAIR, PDw present) to RAS and
   define the session grid: axis-aligned, ``spacing`` mm, covering its field of view;
3. resample every contrast onto that grid by world coordinates (linear, anti-aliased
   when downsampling; label maps nearest). Contrasts acquired on other grids — another
   resolution, orientation or field of view — are thus brought onto one grid rather
   than refused; a scan that barely overlaps the reference is refused;
4. a session without a brain mask gets one by brain extraction (``--brain-extraction``,
   ``neurofm.preprocess.brain``: deepbet on a T1w/T1c, else neurofm's extractor), on the chosen
   scan's own grid, brought to the session grid; its source and the intracranial volume are recorded;
   crop to a foreground box shared by all contrasts (the brain mask, else the union of each
   contrast's head foreground), plus a margin;
5. z-score each contrast within the foreground; optionally zero outside a brain mask;
6. regional volumes for ssl3d: the dataset's ``volumes.csv`` row, else counted from its
   ``dseg`` label map, else neurofm's own tissue segmentation inside the brain mask
   (``neurofm.preprocess.tissue``);
7. write the arrays, then the session record (geometry of the store grid, and each
   scan's original affine and shape, so predictions can go back to native space).

Sessions are spread over worker processes and over shards (``--shard i/n`` takes the
sessions whose key hashes to i), a re-run skips sessions already prepared from the same
files, and one bad file never stops the run.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from neurofm.errors import ConfigError, ScanError
from neurofm.faults import DiskFullError, FolderLock, disk_guard, free_bytes, human, is_disk_full
from neurofm.io.dicom import dicom_to_bids, looks_like_dicom_folder
from neurofm.io.manifest import CONTRASTS, Manifest, SessionSpec, discover, session_key
from neurofm.io.nifti import Scan, load_scan
from neurofm.preprocess import transforms
from neurofm.preprocess.bias import BIAS_METHODS, correct_bias
from neurofm.preprocess.brain import brain_mask, check_available, check_method
from neurofm.preprocess.tissue import choose_contrast, tissue_volumes
from neurofm.store import Store, file_crc32, write_array
from neurofm.utils import stable_hash, write_json

MIN_OVERLAP = 0.5  # fraction of a scan's signal that must land on the session grid


@dataclass
class PrepareConfig:
    """Preprocessing settings; saved in the store and in every checkpoint that uses it.

    Attributes:
        spacing: target voxel size in mm (one number, or three).
        margin: background voxels kept around the foreground box.
        normalize: ``"zscore"`` (within the foreground) or ``"none"``.
        mask_images: set voxels outside the brain mask to 0 (only when a ``brain``
            mask is part of the dataset, or ``skull_stripped``).
        skull_stripped: the scans are brain-extracted; a session without a ``brain``
            mask gets one from its reference scan's non-zero voxels (recorded as derived),
            which then serves the crop, the z-score and the tissue volumes.
        orientation: always ``"RAS"``; recorded so that consumers can check.
        brain_extraction: how a session without a ``brain`` mask gets one: ``auto`` (deepbet on a T1w
            or T1c, else neurofm's extractor), ``deepbet``, ``neurofm`` or ``none`` (the crop and the
            z-score then take the head's foreground). A scan whose field of view is shorter than
            ``MIN_HEAD_MM`` on some axis (a patch, not a head) is left as it is. The mask's source and
            the intracranial volume are recorded; ``predict`` applies the same to raw heads
            (``neurofm.preprocess.brain``).
        bias_correction: ``n4`` (SimpleITK's N4 on every scan before resampling) or ``none``.
    """

    spacing: float | tuple[float, float, float] = 1.0
    margin: int = 4
    normalize: str = "zscore"
    mask_images: bool = False
    orientation: str = "RAS"
    skull_stripped: bool = False
    brain_extraction: str = "auto"
    bias_correction: str = "none"

    def __post_init__(self) -> None:
        sp = np.atleast_1d(np.asarray(self.spacing, dtype=float))
        if sp.size not in (1, 3) or np.any(~np.isfinite(sp)) or np.any(sp <= 0) or np.any(sp > 20):
            raise ConfigError(f"spacing should be 1 or 3 positive numbers of mm (<= 20), got {self.spacing!r}")
        self.spacing = float(sp[0]) if sp.size == 1 else tuple(float(s) for s in sp)  # type: ignore[assignment]
        if self.normalize not in ("zscore", "none"):
            raise ConfigError(f"normalize should be 'zscore' or 'none', got {self.normalize!r}")
        if not 0 <= int(self.margin) <= 64:
            raise ConfigError(f"margin should be in [0, 64] voxels, got {self.margin!r}")
        check_method(self.brain_extraction)
        if self.bias_correction not in BIAS_METHODS:
            allowed = ", ".join(BIAS_METHODS)
            raise ConfigError(f"bias_correction should be one of {allowed}, got {self.bias_correction!r}")
        if self.orientation != "RAS":
            raise ConfigError(f"orientation should be 'RAS', got {self.orientation!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spacing"] = list(d["spacing"]) if isinstance(d["spacing"], tuple) else d["spacing"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrepareConfig:
        d = dict(d)
        if isinstance(d.get("spacing"), list):
            d["spacing"] = tuple(d["spacing"])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class PreparedSession:
    """A session on its store grid, in memory. Arrays are ``(X, Y, Z)``."""

    images: dict[str, np.ndarray]
    label_maps: dict[str, np.ndarray]
    affine: np.ndarray
    grid: dict[str, Any]
    image_meta: dict[str, dict[str, Any]]
    label_meta: dict[str, dict[str, Any]]
    reference: str
    failures: list[dict[str, str]] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        return next(iter(self.images.values())).shape  # type: ignore[return-value]


def contrast_order(names: Iterable[str]) -> list[str]:
    """Known contrasts first in :data:`CONTRASTS` order, then the rest alphabetically."""
    names = list(names)
    known = [c for c in CONTRASTS if c in names]
    return known + sorted(n for n in names if n not in known)


def _native_meta(scan: Scan) -> dict[str, Any]:
    return {
        "source": scan.path,
        "native_affine": scan.affine.tolist(),
        "native_shape": list(scan.shape),
        "native_spacing": [round(s, 6) for s in scan.spacing],
        "native_orientation": scan.orientation,
    }


#: a field of view shorter than this (mm) on some axis is no whole head: it is not brain-extracted
MIN_HEAD_MM = 80.0


def _head_sized(scan: Scan) -> bool:
    return min(n * s for n, s in zip(scan.shape, scan.spacing, strict=True)) >= MIN_HEAD_MM


def _to_grid(scan: Scan, grid: transforms.Grid, order: int) -> np.ndarray:
    """Sample a scan on the session grid. Reorientation is part of the same mapping (a flip
    is exact at integer positions), so no reoriented copy is made."""
    return transforms.resample(scan.data[0], scan.affine, grid, order=order)


def preprocess_scans(
    images: dict[str, Scan],
    label_maps: dict[str, Scan] | None = None,
    cfg: PrepareConfig | None = None,
) -> PreparedSession:
    """Preprocess one session's loaded scans (see module docstring).

    Args:
        images: contrast name -> scan.
        label_maps: label name -> integer label map (masks, segmentations).
        cfg: settings; defaults to :class:`PrepareConfig()`.

    Raises:
        ScanError: when no image of the session is usable.
    """
    cfg = cfg or PrepareConfig()
    label_maps = label_maps or {}
    failures: list[dict[str, str]] = []
    order = contrast_order(images)
    if not order:
        raise ScanError("", "session has no images")
    ref_name = order[0]
    ref = images[ref_name]
    grid = transforms.target_grid(ref.shape, ref.affine, cfg.spacing)  # RAS-aligned whatever the scan's orientation

    resampled: dict[str, np.ndarray] = {}
    meta: dict[str, dict[str, Any]] = {}
    for name in order:
        scan = images[name]
        try:
            if cfg.bias_correction != "none":
                scan = images[name] = correct_bias(scan, cfg.bias_correction)
            arr = _to_grid(scan, grid, order=1)
            src_mass = float(np.abs(scan.data).sum() * np.prod(scan.spacing))
            out_mass = float(np.abs(arr).sum() * np.prod(np.sqrt((grid[1][:3, :3] ** 2).sum(0))))
            if name != ref_name and out_mass < MIN_OVERLAP * src_mass:
                raise ScanError(
                    scan.path,
                    f"lies outside the {ref_name} scan's field of view "
                    f"({100 * out_mass / max(src_mass, 1e-12):.0f}% overlap)",
                )
        except ScanError as e:
            failures.append({"name": name, "path": e.path or scan.path, "reason": e.reason})
            continue
        resampled[name] = arr
        other_grid = not transforms.same_grid((scan.shape, scan.affine), (ref.shape, ref.affine))
        meta[name] = {**_native_meta(scan), "resampled_to_reference": other_grid}
        if cfg.bias_correction != "none":
            meta[name]["bias_correction"] = cfg.bias_correction

    labels_rs: dict[str, np.ndarray] = {}
    lmeta: dict[str, dict[str, Any]] = {}
    for name, scan in label_maps.items():
        arr = _to_grid(scan, grid, order=0)
        if not arr.any() and scan.data.any():
            failures.append({"name": name, "path": scan.path, "reason": f"lies outside the {ref_name} scan's grid"})
            continue
        labels_rs[name] = arr
        lmeta[name] = _native_meta(scan)

    brain = labels_rs.get("brain")
    if cfg.skull_stripped and (brain is None or not brain.any()) and ref_name in resampled:
        brain = transforms.nonzero_mask(resampled[ref_name]).astype(np.uint8)
        if brain.mean() > 0.9:
            failures.append(
                {"name": "brain", "path": ref.path, "reason": "--skull-stripped, but the scan has no zero background"}
            )
            brain = None
        else:
            labels_rs["brain"] = brain
            lmeta["brain"] = {"source": f"derived: non-zero voxels of the skull-stripped {ref_name}"}
    usable = {n: images[n] for n in order if n in resampled}
    if (brain is None or not brain.any()) and cfg.brain_extraction != "none" and usable and _head_sized(ref):
        try:
            found = brain_mask(usable, cfg.brain_extraction)
            on_grid = _to_grid(Scan(found.mask[None].astype(np.float32), found.scan.affine), grid, order=1) > 0.5
            brain = on_grid.astype(np.uint8)
            labels_rs["brain"] = brain
            lmeta["brain"] = {"source": f"extracted: {found.source}", "icv_ml": round(found.icv_ml, 1)}
        except ScanError as e:  # the session goes on without a mask (head foreground), the reason listed
            failures.append({"name": "brain", "path": e.path, "reason": e.reason})
    if brain is not None and brain.any():
        fg = brain > 0
    else:
        fg = np.zeros(grid[0], dtype=bool)
        for arr in resampled.values():
            fg |= transforms.foreground_mask(arr)
    box = transforms.bounding_box(fg, margin=int(cfg.margin))
    fg_crop = fg[box]
    out_images: dict[str, np.ndarray] = {}
    for name, arr in resampled.items():
        crop = arr[box]
        if cfg.normalize == "zscore":
            try:
                crop, mean, std = transforms.zscore(crop, fg_crop)
            except ValueError as e:
                failures.append({"name": name, "path": meta[name]["source"], "reason": str(e)})
                continue
            meta[name].update(mean=mean, std=std)
        if cfg.mask_images and brain is not None:
            crop = np.where(fg_crop, crop, 0).astype(np.float32)
        out_images[name] = np.ascontiguousarray(crop, dtype=np.float32)
    if not out_images:
        raise ScanError(ref.path, "no usable image in this session")
    out_labels = {}
    for name, arr in labels_rs.items():
        crop = arr[box]
        top = float(crop.max()) if crop.size else 0.0
        dtype = np.uint8 if top < 256 else np.uint16 if top < 65536 else np.int32
        out_labels[name] = np.ascontiguousarray(crop.astype(dtype))
        lmeta[name]["values"] = [int(v) for v in np.unique(out_labels[name])[:256]]
    return PreparedSession(
        images=out_images,
        label_maps=out_labels,
        affine=transforms.crop_affine(grid[1], box),
        grid={"shape": list(grid[0]), "affine": grid[1].tolist(), "crop": [[s.start, s.stop] for s in box]},
        image_meta={k: meta[k] for k in out_images},
        label_meta=lmeta,
        reference=ref_name,
        failures=failures,
    )


def label_volumes(label_map: np.ndarray, affine: np.ndarray) -> dict[str, float]:
    """Volume in mm^3 of every non-zero label of a label map (regional volumes)."""
    voxel = float(abs(np.linalg.det(affine[:3, :3])))
    counts = np.bincount(label_map.astype(np.int64).ravel())
    return {str(i): float(c) * voxel for i, c in enumerate(counts) if i > 0 and c > 0}


def _fingerprint(spec: SessionSpec) -> dict[str, list[int]]:
    fp = {}
    for p in [*spec.images.values(), *spec.label_maps.values()]:
        try:
            st = os.stat(p)
            fp[p] = [st.st_size, st.st_mtime_ns]
        except OSError:
            fp[p] = [-1, -1]
    return fp


def prepare_session(spec: SessionSpec, store_root: str, cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """Prepare one session into the store (runs in a worker process). Never raises for bad data."""
    cfg = PrepareConfig.from_dict(cfg_dict)
    root = Path(store_root)
    key = spec.key
    failures: list[dict[str, str]] = []
    record = None
    try:
        images, maps = {}, {}
        for name, path in spec.images.items():
            try:
                images[name] = load_scan(path)
            except ScanError as e:
                failures.append({"name": name, "path": e.path, "reason": e.reason})
        for name, path in spec.label_maps.items():
            try:
                maps[name] = load_scan(path, kind="label")
            except ScanError as e:
                failures.append({"name": name, "path": e.path, "reason": e.reason})
        if images:
            prepared = preprocess_scans(images, maps, cfg)
            failures.extend(prepared.failures)
            record = _write_session(root, spec, prepared, maps)
    except ScanError as e:
        failures.append({"name": "*", "path": e.path, "reason": e.reason})
    except Exception as e:  # a bug or a file nobody anticipated must not stop the run
        if is_disk_full(e, root):  # ... but a full disk is no fault of the scan: it stops the run
            raise
        tb = traceback.extract_tb(e.__traceback__)[-1]
        failures.append(
            {
                "name": "*",
                "path": next(iter(spec.images.values()), ""),
                "reason": f"unexpected {type(e).__name__}: {e} (at {Path(tb.filename).name}:{tb.lineno})",
            }
        )
    fail_path = root / "failures" / f"{key}.json"
    if failures:
        rows = [{"subject": spec.subject, "session": spec.session, **f} for f in failures]
        write_json(fail_path, rows)
    else:
        fail_path.unlink(missing_ok=True)
    if record is not None:
        write_json(root / "records" / f"{key}.json", record)
    return {"key": key, "ok": record is not None, "failures": len(failures)}


def _write_session(root: Path, spec: SessionSpec, p: PreparedSession, maps: dict[str, Scan]) -> dict[str, Any]:
    key = spec.key
    images = {}
    for name, arr in p.images.items():
        rel = f"arrays/{key}/{name}.b2nd"
        write_array(root / rel, arr)
        images[name] = {"array": rel, "crc32": file_crc32(root / rel), **p.image_meta[name]}
    label_entries = {}
    for name, arr in p.label_maps.items():
        rel = f"arrays/{key}/label-{name}.b2nd"
        write_array(root / rel, arr)
        label_entries[name] = {"array": rel, "crc32": file_crc32(root / rel), **p.label_meta[name]}
    volumes = spec.volumes
    volume_source = "table" if volumes is not None else None
    if volumes is None and "dseg" in maps:
        volumes = label_volumes(maps["dseg"].data[0], maps["dseg"].affine)
        volume_source = "dseg"
    contrast = choose_contrast(list(p.images))
    if volumes is None and "brain" in p.label_maps and contrast is not None:
        volumes = tissue_volumes(p.images[contrast], p.label_maps["brain"] > 0, p.affine, contrast)
        volume_source = f"tissue:{contrast}" if volumes else None
    return {
        "key": key,
        "subject": spec.subject,
        "session": spec.session,
        "labels": spec.labels,
        "volumes": volumes,
        "volume_source": volume_source,
        "shape": list(p.shape),
        "spacing": [float(s) for s in np.sqrt((p.affine[:3, :3] ** 2).sum(0))],
        "affine": p.affine.tolist(),
        "grid": p.grid,
        "reference": p.reference,
        "images": images,
        "label_maps": label_entries,
        "fingerprint": _fingerprint(spec),
    }


@dataclass
class PrepareReport:
    """What one ``prepare`` run did."""

    store: Path
    total: int  # sessions in this shard
    prepared: int
    skipped: int  # already prepared from the same files
    failed_sessions: int  # sessions with no usable image
    failures: pd.DataFrame  # every failed scan of this shard
    seconds: float
    notes: list[str] = field(default_factory=list)  # e.g. what a DICOM conversion kept and skipped

    @property
    def ok(self) -> bool:
        return self.failures.empty

    def summary(self) -> str:
        return (
            f"{self.prepared} sessions prepared, {self.skipped} already done, "
            f"{self.failed_sessions} failed entirely, {len(self.failures)} scans failed "
            f"({self.seconds:.1f} s) -> {self.store}"
        ) + "".join(f"\n{n}" for n in self.notes)


def parse_shard(text: str | tuple[int, int] | None) -> tuple[int, int]:
    """``"2/8"`` -> (2, 8): this process takes the sessions whose key hashes to 2 mod 8."""
    if text is None:
        return 0, 1
    if isinstance(text, tuple):
        i, n = text
    else:
        try:
            i, n = (int(x) for x in str(text).split("/"))
        except ValueError:
            raise ConfigError(f"shard should look like i/n (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"shard i/n needs 0 <= i < n, got {i}/{n}")
    return i, n


def prepare(
    src: str | Path | Manifest,
    out: str | Path,
    cfg: PrepareConfig | None = None,
    *,
    workers: int = 1,
    shard: str | tuple[int, int] | None = None,
    progress: bool = True,
    duplicates: str = "error",
    space_check: bool = True,
) -> PrepareReport:
    """Prepare a dataset (BIDS folder, nnU-Net raw folder, CSV/TSV, or a Manifest) into a store.

    Before any work the free space of the output's device is checked against an estimate
    (``space_check``); a second ``prepare`` of the same shard into the same store is refused while
    this one runs (a lock naming it); a full disk ends the run with one line, finished sessions kept."""
    t0 = time.time()
    cfg = cfg or PrepareConfig()
    check_available(cfg.brain_extraction)
    notes = []
    if not isinstance(src, Manifest) and looks_like_dicom_folder(Path(src)):  # DICOM: a BIDS tree beside the store
        bids = Path(out).parent / f"{Path(out).name}-bids"
        src, series = dicom_to_bids(src, bids, progress=progress)
        skipped = int(series["skipped"].notna().sum()) if "skipped" in series else 0
        kept = len(series) - skipped
        notes.append(f"DICOM: {kept} series -> {bids}, {skipped} skipped (see {bids / 'dicom_conversion.tsv'})")
    manifest = src if isinstance(src, Manifest) else discover(src, duplicates=duplicates)
    store = Store.create(out, cfg.to_dict())
    i, n = parse_shard(shard)
    specs = [s for s in manifest.sessions() if stable_hash(s.key) % n == i]
    todo, skipped = [], 0
    for s in specs:
        rec = store.record_path(s.key)
        if rec.is_file():
            try:
                done = store.record(s.key).get("fingerprint") == _fingerprint(s)
            except Exception:
                done = False
            if done:
                skipped += 1
                continue
        todo.append(s)
    if workers < 1:
        raise ConfigError(f"workers should be >= 1, got {workers}")
    if space_check and todo:
        need, free = estimate_bytes(todo, cfg), free_bytes(store.root)
        if free < need:
            raise DiskFullError(
                f"{store.root}: preparing {len(todo)} sessions needs about {human(need)} (estimated from the scans' "
                f"headers at {cfg.spacing} mm), {human(free)} free there; free space, choose another output "
                "folder, or skip this check with --no-space-check"
            )
    lock = FolderLock(store.root / "locks" / f"prepare-shard-{i}-of-{n}.lock", f"prepare shard {i}/{n}")
    with lock, disk_guard(store.root, f"writing the store (shard {i}/{n})", _AGAIN):
        results = list(_run(todo, str(store.root), cfg.to_dict(), workers, progress))
    with disk_guard(store.root, "writing the store's manifest", _AGAIN):
        _, all_failures = store.rebuild_index()
    keys = {s.key for s in specs}
    mine = _shard_failures(all_failures, keys)
    return PrepareReport(
        store=store.root,
        total=len(specs),
        prepared=sum(r["ok"] for r in results),
        skipped=skipped,
        failed_sessions=sum(not r["ok"] for r in results),
        failures=mine,
        seconds=time.time() - t0,
        notes=notes,
    )


_AGAIN = "free space and run the same prepare again: finished sessions are kept"


def estimate_bytes(todo: list[SessionSpec], cfg: PrepareConfig, sample: int = 200) -> int:
    """Bytes the store will take for ``todo``: float32 images and label maps at the target spacing, from
    the scans' headers (a random ``sample`` of them, scaled up), halved for compression (blosc2 ZSTD on
    brain scans compresses 2-4x; the foreground crop makes it smaller still, so this errs high)."""
    import random

    import nibabel as nib

    files = [(p, 4) for s in todo for p in s.images.values()] + [(p, 1) for s in todo for p in s.label_maps.values()]
    if not files:
        return 0
    picked = random.Random(0).sample(files, min(sample, len(files)))
    sp = np.broadcast_to(np.asarray(cfg.spacing, float), (3,))
    total = 0.0
    for path, per_voxel in picked:
        try:
            hdr = nib.load(str(path)).header  # the header only
            shape = np.asarray(hdr.get_data_shape()[:3], float)
            zooms = np.asarray(hdr.get_zooms()[:3], float)
            total += float(np.prod(shape * zooms / sp)) * per_voxel
        except Exception:  # unreadable here: prepare will say why
            continue
    return int(total * len(files) / len(picked) / 2)


def _shard_failures(failures: pd.DataFrame, keys: set[str]) -> pd.DataFrame:
    if failures.empty:
        return failures
    mask = [
        session_key(str(s), str(ses) if ses == ses else "") in keys
        for s, ses in zip(failures["subject"], failures["session"], strict=True)
    ]
    return failures[mask].reset_index(drop=True)


def _run(todo: list[SessionSpec], root: str, cfg: dict[str, Any], workers: int, progress: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [
        TextColumn("[bold]prepare"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("sessions"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, disable=not progress or not todo, transient=False) as bar:
        task = bar.add_task("prepare", total=len(todo))
        if workers == 1 or len(todo) <= 1:
            for spec in todo:
                yield prepare_session(spec, root, cfg)
                bar.advance(task)
            return
        # spawn: workers start clean (no inherited threads or locks from the parent).
        ctx = get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker) as pool:
            futures = {pool.submit(prepare_session, spec, root, cfg): spec for spec in todo}
            for fut in as_completed(futures):
                spec = futures[fut]
                try:
                    yield fut.result()
                except Exception as e:  # the worker process itself died (e.g. out of memory)
                    if is_disk_full(e, root):
                        for f in futures:
                            f.cancel()
                        raise
                    fail = [
                        {
                            "subject": spec.subject,
                            "session": spec.session,
                            "name": "*",
                            "path": next(iter(spec.images.values()), ""),
                            "reason": f"worker failed: {type(e).__name__}: {e}",
                        }
                    ]
                    write_json(Path(root) / "failures" / f"{spec.key}.json", fail)
                    yield {"key": spec.key, "ok": False, "failures": 1}
                bar.advance(task)


def _init_worker() -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
