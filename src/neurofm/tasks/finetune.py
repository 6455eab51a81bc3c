"""Fine-tuning: segmentation, classification, regression from a pretrained run or from scratch.

``finetune()`` selects the cases (few-shot subsets, k folds or site splits, by subject),
trains a :class:`~neurofm.models.downstream.DownstreamModel` per split with Lightning,
saves a self-describing checkpoint, predicts the held-out cases on whole scans and writes
``predictions.csv`` (one row per case) and ``summary.json`` (metrics with bootstrap 95 %
intervals).

Losses: batch Dice without background + cross-entropy (seg, MONAI ``DiceCELoss``), class-weighted cross-entropy
(cls), SmoothL1 on the standardised target (reg). In ``full`` mode from pretrained weights the
field's schedule (nnssl's pretrained fine-tuning, Asparagus' few-shot configs): for the first
``head_warmup`` of the steps only the new head / decoder trains, the encoder held still; then
the encoder's learning rate (``lr x backbone_lr_scale``) warms up linearly over
``warmup_fraction`` of the steps; everything follows a cosine.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from neurofm.data.finetune import CaseSet, FinetuneDataset, build_cases
from neurofm.data.loader import training_loader
from neurofm.errors import ConfigError, NonFiniteLossError, Preempted
from neurofm.evaluate.metrics import per_site, reliability_figure, selective, summarize
from neurofm.evaluate.scoring import config_splits, score_cases, write_predictions
from neurofm.faults import FolderLock, OutOfMemory, process_rank
from neurofm.infer.predictor import Predictor
from neurofm.io.checkpoint import STATE, count_parameters, latest_checkpoint, read_checkpoint, write_run_folder
from neurofm.models.downstream import DownstreamModel, load_pretrained
from neurofm.models.registry import model_from_checkpoint
from neurofm.store import Store
from neurofm.tasks.probe import fit_linear_probe, zero_shot_head
from neurofm.train.callbacks import ExactResume, Preemption, RunCheckpoint
from neurofm.train.config import FinetuneConfig
from neurofm.train.memory import is_oom, oom_error, probe
from neurofm.train.presets import PRESETS, get_preset
from neurofm.train.trainer import build_trainer, layout_name
from neurofm.utils import code_fingerprint, machine, to_jsonable, write_json

__all__ = ["FinetuneConfig", "FinetuneModule", "backbone_from", "finetune"]


def backbone_from(cfg: FinetuneConfig) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None, dict[str, Any]]:
    """The backbone spec, its pretrained weights (None from scratch / random) and the source's metadata."""
    if cfg.source in ("scratch", "random"):
        if cfg.arch in PRESETS:
            pre = get_preset(cfg.arch)
            return {"name": pre.model.name, "kwargs": dict(pre.model.kwargs)}, None, {"patch": pre.data.patch}
        info = _pretrained_info(cfg.arch)  # a run folder: its architecture, not its weights
        return {"name": info["model"]["name"], "kwargs": info["model"]["kwargs"]}, None, {"patch": info["patch"]}
    info = _pretrained_info(cfg.source)
    pre = info["preprocessing"]
    meta = {
        "patch": info["patch"],
        "preprocessing": pre,
        "checkpoint": info["folder"],
        "pretrained_contrasts": pre.get("contrasts"),
        "preset": info["run"].get("preset"),
        # the label a health pretext of the run learned (1 patient), which zero-shot maps to the target's classes
        "health_label": info["run"].get("data", {}).get("health_label", "healthy"),
    }
    spec = info["model"]
    # the rebuilt model's state dict names every tensor under each of its names (a DNA decoder also holds
    # the encoder as decoder.encoder.*; a weights file stores such a tensor once, under one of them)
    model, _ = model_from_checkpoint(info["folder"])
    return {"name": spec["name"], "kwargs": spec["kwargs"]}, dict(model.state_dict()), meta


def _pretrained_info(path: str) -> dict[str, Any]:
    info = read_checkpoint(path)
    if info["model"]["name"] == "downstream":
        raise ConfigError(f"{path} is a fine-tuned run; fine-tune from the pretrained run instead")
    return {**info, "patch": info["run"].get("data", {}).get("patch")}


class FinetuneModule(L.LightningModule):
    def __init__(
        self,
        model: DownstreamModel,
        cfg: FinetuneConfig,
        class_weights: torch.Tensor | None = None,
        target_stats: tuple[float, float] = (0.0, 1.0),
    ):
        super().__init__()
        self.model, self.cfg = model, cfg
        self.register_buffer("class_weights", class_weights if class_weights is not None else torch.ones(1))
        self.target_mean, self.target_std = target_stats
        if cfg.task == "seg":
            from monai.losses import DiceCELoss, DiceLoss

            # as nnU-Net: Dice over the batch and without the background class (which is easy and would
            # otherwise drown the lesion signal), plus cross-entropy over all classes; with seg_fg_weight the
            # cross-entropy weighs every foreground class that much more than background
            dice = {"to_onehot_y": True, "softmax": True, "include_background": False, "batch": True}
            weighted = cfg.seg_fg_weight != 1.0
            self.seg_loss = DiceLoss(**dice) if weighted else DiceCELoss(**dice)
            w = torch.tensor([1.0] + [float(cfg.seg_fg_weight)] * (model.n_out - 1)) if weighted else None
            self.register_buffer("seg_ce_weight", w)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.cfg.task == "seg":
            if self.seg_ce_weight is None:
                return self.seg_loss(logits, y)
            return self.seg_loss(logits, y) + F.cross_entropy(logits, y[:, 0].long(), weight=self.seg_ce_weight)
        if self.cfg.task == "cls":
            return F.cross_entropy(logits, y, weight=self.class_weights if self.class_weights.numel() > 1 else None)
        return F.smooth_l1_loss(logits[:, 0], (y - self.target_mean) / self.target_std)

    @property
    def head_steps(self) -> int:
        """Steps during which only the head learns (a pretrained encoder in full mode)."""
        pretrained = self.cfg.source not in ("scratch", "random")
        return int(self.cfg.head_warmup * self.cfg.steps) if pretrained and self.cfg.mode == "full" else 0

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # no encoder gradients while it is held still (under DDP every parameter must get one: lr 0 does it)
        single = self._trainer is None or self.trainer.world_size == 1
        self.model.freeze_encoder = single and self.global_step < self.head_steps

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.loss(self.model(batch["x"], batch["present"]), batch["y"])
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"fine-tuning loss became {loss.item()} at step {self.global_step}; lower --lr")
        self.log("loss", loss, prog_bar=True, batch_size=batch["x"].shape[0])
        self.last_terms = {"loss": loss.detach()}
        return loss

    def configure_optimizers(self):
        cfg = self.cfg
        # a pretrained encoder is adapted gently; a randomly initialised one learns at the full rate
        scale = cfg.backbone_lr_scale if cfg.source not in ("scratch", "random") else 1.0
        groups = [g for g in self.model.param_groups(cfg.lr, cfg.lr * scale) if g["params"]]
        opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        total, head, warm = cfg.steps, self.head_steps, max(1, int(cfg.warmup_fraction * cfg.steps))
        lambdas = [
            (lambda s: encoder_lr_factor(s, total, head, warm))
            if g["name"] == "encoder"
            else (lambda s: cosine(s, total))
            for g in groups
        ]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambdas)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def cosine(step: int, total: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * min(step / max(total, 1), 1.0)))


def encoder_lr_factor(step: int, total: int, head_steps: int, warm_steps: int) -> float:
    """The encoder's learning-rate multiplier: 0 while the head warms up, then a linear warm-up into the
    cosine that the head follows."""
    if step < head_steps:
        return 0.0
    return min(1.0, (step - head_steps) / max(warm_steps, 1)) * cosine(step, total)


def _task_info(cs: CaseSet, cfg: FinetuneConfig, patch: int, stats: tuple[float, float]) -> dict[str, Any]:
    return {
        "task": cs.task,
        "target": cs.target,
        "contrasts": cs.contrasts,
        "classes": cs.classes,
        "patch": patch,
        "infer_patch": cfg.infer_patch or patch,
        "target_mean": stats[0],
        "target_std": stats[1],
        "mode": cfg.mode,
        "source": cfg.source,
    }


def _check_spacing(src: dict[str, Any], store: Store) -> None:
    pre = src.get("preprocessing") or {}
    if pre.get("spacing") not in (None, store.config.get("spacing")):
        raise ConfigError(
            f"the pretrained run used {pre['spacing']} mm voxels, this store "
            f"{store.config.get('spacing')} mm; prepare the data at the same spacing"
        )


def _target_stats(cs: CaseSet, train: list) -> tuple[tuple[float, float], torch.Tensor | None]:
    """Regression: the training targets' mean and SD (the model learns the standardised target);
    classification: class weights inversely proportional to the training counts."""
    if cs.task == "reg":
        ys = np.array([c.target for c in train], float)
        return (float(ys.mean()), float(ys.std() + 1e-6)), None
    if cs.task == "cls":
        counts = np.bincount([c.target for c in train], minlength=cs.n_out).astype(float)
        return (0.0, 1.0), torch.tensor(counts.sum() / np.maximum(counts, 1) / cs.n_out, dtype=torch.float32)
    return (0.0, 1.0), None


def norm_items(ds: FinetuneDataset, crops: int = 64) -> int:
    """How many training items standardise the features: about ``crops`` crops' worth of voxels, and at least
    two items per case. A whole-scan item holds many crops' voxels, and items of one scan differ only by their
    augmentation, so whole scans take fewer items (a 3-step whole-scan fine-tune of 6 cases at 2 mm: 167 s
    with 64 items, 86 s with 12)."""
    per_item = float(np.prod(ds.whole)) / ds.patch**3 if ds.whole is not None else 1.0
    return max(int(np.ceil(crops / max(per_item, 1.0))), 2 * len(ds.cases))


def _norm_batches(ds: FinetuneDataset, batch_size: int, crops: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The training items of :func:`norm_items` to standardise the features with."""
    n = norm_items(ds, crops)
    items = [ds[i] for i in range(n)]
    return [
        (
            torch.stack([it["x"] for it in items[i : i + batch_size]]),
            torch.stack([it["present"] for it in items[i : i + batch_size]]),
        )
        for i in range(0, n, batch_size)
    ]


def train_fold(
    data: str | Path,
    fold_dir: Path,
    cfg: FinetuneConfig,
    cs: CaseSet,
    train: list,
    test: list,
    source: tuple[dict[str, Any], dict[str, torch.Tensor] | None, dict[str, Any]],
    patch: int,
    seed: int,
    progress: bool | None = None,
    resume: bool = False,
) -> tuple[Predictor | None, dict[str, Any]]:
    """Fine-tune one split; returns its predictor (None on non-zero DDP ranks) and what it did."""
    backbone, weights, src = source
    L.seed_everything(seed, workers=True, verbose=False)
    stats, class_weights = _target_stats(cs, train)
    model = DownstreamModel(
        backbone,
        cs.task,
        cs.n_out,
        cs.contrasts,
        cfg.mode,
        pool=cfg.head_pool,
        pool_latent=cfg.head_pool_latent,
        probe_head=cfg.head_init == "probe",
        pretext_features=cfg.probe_features.startswith("pretext"),
    )
    transfer = load_pretrained(model, weights, src.get("pretrained_contrasts")) if weights is not None else None
    info = _task_info(cs, cfg, patch, stats)
    closed = cfg.mode == "linear" and cfg.linear_fit in ("closed", "zero-shot")  # no gradient steps
    fixed = getattr(model.backbone, "fixed_size", None)
    if cfg.whole_scan and fixed is not None:
        raise ConfigError(f"{backbone['name']} takes a fixed {fixed}^3 cube, not whole scans")
    whole = None
    probe_whole = closed and cfg.probe_windows == "whole"
    if (probe_whole or cfg.whole_scan) and fixed is None:
        info["whole_scan"] = int(model.downsampling)  # the closed-form probe or a whole-scan model reads scans whole
        if cfg.whole_scan and not closed:  # trained on whole scans: all at one size, as the predictor will pad them
            whole = info["whole_shape"] = whole_shape(Store(data), train, int(model.downsampling))
    fold_dir.mkdir(parents=True, exist_ok=True)
    run_cfg = cfg.save(
        fold_dir / "run.json",
        model={"name": "downstream"},
        data={"contrasts": cs.contrasts, "patch": patch},
        extra={"preprocessing": Store(data).config, "store": str(Path(data).resolve())},
        task_info=info,
        transfer=transfer,
        pretrained=src,
        split={"train_subjects": _subjects(train), "test_subjects": _subjects(test)},  # what the run drew
        code=code_fingerprint(),
        threads=torch.get_num_threads(),  # CPU float sums differ with the thread count: part of what made the numbers
        machine=machine(),  # and with the processor (recorded, not checked: the run folder stays where it was made)
        layout=layout_name(cfg.trainer, model),  # and with the memory layout it trains in (trainer.memory_format)
    )
    if closed:
        return _closed_probe(data, fold_dir, cfg, cs, train, test, model, info, run_cfg, transfer)
    ds = FinetuneDataset(
        data, cs, train, patch, length=cfg.steps * cfg.batch_size, seed=seed, fg_p=cfg.fg_p,
        augment=cfg.augment, contrast_dropout=cfg.contrast_dropout, whole=whole,
    )  # fmt: skip
    lp = None
    if cs.task != "seg" and cfg.head_init == "probe":
        # LP-FT: the linear layer beside the head fitted in closed form on the frozen start, read on the windows the
        # predictor reads (which also sets the feature standardisation); the MLP's output at zero, so that training
        # starts from the probe's predictions
        lp = _fit_probe(model, data, cfg, cs, train, info, head=model.probe)
        model.zero_output()
        model.train()  # the probe's features were read in eval mode; Lightning trains the modules in the mode it finds
    elif cs.task != "seg":
        model.fit_feature_norm(_norm_batches(ds, cfg.batch_size))
        if cfg.head_init == "zero":
            model.zero_output()
    module = FinetuneModule(model, cfg, class_weights, stats)
    tc = replace(cfg.trainer, seed=seed)
    saver = RunCheckpoint(fold_dir, run_cfg, tc.checkpoint_every, tc.keep_checkpoints)
    preempt = Preemption(saver)
    loader = training_loader(ds, cfg.batch_size, cfg.num_workers, seed)
    exact = ExactResume(seed, loader.sampler, cfg.batch_size)
    trainer = build_trainer(
        tc, fold_dir, cfg.steps, grad_clip=1.0, callbacks=[exact, saver, preempt], progress=progress, progress_lines=5
    )
    last = latest_checkpoint(fold_dir) if resume else None
    try:
        with preempt.handling():
            trainer.fit(
                module,
                loader,
                ckpt_path=str(last / STATE) if last is not None else None,
                weights_only=True,
            )
    except Exception as e:
        if not is_oom(e):
            raise
        raise _oom(module, cfg, cs, patch) from None
    if preempt.stopped():
        raise Preempted(
            f"stopped by {preempt.stopped()} at step {preempt.step} of {cfg.steps}; a checkpoint at that step is in "
            f"{fold_dir}. Continue with the same command and --resume",
            preempt.signum or 15,
        )
    done = _fold_facts(model, train, test, transfer)
    if lp is not None:
        done["probe"] = lp
    if not trainer.is_global_zero:
        return None, done
    return Predictor(model, info, device=module.device, tta=cfg.tta, overlap=cfg.overlap, lcc=cfg.lcc), done


def _subjects(cases: list) -> list[str]:
    return sorted({c.subject for c in cases})


def whole_shape(store: Store, cases: list, multiple: int) -> list[int]:
    """The size every scan of ``cases`` fits in, per axis rounded up to a multiple of ``multiple``."""
    big = np.max([store.record(c.key)["shape"] for c in cases], axis=0)
    return [int(-(-int(n) // multiple) * multiple) for n in big]


def _fold_facts(model: DownstreamModel, train: list, test: list, transfer: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "train_cases": len(train),
        "test_cases": len(test),
        "train_subjects": len({c.subject for c in train}),
        "trainable_parameters": count_parameters(model, trainable_only=True),
        "transferred_tensors": transfer["transferred"] if transfer else 0,
    }


def _fit_probe(
    model: DownstreamModel,
    data: str | Path,
    cfg: FinetuneConfig,
    cs: CaseSet,
    train: list,
    info: dict[str, Any],
    head: torch.nn.Linear | None = None,
) -> dict[str, Any]:
    """:func:`~neurofm.tasks.probe.fit_linear_probe` with ``cfg``'s probe settings (the linear probe's, and LP-FT's
    start on ``head``): the penalty rule, the flips, the features it weighs, and one row per scan for ``tiles-mean``.
    The windows are ``info``'s (the scan whole or tiles, as the predictor reads them)."""
    return fit_linear_probe(
        model, Store(data), cs, train, info, cfg.linear_penalty, cfg.tta, head=head,
        features=cfg.probe_features, per_scan=cfg.probe_windows == "tiles-mean",
    )  # fmt: skip


def _closed_probe(
    data: str | Path,
    fold_dir: Path,
    cfg: FinetuneConfig,
    cs: CaseSet,
    train: list,
    test: list,
    model: DownstreamModel,
    info: dict[str, Any],
    run_cfg: dict[str, Any],
    transfer: dict[str, Any] | None,
) -> tuple[Predictor | None, dict[str, Any]]:
    """The linear head fitted in closed form (:mod:`neurofm.tasks.probe`), or set to read the pretext classifier as
    it is (``linear_fit=zero-shot``, no labelled case read), saved as a step-0 checkpoint."""
    if cfg.linear_fit == "zero-shot":
        label = (run_cfg.get("pretrained") or {}).get("health_label", "healthy")
        probe = zero_shot_head(model, cs, label)
    else:
        probe = _fit_probe(model, data, cfg, cs, train, info)
    done = {**_fold_facts(model, train, test, transfer), "probe": probe}
    if process_rank() != 0:
        return None, done
    meta = {"step": 0, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "probe": probe}
    write_run_folder(fold_dir, model, run_cfg, to_jsonable(meta))
    return Predictor(model, info, tta=cfg.tta, overlap=cfg.overlap, lcc=cfg.lcc), done


def finetune(
    data: str | Path, out: str | Path, cfg: FinetuneConfig, progress: bool | None = None, resume: bool = False
) -> dict[str, Any]:
    """Fine-tune and evaluate (see module docstring): every split is trained, then its held-out
    cases are scored. Writes ``predictions.csv`` and ``summary.json``; returns the summary.

    ``resume``: continue a stopped run (preempted, killed) in ``out`` from each split's newest checkpoint."""
    t0 = time.time()
    out = Path(out)
    if (out / "summary.json").is_file():
        raise ConfigError(f"{out} already holds a fine-tuning run; choose another --out")
    started = [p for p in [out, *out.glob("fold-*")] if latest_checkpoint(p) is not None]
    if started and not resume:
        raise ConfigError(f"{out} holds a fine-tuning run that did not finish; continue it with --resume")
    store = Store(data)
    cs = build_cases(store, cfg.task, cfg.target, cfg.contrasts, positive_only=cfg.positive_only)
    source = backbone_from(cfg)
    _check_spacing(source[2], store)
    patch = int(cfg.patch or source[2].get("patch") or 64)
    splits = config_splits(cs, cfg)
    rows: list[dict[str, Any]] = []
    fold_info = []
    lock = FolderLock(out / ".lock", "finetune") if process_rank() == 0 else None
    if lock is not None:
        lock.acquire()
    try:
        for f, (train, test) in enumerate(splits):
            fold_dir = out / (f"fold-{f}" if len(splits) > 1 else "")
            train, calib = calibration_split(train, cfg.calibration if cs.task == "cls" else 0.0, cfg.seed + f)
            predictor, done = train_fold(
                data, fold_dir, cfg, cs, train, test, source, patch, cfg.seed + f, progress, resume=resume
            )
            if predictor is None:
                continue
            if calib:
                done.update(calibrate(predictor, store, calib, fold_dir))
            rows.extend(score_cases(predictor, store, cs, test, f))
            fold_info.append({"fold": f, **done})
    finally:
        if lock is not None:
            lock.release()
    summary = {
        "task": cs.task,
        "target": cs.target,
        "contrasts": cs.contrasts,
        "classes": [str(c) for c in cs.classes],
        "source": cfg.source,
        "mode": cfg.mode,
        "shots": cfg.shots,
        "folds": len(splits),
        "seconds": time.time() - t0,
        "splits": fold_info,
        "metrics": summarize(cs.task, rows, reps=cfg.bootstrap, seed=cfg.seed),
        "selective": selective(cs.task, rows),
        "per_site": per_site(cs.task, rows),
    }
    write_predictions(out / "predictions.csv", rows)
    write_json(out / "summary.json", summary)
    reliability_figure(rows, out / "reliability.png")
    return summary


def _oom(module: FinetuneModule, cfg: FinetuneConfig, cs: CaseSet, patch: int) -> OutOfMemory:
    """The out-of-memory error of a fine-tuning run, with the largest batch and patch that fit."""
    model = module.model
    device = next(model.parameters()).device
    n_c = len(cs.contrasts)

    def try_step(b: int, p: int) -> None:
        model.zero_grad(set_to_none=True)
        x = torch.randn(b, n_c, p, p, p, device=device)
        out = model(x, torch.ones(b, n_c, dtype=torch.bool, device=device))
        out.float().mean().backward()
        model.zero_grad(set_to_none=True)

    fixed = getattr(model.backbone, "fixed_size", None) is not None
    fits = probe(try_step, cfg.batch_size, patch, int(model.downsampling), fixed, device)
    return oom_error("fine-tuning", cfg.batch_size, patch, device, fits, "--batch-size", "--patch")


def calibration_split(train: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold ``fraction`` of the training subjects (at least one, never all) out for temperature scaling."""
    if fraction <= 0:
        return train, []
    subjects = sorted({c.subject for c in train})
    if len(subjects) < 3:
        raise ConfigError(f"calibration needs at least 3 training subjects, got {len(subjects)}")
    k = min(len(subjects) - 2, max(1, int(round(fraction * len(subjects)))))
    held = set(np.random.default_rng(seed).choice(subjects, size=k, replace=False).tolist())
    return [c for c in train if c.subject not in held], [c for c in train if c.subject in held]


def calibrate(predictor: Predictor, store: Store, cases: list, fold_dir: Path) -> dict[str, Any]:
    """Fit the temperature of a classifier on held-out training cases and record it with the model
    (``task_info.temperature``, which the predictor divides the logits by)."""
    from neurofm.evaluate.metrics import fit_temperature
    from neurofm.io.checkpoint import latest_checkpoint
    from neurofm.utils import read_json

    predictor.info["temperature"] = 1.0
    logp, ys = [], []
    for c in cases:
        res = predictor.predict({k: np.asarray(store.read(c.key, k), np.float32) for k in c.contrasts})
        logp.append(np.log(np.clip(res.probs, 1e-8, 1.0)))
        ys.append(int(c.target))
    temperature = fit_temperature(np.array(logp), np.array(ys))
    predictor.info["temperature"] = temperature
    ck = latest_checkpoint(fold_dir)
    for path in [fold_dir / "run.json"] + ([ck / "run.json"] if ck is not None else []):
        rec = read_json(path)
        rec.setdefault("task_info", {})["temperature"] = temperature
        write_json(path, rec)
    return {"temperature": temperature, "calibration_cases": len(cases)}
