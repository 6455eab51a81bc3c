from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from helpers import blob_volume, lps_version
from neurofm.preprocess import transforms


def _center_of_mass_world(data, affine):
    idx = np.stack(np.nonzero(data > 0), 1).astype(float)
    w = data[data > 0].astype(float)
    com = (idx * w[:, None]).sum(0) / w.sum()
    return (affine @ np.append(com, 1))[:3]


def _point_blob(shape, at, sigma=2.0):
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    return np.exp(-(((grid - np.asarray(at)) ** 2).sum(-1)) / (2 * sigma**2)).astype(np.float32)


def test_reorientation_is_exact_and_gives_ras(anatomical):
    img = nib.load(str(anatomical))
    data = img.get_fdata().astype(np.float32)
    out, aff = transforms.reorient_ras(data, img.affine)
    assert "".join(nib.aff2axcodes(aff)) == "RAS"
    # Same values at the same world positions: check every voxel through the affines.
    ijk = np.array([[3, 5, 7], [0, 0, 0], [32, 40, 24], [10, 20, 12]])
    for v in ijk:
        world = img.affine @ np.append(v, 1)
        v2 = np.round(np.linalg.inv(aff) @ world)[:3].astype(int)
        assert out[tuple(v2)] == data[tuple(v)]


@pytest.mark.parametrize(
    ("spacing", "make_lps", "zooms"),
    [
        (1.0, True, (2.0, 2.0, 2.0)),
        (1.0, False, (0.8, 1.1, 3.0)),
        (2.0, True, (1.0, 1.0, 1.0)),
        (1.5, True, (1.2, 0.9, 4.0)),
    ],
)
def test_world_coordinates_survive_reorient_and_resample(spacing, make_lps, zooms):
    shape, at = (40, 36, 20), (17.3, 21.6, 9.2)
    data = _point_blob(shape, at, sigma=3.0)
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = [-20.0, 13.0, -7.0]
    if make_lps:
        data, affine = lps_version(data, affine)
    truth = _center_of_mass_world(data, affine)
    ras, aff = transforms.reorient_ras(data, affine)
    grid = transforms.target_grid(ras.shape, aff, spacing)
    out = transforms.resample(ras, aff, grid, order=1)
    assert "".join(nib.aff2axcodes(grid[1])) == "RAS"
    np.testing.assert_allclose(np.sqrt((grid[1][:3, :3] ** 2).sum(0)), spacing)
    got = _center_of_mass_world(out, grid[1])
    assert np.all(np.abs(got - truth) < spacing / 2), (got, truth)


def test_oblique_affine_is_resampled_onto_an_axis_aligned_grid():
    data = _point_blob((30, 30, 30), (12.0, 17.0, 14.0), sigma=2.5)
    c, s = np.cos(0.3), np.sin(0.3)
    affine = np.array([[c, -s, 0, 5], [s, c, 0, -3], [0, 0, 1, 2], [0, 0, 0, 1.0]])
    truth = _center_of_mass_world(data, affine)
    grid = transforms.target_grid(data.shape, affine, 1.0)
    out = transforms.resample(data, affine, grid)
    np.testing.assert_allclose(grid[1][:3, :3], np.eye(3), atol=1e-9)
    assert np.all(np.abs(_center_of_mass_world(out, grid[1]) - truth) < 0.5)


def test_identity_resampling_copies_exactly():
    data = blob_volume((12, 13, 14))
    aff = np.diag([1.0, 1, 1, 1])
    out = transforms.resample(data, aff, (data.shape, aff))
    np.testing.assert_array_equal(out, data)
    assert out is not data


def test_nearest_keeps_label_values():
    lab = np.zeros((20, 20, 20), np.uint8)
    lab[5:12, 5:12, 5:12] = 3
    lab[12:15, 5:9, 5:9] = 7
    out = transforms.resample(
        lab, np.diag([2.0, 2, 2, 1]), transforms.target_grid(lab.shape, np.diag([2.0, 2, 2, 1]), 1.0), order=0
    )
    assert set(np.unique(out)) == {0, 3, 7}
    assert out.dtype == np.uint8


def test_downsampling_is_anti_aliased():
    # Stripes one voxel wide must average out to 0.5 at 2 mm, not alias to a constant 0.
    data = (np.indices((40, 40, 40))[0] % 2).astype(np.float32)
    grid = transforms.target_grid(data.shape, np.eye(4), 2.0)
    inner = transforms.resample(data, np.eye(4), grid)[2:-2, 2:-2, 2:-2]
    assert abs(inner.mean() - 0.5) < 0.05 and inner.std() < 0.05
    aliased = transforms.resample(data, np.eye(4), grid, anti_alias=False)[2:-2, 2:-2, 2:-2]
    assert abs(aliased.mean() - 0.5) > 0.45  # what the filter prevents


def test_zscore_gives_mean_0_std_1_in_the_foreground():
    rng = np.random.default_rng(3)
    data = rng.normal(100, 15, (20, 20, 20)).astype(np.float32)
    mask = np.zeros(data.shape, bool)
    mask[4:16, 3:17, 5:15] = True
    data[~mask] = 0
    out, mean, std = transforms.zscore(data, mask)
    assert out[mask].mean() == pytest.approx(0.0, abs=1e-5)
    assert out[mask].std() == pytest.approx(1.0, abs=1e-5)
    assert mean == pytest.approx(data[mask].mean(), rel=1e-6)
    with pytest.raises(ValueError, match="constant"):
        transforms.zscore(np.ones((5, 5, 5), np.float32), np.ones((5, 5, 5), bool))


def test_foreground_and_bounding_box_on_a_head():
    vol = np.zeros((50, 50, 50), np.float32)
    vol[10:40, 12:38, 15:35] = 100
    vol += np.random.default_rng(0).normal(0, 2, vol.shape).astype(np.float32)
    fg = transforms.foreground_mask(vol)
    box = transforms.bounding_box(fg, margin=2)
    # The mask is computed at half resolution: the box is exact to within one voxel.
    np.testing.assert_allclose([(s.start, s.stop) for s in box], [(8, 42), (10, 40), (13, 37)], atol=1)
    assert transforms.bounding_box(np.zeros((4, 4, 4), bool)) == (slice(0, 4), slice(0, 4), slice(0, 4))


def test_crop_affine_keeps_world_positions():
    aff = np.diag([1.5, 2.0, 1.0, 1.0])
    aff[:3, 3] = [10, -5, 3]
    box = (slice(3, 9), slice(2, 7), slice(0, 4))
    cropped = transforms.crop_affine(aff, box)
    np.testing.assert_allclose(cropped @ [1, 1, 1, 1], aff @ [4, 3, 1, 1])


def test_otsu_splits_two_modes():
    rng = np.random.default_rng(0)
    low, high = rng.normal(10, 2, 5000), rng.normal(80, 5, 5000)
    t = transforms.otsu_threshold(np.concatenate([low, high]))
    assert (low < t).mean() > 0.999 and (high > t).mean() > 0.999
