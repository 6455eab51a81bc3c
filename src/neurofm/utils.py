"""Small helpers shared across the package: atomic file writes, JSON, hashing."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, writer: Callable[[Path], Any], suffix: str = ".tmp") -> Path:
    """Call ``writer(tmp_path)`` then rename the result over ``path``.

    A reader never sees a half-written file: either the old content or the new. The
    temporary file lives in the same folder (same filesystem) so the rename is atomic;
    ``suffix`` is its extension, for writers that choose a format by it (``.nii.gz``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        writer(tmp_path)
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def to_jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays, paths and tuples into plain JSON types."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    with open(path) as fh:
        return json.load(fh)


def stable_hash(text: str) -> int:
    """A hash that is the same in every process and Python run (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big")


@functools.lru_cache(maxsize=1)
def machine() -> dict[str, Any]:
    """The processor a run computed on: its model name and the instruction set PyTorch's CPU kernels use
    (``torch.backends.cpu.get_cpu_capability()``, e.g. ``AVX2``, ``AVX512``), and the GPU's name where one is
    visible. Recorded beside the thread count: the same code, data, seed and threads gave a scratch age run
    8.95 years on one 2-core machine and 8.63 on another, so a table's numbers repeat on its machine only."""
    import platform

    import torch

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:  # not Linux: the platform's name
        pass
    out: dict[str, Any] = {"cpu": name, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def _code_of(source: bytes) -> bytes:
    """What a module computes, without what only its readers see: the syntax tree with its docstrings left out,
    without line numbers (so comments, blank lines, docstrings and line breaks do not count). A file that does not
    parse counts by its bytes."""
    import ast

    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return source
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:]
    return ast.dump(tree, include_attributes=False).encode()


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A hash of neurofm's own Python code (every ``.py`` file of the package, by path and syntax tree).

    A fine-tuning or pretraining run records it, and a finished run is reused only by the code that made it. Any
    change to what the code does counts (a renamed variable, a moved module, another default), which costs a
    retraining, never a stale number; an edit to a comment, a docstring or the layout of the lines does not. The
    tree's text can differ between Python versions, so another Python counts as other code too."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + _code_of(path.read_bytes()) + b"\0")
    return h.hexdigest()[:16]
