"""Metrics, evaluation of fine-tuned runs, and reports."""
