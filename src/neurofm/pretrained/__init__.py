"""Pretrained models that ship inside the package (run folders: safetensors weights and a model card).

``neurofm finetune --from NAME`` (and every other ``--from``/``RUN`` argument) accepts these
names as well as run folders. Each folder's ``MODEL_CARD.md`` says what data it saw, the
command that trained it, for how long, its losses and what ``neurofm analyze`` measured.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).parent


def shipped() -> list[str]:
    """Names of the pretrained models in the package."""
    return sorted(
        p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / "run.json").is_file()
    )


def shipped_path(name: str) -> Path | None:
    """The run folder of a shipped model, or None when ``name`` is not one."""
    path = ROOT / name
    return path if "/" not in name and (path / "run.json").is_file() else None
