"""Pretraining data: random crops streamed from the store, in three shapes.

* ``pair`` (fomo25, mae): two different contrasts of one session, same crop; a session
  with a single scan yields ``pair_valid = False``; ``contrast_a`` / ``contrast_b`` name
  each scan's contrast by its index in ``CONTRASTS`` (-1 for another). When the objective needs it
  (``DataNeeds.reference_crop``) the same two scans at a second, independently placed and
  augmented crop come along too.
* ``scan`` (ssl3d): one scan with its subject's regional-volume vector, health label and
  (dense variant) label map.
* ``stack`` (lamim): the contrasts of a session as channels, missing ones zero-filled and
  flagged in ``present``.

Only the chunks a crop touches are read. Which session (``scan``: which scan) a sample reads, and its
random draws (crop, contrasts, augmentation), come from the run seed and the sample's index
(:func:`~neurofm.data.loader.sample_item`, :func:`~neurofm.data.loader.sample_rng`), so a run draws the same
samples with any number of workers and after a resume, and reads every session of the pool once per as many
samples as it has sessions, whatever ``steps_per_epoch`` is.
What a recipe needs beyond the images (regional volumes, dense label maps) it says in a
:class:`DataNeeds`; this module never asks which recipe it serves.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from neurofm.data.config import DataConfig
from neurofm.data.loader import sample_item, sample_rng, training_loader
from neurofm.data.sampling import random_box, stack_contrasts
from neurofm.errors import StoreError
from neurofm.io.manifest import CONTRASTS
from neurofm.preprocess.transforms import minmax, pad_to, pad_to_shape
from neurofm.store import Store
from neurofm.utils import write_json

ICV_NAMES = ("total intracranial", "estimatedtotalintracranialvol", "etiv", "icv", "intracranial volume")


@dataclass(frozen=True)
class DataNeeds:
    """What an objective needs from the store besides images (a recipe answers this, see ``Recipe.data_needs``).

    Attributes:
        volumes: the ICV-normalised regional-volume vector of each subject (``volumes``, ``has_volumes``).
        dense: the dense label map ``dseg`` of each crop.
        reference_crop: pair mode: the same two scans at a second, independently placed and
            augmented crop (``x_a_ref``, ``x_b_ref``).
        whole_scan: pair mode: the whole scan of the pair's first contrast (``scan_a``), unaugmented, centre-padded
            with its darkest value to the store's largest shape (``extra["scan_canvas"]``), and its own shape
            (``scan_shape_a``), so that it can be read as the latent analysis reads a scan.
    """

    volumes: bool = False
    dense: bool = False
    reference_crop: bool = False
    whole_scan: bool = False


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


def contrast_id(name: str) -> int:
    """The index of a contrast in ``io.manifest.CONTRASTS`` (the scan's BIDS suffix), -1 for another name."""
    return CONTRASTS.index(name) if name in CONTRASTS else -1


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


def build_index(store: Store, cfg: DataConfig, extra: dict[str, Any], needs: DataNeeds) -> SessionIndex:
    """Select sessions with the wanted contrasts (and not of an excluded subject); derive per-session targets."""
    keys, contrasts, shapes, recs = [], [], [], []
    excluded = set(cfg.exclude_subjects or ())
    for key, rec in store.records.items():
        if str(rec.get("subject")) in excluded:
            continue
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
        raise StoreError(f"{store.root}: no sessions{want}" + (" outside the excluded subjects" if excluded else ""))
    health = np.array([health_target(r.get("labels", {}), cfg.health_label) for r in recs], np.int64)
    idx = SessionIndex(keys, contrasts, shapes, health)
    if needs.volumes:
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
    if needs.dense and "dense_labels" not in extra:
        values: set[int] = set()
        for r in recs:
            values |= set(r.get("label_maps", {}).get("dseg", {}).get("values", []))
        if not values:
            raise StoreError(f"{store.root}: the dense variant needs dseg label maps; none found")
        extra["dense_labels"] = sorted(values)
    if needs.whole_scan:  # every scan fits the canvas (a resumed run's canvas grows with a larger store)
        canvas = np.max([*shapes, extra.get("scan_canvas", (0, 0, 0))], axis=0)
        extra["scan_canvas"] = [max(int(c), cfg.patch) for c in canvas]
    idx.extra = extra
    return idx


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
        # one generator for every transform, re-seeded in place for each sample (a new generator per transform
        # and sample cost about a third of the augmentation's time)
        self._state = np.random.RandomState(seed)
        for t in [*spatial, self.gamma, self.noise]:
            t.set_random_state(state=self._state)

    def reseed(self, seed: int) -> None:
        self._state.seed(seed)

    def __call__(self, image: np.ndarray, label: np.ndarray | None, present: np.ndarray) -> tuple[np.ndarray, Any]:
        d = {"image": image} if label is None else {"image": image, "label": label}
        d = self.spatial(d)
        img = np.asarray(d["image"], dtype=np.float32).copy()
        for c in np.flatnonzero(present):
            img[c] = np.asarray(self.noise(self.gamma(img[c : c + 1])), dtype=np.float32)[0]
        lab = np.asarray(d["label"]) if label is not None else None
        return img, lab


class DamagedSession(Exception):
    """A session's stored data cannot be read (a damaged or missing chunk)."""

    def __init__(self, key: str, path: str, reason: str):
        super().__init__(f"{key}: {path}: {reason}")
        self.key, self.path, self.reason = key, path, reason


class PretrainDataset(Dataset):
    """``length`` random samples per epoch from the sessions of ``index`` (see module docstring)."""

    def __init__(
        self,
        store_root: str | Path,
        index: SessionIndex,
        cfg: DataConfig,
        length: int,
        seed: int = 0,
        needs: DataNeeds | None = None,
        report_dir: str | Path | None = None,
    ):
        self.store_root = str(store_root)
        self.index = index
        self.cfg = cfg
        self.length = length
        self.seed = seed
        self.needs = needs or DataNeeds()
        self.dense = self.needs.dense
        if cfg.mode == "scan":
            self.items = [(i, c) for i, cs in enumerate(index.contrasts) for c in cs]
        else:
            self.items = [(i, "") for i in range(len(index.keys))]
        self.report_dir = str(report_dir) if report_dir else None
        self._damaged: set[str] = set()
        self._store: Store | None = None
        self._rng: np.random.Generator | None = None
        self._augment: Augment | None = None
        if self.dense:
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
            self._augment = Augment(self.cfg, self.seed) if self.cfg.augment else None

    def _read(self, key: str, name: str, box: tuple[slice, ...] | None, dtype: Any = np.float32) -> np.ndarray:
        assert self._store is not None
        try:
            return np.asarray(self._store.read(key, name, box), dtype=dtype)
        except Exception as e:  # a damaged or missing chunk: this session is skipped (see __getitem__)
            raise DamagedSession(key, str(self._store.array_path(key, name)), f"{type(e).__name__}: {e}") from None

    def _skip(self, err: DamagedSession) -> None:
        """Note a damaged session once per worker: a line on stderr and ``report_dir/skipped/<key>.json``."""
        if err.key in self._damaged:
            return
        self._damaged.add(err.key)
        print(f"neurofm: skipped session {err.key}: cannot read {err.path} ({err.reason})", file=sys.stderr)
        if self.report_dir:
            row = {"key": err.key, "path": err.path, "reason": err.reason, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            with contextlib.suppress(OSError):  # the line above has said it
                write_json(Path(self.report_dir) / "skipped" / f"{err.key}.json", row)

    def _crop(
        self, key: str, shape: tuple[int, ...], names: list[str], avail: list[str]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """One (augmented) crop of ``names`` as channels: ``(C, P, P, P)``, presence ``(C,)``, dense label or None."""
        cfg, rng = self.cfg, self._rng
        assert rng is not None and self._store is not None
        box = None if cfg.fit == "resize" else random_box(shape, cfg.patch, rng)
        img, present = stack_contrasts({n: self._read(key, n, box) for n in names if n in avail}, names)
        label = None
        if self.dense:
            maps = self._store.record(key).get("label_maps", {})
            lab = self._read(key, "dseg", box, np.int64) if "dseg" in maps else None
            label = (self._lut[np.asarray(lab, np.int64)] if lab is not None else np.full(img.shape[1:], -1))[None]
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
        return img, present, label

    def _whole(self, key: str, name: str) -> tuple[np.ndarray, tuple[int, ...]]:
        """The whole scan ``name`` of session ``key`` as the analysis reads it (no augmentation), centre-padded with
        its darkest value to the canvas: ``(1, *canvas)``, and its own shape (the critic tiles that, as the
        analysis does)."""
        vol = self._read(key, name, None)
        if self.cfg.intensity == "minmax":
            vol = minmax(vol)
        canvas = self.index.extra["scan_canvas"]
        scan = np.ascontiguousarray(pad_to_shape(vol, canvas, float(vol.min()))[None], dtype=np.float32)
        return scan, tuple(int(s) for s in vol.shape)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Sample ``i`` (its draws from :func:`sample_rng`); a session whose data cannot be read is skipped for
        a random other one."""
        self._setup()
        self._rng = rng = sample_rng(self.seed, i)
        if self._augment is not None:
            self._augment.reseed(int(rng.integers(2**31 - 3)))
        item = sample_item(self.seed, i, len(self.items))
        for _ in range(len(self.items) + 10):
            s = self.items[item][0]
            if self.index.keys[s] not in self._damaged:
                try:
                    return self._sample(item)
                except DamagedSession as e:
                    self._skip(e)
            item = int(rng.integers(len(self.items)))
        raise StoreError(f"{self.store_root}: no readable session left ({len(self._damaged)} damaged)")

    def _sample(self, item: int) -> dict[str, Any]:
        rng = self._rng
        assert rng is not None
        s, contrast = self.items[item]
        key, shape, avail = self.index.keys[s], self.index.shapes[s], self.index.contrasts[s]
        cfg = self.cfg
        if cfg.mode == "pair":
            pick = list(rng.choice(avail, size=min(2, len(avail)), replace=False))
            names = pick if len(pick) == 2 else pick * 2
        elif cfg.mode == "scan":
            names = [contrast]
        else:
            names = list(cfg.contrasts or avail)
        img, present, label = self._crop(key, shape, names, avail)
        out: dict[str, Any] = {}
        if cfg.mode == "pair":
            out.update(
                x_a=torch.from_numpy(img[:1].copy()),
                x_b=torch.from_numpy(img[1:2].copy()),
                pair_valid=torch.tensor(len(set(names)) == 2),
                contrast_a=torch.tensor(contrast_id(names[0])),
                contrast_b=torch.tensor(contrast_id(names[1])),
            )
            if self.needs.reference_crop:  # the same two scans elsewhere: a contrast code that shares no crop
                ref, _, _ = self._crop(key, shape, names, avail)
                out.update(x_a_ref=torch.from_numpy(ref[:1].copy()), x_b_ref=torch.from_numpy(ref[1:2].copy()))
            if self.needs.whole_scan:
                scan, shape = self._whole(key, names[0])
                out.update(scan_a=torch.from_numpy(scan), scan_shape_a=torch.tensor(shape, dtype=torch.long))
        else:
            out.update(x=torch.from_numpy(np.ascontiguousarray(img)), present=torch.from_numpy(present))
        out["health"] = torch.tensor(int(self.index.health[s]))
        if self.index.volumes is not None:
            out["volumes"] = torch.from_numpy(self.index.volumes[s])
            out["has_volumes"] = torch.tensor(bool(self.index.has_volumes[s]))
        if label is not None:
            out["dseg"] = torch.from_numpy(np.ascontiguousarray(label[0]).astype(np.int64))
        return out


def pretrain_loader(
    store_root: str | Path,
    index: SessionIndex,
    cfg: DataConfig,
    needs: DataNeeds,
    seed: int,
    report_dir: str | Path | None = None,
) -> DataLoader:
    """Batches of ``cfg.steps_per_epoch * cfg.batch_size`` random samples per epoch; damaged sessions are
    skipped and listed in ``report_dir/skipped/``."""
    length = cfg.steps_per_epoch * cfg.batch_size
    ds = PretrainDataset(store_root, index, cfg, length=length, seed=seed, needs=needs, report_dir=report_dir)
    return training_loader(ds, cfg.batch_size, cfg.num_workers, seed)
