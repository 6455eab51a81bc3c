from __future__ import annotations

import pytest

from helpers import blob_volume, write_nifti
from neurofm import __version__


def test_version_and_help(run_cli):
    code, out, _ = run_cli("--version")
    assert code == 0 and __version__ in out
    code, out, _ = run_cli("--help")
    assert code == 0
    for verb in ("prepare", "inspect", "demo"):
        assert verb in out


def test_prepare_then_inspect(tmp_path, run_cli):
    write_nifti(tmp_path / "bids/sub-01/anat/sub-01_T1w.nii.gz", blob_volume((20, 20, 20)))
    write_nifti(tmp_path / "bids/sub-01/anat/sub-01_FLAIR.nii.gz", blob_volume((20, 20, 20), seed=1))
    code, _, err = run_cli("prepare", tmp_path / "bids", tmp_path / "store", "--no-progress", "--spacing", "2")
    assert code == 0, err
    code, out, _ = run_cli("inspect", tmp_path / "store")
    assert code == 0
    assert "1 subjects, 1 sessions, 2 images" in out and "2.0 mm" in out


def test_user_errors_are_one_line_without_traceback(tmp_path, run_cli):
    code, out, err = run_cli("prepare", tmp_path / "nowhere", tmp_path / "store")
    assert code == 2
    assert "no such file or folder" in err and "Traceback" not in err
    code, _, err = run_cli("prepare", tmp_path, tmp_path / "s2", "--spacing", "-1")
    assert code == 2 and "spacing" in err
    code, _, err = run_cli("inspect", tmp_path)
    assert code == 2 and "neither a store" in err


@pytest.mark.slow
def test_analyze_and_bench_verbs(tiny_store, pretrained_run, tmp_path, run_cli):
    code, out, err = run_cli(
        "analyze", pretrained_run, "--data", tiny_store, "--out", tmp_path / "an", "--max-sessions", "2"
    )
    assert code == 0, err
    assert "anatomy" in out and (tmp_path / "an" / "report.html").is_file()
    code, _, err = run_cli("analyze", pretrained_run, "--data", tiny_store, "--out", tmp_path / "x", "--compare", "mae")
    assert code == 2 and "NAME=RUN" in err
    code, _, _ = run_cli("bench", "--only", "store")
    assert code == 0
