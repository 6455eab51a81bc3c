"""The preprocessed store: compressed, chunked volumes plus one manifest table.

Layout of a store folder::

    store.json                 format version and the preprocessing settings
    records/<key>.json         one prepared session: geometry, labels, arrays (written last)
    arrays/<key>/<name>.b2nd   blosc2 NDArrays: images float32, label maps uint8/uint16
    failures/<key>.json        scans of that session that could not be used
    manifest.parquet           one row per image, rebuilt from records/
    failures.csv               every failure, rebuilt from failures/

Volumes are blosc2 NDArrays chunked in 64^3 voxels with 16^3 blocks (ZSTD level 1,
byte shuffle), so reading a training crop decompresses only the blocks it touches —
``benchmarks/bench_store.py`` measures this against zarr and against reading the whole
volume. A session is visible only once its record exists, and every file is written
to a temporary name and renamed, so a killed ``prepare`` leaves nothing half-written.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

import blosc2
import numpy as np
import pandas as pd

from neurofm.errors import StoreError
from neurofm.utils import atomic_write, read_json, write_json

FORMAT = "neurofm-store"
VERSION = 1
CHUNKS = (64, 64, 64)
BLOCKS = (16, 16, 16)


def cparams() -> blosc2.CParams:
    return blosc2.CParams(codec=blosc2.Codec.ZSTD, clevel=1, filters=[blosc2.Filter.SHUFFLE], nthreads=1)


def write_array(path: str | Path, array: np.ndarray) -> Path:
    """Write an ``(X, Y, Z)`` array as a chunked blosc2 file, atomically."""
    chunks = tuple(min(c, s) for c, s in zip(CHUNKS, array.shape, strict=False))
    blocks = tuple(min(b, c) for b, c in zip(BLOCKS, chunks, strict=False))

    def write(tmp: Path) -> None:
        tmp.unlink()  # blosc2 refuses to overwrite with mode="w" on some versions; start clean
        blosc2.asarray(
            np.ascontiguousarray(array), urlpath=str(tmp), mode="w", chunks=chunks, blocks=blocks, cparams=cparams()
        )

    return atomic_write(path, write, suffix=".b2nd")


def file_crc32(path: str | Path) -> int:
    """CRC-32 of a file's bytes (recorded per array when a session is written; ``inspect --verify`` checks it)."""
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


class _HandleCache:
    """Keeps recently opened arrays per process, so repeated crops skip the open cost."""

    def __init__(self, size: int = 128):
        self.size = size
        self._d: OrderedDict[str, Any] = OrderedDict()

    def get(self, path: str) -> Any:
        arr = self._d.get(path)
        if arr is None:
            arr = blosc2.open(path, mode="r")
            self._d[path] = arr
            if len(self._d) > self.size:
                self._d.popitem(last=False)
        else:
            self._d.move_to_end(path)
        return arr


class Store:
    """Read access to a prepared store (and the bookkeeping ``prepare`` writes).

    Args:
        root: the store folder.

    Raises:
        StoreError: if ``root`` is not a neurofm store.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        meta = self.root / "store.json"
        if not meta.is_file():
            raise StoreError(f"{self.root}: not a neurofm store (no store.json); create one with `neurofm prepare`")
        info = read_json(meta)
        if info.get("format") != FORMAT:
            raise StoreError(f"{meta}: not a neurofm store file")
        if int(info.get("version", 0)) > VERSION:
            raise StoreError(f"{meta}: store version {info['version']} is newer than this neurofm ({VERSION})")
        self.info = info
        self.config: dict[str, Any] = info.get("config", {})
        self._records: dict[str, dict] | None = None
        self._manifest: pd.DataFrame | None = None
        self._cache = _HandleCache()

    # ----------------------------------------------------------------- creation
    @classmethod
    def create(cls, root: str | Path, config: dict[str, Any]) -> Store:
        """Create a store, or open an existing one prepared with the same settings."""
        root = Path(root)
        meta = root / "store.json"
        if meta.is_file():
            store = cls(root)
            if store.config != config:
                diff = {k: (store.config.get(k), v) for k, v in config.items() if store.config.get(k) != v}
                raise StoreError(
                    f"{root} was prepared with other settings {diff} (stored, requested); "
                    "use a new output folder or the same settings"
                )
            return store
        if root.exists() and any(root.iterdir()):
            raise StoreError(f"{root} exists and is not a neurofm store; choose an empty or new folder")
        for sub in ("records", "arrays", "failures"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        write_json(meta, {"format": FORMAT, "version": VERSION, "config": config})
        return cls(root)

    # ------------------------------------------------------------------ records
    def record_path(self, key: str) -> Path:
        return self.root / "records" / f"{key}.json"

    @property
    def records(self) -> dict[str, dict]:
        if self._records is None:
            recs = {}
            for f in sorted((self.root / "records").glob("*.json")):
                recs[f.stem] = read_json(f)
            self._records = recs
        return self._records

    def record(self, key: str) -> dict:
        try:
            return self.records[key]
        except KeyError:
            raise StoreError(f"{self.root}: no session {key!r}") from None

    @property
    def keys(self) -> list[str]:
        return list(self.records)

    # ------------------------------------------------------------------ manifest
    @property
    def manifest(self) -> pd.DataFrame:
        """One row per stored image: key, subject, session, contrast, shape, labels..."""
        if self._manifest is None:
            path = self.root / "manifest.parquet"
            if path.is_file():
                self._manifest = pd.read_parquet(path)
            else:
                self._manifest = self.build_manifest()
        return self._manifest

    def build_manifest(self) -> pd.DataFrame:
        rows = []
        for key, rec in self.records.items():
            for name, img in rec["images"].items():
                rows.append(
                    {
                        "key": key,
                        "subject": rec["subject"],
                        "session": rec["session"],
                        "contrast": name,
                        "shape": "x".join(map(str, rec["shape"])),
                        "spacing": rec["spacing"][0],
                        "source": img["source"],
                        "label_maps": ",".join(rec.get("label_maps", {})),
                        "has_volumes": rec.get("volumes") is not None,
                        **{f"label:{k}": v for k, v in rec.get("labels", {}).items()},
                    }
                )
        cols = [
            "key",
            "subject",
            "session",
            "contrast",
            "shape",
            "spacing",
            "source",
            "label_maps",
            "has_volumes",
        ]
        df = pd.DataFrame(rows, columns=None if rows else cols)
        # Label values can mix types across sessions (e.g. 'n/a' and numbers); store them as text
        # where they are not all numeric so that Parquet accepts the column.
        for c in df.columns:
            if c.startswith("label:") and df[c].dtype == object:
                num = pd.to_numeric(df[c], errors="coerce")
                df[c] = num if num.notna().sum() == df[c].notna().sum() else df[c].astype("string")
        return df

    def rebuild_index(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Rewrite manifest.parquet and failures.csv from records/ and failures/."""
        self._records = None
        df = self.build_manifest()
        _atomic_df(self.root / "manifest.parquet", df, parquet=True)
        self._manifest = df
        fails = self.failures()
        _atomic_df(self.root / "failures.csv", fails, parquet=False)
        return df, fails

    def failures(self) -> pd.DataFrame:
        rows = []
        for f in sorted((self.root / "failures").glob("*.json")):
            rows.extend(read_json(f))
        return pd.DataFrame(rows, columns=["subject", "session", "name", "path", "reason"])

    # -------------------------------------------------------------------- arrays
    def array_path(self, key: str, name: str) -> Path:
        rec = self.record(key)
        entry = rec["images"].get(name) or rec.get("label_maps", {}).get(name)
        if entry is None:
            have = list(rec["images"]) + list(rec.get("label_maps", {}))
            raise StoreError(f"session {key} has no {name!r} (has {have})")
        return self.root / entry["array"]

    def open_array(self, key: str, name: str) -> Any:
        return self._cache.get(str(self.array_path(key, name)))

    def read(self, key: str, name: str, box: tuple[slice, ...] | None = None) -> np.ndarray:
        """Read an image or label map of a session, whole or a box: ``(X, Y, Z)``."""
        arr = self.open_array(key, name)
        return arr[box] if box is not None else arr[...]

    def verify(self, progress: bool = False) -> tuple[int, list[dict[str, str]]]:
        """Check every stored array: the file is there, its CRC-32 matches the one recorded when it was
        written (stores prepared before checksums were recorded skip this part) and every chunk
        decompresses. Returns (arrays checked, one row per damaged array: key, name, path, reason)."""
        from rich.progress import Progress

        bad: list[dict[str, str]] = []
        entries = [
            (key, name, e)
            for key, rec in self.records.items()
            for name, e in {**rec["images"], **rec.get("label_maps", {})}.items()
        ]
        with Progress(disable=not progress) as bar:
            task = bar.add_task("verify", total=len(entries))
            for key, name, e in entries:
                path = self.root / e["array"]
                reason = None
                try:
                    if "crc32" in e and file_crc32(path) != int(e["crc32"]):
                        reason = "checksum differs from the one recorded when it was written"
                    else:
                        arr = blosc2.open(str(path), mode="r")
                        for i in range(arr.schunk.nchunks):
                            arr.schunk.decompress_chunk(i)
                except FileNotFoundError:
                    reason = "file missing"
                except Exception as ex:
                    reason = f"cannot be decompressed ({type(ex).__name__}: {ex})"
                if reason:
                    bad.append({"key": key, "name": name, "path": str(path), "reason": reason})
                bar.advance(task)
        return len(entries), bad

    def affine(self, key: str) -> np.ndarray:
        return np.asarray(self.record(key)["affine"], dtype=float)

    def shape(self, key: str) -> tuple[int, int, int]:
        return tuple(self.record(key)["shape"])  # type: ignore[return-value]

    def summary(self) -> str:
        m = self.manifest
        if m.empty:
            return f"{self.root}: empty store"
        counts = m["contrast"].value_counts().to_dict()
        return (
            f"{self.root}: {m['subject'].nunique()} subjects, {m['key'].nunique()} sessions, {len(m)} images "
            f"({', '.join(f'{k} {v}' for k, v in counts.items())}) at {self.config.get('spacing')} mm"
        )


def _atomic_df(path: Path, df: pd.DataFrame, parquet: bool) -> None:
    atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False) if parquet else df.to_csv(tmp, index=False))


__all__ = ["Store", "write_array", "write_json"]
