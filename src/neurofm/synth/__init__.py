"""Synthetic multi-contrast subjects built from real anatomy (``neurofm synth``)."""

from neurofm.synth.generator import SynthConfig, synthesize

__all__ = ["SynthConfig", "synthesize"]
