"""Scan I/O (NIfTI) and dataset discovery (BIDS, nnU-Net raw, CSV/TSV manifests)."""

from neurofm.io.manifest import CONTRASTS, Manifest, SessionSpec, canonical_contrast, discover
from neurofm.io.nifti import Scan, load_scan, save_scan

__all__ = [
    "CONTRASTS",
    "Manifest",
    "Scan",
    "SessionSpec",
    "canonical_contrast",
    "discover",
    "load_scan",
    "save_scan",
]
