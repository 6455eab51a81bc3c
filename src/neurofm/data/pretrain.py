"""Pretraining data: random crops streamed from the store, in three shapes.

* ``pair`` (fomo25, mae): two different contrasts of one session, same crop; a session
  with a single scan yields ``pair_valid = False``.
* ``scan`` (ssl3d): one scan with its subject's regional-volume vector, health label and
  (dense variant) label map.
* ``stack`` (lamim): the contrasts of a session as channels, missing ones zero-filled and
  flagged in ``present``.

Only the chunks a crop touches are read. Random draws come from a per-worker generator
seeded from torch's worker seed (itself from the run seed), so runs are reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from neurofm.errors import ConfigError, StoreError
from neurofm.store import Store
from neurofm.train.config import DataConfig, RunConfig

ICV_NAMES = ("total intracranial", "estimatedtotalintracranialvol", "etiv", "icv", "intracranial volume")


@dataclass
class SessionIndex:
    """What the loaders need from a store, computed once in the main process."""

    keys: list[str]
    contrasts: list[list[str]]  # available per session (filtered, ordered)
    shapes: list[tuple[int, int, int]]
    health: np.ndarray  # (N,) int: 1 = not healthy, 0 = healthy, -1 unknown
    volumes: np.ndarray | None = None  # (N, D) standardised ICV-normalised region volumes
    has_volumes: np.ndarray | None = None  # (N,) bool
    extra: dict[str, Any] = field(default_factory=dict)


def health_target(labels: dict[str, Any], column: str) -> int:
    """1 for a patient, 0 for a healthy subject, -1 when unknown (from ``column`` or ``diagnosis``)."""
    v = labels.get(column)
    if isinstance(v, int | float) and not (isinstance(v, float) and math.isnan(v)):
        return int(v == 0) if column == "healthy" else int(v)
    dx = labels.get("diagnosis")
    if isinstance(dx, str):
        return int(dx.lower() not in ("healthy", "control", "hc", "cn"))
    return -1


def _icv(vol: dict[str, float]) -> tuple[float, list[str]]:
    for k in vol:
        if k.strip().lower() in ICV_NAMES:
            return float(vol[k]), [k]
    return float(sum(vol.values())), []


def region_vectors(records: list[dict], regions: list[str] | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """ICV-normalised regional volumes ``(N, D)`` for the records, and which records have them."""
    if regions is None:
        names: set[str] = set()
        for r in records:
            vol = r.get("volumes")
            if vol:
                _, icv_keys = _icv(vol)
                names |= {k for k in vol if k not in icv_keys and k.lower() != "lesion"}
        regions = sorted(names)
    mat = np.zeros((len(records), len(regions)), np.float32)
    has = np.zeros(len(records), bool)
    for i, r in enumerate(records):
        vol = r.get("volumes")
        if not vol:
            continue
        icv, _ = _icv(vol)
        if icv <= 0:
            continue
        mat[i] = [vol.get(k, 0.0) / icv for k in regions]
        has[i] = True
    return regions, mat, has


def build_index(store: Store, cfg: DataConfig, extra: dict[str, Any], needs_volumes: bool, dense: bool) -> SessionIndex:
    """Select sessions with the wanted contrasts and derive per-session targets."""
    keys, contrasts, shapes, recs = [], [], [], []
    for key, rec in store.records.items():
        avail = list(rec["images"])
        if cfg.contrasts:
            avail = [c for c in cfg.contrasts if c in avail]
        if not avail:
            continue
        keys.append(key)
        contrasts.append(avail)
        shapes.append(tuple(rec["shape"]))
        recs.append(rec)
    if not keys:
        want = f" with contrasts {cfg.contrasts}" if cfg.contrasts else ""
        raise StoreError(f"{store.root}: no sessions{want}")
    health = np.array([health_target(r.get("labels", {}), cfg.health_label) for r in recs], np.int64)
    idx = SessionIndex(keys, contrasts, shapes, health)
    if needs_volumes:
        regions, mat, has = region_vectors(recs, extra.get("regions"))
        if not has.any():
            raise StoreError(
                f"{store.root}: the ssl3d anatomy term needs regional volumes (a volumes.csv, a dseg label map, "
                "or a brain mask for neurofm's tissue volumes, per session); none found. "
                "Switch it off with --set objective.w_anatomy=0"
            )
        if "region_mean" not in extra:
            mean, std = mat[has].mean(0), mat[has].std(0) + 1e-6
            extra.update(regions=regions, region_mean=mean.tolist(), region_std=std.tolist())
        mean, std = np.asarray(extra["region_mean"], np.float32), np.asarray(extra["region_std"], np.float32)
        idx.volumes = ((mat - mean) / std) * has[:, None]
        idx.has_volumes = has
    if dense and "dense_labels" not in extra:
        values: set[int] = set()
        for r in recs:
            values |= set(r.get("label_maps", {}).get("dseg", {}).get("values", []))
        if not values:
            raise StoreError(f"{store.root}: the dense variant needs dseg label maps; none found")
        extra["dense_labels"] = sorted(values)
    idx.extra = extra
    return idx


def random_box(shape: tuple[int, ...], patch: int, rng: np.random.Generator) -> tuple[slice, ...]:
    return tuple(slice(s0 := int(rng.integers(0, max(s - patch, 0) + 1)), min(s0 + patch, s)) for s in shape)  # type: ignore[return-value]


def pad_to(x: np.ndarray, patch: int, value: float) -> np.ndarray:
    """Centre-pad the last three axes of ``x`` up to ``patch``."""
    pads = [(0, 0)] * (x.ndim - 3)
    for s in x.shape[-3:]:
        extra = max(patch - s, 0)
        pads.append((extra // 2, extra - extra // 2))
    return np.pad(x, pads, constant_values=value) if any(p[1] or p[0] for p in pads) else x


def minmax(x: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] between the 0.5th and 99.5th percentiles (LaMIM scales every channel to [0, 1])."""
    lo, hi = np.percentile(x, [0.5, 99.5])
    return np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)


class Augment:
    """Online augmentation with MONAI: flips and a small affine (same for all channels and the
    label map), then gamma and Gaussian noise per present channel."""

    def __init__(self, cfg: DataConfig, seed: int):
        from monai.transforms import Compose, RandAdjustContrast, RandAffined, RandFlipd, RandGaussianNoise

        keys = ["image", "label"]
        spatial = [RandFlipd(keys, prob=cfg.flip_p, spatial_axis=a, allow_missing_keys=True) for a in range(3)]
        if cfg.affine_p > 0:
            rot = math.radians(cfg.rotate_deg)
            spatial.append(
                RandAffined(
                    keys,
                    prob=cfg.affine_p,
                    rotate_range=(rot, rot, rot),
                    scale_range=(cfg.scale,) * 3,
                    mode=("bilinear", "nearest"),
                    padding_mode="border",
                    allow_missing_keys=True,
                )
            )
        self.spatial = Compose(spatial)
        self.gamma = RandAdjustContrast(prob=cfg.gamma_p, gamma=(0.7, 1.5))
        self.noise = RandGaussianNoise(prob=cfg.noise_p, std=0.1)
        self.spatial.set_random_state(seed)
        self.gamma.set_random_state(seed + 1)
        self.noise.set_random_state(seed + 2)

    def __call__(self, image: np.ndarray, label: np.ndarray | None, present: np.ndarray) -> tuple[np.ndarray, Any]:
        d = {"image": image} if label is None else {"image": image, "label": label}
        d = self.spatial(d)
        img = np.asarray(d["image"], dtype=np.float32).copy()
        for c in np.flatnonzero(present):
            img[c] = np.asarray(self.noise(self.gamma(img[c : c + 1])), dtype=np.float32)[0]
        lab = np.asarray(d["label"]) if label is not None else None
        return img, lab


class PretrainDataset(Dataset):
    """``length`` random samples per epoch from the sessions of ``index`` (see module docstring)."""

    def __init__(
        self,
        store_root: str | Path,
        index: SessionIndex,
        cfg: DataConfig,
        length: int,
        seed: int = 0,
        dense: bool = False,
    ):
        self.store_root = str(store_root)
        self.index = index
        self.cfg = cfg
        self.length = length
        self.seed = seed
        self.dense = dense
        if cfg.mode == "scan":
            self.items = [(i, c) for i, cs in enumerate(index.contrasts) for c in cs]
        else:
            self.items = [(i, "") for i in range(len(index.keys))]
        self._store: Store | None = None
        self._rng: np.random.Generator | None = None
        self._augment: Augment | None = None
        if dense:
            values = index.extra["dense_labels"]
            self._lut = np.full(max(values) + 1, -1, np.int64)
            self._lut[values] = np.arange(len(values))

    def __len__(self) -> int:
        return self.length

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_store=None, _rng=None, _augment=None)  # every worker opens its own
        return state

    def _setup(self) -> None:
        if self._store is None:
            self._store = Store(self.store_root)
            seed = (torch.initial_seed() + self.seed) % 2**32
            self._rng = np.random.default_rng(seed)
            self._augment = Augment(self.cfg, int(seed % 2**31)) if self.cfg.augment else None

    def _read(self, key: str, name: str, box: tuple[slice, ...] | None) -> np.ndarray:
        assert self._store is not None
        return np.asarray(self._store.read(key, name, box), dtype=np.float32)

    def __getitem__(self, i: int) -> dict[str, Any]:
        self._setup()
        rng = self._rng
        assert rng is not None
        s, contrast = self.items[i % len(self.items)]
        key, shape, avail = self.index.keys[s], self.index.shapes[s], self.index.contrasts[s]
        cfg = self.cfg
        box = None if cfg.fit == "resize" else random_box(shape, cfg.patch, rng)
        if cfg.mode == "pair":
            pick = list(rng.choice(avail, size=min(2, len(avail)), replace=False))
            names = pick if len(pick) == 2 else pick * 2
        elif cfg.mode == "scan":
            names = [contrast]
        else:
            names = list(cfg.contrasts or avail)
        present = np.array([n in avail for n in names])
        chans = []
        for n, ok in zip(names, present, strict=True):
            chans.append(self._read(key, n, box) if ok else None)
        ref = next(c for c in chans if c is not None)
        chans = [c if c is not None else np.zeros_like(ref) for c in chans]
        img = np.stack(chans)
        label = None
        if self.dense:
            lab = (
                self._store.read(key, "dseg", box) if "dseg" in self._store.record(key).get("label_maps", {}) else None
            )
            label = (self._lut[np.asarray(lab, np.int64)] if lab is not None else np.full(ref.shape, -1))[None]
        if cfg.fit == "resize":
            img = F.interpolate(torch.from_numpy(img)[None], size=(cfg.patch,) * 3, mode="trilinear")[0].numpy()
        background = [float(c.min()) if c.size else 0.0 for c in img]
        img = np.stack([pad_to(c, cfg.patch, b) for c, b in zip(img, background, strict=True)])
        if label is not None:
            label = pad_to(label, cfg.patch, -1)
        if cfg.intensity == "minmax":
            img = np.stack([minmax(c) if ok else c for c, ok in zip(img, present, strict=True)])
        img = img * present[:, None, None, None]
        if self._augment is not None:
            img, label = self._augment(img, label, present)
        out: dict[str, Any] = {}
        if cfg.mode == "pair":
            out.update(
                x_a=torch.from_numpy(img[:1].copy()),
                x_b=torch.from_numpy(img[1:2].copy()),
                pair_valid=torch.tensor(len(set(names)) == 2),
            )
        else:
            out.update(x=torch.from_numpy(np.ascontiguousarray(img)), present=torch.from_numpy(present))
        out["health"] = torch.tensor(int(self.index.health[s]))
        if self.index.volumes is not None:
            out["volumes"] = torch.from_numpy(self.index.volumes[s])
            out["has_volumes"] = torch.tensor(bool(self.index.has_volumes[s]))
        if label is not None:
            out["dseg"] = torch.from_numpy(np.ascontiguousarray(label[0]).astype(np.int64))
        return out


def prepare_data(cfg: RunConfig, store_root: str | Path) -> tuple[RunConfig, SessionIndex]:
    """Check the store against the recipe and fill in what the model needs from the data
    (number of regions, dense classes) in ``cfg.extra`` and ``cfg.model.kwargs``."""
    store = Store(store_root)
    obj = cfg.objective
    needs_volumes = obj.kind == "ssl3d" and obj.w_anatomy > 0
    dense = obj.kind == "ssl3d" and obj.w_dense > 0
    extra = dict(cfg.extra)
    index = build_index(store, cfg.data, extra, needs_volumes, dense)
    kwargs = dict(cfg.model.kwargs)
    if obj.kind == "ssl3d":
        kwargs["anatomy_outputs"] = len(extra["regions"]) if needs_volumes else 0
        kwargs["health_classes"] = 2 if obj.w_health > 0 else 0
        kwargs["dense_classes"] = len(extra["dense_labels"]) if dense else 0
    if cfg.data.mode == "stack":
        kwargs.setdefault("in_channels", len(cfg.data.contrasts or []) or 4)
        kwargs.setdefault("out_channels", kwargs["in_channels"])
        if kwargs.get("img_size", cfg.data.patch) != cfg.data.patch:
            raise ConfigError(f"model img_size {kwargs['img_size']} differs from data.patch {cfg.data.patch}")
        kwargs["img_size"] = cfg.data.patch
    extra["store"] = str(Path(store_root).resolve())
    extra["preprocessing"] = store.config
    extra["sessions"] = len(index.keys)
    d = cfg.to_dict()
    d["model"]["kwargs"] = kwargs
    d["extra"] = extra
    return RunConfig.from_dict(d), index


def loader_context() -> str | None:
    """Worker start method: forkserver where available. A plain fork of a process that already runs
    threads (blosc2, OpenMP, progress bars) can copy a held lock into the worker and hang it."""
    import multiprocessing as mp

    return "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


def make_loader(store_root: str | Path, index: SessionIndex, cfg: RunConfig) -> DataLoader:
    dc = cfg.data
    ds = PretrainDataset(
        store_root,
        index,
        dc,
        length=dc.steps_per_epoch * dc.batch_size,
        seed=cfg.trainer.seed,
        dense=cfg.objective.kind == "ssl3d" and cfg.objective.w_dense > 0,
    )
    workers = dc.num_workers > 0
    return DataLoader(
        ds,
        batch_size=dc.batch_size,
        shuffle=True,
        num_workers=dc.num_workers,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers,
        prefetch_factor=4 if workers else None,
        multiprocessing_context=loader_context() if workers else None,
    )
