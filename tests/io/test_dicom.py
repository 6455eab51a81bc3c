"""DICOM in: series written from synthetic volumes with pydicom as an MR scanner writes them (one file per
slice, LPS patient coordinates), converted back by dcm2niix, identified, and prepared."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from neurofm.io.dicom import identify, looks_like_dicom_folder

LPS = np.diag([-1.0, -1.0, 1.0])


def write_series(folder, data, affine, *, patient="P01", study_uid=None, number=1, description="t1_mprage",
                 tr=2300.0, te=2.3, ti=900.0, agent="", image_type=("ORIGINAL", "PRIMARY", "M", "ND")):  # fmt: skip
    """One DICOM file per slice k of ``data`` (X, Y, Z) with the geometry of ``affine`` (RAS): columns run
    along X, rows along Y, slices along Z."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    col_dir, row_dir = LPS @ affine[:3, 0], LPS @ affine[:3, 1]
    dc, dr = np.linalg.norm(col_dir), np.linalg.norm(row_dir)
    slope = float(np.abs(data).max()) / 30000 or 1.0
    for k in range(data.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.Manufacturer = "MR", "neurofm-test"
        ds.PatientID, ds.PatientName = patient, patient
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.StudyDate, ds.SeriesNumber, ds.InstanceNumber, ds.AcquisitionNumber = "20260101", number, k + 1, 1
        ds.SeriesDescription = ds.ProtocolName = description
        ds.ImageType = list(image_type)
        ds.RepetitionTime, ds.EchoTime = f"{tr:g}", f"{te:g}"
        if ti:
            ds.InversionTime = f"{ti:g}"
        if agent:
            ds.ContrastBolusAgent = agent
        ds.MagneticFieldStrength = "3"
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*(col_dir / dc), *(row_dir / dr))]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in LPS @ (affine @ [0, 0, k, 1])[:3]]
        ds.PixelSpacing = [f"{dr:.6f}", f"{dc:.6f}"]
        ds.SliceThickness = f"{np.linalg.norm(affine[:3, 2]):.6f}"
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.8g}", "0"
        ds.PixelData = np.round(data[:, :, k].T / slope).astype(np.int16).tobytes()
        ds.save_as(folder / f"IM{k:04d}.dcm", enforce_file_format=True)
    return series_uid


def _head(tiny_store, contrast):
    anat = tiny_store.parent / "bids" / "sub-001" / "ses-1" / "anat"
    name = {"T1c": "ce-gadolinium_T1w"}.get(contrast, contrast)
    found = sorted(anat.glob(f"sub-001_ses-1_{name}.nii.gz")) or sorted(anat.glob("sub-001_ses-1_T1w.nii.gz"))
    img = nib.load(found[0])  # a contrast this session lacks: its T1w (the tags tell the contrast)
    return np.asarray(img.dataobj, np.float32), img.affine


@pytest.mark.slow
def test_dicom_round_trip_geometry_and_contrast(tiny_store, tmp_path, run_cli):
    src = tmp_path / "dicom"
    study = generate_uid()
    protocols = {  # contrast: (description, TR, TE, TI, agent)
        "T1w": ("t1_mprage_sag", 2300, 2.3, 900, ""),
        "T1c": ("t1_mprage_post", 2300, 2.3, 900, "Gadovist"),
        "T2w": ("series 7", 5000, 95, 0, ""),  # no telling name: identified by its timing
        "FLAIR": ("t2_flair_ax", 9000, 85, 2500, ""),
    }
    originals = {}
    for n, (contrast, (desc, tr, te, ti, agent)) in enumerate(protocols.items(), start=2):
        data, affine = _head(tiny_store, contrast)
        originals[contrast] = (data, affine)
        write_series(src / f"s{n}", data, affine, study_uid=study, number=n, description=desc, tr=tr, te=te,
                     ti=ti, agent=agent)  # fmt: skip
    loc, aff = _head(tiny_store, "T1w")
    write_series(src / "s1", loc[:, :, :3], aff, study_uid=study, number=1, description="AAHead_Scout",
                 image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))  # fmt: skip
    write_series(src / "s9", loc[:, :, 40:41], aff, study_uid=study, number=9, description="t1 single slice")
    write_series(src / "s10", loc, aff, study_uid=study, number=10, description="ADC",
                 image_type=("DERIVED", "PRIMARY", "ADC"))  # fmt: skip
    (src / "notes.txt").write_text("not dicom")
    assert looks_like_dicom_folder(src)

    code, out, err = run_cli("prepare", src, tmp_path / "store", "--spacing", "2", "--brain-extraction", "none",
                             "--no-progress")  # fmt: skip
    assert code == 0, err + out
    bids = tmp_path / "store-bids"
    printed = " ".join((out + err).split())
    assert "DICOM: 4 series" in printed and "store-bids" in printed, printed
    table = pd.read_csv(bids / "dicom_conversion.tsv", sep="\t")
    skipped = dict(zip(table["description"].fillna(""), table["skipped"].fillna(""), strict=True))
    assert skipped["AAHead_Scout"] == "localizer" and skipped["ADC"] == "derived series"
    assert skipped["t1 single slice"].startswith("2D") and "not a DICOM file" in skipped[""]
    anat = bids / "sub-P01" / "ses-20260101" / "anat"
    for contrast, (data, affine) in originals.items():
        suffix = "ce-gadolinium_T1w" if contrast == "T1c" else contrast
        img = nib.load(anat / f"sub-P01_ses-20260101_{suffix}.nii.gz")
        # the same voxels at the same places: compare in the closest-canonical (RAS) frame
        back, orig = nib.as_closest_canonical(img), nib.as_closest_canonical(nib.Nifti1Image(data, affine))
        assert back.shape == orig.shape
        assert np.allclose(back.affine, orig.affine, atol=1e-3), (contrast, back.affine, orig.affine)
        got, want = np.asarray(back.dataobj, np.float32), np.asarray(orig.dataobj, np.float32)
        assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max() + 1e-3
        side = json.loads((anat / f"sub-P01_ses-20260101_{suffix}.json").read_text())
        assert side["Modality"] == "MR" and "PatientID" not in side  # dcm2niix's sidecar, anonymised
    how = dict(zip(table["contrast"].fillna(""), table["identified_by"].fillna(""), strict=True))
    assert how["T2w"].startswith("timing") and how["T1c"].endswith("contrast agent")
    # ... and the store holds the session with its four contrasts
    rec = json.loads(next((tmp_path / "store" / "records").glob("*.json")).read_text())
    assert sorted(rec["images"]) == sorted(protocols)


def test_identify_by_name_and_timing():
    assert identify({"SeriesDescription": "Sag T1 MPRAGE"}, 176) == ("T1w", "description 'Sag T1 MPRAGE'")
    assert identify({"SeriesDescription": "AX T1 POST GAD"}, 176)[0] == "T1c"
    assert identify({"SeriesDescription": "ax flair"}, 40)[0] == "FLAIR"
    assert identify({"SeriesDescription": "PD_TSE"}, 40)[0] == "PDw"
    assert identify({"SeriesDescription": "x", "RepetitionTime": "500", "EchoTime": "12"}, 40)[0] == "T1w"
    assert identify({"SeriesDescription": "x", "RepetitionTime": "3000", "EchoTime": "20"}, 40)[0] == "PDw"
    assert identify({"SeriesDescription": "dwi", "RepetitionTime": "3000", "EchoTime": "55"}, 40)[0] is None
    assert identify({"SeriesDescription": "t1", "ImageType": ["ORIGINAL", "LOCALIZER"]}, 3) == (None, "localizer")
    assert identify({"SeriesDescription": "T1 MPR COR"}, 100) == (None, "derived series")
    assert identify({"SeriesDescription": "T1"}, 1) == (None, "2D (1 slice)")
    assert identify({"SeriesDescription": "mystery"}, 40)[1].startswith("contrast not identified")
    assert not looks_like_dicom_folder(Path("/nonexistent"))
