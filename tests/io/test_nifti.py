from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from helpers import blob_volume, write_nifti
from neurofm.errors import ScanError
from neurofm.io.nifti import load_scan, save_scan


def test_reads_real_scan_with_its_geometry(anatomical):
    scan = load_scan(anatomical)
    img = nib.load(str(anatomical))
    assert scan.data.shape == (1, *img.shape)
    assert scan.data.dtype == np.float32
    np.testing.assert_array_equal(scan.data[0], img.get_fdata().astype(np.float32))
    np.testing.assert_array_equal(scan.affine, img.affine)
    assert scan.orientation == "LAS"
    assert scan.spacing == pytest.approx((2.0, 2.0, 2.0))


def test_save_then_load_round_trips(tmp_path, anatomical):
    scan = load_scan(anatomical)
    for name in ("a.nii", "b.nii.gz"):
        out = save_scan(tmp_path / name, scan.data, scan.affine)
        back = load_scan(out)
        np.testing.assert_array_equal(back.data, scan.data)
        np.testing.assert_allclose(back.affine, scan.affine)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_4d_with_one_volume_is_accepted(tmp_path):
    vol = blob_volume((10, 11, 12))
    p = write_nifti(tmp_path / "x.nii.gz", vol[..., None])
    assert load_scan(p).data.shape == (1, 10, 11, 12)


def _expect(path, fragment, kind="image"):
    with pytest.raises(ScanError) as info:
        load_scan(path, kind=kind)
    assert str(path) in str(info.value)
    assert fragment in info.value.reason, info.value.reason
    return info.value


def test_truncated_gzip_is_refused(tmp_path):
    good = write_nifti(tmp_path / "good.nii.gz", blob_volume((20, 20, 20)))
    raw = good.read_bytes()
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(raw[: len(raw) // 2])
    _expect(bad, "truncated or corrupt data")


def test_truncated_uncompressed_is_refused(tmp_path):
    good = write_nifti(tmp_path / "good.nii", blob_volume((20, 20, 20)))
    bad = tmp_path / "bad.nii"
    bad.write_bytes(good.read_bytes()[:1000])
    _expect(bad, "truncated or corrupt data")


def test_garbage_and_non_images_are_refused(tmp_path):
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(gzip.compress(b"this is not an image" * 100))
    _expect(junk, "not a readable NIfTI")
    text = tmp_path / "notes.nii"
    text.write_text("hello")
    _expect(text, "not a readable NIfTI")
    png = tmp_path / "picture.png"
    png.write_bytes(b"\x89PNG\r\n")
    _expect(png, "not a NIfTI file")
    _expect(tmp_path / "missing.nii.gz", "does not exist")
    empty = tmp_path / "empty.nii"
    empty.write_bytes(b"")
    _expect(empty, "empty file")


@pytest.mark.parametrize(
    ("shape", "fragment"),
    [
        ((30, 30), "2D"),
        ((10, 10, 10, 2, 3), "5D"),
        ((10, 10, 10, 3), "4D data with 3 volumes"),
        ((1, 30, 30), "too small"),
    ],
)
def test_wrong_dimensionality_is_refused(tmp_path, shape, fragment):
    p = write_nifti(tmp_path / "x.nii.gz", np.random.default_rng(0).random(shape).astype(np.float32))
    _expect(p, fragment)


def test_absurd_header_dimensions_are_refused(tmp_path):
    img = nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4))
    img.header["dim"][1:4] = [8, 8, 30000]
    p = tmp_path / "huge.nii"
    p.write_bytes(img.header.binaryblock + b"\0" * 4 + np.ones(512, np.float32).tobytes())
    _expect(p, "absurd dimensions")


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_voxels_are_refused(tmp_path, value):
    vol = blob_volume((12, 12, 12))
    vol[3, 4, 5] = value
    _expect(write_nifti(tmp_path / "x.nii.gz", vol), "NaN/Inf")


def _with_sform(path, data, sform):
    """nibabel refuses to build an image from a singular affine; write the header fields directly."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(np.float32)
    hdr["sform_code"], hdr["qform_code"] = 1, 0
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = sform[0], sform[1], sform[2]
    nib.save(nib.Nifti1Image(data, None, header=hdr), str(path))
    return path


def test_singular_affine_is_refused(tmp_path):
    vol = blob_volume((12, 12, 12))
    aff = np.eye(4)
    aff[2, 2] = 0.0
    _expect(_with_sform(tmp_path / "flat.nii.gz", vol, aff), "singular affine")
    aff = np.eye(4)
    aff[:3, 1] = aff[:3, 0]  # two parallel voxel axes
    _expect(_with_sform(tmp_path / "par.nii.gz", vol, aff), "singular affine")


def test_absurd_voxel_size_is_refused(tmp_path):
    _expect(
        write_nifti(tmp_path / "x.nii.gz", blob_volume((12, 12, 12)), np.diag([1, 1, 500.0, 1])),
        "absurd voxel size",
    )


def test_constant_image_is_refused(tmp_path):
    _expect(write_nifti(tmp_path / "x.nii.gz", np.zeros((12, 12, 12), np.float32)), "constant")


def test_label_maps_must_hold_integers(tmp_path):
    lab = np.zeros((12, 12, 12), np.float32)
    lab[4:8, 4:8, 4:8] = 1
    ok = load_scan(write_nifti(tmp_path / "ok.nii.gz", lab), kind="label")
    assert set(np.unique(ok.data)) == {0.0, 1.0}
    lab[5, 5, 5] = 0.5
    _expect(write_nifti(tmp_path / "bad.nii.gz", lab), "non-integer", kind="label")
