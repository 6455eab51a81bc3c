from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch

from neurofm.data.pretrain import PretrainDataset
from neurofm.errors import ConfigError, NonFiniteLossError
from neurofm.io.checkpoint import STATE, latest_checkpoint
from neurofm.models.registry import create_model, model_from_checkpoint
from neurofm.objectives import build_objective
from neurofm.tasks.pretrain import PretrainModule, prepare_data, pretrain
from neurofm.train.config import OptimConfig
from neurofm.train.optim import build_optimizer, lr_factor
from neurofm.train.presets import PRESETS, get_preset
from neurofm.utils import machine

TINY_PRESETS = sorted(p for p in PRESETS if p.endswith("-tiny")) + ["ssl3d-tiny+dense"]


def _batch(cfg, index, store):
    dcfg = dataclasses.replace(cfg.data, augment=False)
    ds = PretrainDataset(
        store,
        index,
        dcfg,
        length=8,
        seed=0,
        needs=cfg.data_needs(),
    )
    return torch.utils.data.default_collate([ds[i] for i in range(cfg.data.batch_size)])


@pytest.mark.slow
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_tiny_preset_trains_loss_falls_and_every_parameter_learns(preset, tiny_store):
    name, _, variant = preset.partition("+")
    cfg = get_preset(name)
    if variant == "dense":  # the ssl3d dense-anatomy variant: a label-map head on the anatomy channels
        cfg = cfg.override(["objective.w_dense=0.1"])
    cfg, index = prepare_data(cfg, tiny_store)
    torch.manual_seed(0)
    model = create_model(cfg.model.name, **cfg.model.kwargs)
    objective = build_objective(cfg.objective)
    batch = _batch(cfg, index, tiny_store)
    opt = build_optimizer(model.parameters(), dataclasses.replace(cfg.optim, lr=3e-3, weight_decay=0.0))
    losses = []

    def fell() -> bool:  # the mean of the last 5 losses 15 % under the mean of the first 5
        return sum(losses[-5:]) < 0.85 * sum(losses[:5])

    for step in range(40):  # within 40 steps the loss falls by 15 %; a preset that is there sooner stops there
        opt.zero_grad()
        loss, terms, _ = objective(model, batch, progress=float(step))
        loss.backward()
        if step == 0:
            for n, p in model.named_parameters():
                if p.requires_grad:
                    assert p.grad is not None and torch.isfinite(p.grad).all(), f"{preset}: {n} has no gradient"
        opt.step()
        losses.append(loss.item())
        if len(losses) >= 10 and fell():
            break
    assert fell(), f"{preset}: loss {sum(losses[:5]) / 5:.4f} -> {sum(losses[-5:]) / 5:.4f} in {len(losses)} steps"


def test_presets_and_overrides():
    cfg = get_preset("fomo25")
    assert cfg.objective.w_rec == 3.0 and cfg.objective.mask_ratio == 0.6 and cfg.objective.block == 4
    assert cfg.optim.name == "adamw" and cfg.optim.warmup_epochs == 5 and cfg.optim.grad_clip == 1.0
    ssl = get_preset("ssl3d")
    assert (ssl.optim.name, ssl.optim.momentum, ssl.optim.lr, ssl.optim.weight_decay) == (
        "sgd",
        0.99,
        1e-2,
        3e-5,
    )
    assert (ssl.objective.block, ssl.objective.mask_ratio) == (16, 0.75)
    lam = get_preset("lamim4")
    assert (lam.objective.hole, lam.objective.holes, lam.data.patch, lam.data.batch_size) == (4, 6000, 96, 7)
    mae = get_preset("mae")
    assert mae.objective.w_swap == mae.objective.w_align == mae.objective.w_kl == 0.0
    new = cfg.override(["optim.lr=3e-4", "objective.w_swap=0", "model.kwargs.latent=64", "trainer.devices=4"])
    assert new.optim.lr == 3e-4 and new.objective.w_swap == 0 and new.model.kwargs["latent"] == 64
    assert new.trainer.devices == 4
    with pytest.raises(ConfigError, match="unknown setting 'optim.lrr'"):
        cfg.override(["optim.lrr=1"])
    with pytest.raises(ConfigError, match="key=value"):
        cfg.override(["optim.lr"])
    with pytest.raises(ConfigError, match="data.mode"):
        cfg.override(["data.mode=triplets"])
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("fomo26")


def test_lr_schedules_known_answers():
    cos = OptimConfig(schedule="warmup_cosine", warmup_epochs=2, warmup_start_factor=1e-3)
    assert lr_factor(0, 100, 10, cos) == pytest.approx(1e-3)
    assert lr_factor(10, 100, 10, cos) == pytest.approx(0.5 + 0.5e-3, rel=1e-3)
    assert lr_factor(20, 100, 10, cos) == pytest.approx(1.0)
    assert lr_factor(60, 100, 10, cos) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, cos) == pytest.approx(0.0, abs=1e-9)
    poly = OptimConfig(schedule="poly", poly_exponent=0.9)
    assert lr_factor(50, 100, 10, poly) == pytest.approx(0.5**0.9)
    assert lr_factor(7, 100, 10, OptimConfig(schedule="constant")) == 1.0


def test_nan_loss_stops_with_a_clear_message():
    module = PretrainModule(get_preset("fomo25-tiny"))
    batch = {
        "x_a": torch.full((1, 1, 32, 32, 32), float("nan")),
        "x_b": torch.zeros(1, 1, 32, 32, 32),
        "pair_valid": torch.tensor([True]),
    }
    with pytest.raises(NonFiniteLossError, match="lower the learning rate|Lower the learning rate"):
        module.training_step(batch, 0)


@pytest.mark.slow
def test_cli_pretrain_writes_a_self_describing_run(tiny_store, tmp_path, run_cli):
    run = tmp_path / "run"
    code, _, err = run_cli(
        "pretrain",
        "--preset",
        "fomo25-tiny",
        "--data",
        tiny_store,
        "--out",
        run,
        "--max-steps",
        "12",
        "--set",
        "trainer.checkpoint_every=5",
        "--progress",
    )
    assert code == 0, err
    # stderr is not a terminal here: plain progress lines, no bar redrawn with carriage returns
    lines = [ln for ln in err.splitlines() if ln.startswith("step ")]
    assert lines[-1].startswith("step 12/12  loss ") and "steps/s" in lines[-1]
    assert len(lines) == 12 and "\r" not in err
    ck = latest_checkpoint(run)
    assert ck is not None and ck.name == "step-0000012"
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-0000010", "step-0000012"]
    for f in (
        "model.safetensors",
        "model.json",
        "transfer.json",
        "preprocessing.json",
        "run.json",
        "meta.json",
        STATE,
    ):
        assert (ck / f).is_file(), f
    model, info = model_from_checkpoint(run)
    assert info["preprocessing"]["spacing"] == 2.0 and info["transfer"]["in_channels"] == 1
    assert info["meta"]["step"] == 12
    assert (run / "figures" / "reconstructions.png").stat().st_size > 5000
    assert (run / "logs" / "csv" / "version_0" / "metrics.csv").is_file()
    code, out, _ = run_cli("inspect", run)
    assert code == 0 and "fomo25-tiny" in out and "parameters: 293,905" in out and "step 12" in out
    code, _, err = run_cli("pretrain", "--preset", "fomo25-tiny", "--data", tiny_store, "--out", run)
    assert code == 2 and "--resume" in err


def test_half_written_checkpoints_are_never_picked_up(tmp_path):
    ck = tmp_path / "run" / "checkpoints"
    good = ck / "step-0000010"
    good.mkdir(parents=True)
    (good / "model.safetensors").write_bytes(b"x")
    (good / "meta.json").write_text("{}")
    partial = ck / "step-0000020"  # renamed but incomplete (no meta.json) cannot happen, but must not be used
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"x")
    (ck / ".tmp-step-0000030").mkdir()
    (ck / "last").write_text("step-0000020\n")  # even a pointer to it is not trusted
    assert latest_checkpoint(tmp_path / "run") == good


class _Capture(L.Callback):
    def __init__(self):
        self.start_step = None
        self.optimizer_state = None

    def on_train_start(self, trainer, pl_module):
        self.start_step = trainer.global_step
        self.optimizer_state = {
            k: {n: t.clone() for n, t in v.items() if torch.is_tensor(t)}
            for k, v in trainer.optimizers[0].state_dict()["state"].items()
        }


@pytest.mark.slow
def test_kill_9_then_resume_continues_from_the_last_checkpoint(tiny_store, tmp_path, monkeypatch):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "neurofm.cli",
        "pretrain",
        "--preset",
        "fomo25-tiny",
        "--data",
        str(tiny_store),
        "--out",
        str(run),
        "--max-steps",
        "400",
        "--set",
        "trainer.checkpoint_every=4",
        "--no-progress",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 180
    try:
        while time.time() < deadline:
            ck = latest_checkpoint(run)
            if ck is not None and ck.name >= "step-0000012":
                break
            if proc.poll() is not None:
                pytest.fail(f"training exited early: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint within the time limit")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    ck = latest_checkpoint(run)
    saved = torch.load(ck / STATE, map_location="cpu", weights_only=True)
    saved_step = saved["global_step"]
    assert saved_step == int(ck.name.split("-")[1])
    cap = _Capture()
    target = saved_step + 6
    first = json.loads((run / "run.json").read_text())
    first_code = first["code"]
    # resumed by other code (as after a git pull): run.json names the new code and keeps the old one's steps
    monkeypatch.setattr("neurofm.tasks.pretrain.code_fingerprint", lambda: "other-code")
    pretrain(None, run, resume=True, overrides=[f"trainer.max_steps={target}"], progress=False, callbacks=[cap])
    assert cap.start_step == saved_step
    record = json.loads((run / "run.json").read_text())
    assert record["code"] == "other-code"
    made = {"code": first_code, "threads": first["threads"], "machine": first["machine"], "until_step": saved_step}
    assert record["code_history"] == [made]
    assert record["threads"] == torch.get_num_threads() and record["machine"] == machine()
    want = saved["optimizer_states"][0]["state"]
    assert set(cap.optimizer_state) == set(want)
    for k, v in want.items():
        for n, t in v.items():
            if torch.is_tensor(t):
                assert torch.equal(cap.optimizer_state[k][n], t), (k, n)
    final = latest_checkpoint(run)
    assert final.name == f"step-{target:07d}"
    assert not list((run / "checkpoints").glob(".tmp-*"))


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(tiny_store, tmp_path):
    run = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "neurofm.cli",
        "pretrain",
        "--preset",
        "ssl3d-tiny",
        "--data",
        str(tiny_store),
        "--out",
        str(run),
        "--max-steps",
        "4",
        "--accelerator",
        "cpu",
        "--devices",
        "2",
        "--no-progress",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ck = latest_checkpoint(run)
    assert ck is not None and ck.name == "step-0000004"
    assert model_from_checkpoint(run)[1]["meta"]["world_size"] == 2
    assert res.stdout.count("latest checkpoint") + res.stderr.count("latest checkpoint") == 1  # one rank reports


def test_checkpoint_weights_round_trip(tmp_path):
    from neurofm.io.checkpoint import load_state, load_weights, save_weights

    m = create_model("resenc_unet", features=[4, 8], blocks=[1, 1])
    save_weights(m, tmp_path / "w.safetensors")
    stored = load_weights(tmp_path / "w.safetensors")
    # DNA's decoder holds the encoder too: each shared tensor is stored once, under its encoder name
    assert not [k for k in stored if k.startswith("decoder.encoder.")]
    assert "encoder.stem.convs.0.conv.weight" in stored and len(stored) < len(m.state_dict())
    m2 = create_model("resenc_unet", features=[4, 8], blocks=[1, 1])
    load_state(m2, load_weights(tmp_path / "w.safetensors"))
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    (tmp_path / "w.pt").write_bytes(b"pickle")
    with pytest.raises(Exception, match="safetensors"):
        load_weights(tmp_path / "w.pt")


def test_pool_can_leave_out_subjects_and_pairs_bring_a_reference_crop(tiny_store):
    from neurofm.data.pretrain import DataNeeds, build_index
    from neurofm.store import Store

    store = Store(tiny_store)
    subjects = sorted({store.record(k)["subject"] for k in store.keys})
    cfg = get_preset("fomo25-tiny").override({"data.exclude_subjects": subjects[:2]})
    index = build_index(store, cfg.data, {}, DataNeeds(reference_crop=True))
    assert {store.record(k)["subject"] for k in index.keys} == set(subjects[2:])
    ds = PretrainDataset(
        tiny_store, index, dataclasses.replace(cfg.data, augment=False), 4, needs=DataNeeds(reference_crop=True)
    )
    item = ds[0]
    assert item["x_a_ref"].shape == item["x_a"].shape == (1, 32, 32, 32)
    assert "x_a_ref" not in PretrainDataset(tiny_store, index, cfg.data, 4)[0]
    with pytest.raises(Exception, match="no sessions"):
        build_index(
            store, get_preset("fomo25-tiny").override({"data.exclude_subjects": subjects}).data, {}, DataNeeds()
        )


def _weights(run, step):
    from safetensors.torch import load_file

    return load_file(run / "checkpoints" / f"step-{step:07d}" / "model.safetensors")


class _StopAt(L.Callback):
    """Stops a run after ``step`` steps, as a kill would, but leaving its checkpoint at that step."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


# fomo25 with every running estimate its objective keeps: the anatomy latent's running mean (align=centred), the
# per-contrast running means and their scale (w_contrast_means), and the whole-scan critic's bank, its counters and
# its last fit (a bank of 8 scans, fitted every 2 steps)
_RUNNING_STATE = [
    "objective.w_adversary=1.0",
    "objective.adversary_pool=mean",
    "objective.adversary_fit=scans",
    "objective.adversary_scans=8",
    "objective.adversary_refit=2",
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("preset", "extra"), [("fomo25-tiny", []), ("fomo25-cmeans-tiny", _RUNNING_STATE)], ids=["plain", "running-state"]
)
def test_a_resumed_run_trains_exactly_as_an_uninterrupted_one(store_4mm, tmp_path, preset, extra):
    """Crops, augmentation, masks and noise after a resume are the ones the run would have drawn, and the
    objective's running estimates are the ones it had: the weights at the end are the same tensors, whether the run
    stopped at an epoch's end (8) or inside one (6; the only stop with the running estimates). On the 4 mm store:
    the critic encodes whole scans, an eighth of the voxels of a 2 mm one."""
    sets = ["trainer.max_steps=12", "trainer.checkpoint_every=2", "data.steps_per_epoch=4", "data.num_workers=0"]
    sets += ["trainer.keep_checkpoints=20", *extra]
    whole = tmp_path / "whole"
    pretrain(store_4mm, whole, preset, overrides=sets, progress=False)
    for stop in (8, 6) if not extra else (6,):  # the critic's encodings of whole scans are slow: one stop
        parted = tmp_path / f"parted-{stop}"
        pretrain(store_4mm, parted, preset, overrides=sets, progress=False, callbacks=[_StopAt(stop)])
        assert latest_checkpoint(parted).name == f"step-{stop:07d}"
        if extra:  # the checkpoint holds a fitted critic and the statistics, so the resume has something to restore
            saved = torch.load(latest_checkpoint(parted) / STATE, map_location="cpu", weights_only=True)
            running = saved["objective_state"]["buffers"]
            assert running["critic_weight"].numel() > 0 and running["critic_x"].shape[0] == 8
            assert running["anatomy_mean"].numel() > 0 and running["contrast_means"].numel() > 0
        a, b = _weights(whole, stop), _weights(parted, stop)
        assert all(torch.equal(a[k], b[k]) for k in a)  # the same run up to the stop
        pretrain(None, parted, resume=True, progress=False)
        a, b = _weights(whole, 12), _weights(parted, 12)
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differ, (
            f"stopped at {stop}: {len(differ)} of {len(a)} tensors differ after the resume, e.g. {differ[:3]}"
        )


def test_the_epoch_sampler_numbers_samples_across_epochs_and_resumes_inside_one():
    from neurofm.data.loader import EpochSampler

    s = EpochSampler(6, seed=3)
    first = list(s)
    s.set_epoch(1)
    second = list(s)
    assert sorted(first) == list(range(6)) and sorted(second) == list(range(6, 12))
    assert [i - 6 for i in second] != first and list(s) == second  # a new order each epoch, the same on a rerun
    s.resume(1, 4)
    assert list(s) == second[4:]  # what the stopped run had not trained on yet, in its order
    assert list(s) == second  # once only
    s.resume(0, 4)
    assert list(s) == second  # a position in another epoch does not apply


def test_sample_item_reads_every_item_once_per_cycle_in_an_order_of_its_seed():
    from neurofm.data.loader import sample_item

    n = 7
    run = [sample_item(3, i, n) for i in range(3 * n)]
    cycles = [run[k * n : (k + 1) * n] for k in range(3)]
    assert all(sorted(c) == list(range(n)) for c in cycles)  # each item once per n samples
    assert cycles[0] != cycles[1] and cycles[0] != list(range(n))  # a new order each cycle, not the key order
    assert [sample_item(3, i, n) for i in (20, 4, 11)] == [run[20], run[4], run[11]]  # the index alone decides
    assert [sample_item(4, i, n) for i in range(n)] != cycles[0]  # another seed, another order
    with pytest.raises(ValueError, match="no items"):
        sample_item(0, 0, 0)


@pytest.mark.parametrize("preset", ["fomo25-tiny", "ssl3d-tiny"])
def test_an_epoch_shorter_than_the_pool_still_reads_the_whole_pool(tiny_store, preset):
    """Until 2026-12-06 a sample read the item at its position within the epoch: with ``steps_per_epoch`` x
    ``batch_size`` under the pool's sessions (ssl3d-tiny's 20 scans), every epoch read the same first items."""
    from neurofm.data.loader import EpochSampler

    cfg, index = prepare_data(get_preset(preset), tiny_store)
    length = 4
    ds = PretrainDataset(tiny_store, index, cfg.data, length=length, seed=5, needs=cfg.data_needs())
    n = len(ds.items)
    assert n > 2 * length  # the tiny store has 12 sessions (pairs), more scans (ssl3d)
    read: list[int] = []
    ds._sample = lambda item: read.append(item)  # which item each sample reads, not its crop
    sampler = EpochSampler(length, seed=5)
    for epoch in range(n // length):
        sampler.set_epoch(epoch)
        read_before = len(read)
        for i in sampler:
            ds[i]
        assert len(read) - read_before == length
    assert sorted(read) == list(range(n))  # n samples: every session (scan) once


class _ParentPid(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> int:
        return os.getppid()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the fork server's memory map in /proc")
def test_loader_workers_fork_from_a_server_that_has_already_imported_torch():
    from neurofm.data.loader import loader_context, training_loader

    if loader_context() != "forkserver":
        pytest.skip("no fork server on this platform")
    parent = int(next(iter(training_loader(_ParentPid(), 2, 1, seed=0)))[0])
    assert parent != os.getpid()  # the worker's parent is the fork server, not this process
    with open(f"/proc/{parent}/maps") as f:  # torch's library is in it: the worker did not import torch itself
        assert "libtorch_cpu" in f.read()


def test_a_sample_depends_on_its_index_and_the_seed_only(tiny_store):
    cfg, index = prepare_data(get_preset("fomo25-tiny"), tiny_store)

    def data(seed):
        return PretrainDataset(tiny_store, index, cfg.data, length=8, seed=seed, needs=cfg.data_needs())

    a, b = data(0), data(0)
    forward = [a[i]["x_a"] for i in (3, 12, 27)]
    backward = [b[i]["x_a"] for i in (27, 12, 3)][::-1]  # another order, as another worker would draw them
    assert all(torch.equal(x, y) for x, y in zip(forward, backward, strict=True))
    assert not torch.equal(a[11]["x_a"], forward[0])  # another sample index: a new draw
    assert not torch.equal(data(1)[3]["x_a"], forward[0])


def test_pairs_can_bring_the_whole_scan_as_the_analysis_reads_it(tiny_store):
    """``DataNeeds(whole_scan=True)``: the pair's first contrast, whole and unaugmented, centre-padded with its
    darkest value to the store's largest shape; the scan the crops were cut from."""
    import numpy as np

    from neurofm.data.loader import sample_item
    from neurofm.data.pretrain import DataNeeds, build_index, contrast_id
    from neurofm.store import Store

    store = Store(tiny_store)
    cfg = get_preset("fomo25-tiny")
    extra: dict = {}
    index = build_index(store, cfg.data, extra, DataNeeds(whole_scan=True))
    shapes = np.array([store.record(k)["shape"] for k in index.keys])
    assert extra["scan_canvas"] == [max(int(s), cfg.data.patch) for s in shapes.max(0)]
    ds = PretrainDataset(tiny_store, index, cfg.data, 4, needs=DataNeeds(whole_scan=True))  # augmentation on
    item = ds[1]
    scan = item["scan_a"].numpy()[0]
    assert scan.shape == tuple(extra["scan_canvas"])
    session = ds.items[sample_item(ds.seed, 1, len(ds.items))][0]  # pair mode: one item per session
    key = index.keys[session]
    name = next(n for n in index.contrasts[session] if contrast_id(n) == int(item["contrast_a"]))
    vol = np.asarray(store.read(key, name), np.float32)
    pads = [(c - v) // 2 for c, v in zip(scan.shape, vol.shape, strict=True)]
    inner = scan[tuple(slice(p, p + v) for p, v in zip(pads, vol.shape, strict=True))]
    assert np.array_equal(inner, vol)  # the stored scan itself: no flip, gamma or noise
    assert item["scan_shape_a"].tolist() == list(vol.shape)  # its own shape, which the critic tiles
    assert np.isclose(scan.min(), vol.min()) and (scan == vol.min()).sum() >= scan.size - vol.size
    assert "scan_a" not in PretrainDataset(tiny_store, index, cfg.data, 4)[0]
