"""The faults of a shared cluster (neurofm.faults): disk full, preemption, out of memory, two writers,
a damaged store chunk. Disk full is simulated with a patched writer (a test cannot mount a small
filesystem everywhere); signals, locks and damage are real."""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import blob_volume, write_nifti
from neurofm.errors import NeurofmError
from neurofm.faults import FolderLock, LockedError, disk_guard, is_disk_full
from neurofm.io.checkpoint import checkpoint_step, latest_checkpoint, read_checkpoint


def _one_line(code: int, out: str, err: str, *words: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert lines and lines[-1].startswith("error:"), err
    assert "Traceback" not in err + out
    for w in words:
        assert w in lines[-1], lines[-1]
    return lines[-1]


def _enospc(path: str | Path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _tree_digest(root: Path, parts: tuple[str, ...] = ("arrays", "records")) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for part in parts
        for p in sorted((root / part).rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def small_bids(tmp_path) -> Path:
    for s in range(3):
        for c, seed in (("T1w", s), ("FLAIR", 10 + s)):
            write_nifti(tmp_path / f"bids/sub-0{s}/anat/sub-0{s}_{c}.nii.gz", blob_volume((24, 24, 24), seed=seed))
    return tmp_path / "bids"


def test_disk_full_words_of_other_libraries_are_recognised(tmp_path):
    assert is_disk_full(_enospc(tmp_path))
    assert is_disk_full(RuntimeError("I/O error: No space left on device (os error 28)"))  # safetensors
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    try:
        try:
            raise _enospc(tmp_path / "a")
        except OSError as e:
            raise RuntimeError("cleanup failed too") from e
    except RuntimeError as chained:
        assert is_disk_full(chained)
    assert not is_disk_full(RuntimeError("shape mismatch"))
    assert not is_disk_full(RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"), tmp_path)
    with (
        pytest.raises(NeurofmError, match="no space left on the device while testing"),
        disk_guard(tmp_path, "testing"),
    ):
        raise _enospc(tmp_path / "x")
    with pytest.raises(ValueError), disk_guard(tmp_path, "testing"):  # anything else passes through untouched
        raise ValueError("not a disk problem")


def test_disk_full_during_prepare_is_one_line_and_a_rerun_matches(small_bids, tmp_path, run_cli, monkeypatch):
    prep = importlib.import_module("neurofm.preprocess.prepare")  # the module (the package exports a function)

    code, _, err = run_cli("prepare", small_bids, tmp_path / "clean", "--no-progress", "--spacing", "2")
    assert code == 0, err
    real, calls = prep.write_array, []

    def full_after_three(path, array):
        calls.append(path)
        if len(calls) > 3:
            raise _enospc(path)
        return real(path, array)

    monkeypatch.setattr(prep, "write_array", full_after_three)
    code, out, err = run_cli("prepare", small_bids, tmp_path / "store", "--no-progress", "--spacing", "2")
    line = _one_line(code, out, err, "no space left on the device while writing the store", "run the same prepare")
    assert str(tmp_path / "store") in line
    assert not list((tmp_path / "store" / "failures").glob("*.json"))  # a full disk is no scan's failure
    monkeypatch.setattr(prep, "write_array", real)
    code, _, err = run_cli("prepare", small_bids, tmp_path / "store", "--no-progress", "--spacing", "2")
    assert code == 0, err
    assert _tree_digest(tmp_path / "store") == _tree_digest(tmp_path / "clean")


def test_prepare_checks_free_space_before_any_work(small_bids, tmp_path, run_cli, monkeypatch):
    prep = importlib.import_module("neurofm.preprocess.prepare")  # the module (the package exports a function)

    monkeypatch.setattr(prep, "free_bytes", lambda folder: 1000)
    code, out, err = run_cli("prepare", small_bids, tmp_path / "store", "--no-progress", "--spacing", "2")
    _one_line(code, out, err, "needs about", "1000 B free", "--no-space-check")
    assert not list((tmp_path / "store" / "arrays").rglob("*.b2nd"))
    need = prep.estimate_bytes(prep.discover(small_bids).sessions(), prep.PrepareConfig(spacing=2.0))
    assert 6 * 12**3 * 4 / 2 * 0.9 < need < 6 * 12**3 * 4 / 2 * 1.1  # 6 images of 24^3 x 1 mm at 2 mm, float32, /2
    code, _, err = run_cli(
        "prepare", small_bids, tmp_path / "store", "--no-progress", "--spacing", "2", "--no-space-check"
    )
    assert code == 0, err


@pytest.mark.slow
def test_disk_full_during_pretrain_then_resume_finishes(tiny_store, tmp_path, run_cli, monkeypatch):
    import neurofm.io.checkpoint as ckio

    real = ckio.save_file
    calls = []

    def full_on_second(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError(f"I/O error: No space left on device (os error 28): {path}")  # safetensors' words
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ckio, "save_file", full_on_second)
    args = ["pretrain", "--preset", "fomo25-tiny", "--data", tiny_store, "--out", tmp_path / "run", "--no-progress"]
    code, out, err = run_cli(*args, "--max-steps", "8", "--set", "trainer.checkpoint_every=4")
    _one_line(code, out, err, "no space left on the device while writing checkpoints", "--resume")
    assert checkpoint_step(latest_checkpoint(tmp_path / "run")) == 4  # the last good one stands
    monkeypatch.setattr(ckio, "save_file", real)
    code, _, err = run_cli("pretrain", "--out", tmp_path / "run", "--resume", "--no-progress")
    assert code == 0, err
    assert checkpoint_step(latest_checkpoint(tmp_path / "run")) == 8
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))


def _start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "neurofm.cli", *map(str, args)]
    return subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
    )


def _wait_for_step(proc: subprocess.Popen, at_least: int, timeout: float = 240) -> list[str]:
    """Read the progress lines (``step N/M ...``) until step >= at_least."""
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            if proc.poll() is not None:
                pytest.fail("training ended early:\n" + "".join(seen)[-3000:])
            continue
        seen.append(line)
        if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= at_least:
            return seen
    pytest.fail("no progress within the time limit")


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_at_the_current_step_and_resume_finishes(store_4mm, tmp_path):
    run = tmp_path / "run"
    args = ["pretrain", "--preset", "fomo25-tiny", "--data", store_4mm, "--out", run, "--max-steps", "40"]
    proc = _start([*args, "--set", "trainer.checkpoint_every=1000", "--progress"])  # no periodic checkpoint
    _wait_for_step(proc, 6)
    proc.send_signal(signal.SIGTERM)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM at step" in err and "--resume" in err and "Traceback" not in err
    ck = latest_checkpoint(run)
    step = checkpoint_step(ck)
    assert 6 <= step < 40 and read_checkpoint(run)["meta"]["step"] == step
    assert not (run / ".lock").exists()  # released on the way out
    proc = _start(["pretrain", "--out", run, "--resume", "--no-progress"])
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, err
    assert checkpoint_step(latest_checkpoint(run)) == 40  # the same final step as an uninterrupted run


@pytest.mark.slow
def test_sigusr1_under_slurm_requeues_and_finetune_resumes(store_4mm, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {"SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    out = tmp_path / "ft"
    args = ["finetune", "--data", store_4mm, "--task", "cls", "--target", "healthy", "--from", "scratch"]
    args += ["--arch", "fomo25-tiny", "--shots", "3", "--steps", "30", "--workers", "0", "--no-tta", "--out", out]
    args += ["--bootstrap", "20"]
    proc = _start([*args, "--progress"], env)
    _wait_for_step(proc, 6)
    proc.send_signal(signal.SIGUSR1)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGUSR1, err
    assert "stopped by SIGUSR1" in err and "Traceback" not in err
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    step = checkpoint_step(latest_checkpoint(out))
    assert 6 <= step < 30
    proc = _start([*args, "--no-progress"])  # without --resume: refused, nothing lost
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 2 and "--resume" in err
    proc = _start([*args, "--no-progress", "--resume"])
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, err
    assert checkpoint_step(latest_checkpoint(out)) == 30 and (out / "summary.json").is_file()


def test_out_of_memory_names_the_batch_and_what_fits(tiny_store, tmp_path, run_cli, monkeypatch):
    from neurofm.objectives.fomo25 import Fomo25Loss

    real = Fomo25Loss.forward

    def small_memory(self, model, batch, progress=0.0):
        x = batch["x_a"]
        if x.shape[0] * x.shape[2] ** 3 > 2 * 32**3:  # only two 32^3 pairs fit
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, model, batch, progress)

    monkeypatch.setattr(Fomo25Loss, "forward", small_memory)
    args = ["pretrain", "--preset", "fomo25-tiny", "--data", tiny_store, "--out", tmp_path / "run", "--no-progress"]
    code, out, err = run_cli(*args, "--max-steps", "3", "--set", "data.batch_size=8")
    _one_line(code, out, err, "ran out of memory at batch 8, patch 32^3", "batch 2 at patch 32^3 fits")
    assert "--set data.batch_size=2" in err
    assert not (tmp_path / "run" / ".lock").exists()


def test_a_second_writer_is_refused_and_a_stale_lock_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = tmp_path / "store" / "locks" / "prepare-shard-0-of-1.lock"
        lock.parent.mkdir(parents=True)
        import socket

        info = {"host": socket.gethostname(), "pid": holder.pid, "command": "neurofm prepare a b", "started": "then"}
        lock.write_text(json.dumps(info))
        with pytest.raises(LockedError, match=f"pid {holder.pid}.*neurofm prepare a b"):
            FolderLock(lock, "prepare").acquire()
    finally:
        holder.kill()
        holder.wait()
    taken = FolderLock(lock, "prepare").acquire()  # its process is gone: stale
    assert taken.took_over["pid"] == holder.pid and json.loads(lock.read_text())["pid"] == os.getpid()
    taken.release()
    assert not lock.exists()
    # another host: alive while its heartbeat is fresh, stale once it stops
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "command": "neurofm pretrain", "started": "x"}))
    with pytest.raises(LockedError, match="host elsewhere"):
        FolderLock(lock, "prepare", stale_after=60).acquire()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    FolderLock(lock, "prepare", stale_after=60).acquire().release()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process start times are read from /proc")
def test_a_lock_whose_pid_was_handed_to_a_newer_process_is_stale(tmp_path):
    """After a restart the dead writer's pid can name another live process: one started after the lock was taken."""
    import socket

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = tmp_path / "run" / ".lock"
        lock.parent.mkdir()
        info = {"host": socket.gethostname(), "pid": other.pid, "command": "neurofm pretrain"}
        hour_ago = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 3600))
        lock.write_text(json.dumps({**info, "started": hour_ago}))  # taken an hour before `other` started
        taken = FolderLock(lock, "pretrain").acquire()
        assert taken.took_over["pid"] == other.pid
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        taken.release()
        now = time.strftime("%Y-%m-%dT%H:%M:%S")
        lock.write_text(json.dumps({**info, "started": now}))  # taken after `other` started: its own
        with pytest.raises(LockedError, match=f"pid {other.pid}"):
            FolderLock(lock, "pretrain").acquire()
    finally:
        other.kill()
        other.wait()


def test_prepare_refuses_a_second_writer_of_the_same_shard(small_bids, tmp_path, run_cli):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        code, _, err = run_cli("prepare", small_bids, tmp_path / "store", "--no-progress", "--spacing", "2")
        assert code == 0, err
        import socket

        lock = tmp_path / "store" / "locks" / "prepare-shard-0-of-1.lock"
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid, "command": "neurofm prepare"}))
        code, out, err = run_cli("prepare", small_bids, tmp_path / "store", "--no-progress", "--spacing", "2")
        _one_line(code, out, err, "being written by another process", f"pid {holder.pid}")
        # two pretraining runs into one run folder: the second is refused the same way
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / ".lock").write_text(lock.read_text())
        args = ["pretrain", "--preset", "mae-tiny", "--data", tmp_path / "store", "--out", tmp_path / "run"]
        code, out, err = run_cli(*args)
        _one_line(code, out, err, "being written by another process", f"pid {holder.pid}")
        # another shard of the same store is another writer's own part: allowed
        code, _, err = run_cli(
            "prepare", small_bids, tmp_path / "store", "--no-progress", "--spacing", "2", "--shard", "1/2"
        )
        assert code == 0, err
    finally:
        holder.kill()
        holder.wait()


def _damage(store: Path, key: str, how: str) -> list[Path]:
    files = sorted((store / "arrays" / key).glob("*.b2nd"))
    for f in files:
        data = bytearray(f.read_bytes())
        if how == "chunks":  # everything after the header: no chunk decompresses
            start = min(2048, len(data) // 4)
            data[start:] = os.urandom(len(data) - start)
        else:  # one flipped byte in the middle: may decode to wrong values without an error
            data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    return files


@pytest.mark.slow
def test_a_damaged_chunk_skips_its_session_and_verify_finds_it(tiny_store, tmp_path, run_cli):
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    code, _, err = run_cli("inspect", store, "--verify")
    assert code == 0 and "0 damaged" in err, err
    from neurofm.store import Store

    keys = Store(store).keys
    damaged = _damage(store, keys[0], "chunks")
    args = ["pretrain", "--preset", "mae-tiny", "--data", store, "--out", tmp_path / "run", "--no-progress"]
    code, out, err = run_cli(*args, "--max-steps", "30")
    assert code == 0, err
    assert f"skipped session {keys[0]}" in err
    listed = [json.loads(p.read_text()) for p in (tmp_path / "run" / "skipped").glob("*.json")]
    assert [r["key"] for r in listed] == [keys[0]] and listed[0]["path"].endswith(".b2nd")
    assert "skipped sessions (data could not be read): 1" in out
    flipped = _damage(store, keys[1], "flip")  # found by its checksum even where it would decode
    code, _, err = run_cli("inspect", store, "--verify")
    assert code == 1
    assert f"{len(damaged) + len(flipped)} damaged" in err, err
    assert err.count(f"damaged: {keys[1]}") == len(flipped) and "checksum differs" in err


@pytest.mark.slow
def test_prepare_on_a_real_small_filesystem(small_bids, tmp_path, run_cli):
    """Where the test may mount a tmpfs (root in a container), the full disk is a real one."""
    code, _, err = run_cli("prepare", small_bids, tmp_path / "clean", "--no-progress", "--spacing", "1")
    assert code == 0, err
    size = sum(p.stat().st_size for p in (tmp_path / "clean").rglob("*") if p.is_file())
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    half = max(64 * 1024, size // 2)
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={half}", "tmpfs", str(mnt)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        args = ["prepare", small_bids, mnt / "store", "--no-progress", "--spacing", "1", "--no-space-check"]
        code, out, err = run_cli(*args)
        _one_line(code, out, err, "no space left on the device while writing the store")
        subprocess.run(["mount", "-o", f"remount,size={4 * size + 2**20}", str(mnt)], check=True)
        code, _, err = run_cli(*args)
        assert code == 0, err
        assert _tree_digest(mnt / "store") == _tree_digest(tmp_path / "clean")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)  # lazy: a handle left open must not block


def _take_lock_in_child(path: str, queue) -> None:
    try:
        FolderLock(Path(path), "fine-tune").acquire()
        queue.put("acquired")
    except LockedError as e:
        queue.put(str(e))


def test_a_child_process_rerunning_its_parents_script_is_told_the_likely_cause(tmp_path):
    """A script without a ``__main__`` guard re-runs in every data-loader worker; the worker then meets the lock its
    parent holds, and the error says so instead of blaming "another process"."""
    import multiprocessing

    lock = tmp_path / "run" / ".lock"
    held = FolderLock(lock, "fine-tune").acquire()
    try:
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        child = ctx.Process(target=_take_lock_in_child, args=(str(lock), queue))
        child.start()
        said = queue.get(timeout=120)
        child.join(timeout=60)
    finally:
        held.release()
    assert f"held by this process's parent (pid {os.getpid()})" in said
    assert 'if __name__ == "__main__":' in said
