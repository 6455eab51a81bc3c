"""Shared fixtures: tiny volumes, a real scan that ships with nibabel, dataset trees."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nibabel as nib
import pytest

# One process's PyTorch threads: 2, or under pytest-xdist (make test) the cores shared out between its workers
# (pytest_configure): on 2 cores two 1-thread workers ran the suite in 2/3 of the time one 2-thread process took.
# A count set from outside is kept; pytest-xdist's workers inherit the main process's environment, default included.
_ASKED_THREADS = None if "NEUROFM_TEST_THREADS_DEFAULT" in os.environ else os.environ.get("OMP_NUM_THREADS")
if _ASKED_THREADS is None:
    os.environ["OMP_NUM_THREADS"] = os.environ["NEUROFM_TEST_THREADS_DEFAULT"] = "2"


def pytest_configure(config):
    workers = getattr(config, "workerinput", {}).get("workercount")  # set in pytest-xdist's workers only
    if workers and _ASKED_THREADS is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // int(workers)))  # this worker and what it starts
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


ANATOMICAL = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"


@pytest.fixture(scope="session")
def anatomical() -> Path:
    """A real T1 scan (33x41x25 voxels, 2 mm, LAS) that ships with nibabel."""
    assert ANATOMICAL.is_file()
    return ANATOMICAL


@pytest.fixture
def run_cli(capsys):
    """Run ``neurofm ARGS`` in-process; returns (exit code, stdout, stderr)."""
    from neurofm.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        old = sys.argv
        sys.argv = ["neurofm", *map(str, args)]
        try:
            main()
            code = 0
        except SystemExit as e:
            code = int(e.code or 0) if not isinstance(e.code, str) else 1
        finally:
            sys.argv = old
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> Path:
    """A 2 mm store of 6 synthetic subjects x 2 sessions (all contrasts, volumes, masks)."""
    from neurofm.preprocess import PrepareConfig, prepare
    from neurofm.synth import SynthConfig, synthesize

    root = tmp_path_factory.mktemp("tiny")
    synthesize(
        root / "bids",
        SynthConfig(subjects=6, sessions=2, seed=1, resolution=2, missing_rate=0.15),
        workers=2,
        progress=False,
    )
    prepare(root / "bids", root / "store", PrepareConfig(spacing=2.0), workers=2, progress=False)
    return root / "store"


@pytest.fixture(scope="session")
def pretrained_run(tiny_store, tmp_path_factory) -> Path:
    """fomo25-tiny pretrained for a few steps on the tiny store."""
    from neurofm.tasks.pretrain import pretrain

    out = tmp_path_factory.mktemp("pre") / "run"
    return pretrain(tiny_store, out, "fomo25-tiny", overrides=["trainer.max_steps=4"], progress=False)


@pytest.fixture(scope="session")
def store_4mm(tiny_store) -> Path:
    """The tiny store's scans prepared at 4 mm, the demo's and the shipped models' spacing.

    For the end-to-end tests whose cost is whole-scan inference and feature standardisation:
    a 4 mm scan has an eighth of a 2 mm scan's voxels."""
    from neurofm.preprocess import PrepareConfig, prepare

    out = tiny_store.parent / "store-4mm"
    prepare(tiny_store.parent / "bids", out, PrepareConfig(spacing=4.0), workers=2, progress=False)
    return out


@pytest.fixture(scope="session")
def pretrained_4mm(store_4mm, tmp_path_factory) -> Path:
    """fomo25-tiny pretrained for a few steps on the 4 mm store."""
    from neurofm.tasks.pretrain import pretrain

    out = tmp_path_factory.mktemp("pre4") / "run"
    return pretrain(store_4mm, out, "fomo25-tiny", overrides=["trainer.max_steps=4"], progress=False)
