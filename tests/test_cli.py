from __future__ import annotations

import re
from pathlib import Path

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


#: one bad input per verb, refused before any work: (arguments, words the one-line error must contain)
BAD_INPUT = {
    "prepare": (["prepare", "{tmp}/nowhere", "{tmp}/store"], "no such file or folder"),
    "synth": (["synth", "{tmp}/bids", "--resolution", "3", "--no-progress"], "resolution should be 1 or 2"),
    "pretrain": (["pretrain", "--preset", "nope", "--data", "{tmp}", "--out", "{tmp}/run"], "unknown preset"),
    "finetune": (
        ["finetune", "--data", "{tmp}/nowhere", "--task", "seg", "--target", "lesion", "--out", "{tmp}/ft"],
        "not a neurofm store",
    ),
    "evaluate": (["evaluate", "{tmp}/nowhere", "--data", "{tmp}"], "not a neurofm store"),
    "predict": (["predict", "{tmp}/nowhere", "T1w={tmp}/t1.nii.gz", "--out", "{tmp}/p"], "neither a run folder"),
    "embed": (["embed", "{tmp}/nowhere", "--data", "{tmp}", "--out", "{tmp}/e.csv"], "neither a run folder"),
    "analyze": (["analyze", "{tmp}/nowhere", "--data", "{tmp}", "--out", "{tmp}/a"], "neither a run folder"),
    "erase": (["erase", "{tmp}/nowhere", "--data", "{tmp}"], "neither a run folder"),
    "bench": (["bench", "--only", "nope"], "unknown benchmark"),
    "import": (["import", "nnssl", "{tmp}/missing.pth", "--out", "{tmp}/i"], "no such file"),
    "export": (["export", "{tmp}/nowhere", "--out", "{tmp}/x.pth"], "neither a run folder"),
    "inspect": (["inspect", "{tmp}"], "neither a store"),
    "brain-extract": (["brain-extract", "{tmp}/t1.nii.gz", "--out", "{tmp}/a", "--method", "none"], "needs a method"),
    "demo": (["demo", "--out", "{tmp}/demo", "--subjects", "2"], "too few"),
}


@pytest.mark.parametrize("verb", sorted(BAD_INPUT))
def test_every_verb_refuses_bad_input_in_one_line(verb, tmp_path, run_cli):
    args, words = BAD_INPUT[verb]
    code, out, err = run_cli(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], err
    assert "Traceback" not in err + out
    assert not (tmp_path / "demo").exists() and not (tmp_path / "a").exists()  # refused before any work


def test_every_verb_is_tested_through_the_cli():
    """Each verb has a bad-input case above and at least one run through the CLI that succeeds."""
    from pathlib import Path

    from neurofm.cli import app

    verbs = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert verbs == set(BAD_INPUT)
    tests = "\n".join(p.read_text() for p in Path(__file__).parent.rglob("test_*.py"))
    untested = [v for v in verbs if not re.search(rf'(run_cli\(|args = \[)\s*"{v}"', tests)]
    assert not untested, f"verbs never run through the CLI: {untested}"


def test_predict_options_that_do_not_go_together_are_refused(tmp_path, run_cli):
    args = ["predict", tmp_path / "ft", "T1w=x.nii.gz", "--out", tmp_path / "p", "--engine", "onnx"]
    (tmp_path / "ft").mkdir()  # neither a run nor an export
    code, out, err = run_cli(*args, "--ensemble", tmp_path / "ft2")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "neither an exported model" in lines[0]
    code, _, err = run_cli(*args[:-1], "tensorrt")
    assert code == 2 and "--engine should be one of" in err and "Traceback" not in err


def test_bench_knows_every_benchmark_of_run_all():
    """`neurofm bench --only` accepts exactly the benchmarks run_all.py runs, and each has its script."""
    import importlib.util

    from neurofm.cli import BENCHMARKS

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    spec = importlib.util.spec_from_file_location("run_all", bench / "run_all.py")
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    assert set(BENCHMARKS) == set(run_all.CPU) == set(run_all.GPU)
    assert all((bench / f"bench_{name}.py").is_file() for name in BENCHMARKS)
