"""Offline, deterministic preprocessing into a store (see :mod:`neurofm.preprocess.prepare`)."""

from neurofm.preprocess.prepare import PrepareConfig, PrepareReport, prepare, preprocess_scans

__all__ = ["PrepareConfig", "PrepareReport", "prepare", "preprocess_scans"]
