"""Run configuration, presets, the Trainer factory and checkpoint folders."""
