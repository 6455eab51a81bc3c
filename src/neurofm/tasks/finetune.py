"""Fine-tuning: segmentation, classification, regression from a pretrained run or from scratch.

``finetune()`` selects the cases (few-shot subsets, k folds or site splits, by subject),
trains a :class:`~neurofm.models.downstream.DownstreamModel` per split with Lightning,
saves a self-describing checkpoint, predicts the held-out cases on whole scans and writes
``predictions.csv`` (one row per case) and ``summary.json`` (metrics with bootstrap 95 %
intervals).

Losses: batch Dice without background + cross-entropy (seg, MONAI ``DiceCELoss``), class-weighted cross-entropy
(cls), SmoothL1 on the standardised target (reg). In ``full`` mode the encoder's learning
rate warms up linearly from 0 over ``warmup_fraction`` of the steps (then cosine) while
the new head starts at full rate.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from neurofm.data.finetune import Case, CaseSet, FinetuneDataset, build_cases, by_site, few_shot, k_folds
from neurofm.data.pretrain import loader_context
from neurofm.errors import ConfigError
from neurofm.models.downstream import DownstreamModel, count_trainable, load_pretrained
from neurofm.store import Store
from neurofm.train.config import TrainerConfig
from neurofm.utils import read_json, write_json


@dataclass
class FinetuneConfig:
    """Settings of ``neurofm finetune`` (see its ``--help``)."""

    task: str
    target: str
    source: str = "scratch"  # a pretrained run folder, or "scratch"
    arch: str = "fomo25"  # preset whose backbone is used from scratch
    contrasts: list[str] | None = None
    mode: str = "full"
    shots: int | None = None
    folds: int = 0
    train_sites: list[str] | None = None
    test_sites: list[str] | None = None
    train_subjects: list[str] | None = None  # exactly these subjects for training (overrides --shots)
    test_fraction: float = 0.2
    positive_only: bool = False  # seg: only cases with foreground in the target label map
    seed: int = 0
    patch: int | None = None  # default: the pretraining patch
    infer_patch: int | None = None  # segmentation window at inference (default: the training patch)
    batch_size: int = 2
    steps: int = 300
    lr: float = 1e-3
    backbone_lr_scale: float = 0.1
    warmup_fraction: float = 0.1
    weight_decay: float = 1e-4
    num_workers: int = 2
    fg_p: float = 0.33
    tta: bool = True
    overlap: float = 0.5
    lcc: bool = False
    bootstrap: int = 1000
    trainer: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in ("seg", "cls", "reg"):
            raise ConfigError(f"--task should be seg, cls or reg, got {self.task!r}")
        if self.mode not in ("linear", "frozen", "full"):
            raise ConfigError(f"--mode should be linear, frozen or full, got {self.mode!r}")
        if self.task == "seg" and self.mode == "linear":
            raise ConfigError("a linear probe is defined for cls/reg; for segmentation use --mode frozen or full")
        if self.source == "scratch" and self.mode != "full":
            raise ConfigError(f"--mode {self.mode} freezes an encoder; from scratch only --mode full makes sense")
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ConfigError("--steps, --batch-size and --lr must be positive")


def backbone_from(cfg: FinetuneConfig) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None, dict[str, Any]]:
    """The backbone spec, its pretrained weights (None from scratch) and the source's metadata."""
    from neurofm.train.checkpoint import WEIGHTS, load_weights, resolve_checkpoint
    from neurofm.train.presets import get_preset

    if cfg.source == "scratch":
        pre = get_preset(cfg.arch)
        return {"name": pre.model.name, "kwargs": dict(pre.model.kwargs)}, None, {"patch": pre.data.patch}
    folder = resolve_checkpoint(cfg.source)
    spec = read_json(folder / "model.json")
    if spec["name"] == "downstream":
        raise ConfigError(f"{cfg.source} is a fine-tuned run; fine-tune from the pretrained run instead")
    run = read_json(folder / "run.json") if (folder / "run.json").is_file() else {}
    pre = read_json(folder / "preprocessing.json") if (folder / "preprocessing.json").is_file() else {}
    meta = {
        "patch": run.get("data", {}).get("patch"),
        "preprocessing": pre,
        "checkpoint": str(folder),
        "pretrained_contrasts": pre.get("contrasts"),
        "preset": run.get("preset"),
    }
    return {"name": spec["name"], "kwargs": spec["kwargs"]}, load_weights(folder / WEIGHTS), meta


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
            from monai.losses import DiceCELoss

            # as nnU-Net: Dice over the batch and without the background class (which is easy and would
            # otherwise drown the lesion signal), plus cross-entropy over all classes
            self.seg_loss = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.cfg.task == "seg":
            return self.seg_loss(logits, y)
        if self.cfg.task == "cls":
            return F.cross_entropy(logits, y, weight=self.class_weights if self.class_weights.numel() > 1 else None)
        return F.smooth_l1_loss(logits[:, 0], (y - self.target_mean) / self.target_std)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.loss(self.model(batch["x"], batch["present"]), batch["y"])
        if not torch.isfinite(loss):
            from neurofm.tasks.pretrain import NonFiniteLossError

            raise NonFiniteLossError(f"fine-tuning loss became {loss.item()} at step {self.global_step}; lower --lr")
        self.log("loss", loss, prog_bar=True, batch_size=batch["x"].shape[0])
        self.last_terms = {"loss": loss.detach()}
        return loss

    def configure_optimizers(self):
        cfg = self.cfg
        # a pretrained encoder is adapted gently; a randomly initialised one learns at the full rate
        scale = 1.0 if cfg.source == "scratch" else cfg.backbone_lr_scale
        groups = [g for g in self.model.param_groups(cfg.lr, cfg.lr * scale) if g["params"]]
        opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        total, warm = cfg.steps, max(1, int(cfg.warmup_fraction * cfg.steps))

        def cosine(s: int) -> float:
            return 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0)))

        def encoder(s: int) -> float:
            return s / warm if s < warm else cosine(s)

        lambdas = [encoder if g["name"] == "encoder" else cosine for g in groups]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambdas)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _splits(cs: CaseSet, cfg: FinetuneConfig) -> list[tuple[list[Case], list[Case]]]:
    cases = cs.cases
    if cfg.train_subjects:
        chosen = set(cfg.train_subjects)
        missing = chosen - {c.subject for c in cases}
        if missing:
            raise ConfigError(f"training subjects without the target or contrasts: {sorted(missing)[:5]}")
        test = [c for c in cases if c.subject not in chosen]
        if cfg.train_sites:
            test = by_site(test, cfg.train_sites, cfg.test_sites)[1]
        return [([c for c in cases if c.subject in chosen], test)]
    if cfg.train_sites:
        cases_train, cases_test = by_site(cases, cfg.train_sites, cfg.test_sites)
        if cfg.shots:
            cases_train, _ = few_shot(cases_train, cfg.shots, cfg.seed, stratify=cs.task == "cls")
        return [(cases_train, cases_test)]
    if cfg.folds:
        folds = k_folds(cases, cfg.folds, cfg.seed)
        if cfg.shots:
            folds = [
                (few_shot(tr, min(cfg.shots, len({c.subject for c in tr}) - 1), cfg.seed, cs.task == "cls")[0], te)
                for tr, te in folds
            ]
        return folds
    if cfg.shots:
        return [few_shot(cases, cfg.shots, cfg.seed, stratify=cs.task == "cls")]
    n_subj = len({c.subject for c in cases})
    n_test = max(1, int(round(cfg.test_fraction * n_subj)))
    train, test = few_shot(cases, n_subj - n_test, cfg.seed, stratify=cs.task == "cls")
    return [(train, test)]


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


def case_rows(predictor: Any, store: Store, cs: CaseSet, cases: list[Case], fold: int) -> list[dict[str, Any]]:
    """Predict held-out cases on whole store volumes and score each (seg) or keep its prediction."""
    from neurofm.evaluate.metrics import segmentation_case

    rows = []
    lut = None
    if cs.task == "seg":
        lut = np.zeros(max(cs.classes) + 1, np.int64)
        lut[cs.classes] = np.arange(len(cs.classes))
    for c in cases:
        images = {k: np.asarray(store.read(c.key, k), np.float32) for k in c.contrasts}
        res = predictor.predict(images)
        row: dict[str, Any] = {
            "fold": fold,
            "key": c.key,
            "subject": c.subject,
            "session": c.session,
            "site": c.site,
            "contrasts": ",".join(c.contrasts),
        }
        if cs.task == "seg":
            truth = lut[np.asarray(store.read(c.key, c.target), np.int64)]
            spacing = store.record(c.key)["spacing"]
            row.update(segmentation_case(res.labels, truth, spacing, classes=len(cs.classes)))
            vox = float(np.prod(spacing))
            row.update(
                volume_true_mm3=float((truth > 0).sum()) * vox, volume_pred_mm3=float((res.labels > 0).sum()) * vox
            )
        elif cs.task == "cls":
            row.update(target=int(c.target), prediction=int(np.argmax(res.probs)), prob=[float(p) for p in res.probs])
        else:
            row.update(target=float(c.target), prediction=float(res.value))
        rows.append(row)
    return rows


def finetune(data: str | Path, out: str | Path, cfg: FinetuneConfig, progress: bool | None = None) -> dict[str, Any]:
    """Fine-tune and evaluate (see module docstring). Returns the summary."""
    from neurofm.evaluate.metrics import summarize
    from neurofm.infer.predictor import Predictor
    from neurofm.train.checkpoint import RunCheckpoint
    from neurofm.train.trainer import build_trainer

    t0 = time.time()
    out = Path(out)
    if (out / "summary.json").is_file():
        raise ConfigError(f"{out} already holds a fine-tuning run; choose another --out")
    store = Store(data)
    cs = build_cases(store, cfg.task, cfg.target, cfg.contrasts, positive_only=cfg.positive_only)
    backbone, weights, src = backbone_from(cfg)
    patch = int(cfg.patch or src.get("patch") or 64)
    if src.get("preprocessing") and src["preprocessing"].get("spacing") not in (None, store.config.get("spacing")):
        raise ConfigError(
            f"the pretrained run used {src['preprocessing']['spacing']} mm voxels, this store "
            f"{store.config.get('spacing')} mm; prepare the data at the same spacing"
        )
    splits = _splits(cs, cfg)
    tc = TrainerConfig(**{**{"checkpoint_every": cfg.steps, "keep_checkpoints": 1, "seed": cfg.seed}, **cfg.trainer})
    rows: list[dict[str, Any]] = []
    fold_info = []
    for f, (train, test) in enumerate(splits):
        L.seed_everything(cfg.seed + f, workers=True, verbose=False)
        fold_dir = out / (f"fold-{f}" if len(splits) > 1 else "")
        stats = (0.0, 1.0)
        weights_cls = None
        if cs.task == "reg":
            ys = np.array([c.target for c in train], float)
            stats = (float(ys.mean()), float(ys.std() + 1e-6))
        if cs.task == "cls":
            counts = np.bincount([c.target for c in train], minlength=cs.n_out).astype(float)
            weights_cls = torch.tensor(counts.sum() / np.maximum(counts, 1) / cs.n_out, dtype=torch.float32)
        model = DownstreamModel(backbone, cs.task, cs.n_out, cs.contrasts, cfg.mode)
        transfer = None
        if weights is not None:
            transfer = load_pretrained(model, weights, src.get("pretrained_contrasts"))
        info = _task_info(cs, cfg, patch, stats)
        run_cfg = {
            "model": {"name": "downstream"},
            "data": {"contrasts": cs.contrasts, "patch": patch},
            "extra": {"preprocessing": store.config, "store": str(Path(data).resolve())},
            "finetune": asdict(cfg),
            "task_info": info,
            "transfer": transfer,
            "pretrained": src,
            "train_subjects": sorted({c.subject for c in train}),
            "test_subjects": sorted({c.subject for c in test}),
        }
        fold_dir.mkdir(parents=True, exist_ok=True)
        write_json(fold_dir / "run.json", run_cfg)
        module = FinetuneModule(model, cfg, weights_cls, stats)
        saver = RunCheckpoint(fold_dir, run_cfg, tc.checkpoint_every, tc.keep_checkpoints)
        trainer = build_trainer(
            tc, fold_dir, cfg.steps, grad_clip=1.0, callbacks=[saver], progress=progress, progress_lines=5
        )
        ds = FinetuneDataset(
            data, cs, train, patch, length=cfg.steps * cfg.batch_size, seed=cfg.seed + f, fg_p=cfg.fg_p
        )
        loader = torch.utils.data.DataLoader(
            ds,
            batch_size=cfg.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=cfg.num_workers,
            persistent_workers=cfg.num_workers > 0,
            multiprocessing_context=loader_context() if cfg.num_workers > 0 else None,
        )
        trainer.fit(module, loader)
        if not trainer.is_global_zero:
            continue
        predictor = Predictor(model, info, device=module.device, tta=cfg.tta, overlap=cfg.overlap, lcc=cfg.lcc)
        rows.extend(case_rows(predictor, store, cs, test, f))
        fold_info.append(
            {
                "fold": f,
                "train_cases": len(train),
                "test_cases": len(test),
                "train_subjects": len({c.subject for c in train}),
                "trainable_parameters": count_trainable(model),
                "transferred_tensors": transfer["transferred"] if transfer else 0,
            }
        )
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
    }
    write_predictions(out / "predictions.csv", rows)
    write_json(out / "summary.json", summary)
    return summary


def write_predictions(path: Path, rows: list[dict[str, Any]]) -> None:
    from neurofm.utils import atomic_write_text

    df = pd.DataFrame(rows)
    if "prob" in df.columns:
        df["prob"] = [json.dumps(p) for p in df["prob"]]
    atomic_write_text(path, df.to_csv(index=False))


def read_predictions(path: Path) -> list[dict[str, Any]]:
    df = pd.read_csv(path)
    rows = df.to_dict("records")
    for r in rows:
        if isinstance(r.get("prob"), str):
            r["prob"] = json.loads(r["prob"])
    return rows
