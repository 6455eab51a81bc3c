"""Brain extraction: a brain mask for a raw head, so raw scans reach the models without outside tools.

Two extractors, behind one function (:func:`brain_mask`), so that another can replace either:

* ``deepbet`` — deepbet 1.0 (Fisch et al. 2024, MIT; its two TorchScript networks ship inside its
  wheel, so it works offline). Trained on T1-weighted heads. It is installed without its GUI
  dependency (``customtkinter``) by ``scripts/setup.sh``; its own dependencies are pinned.
* ``neurofm`` — neurofm's own extractor (``pretrained/neurofm-brain-extract``): a segmentation model
  fine-tuned from the shipped pretrained backbone on ``neurofm synth`` heads of all five contrasts
  (skull, scalp and neck included; the generator's brain mask is the label), run from its ONNX
  export on onnxruntime in sliding windows, so it needs no PyTorch. Used for sessions without a T1-weighted scan.

``auto`` takes deepbet when the session has a T1w (or T1c) and neurofm's extractor otherwise (and
wherever deepbet or PyTorch is not installed).
The mask is made on the chosen scan's own grid; the other contrasts of a session take it through
the session's shared grid (``neurofm.preprocess.prepare``).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from neurofm.errors import ConfigError, ScanError
from neurofm.io.nifti import Scan

METHODS = ("auto", "deepbet", "neurofm", "none")
#: deepbet reads these contrasts (it was trained on T1-weighted heads)
DEEPBET_CONTRASTS = ("T1w", "T1c")
#: which scan of a session the neurofm extractor reads, in order of preference
NEUROFM_ORDER = ("T1w", "T1c", "T2w", "FLAIR", "PDw")
EXTRACTOR = "neurofm-brain-extract"
#: neurofm's extractor refuses a mask when its uncertain voxels (probability 0.05-0.95) number more than this
#: share of the mask's size (synthetic heads of every contrast: 0.11-0.18; a box phantom: 0.51; Gaussian
#: noise: 0.26, so noise is *not* caught)
MAX_UNSURE = 0.35


@dataclass
class BrainMask:
    """A brain mask on one scan's grid, what made it, and the intracranial volume it encloses."""

    mask: np.ndarray  # bool (X, Y, Z) on ``scan``'s grid
    scan: Scan
    contrast: str
    method: str  # deepbet | neurofm

    @property
    def icv_ml(self) -> float:
        voxel = float(abs(np.linalg.det(self.scan.affine[:3, :3])))
        return float(self.mask.sum()) * voxel / 1000.0

    @property
    def source(self) -> str:
        return f"{self.method} on {self.contrast}"


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ConfigError(f"brain extraction should be one of {', '.join(METHODS)}, got {method!r}")
    return method


def check_available(method: str) -> None:
    """Refuse, before any work, an extractor asked for by name that this installation lacks."""
    check_method(method)
    if method == "deepbet" and not deepbet_available():
        _deepbet()  # raises with the install command
    if method == "neurofm":
        _extractor()


def choose(scans: dict[str, Scan], method: str) -> tuple[str, str]:
    """(method, contrast) that ``method`` resolves to for a session with these scans."""
    check_method(method)
    if method == "none":
        raise ConfigError("brain extraction is off (none)")
    t1 = next((c for c in DEEPBET_CONTRASTS if c in scans), None)
    if method == "deepbet":  # asked for by name: on a T1-weighted scan if there is one, else the user's choice
        return "deepbet", t1 or next(iter(scans))
    if method == "auto" and t1 is not None and deepbet_available():  # without PyTorch: neurofm's extractor
        return "deepbet", t1
    return "neurofm", next((c for c in NEUROFM_ORDER if c in scans), next(iter(scans)))


def brain_mask(scans: dict[str, Scan], method: str = "auto") -> BrainMask:
    """The brain mask of a session (``contrast -> scan``) by ``method`` (see module docstring).

    Raises:
        ScanError: the extractor found no brain in the scan (its path and why).
    """
    how, contrast = choose(scans, method)
    scan = scans[contrast]
    try:
        mask = deepbet_mask(scan) if how == "deepbet" else neurofm_mask(scan, contrast)
    except (ScanError, ConfigError):  # the scan's own error, or a missing extractor (not the scan's fault)
        raise
    except (AssertionError, ValueError) as e:  # deepbet asserts on a scan with too little foreground
        raise ScanError(scan.path, f"brain extraction ({how}) failed: {e or 'no head found'}") from None
    if mask.sum() * float(abs(np.linalg.det(scan.affine[:3, :3]))) < 100_000:  # < 100 ml: not a brain
        raise ScanError(scan.path, f"brain extraction ({how}) found no brain (mask under 100 ml)")
    return BrainMask(mask=mask, scan=scan, contrast=contrast, method=how)


# ---------------------------------------------------------------- deepbet
@functools.lru_cache(maxsize=1)
def deepbet_available() -> bool:
    """deepbet and PyTorch can be imported here."""
    try:
        import deepbet  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _deepbet() -> Any:
    try:
        from deepbet.bet import BrainExtraction
    except ImportError as e:
        raise ConfigError(
            f"deepbet is not installed ({e}); scripts/setup.sh installs it, or: pip install --no-deps deepbet==1.0.2 "
            "connected-components-3d fill_voids fastremap tqdm — or use --brain-extraction neurofm"
        ) from None
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        return BrainExtraction(no_gpu=not torch.cuda.is_available())


def deepbet_mask(scan: Scan, threshold: float = 0.5) -> np.ndarray:
    """deepbet's mask of one scan, on its own grid (deepbet reorients to RAS and back itself)."""
    import nibabel as nib
    import torch

    bet = _deepbet()
    img = nib.Nifti1Image(np.nan_to_num(np.asarray(scan.data[0], np.float32)), scan.affine)
    with torch.inference_mode():
        _, mask, _ = bet.run(img, threshold=threshold)
    return np.asarray(mask.dataobj) > 0


# ---------------------------------------------------------------- neurofm
@functools.lru_cache(maxsize=2)
def _extractor(folder: Path | None = None) -> tuple[Any, dict[str, Any]]:
    """An extractor's ONNX session and its export description (default: the shipped one)."""
    import json

    from neurofm.preprocess.windows import onnx_session
    from neurofm.pretrained import shipped_path

    if folder is None:
        run = shipped_path(EXTRACTOR)
        folder = run / "export-onnx" if run is not None else None
    if folder is None or not (folder / "neurofm-export.json").is_file():
        raise ConfigError(f"neurofm's brain extractor ({EXTRACTOR}) is not in this installation")
    meta = json.loads((folder / "neurofm-export.json").read_text())
    session = onnx_session(folder / meta["file"])
    return session, meta


def neurofm_mask(scan: Scan, contrast: str, folder: str | Path | None = None) -> np.ndarray:
    """neurofm's extractor on one scan (any contrast): its preprocessing (whole head, no mask), Gaussian-blended
    sliding windows of the patch it was trained on (one pass over the whole padded head did worse: its
    instance norms then see other statistics), the mask put back on the scan's own grid.
    ``folder``: another extractor's ONNX export (default: the shipped one)."""
    from neurofm.preprocess import transforms
    from neurofm.preprocess.prepare import PrepareConfig, preprocess_scans
    from neurofm.preprocess.windows import sliding_window, softmax

    session, meta = _extractor(Path(folder).resolve() if folder is not None else None)
    info = meta["task_info"]
    contrasts = list(info["contrasts"])
    cfg = PrepareConfig.from_dict({**meta["preprocessing"], "brain_extraction": "none", "bias_correction": "none"})
    name = contrast if contrast in contrasts else contrasts[0]
    prepared = preprocess_scans({name: scan}, cfg=cfg)
    if name not in prepared.images:
        raise ScanError(scan.path, "no usable image for brain extraction")
    image = prepared.images[name]
    x = np.zeros((1, len(contrasts), *image.shape), np.float32)
    x[0, contrasts.index(name)] = image
    present = np.zeros((1, len(contrasts)), np.float32)
    present[0, contrasts.index(name)] = 1.0

    def net(t: np.ndarray) -> np.ndarray:
        return softmax(session.run(None, {"image": t, "present": np.repeat(present, len(t), axis=0)})[0], axis=1)

    probs = sliding_window(x, int(info.get("infer_patch") or info["patch"]), net, overlap=0.5, cval=float(image.min()))
    fg = 1.0 - probs[0, 0]
    unsure = float(((fg > 0.05) & (fg < 0.95)).sum() / max((fg > 0.5).sum(), 1))
    if unsure > MAX_UNSURE:  # synthetic heads: 0.11-0.18; a box phantom 0.51
        raise ScanError(scan.path, f"brain extraction (neurofm) is unsure: {unsure:.0%} of the mask's size is "
                        "uncertain voxels; does the scan show a head?")  # fmt: skip
    native = transforms.resample(fg.astype(np.float32), prepared.affine, (scan.shape, scan.affine), order=1)
    return transforms.largest_filled(native > 0.5)


# ---------------------------------------------------------------- files (the brain-extract verb)
def contrast_of(path: str | Path, default: str | None = None) -> str:
    """A scan's contrast from its BIDS-style name (``*_T1w``, ``*_ce-gd_T1w`` -> T1c, ``*_FLAIR``, ...)."""
    from neurofm.io.manifest import contrast_from_filename

    name = contrast_from_filename(Path(path).name)
    return name if name in NEUROFM_ORDER or default is None else default


def extract_files(
    inputs: list[str | Path], out: str | Path, method: str = "auto", *, contrast: str | None = None,
    brain: bool = False, progress: bool = True,
) -> pd.DataFrame:  # fmt: skip
    """Brain masks of NIfTI files, each on its input's own grid: ``OUT/<name>_mask.nii.gz`` (and the masked scan
    ``OUT/<name>_brain.nii.gz`` with ``brain``), a row per input in ``OUT/brain_extraction.csv``. An input that
    fails is listed with its reason and the rest are done."""
    from rich.progress import track

    from neurofm.io.nifti import load_scan, save_like
    from neurofm.utils import atomic_write_text

    check_method(method)
    if method == "none":
        raise ConfigError("brain-extract needs a method: auto, deepbet or neurofm")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for path in track([Path(p) for p in inputs], description="brain-extract", disable=not progress):
        name = path.name.removesuffix(".gz").removesuffix(".nii")
        row: dict[str, Any] = {"input": str(path)}
        try:
            c = contrast or contrast_of(path, "T1w")
            found = brain_mask({c: load_scan(path)}, method)
            mask_path = save_like(out / f"{name}_mask.nii.gz", found.mask.astype(np.uint8), path, dtype=np.uint8)
            row.update(contrast=c, method=found.method, mask=str(mask_path), icv_ml=round(found.icv_ml, 1))
            if brain:
                data = np.where(found.mask, found.scan.data[0], 0).astype(np.float32)
                row["brain"] = str(save_like(out / f"{name}_brain.nii.gz", data, path, dtype=np.float32))
        except ScanError as e:
            row["error"] = e.reason
        rows.append(row)
    table = pd.DataFrame(rows)
    atomic_write_text(out / "brain_extraction.csv", table.to_csv(index=False))
    table.attrs["written"] = str(out / "brain_extraction.csv")
    return table
