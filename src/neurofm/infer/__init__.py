"""Whole-scan inference back to native space (see :mod:`neurofm.infer.predictor`)."""
