"""Labelled cases for fine-tuning: targets, reproducible few-shot subsets, k folds, site splits.

A *case* is one session with its target: a label map (seg), a class (cls) or a number (reg).
Splits are made by **subject**, so no subject has sessions on both sides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from neurofm.data.augment import AUGMENTS, NnUNetAugment, resample, widen
from neurofm.data.loader import sample_item, sample_rng
from neurofm.data.sampling import box_around, random_box, stack_contrasts
from neurofm.errors import ConfigError, StoreError
from neurofm.preprocess.transforms import pad_to, pad_to_shape
from neurofm.store import Store


@dataclass
class Case:
    key: str
    subject: str
    session: str
    contrasts: list[str]  # available, among the requested ones
    target: Any  # label-map name (seg), class index (cls), value (reg)
    site: str = ""
    labels: dict[str, Any] = field(default_factory=dict)


@dataclass
class CaseSet:
    """All usable cases of a store for one task, plus what the target means."""

    cases: list[Case]
    task: str
    target: str
    contrasts: list[str]
    classes: list[Any] = field(default_factory=list)  # cls: class values in index order; seg: label values

    @property
    def n_out(self) -> int:
        return 1 if self.task == "reg" else len(self.classes)


def _is_missing(v: Any) -> bool:
    return (
        v is None
        or (isinstance(v, float) and math.isnan(v))
        or (isinstance(v, str) and v.lower() in ("", "n/a", "nan"))
    )


def build_cases(
    store: Store, task: str, target: str, contrasts: list[str] | None = None, positive_only: bool = False
) -> CaseSet:
    """Sessions of ``store`` usable for ``task`` on ``target``, with at least one wanted contrast.

    ``positive_only`` (segmentation): only sessions whose label map has foreground, as in
    FOMO25's segmentation task where every case has a lesion.
    """
    if task not in ("seg", "cls", "reg"):
        raise ConfigError(f"task should be seg, cls or reg, got {task!r}")
    recs = store.records
    if not recs:
        raise StoreError(f"{store.root}: empty store")
    all_contrasts = sorted({c for r in recs.values() for c in r["images"]})
    wanted = list(contrasts) if contrasts else all_contrasts
    unknown = [c for c in wanted if c not in all_contrasts]
    if unknown:
        raise ConfigError(f"contrast(s) {unknown} are not in the store (it has {all_contrasts})")
    cases: list[Case] = []
    values: set[Any] = set()
    for key, r in recs.items():
        avail = [c for c in wanted if c in r["images"]]
        if not avail:
            continue
        labels = r.get("labels", {})
        if task == "seg":
            lm = r.get("label_maps", {}).get(target)
            if lm is None or (positive_only and not any(v > 0 for v in lm.get("values", []))):
                continue
            values |= set(lm.get("values", []))
            value: Any = target
        else:
            value = labels.get(target)
            if _is_missing(value):
                continue
            if task == "reg":
                try:
                    value = float(value)
                except (TypeError, ValueError):
                    raise ConfigError(
                        f"target {target!r} of {key} is not a number ({value!r}); use --task cls"
                    ) from None
            values.add(value)
        cases.append(Case(key, r["subject"], r["session"], avail, value, str(labels.get("site", "")), labels))
    if not cases:
        raise StoreError(f"{store.root}: no session has the target {target!r} and one of the contrasts {wanted}")
    classes: list[Any] = []
    if task == "cls":
        classes = sorted(values, key=lambda v: (isinstance(v, str), v))
        if len(classes) < 2:
            raise ConfigError(f"target {target!r} has a single class {classes}; classification needs two or more")
        index = {v: i for i, v in enumerate(classes)}
        for c in cases:
            c.target = index[c.target]
    elif task == "seg":
        classes = sorted(int(v) for v in values | {0})
    return CaseSet(cases, task, target, wanted, classes)


def _subjects(cases: list[Case]) -> list[str]:
    return sorted({c.subject for c in cases})


def subject_class(cases: list[Case]) -> dict[str, int]:
    """A stratification class per subject (its first session's class; -1 for seg/reg)."""
    out: dict[str, int] = {}
    for c in sorted(cases, key=lambda c: (c.subject, c.session)):
        out.setdefault(c.subject, int(c.target) if isinstance(c.target, int | np.integer) else -1)
    return out


def few_shot(cases: list[Case], shots: int, seed: int = 0, stratify: bool = True) -> tuple[list[Case], list[Case]]:
    """``shots`` training subjects (at least one per class when stratified), the rest held out.

    The same seed gives the same subjects; a larger ``shots`` keeps the smaller set's
    subjects (subsets are nested), so label-efficiency curves compare like with like.
    """
    subjects = _subjects(cases)
    if not 1 <= shots < len(subjects):
        raise ConfigError(f"--shots should be in [1, {len(subjects) - 1}] ({len(subjects)} subjects have the target)")
    rng = np.random.default_rng(seed)
    order = list(rng.permutation(subjects))
    cls = subject_class(cases)
    if stratify and len(set(cls.values()) - {-1}) > 1:
        # one subject of each class first (in the permuted order), then the permuted rest
        firsts, seen = [], set()
        for s in order:
            if cls[s] not in seen:
                seen.add(cls[s])
                firsts.append(s)
        order = firsts + [s for s in order if s not in firsts]
    train = set(order[:shots])
    return [c for c in cases if c.subject in train], [c for c in cases if c.subject not in train]


def k_folds(cases: list[Case], k: int, seed: int = 0) -> list[tuple[list[Case], list[Case]]]:
    """Subject-level k folds, stratified by class for classification."""
    subjects = _subjects(cases)
    if not 2 <= k <= len(subjects):
        raise ConfigError(f"--folds should be in [2, {len(subjects)}], got {k}")
    rng = np.random.default_rng(seed)
    cls = subject_class(cases)
    fold_of: dict[str, int] = {}
    for group in sorted(set(cls.values())):
        members = [s for s in rng.permutation(subjects) if cls[s] == group]
        for i, s in enumerate(members):
            fold_of[s] = (i + len(fold_of)) % k
    return [
        ([c for c in cases if fold_of[c.subject] != f], [c for c in cases if fold_of[c.subject] == f]) for f in range(k)
    ]


def by_site(
    cases: list[Case], train_sites: list[str], test_sites: list[str] | None = None
) -> tuple[list[Case], list[Case]]:
    """Fine-tune on some sites, test on others (out-of-domain, as FOMO25)."""
    sites = sorted({c.site for c in cases})
    bad = [s for s in (train_sites + (test_sites or [])) if s not in sites]
    if bad:
        raise ConfigError(f"unknown site(s) {bad}; the cases come from {sites}")
    test_sites = test_sites or [s for s in sites if s not in train_sites]
    return [c for c in cases if c.site in train_sites], [c for c in cases if c.site in test_sites]


def make_splits(
    cs: CaseSet,
    *,
    seed: int = 0,
    shots: int | None = None,
    folds: int = 0,
    train_sites: list[str] | None = None,
    test_sites: list[str] | None = None,
    train_subjects: list[str] | None = None,
    test_fraction: float = 0.2,
) -> list[tuple[list[Case], list[Case]]]:
    """(train, test) case lists, by subject: exactly ``train_subjects``; or ``train_sites`` (few-shot within
    them); or k ``folds`` (few-shot within each); or ``shots`` subjects; or a ``test_fraction`` hold-out."""
    cases = cs.cases
    stratify = cs.task == "cls"
    if train_subjects:
        chosen = set(train_subjects)
        missing = chosen - {c.subject for c in cases}
        if missing:
            raise ConfigError(f"training subjects without the target or contrasts: {sorted(missing)[:5]}")
        test = [c for c in cases if c.subject not in chosen]
        if train_sites:  # the names are checked against every case: all of a site may be in training
            by_site(cases, train_sites, test_sites)
            test = [c for c in test if c.site not in train_sites and (not test_sites or c.site in test_sites)]
        return [([c for c in cases if c.subject in chosen], test)]
    if train_sites:
        cases_train, cases_test = by_site(cases, train_sites, test_sites)
        if shots:
            cases_train, _ = few_shot(cases_train, shots, seed, stratify=stratify)
        return [(cases_train, cases_test)]
    if folds:
        splits = k_folds(cases, folds, seed)
        if shots:
            splits = [
                (few_shot(tr, min(shots, len({c.subject for c in tr}) - 1), seed, stratify)[0], te) for tr, te in splits
            ]
        return splits
    if shots:
        return [few_shot(cases, shots, seed, stratify=stratify)]
    n_subj = len({c.subject for c in cases})
    n_test = max(1, int(round(test_fraction * n_subj)))
    return [few_shot(cases, n_subj - n_test, seed, stratify=stratify)]


class FinetuneDataset(Dataset):
    """Random training crops of labelled cases: ``x`` (C, P, P, P), ``present`` (C,), ``y``.

    Segmentation crops are centred on a foreground voxel with probability ``fg_p`` (as
    nnU-Net's oversampling) so that small lesions are seen. With ``contrast_dropout`` each present
    contrast of a crop is left out with that probability (one always stays), so that a model
    trained on complete sessions also works on any one contrast alone.

    ``augment``: ``flips`` (mirror flips along each axis; True), ``nnunet`` (nnU-Net's default training
    augmentation, :mod:`neurofm.data.augment`: rotation, scaling, noise, blur, brightness, contrast, low
    resolution, gamma, and the flips) or ``none`` (False; contrast dropout is augmentation too and goes with it).

    With ``whole`` (cls/reg), each item is a whole scan instead of a crop, padded evenly to that fixed
    shape ``(X, Y, Z)`` (:func:`neurofm.infer.runtime.global_windows` pads a scan the same way when
    the model reads it): a global target such as age is a property of the whole brain, which a crop
    shows only in part.
    """

    def __init__(
        self,
        store_root: str | Path,
        case_set: CaseSet,
        cases: list[Case],
        patch: int,
        length: int,
        seed: int = 0,
        fg_p: float = 0.33,
        augment: bool | str = True,
        contrast_dropout: float = 0.0,
        whole: list[int] | None = None,
    ):
        if not cases:
            raise ConfigError("no training cases")
        if whole is not None and case_set.task == "seg":
            raise ConfigError("whole-scan training is for cls/reg; segmentation trains on crops")
        self.store_root = str(store_root)
        self.cs, self.cases, self.patch, self.length = case_set, cases, patch, length
        augment = {True: "flips", False: "none"}.get(augment, augment)  # type: ignore[call-overload]
        if augment not in AUGMENTS:
            raise ConfigError(f"augment should be one of {AUGMENTS}, got {augment!r}")
        self.seed, self.fg_p = seed, fg_p
        self.augment = augment != "none"
        self.nnunet = NnUNetAugment() if augment == "nnunet" else None
        self.contrast_dropout = float(contrast_dropout)
        self.whole = list(whole) if whole is not None else None
        self._store: Store | None = None
        self._rng: np.random.Generator | None = None
        if case_set.task == "seg":
            self._lut = np.zeros(max(case_set.classes) + 1, np.int64)
            self._lut[case_set.classes] = np.arange(len(case_set.classes))

    def __len__(self) -> int:
        return self.length

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_store": None, "_rng": None}

    def _setup(self) -> None:
        if self._store is None:
            self._store = Store(self.store_root)

    def _box(self, case: Case, shape: tuple[int, ...]) -> tuple[slice, ...]:
        rng, p = self._rng, self.patch
        assert rng is not None and self._store is not None
        if self.whole is not None:
            return tuple(slice(0, s) for s in shape)
        if self.cs.task == "seg" and rng.random() < self.fg_p:
            fg = np.argwhere(np.asarray(self._store.read(case.key, case.target)) > 0)
            if len(fg):
                return box_around(fg[rng.integers(len(fg))], shape, p)
        return random_box(shape, p, rng)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Sample ``i``: its crop, augmentation and contrast dropout come from :func:`sample_rng` (seed, i)."""
        self._setup()
        self._rng = sample_rng(self.seed, i)
        assert self._store is not None
        n = len(self.cases)
        # a budget of at least one sample per case: each case in turn, an equal share each (as before 2026-12-06);
        # a shorter one: a random draw of the cases (sample_item), not the first in key order
        case = self.cases[(i % self.length) % n if self.length >= n else sample_item(self.seed, i, n)]
        shape = tuple(self._store.record(case.key)["shape"])
        box = self._box(case, shape)
        size = self.whole or [self.patch] * 3
        turn = self.nnunet.spatial(self._rng) if self.nnunet is not None else None
        read, pads = box, None
        if turn is not None and self.whole is None:  # read around the crop, so that turning it shows no empty corners
            read, pads = widen(box, shape, tuple(self.patch + 2 * m for m in NnUNetAugment.margins(self.patch, turn)))
        images = {c: np.asarray(self._store.read(case.key, c, read), np.float32) for c in case.contrasts}
        img, present = stack_contrasts(images, self.cs.contrasts)
        if self.augment and self.contrast_dropout > 0 and present.sum() > 1:
            keep = present & (self._rng.random(len(present)) >= self.contrast_dropout)
            if not keep.any():
                keep[self._rng.choice(np.flatnonzero(present))] = True
            present = keep
        lab = None
        if self.cs.task == "seg":
            lab = self._lut[np.asarray(self._store.read(case.key, case.target, read), np.int64)]
        if pads is not None:
            img = np.stack([np.pad(a, pads, constant_values=float(a.min())) for a in img])
            lab = np.pad(lab, pads) if lab is not None else None
        else:
            img = np.stack([pad_to_shape(a, size, float(a.min())) for a in img])
            lab = pad_to(lab, self.patch, 0) if lab is not None else None
        if turn is not None:
            img, lab = resample(img, lab, turn, size)
        img *= present.astype(np.float32)[:, None, None, None]
        if self.augment:
            for ax in range(3):
                if self._rng.random() < 0.5:
                    img = np.flip(img, ax + 1)
                    lab = np.flip(lab, ax) if lab is not None else None
        if self.nnunet is not None:
            img = self.nnunet.intensity(img, present, self._rng)
        out: dict[str, Any] = {"x": torch.from_numpy(np.ascontiguousarray(img)), "present": torch.from_numpy(present)}
        if lab is not None:
            out["y"] = torch.from_numpy(np.ascontiguousarray(lab))[None]
        else:
            out["y"] = torch.tensor(case.target, dtype=torch.long if self.cs.task == "cls" else torch.float32)
        return out
