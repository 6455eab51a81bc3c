"""Fine-tuning augmentation: nnU-Net's pipeline (``augment=nnunet``) next to the plain mirror flips."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from neurofm.data.augment import NnUNetAugment, resample, widen
from neurofm.data.finetune import FinetuneDataset, build_cases
from neurofm.errors import ConfigError
from neurofm.store import Store
from neurofm.tasks.finetune import finetune
from neurofm.train.config import FinetuneConfig

INTENSITY_OFF = NnUNetAugment(
    noise_p=0, blur_p=0, brightness_p=0, contrast_p=0, lowres_p=0, gamma_inverted_p=0, gamma_p=0
)
SPATIAL_ONLY = replace(INTENSITY_OFF, rotate_p=1, scale_p=1)


def _ball(n: int, radius: float, centre: tuple[float, ...] | None = None) -> np.ndarray:
    c = centre if centre is not None else ((n - 1) / 2,) * 3
    g = np.indices((n, n, n)).astype(np.float32)
    return np.sqrt(sum((g[i] - c[i]) ** 2 for i in range(3)))


def test_resample_keeps_the_centre_turns_exactly_and_scales_by_the_factor():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(2, 30, 30, 30)).astype(np.float32)
    lab = rng.integers(0, 3, (30, 30, 30))
    same, same_lab = resample(img, lab, ((0.0, 0.0, 0.0), 1.0), [16, 16, 16])
    np.testing.assert_allclose(same, img[:, 7:23, 7:23, 7:23], atol=1e-5)  # the identity keeps the central cube
    np.testing.assert_array_equal(same_lab, lab[7:23, 7:23, 7:23])
    # a quarter turn about one axis maps the voxel grid onto itself: the label follows exactly, as numpy turns it
    _, turned = resample(img, lab, ((math.pi / 2, 0.0, 0.0), 1.0), [16, 16, 16])
    centre = lab[7:23, 7:23, 7:23]
    assert any(np.array_equal(turned, np.rot90(centre, k, axes=(1, 2))) for k in (1, 3))
    assert not np.array_equal(turned, centre)
    # scale s samples s times the room: a ball's volume shrinks by s^3 (nnU-Net's meaning: 1.4 zooms out)
    ball = (_ball(40, 8.0) <= 8.0).astype(np.int64)
    for s in (0.7, 1.4):
        _, small = resample(ball[None].astype(np.float32), ball, ((0.0, 0.0, 0.0), s), [40, 40, 40])
        assert small.sum() / ball.sum() == pytest.approx(s**-3, rel=0.12)


def test_image_and_label_turn_together():
    dist = _ball(48, 0, centre=(20.0, 26.0, 23.0))
    img = np.exp(-(dist**2) / (2 * 7.0**2))[None].astype(np.float32)  # a smooth blob, off centre
    lab = (img[0] > 0.5).astype(np.int64)
    rng = np.random.default_rng(1)
    for _ in range(5):
        turn = SPATIAL_ONLY.spatial(rng)
        assert turn is not None
        out, out_lab = resample(img, lab, turn, [24, 24, 24])
        assert out_lab.sum() > 50  # the blob is still in view
        agree = np.mean((out[0] > 0.5) == (out_lab == 1))
        assert agree > 0.98  # bilinear image and nearest label differ only on the edge


def test_widen_keeps_the_crop_centre_and_pads_where_the_scan_ends():
    read, pads = widen((slice(10, 26),) * 3, (40, 40, 40), 32)
    assert read == (slice(2, 34),) * 3 and pads == [(0, 0)] * 3
    read, pads = widen((slice(0, 16), slice(24, 40), slice(5, 21)), (40, 40, 40), 32)
    assert read == (slice(0, 24), slice(16, 40), slice(0, 29)) and pads == [(8, 0), (0, 8), (3, 0)]
    assert all(r.stop - r.start + a + b == 32 for r, (a, b) in zip(read, pads, strict=True))
    read, pads = widen((slice(10, 26),) * 3, (40, 40, 40), (16, 20, 42))  # one size per axis
    assert read == (slice(10, 26), slice(8, 28), slice(0, 39)) and pads == [(0, 0), (0, 0), (3, 0)]


def test_a_draws_read_is_all_its_turned_patch_samples_and_far_less_than_any_turn_needs():
    rng = np.random.default_rng(3)
    vol = rng.normal(size=(1, 72, 72, 72)).astype(np.float32)
    lab = rng.integers(0, 3, (72, 72, 72))
    p, box = 16, (slice(28, 44),) * 3
    spatial = SPATIAL_ONLY.spatial
    for _ in range(12):
        turn = spatial(rng)
        assert turn is not None
        read, pads = widen(box, vol.shape[1:], tuple(p + 2 * m for m in NnUNetAugment.margins(p, turn)))
        assert pads == [(0, 0)] * 3
        tight, tight_lab = resample(vol[(slice(None), *read)], lab[read], turn, [p] * 3)
        # the room a cube turned any way would need: half its diagonal at scale 1.4, and a voxel more
        wide = widen(box, vol.shape[1:], p + 2 * (math.ceil(p * (1.4 * math.sqrt(3) - 1) / 2) + 1))[0]
        ref, ref_lab = resample(vol[(slice(None), *wide)], lab[wide], turn, [p] * 3)
        np.testing.assert_allclose(tight, ref, atol=1e-4)  # nothing sampled lay outside the tight read
        assert np.mean(tight_lab == ref_lab) > 0.999
    # a voxel short at each end of one axis and the patch samples beyond the read (there the border value stands in)
    turn = ((0.5, 0.4, -0.5), 1.4)
    m = NnUNetAugment.margins(p, turn)
    short = widen(box, vol.shape[1:], (p + 2 * m[0] - 2, p + 2 * m[1], p + 2 * m[2]))[0]
    ref = resample(vol[(slice(None), *widen(box, vol.shape[1:], 64)[0])], None, turn, [p] * 3)[0]
    assert np.abs(resample(vol[(slice(None), *short)], None, turn, [p] * 3)[0] - ref).max() > 1e-3
    # no turn and scale 1 read one voxel more than the crop; at 1 mm with 128^3 patches a spatial draw reads on
    # average under a fifth of what the room for any turn (312^3) would
    assert NnUNetAugment.margins(p, ((0.0, 0.0, 0.0), 1.0)) == (1, 1, 1)
    draws = [t for t in (NnUNetAugment().spatial(rng) for _ in range(4000)) if t is not None]
    reads = [np.prod([128 + 2 * m for m in NnUNetAugment.margins(128, t)]) for t in draws]
    assert np.mean(reads) < 0.2 * 312**3


def test_nnunet_items_are_reproducible_augmented_and_keep_missing_contrasts_empty(tiny_store):
    store = Store(tiny_store)
    cs = build_cases(store, "seg", "lesion", ["T1w", "FLAIR", "PDw"])
    plain = FinetuneDataset(tiny_store, cs, cs.cases, 16, length=40, seed=2)
    aug = FinetuneDataset(tiny_store, cs, cs.cases, 16, length=40, seed=2, augment="nnunet")
    again = FinetuneDataset(tiny_store, cs, cs.cases, 16, length=40, seed=2, augment="nnunet")
    # with every probability at 0 an item only crops and flips: each value is one of its scan's voxels
    still = FinetuneDataset(tiny_store, cs, cs.cases, 16, length=40, seed=2, augment="nnunet")
    still.nnunet = replace(INTENSITY_OFF, rotate_p=0, scale_p=0)
    scans = {(c.key, k): np.asarray(store.read(c.key, k), np.float32) for c in cs.cases for k in c.contrasts}
    resampled = 0
    for i in range(40):
        a, b, p, z = aug[i], again[i], plain[i], still[i]
        np.testing.assert_array_equal(a["x"].numpy(), b["x"].numpy())  # the sample's own draws, in any worker
        assert a["x"].shape == p["x"].shape and a["y"].shape == p["y"].shape
        assert set(np.unique(a["y"].numpy())) <= {0, 1}
        assert not a["x"][~a["present"]].any()  # a missing contrast stays empty
        case = cs.cases[i % len(cs.cases)]
        for ch, name in enumerate(cs.contrasts):
            if z["present"][ch]:
                assert np.isin(z["x"][ch].numpy(), scans[(case.key, name)]).all()
            if a["present"][ch]:
                resampled += not np.isin(a["x"][ch].numpy(), scans[(case.key, name)]).all()
    assert resampled > 0  # the pipeline makes values no voxel of the scan has (resampling, noise, gamma, ...)
    # nnU-Net's probabilities: rotation 0.2 and scaling 0.2, so a patch is resampled with probability 0.36
    rng = np.random.default_rng(0)
    turns = [NnUNetAugment().spatial(rng) for _ in range(4000)]
    assert np.mean([t is not None for t in turns]) == pytest.approx(0.36, abs=0.025)
    angles = np.array([t[0] for t in turns if t is not None and any(t[0])])
    scales = np.array([t[1] for t in turns if t is not None and t[1] != 1.0])
    assert np.abs(angles).max() <= math.radians(30) and scales.min() >= 0.7 and scales.max() <= 1.4
    with pytest.raises(ConfigError, match="augment should be one of"):
        FinetuneDataset(tiny_store, cs, cs.cases, 16, length=4, augment="elastic")
    with pytest.raises(ConfigError, match="--augment should be one of none, flips, nnunet"):
        FinetuneConfig(task="seg", target="lesion", augment="elastic")


def test_intensity_transforms_touch_only_present_channels_and_keep_gamma_statistics():
    rng = np.random.default_rng(3)
    img = np.stack([rng.normal(size=(12, 12, 12)), np.zeros((12, 12, 12))]).astype(np.float32)
    present = np.array([True, False])
    gamma_only = replace(SPATIAL_ONLY, gamma_p=1.0)
    out = gamma_only.intensity(img, present, np.random.default_rng(0))
    assert not out[1].any() and not np.allclose(out[0], img[0])
    assert out[0].mean() == pytest.approx(img[0].mean(), abs=1e-4)  # nnU-Net's gamma retains the statistics
    assert out[0].std() == pytest.approx(img[0].std(), rel=1e-3)
    bright = replace(SPATIAL_ONLY, brightness_p=1.0).intensity(img, present, np.random.default_rng(0))
    ratio = bright[0] / img[0]
    assert np.allclose(ratio, ratio.flat[0]) and 0.75 <= ratio.flat[0] <= 1.25  # one factor per channel


@pytest.mark.slow
def test_segmentation_learns_under_nnunet_augmentation(store_4mm, tmp_path):
    cfg = FinetuneConfig(
        task="seg", target="brain", contrasts=["T1w", "FLAIR"], source="scratch", arch="fomo25-tiny", shots=3,
        steps=40, lr=1e-2, patch=16, num_workers=0, bootstrap=20, tta=False, augment="nnunet",
    )  # fmt: skip
    cfg = replace(cfg, trainer=replace(cfg.trainer, log_every=1))
    finetune(store_4mm, tmp_path / "ft", cfg, progress=False)
    logs = pd.read_csv(next((tmp_path / "ft").rglob("metrics.csv")))
    loss = logs["loss"].dropna().to_numpy()
    assert len(loss) == 40
    assert loss[-10:].mean() < 0.9 * loss[:10].mean()  # it learns through the augmentation (0.85x measured)


class _Recording:
    """A store that remembers which session each sample reads (its first call is ``record(key)``)."""

    def __init__(self, store):
        self.store, self.keys = store, []

    def record(self, key):
        self.keys.append(key)
        return self.store.record(key)

    def read(self, *args, **kwargs):
        return self.store.read(*args, **kwargs)


def test_a_fine_tune_reads_every_case_or_a_random_draw_of_them(tiny_store):
    store = Store(tiny_store)
    cs = build_cases(store, "cls", "healthy", None)
    n = len(cs.cases)

    def read(length):
        ds = FinetuneDataset(tiny_store, cs, cs.cases, 16, length=length, seed=4)
        ds._store = _Recording(store)
        for i in range(length):
            ds[i]
        return ds._store.keys

    keys = [c.key for c in cs.cases]
    enough = read(2 * n)  # a budget of two samples per case: each case twice
    assert sorted(enough) == sorted(keys * 2)
    short = read(n // 2)  # a budget under the cases: a draw without repeats, not the first cases in key order
    assert len(set(short)) == n // 2 and set(short) != set(keys[: n // 2])
