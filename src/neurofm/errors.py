"""Errors that neurofm reports to users as one clear line, never as a traceback."""

from __future__ import annotations

from pathlib import Path


class NeurofmError(Exception):
    """Base class: the CLI prints the message and exits with ``exit_code`` (2)."""

    exit_code = 2


class ConfigError(NeurofmError, ValueError):
    """A bad option, preset or config value. The message names the value and how to fix it."""


class ManifestError(NeurofmError):
    """A dataset cannot be turned into a manifest (duplicates, missing files, bad columns)."""


class StoreError(NeurofmError):
    """A store is missing, incomplete, or was prepared with different settings."""


class CheckpointError(NeurofmError):
    """A run folder or checkpoint cannot be read, or does not match the model."""


class ScanError(NeurofmError):
    """One scan cannot be used. Carries the path and a one-line reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class NonFiniteLossError(NeurofmError):
    """The loss became NaN or infinite: training stops, the last checkpoint stays intact."""


class Preempted(NeurofmError):
    """Training stopped on SIGTERM / SIGUSR1 after writing a checkpoint at the current step.

    The CLI exits with 128 + the signal number (143 for SIGTERM), as a process killed by it would,
    so that ``pretrain && finetune`` does not go on with an unfinished model."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + int(signum)
