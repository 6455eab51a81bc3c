"""Training step time in the two memory layouts, contiguous and channels_last_3d, side by side in one run.

``trainer.memory_format=auto`` trains a network in channels_last_3d on a CPU when its first 3D convolution has
fewer than 32 output channels (:func:`neurofm.train.trainer.memory_format`). This measures what that rule rests on:
the same step, from the same weights and inputs, in each layout, on the CPU:

* the demo's fine-tuning steps (fomo25-tiny's backbone with the demo's heads: age regression 8 crops, lesion
  segmentation and health classification 2 crops, each of two contrasts, 32^3);
* the tiny pretraining recipes (fomo25-cmeans-tiny, ssl3d-tiny: 2 crops of 32^3);
* with ``--large``, fomo25 at paper size and the nnU-Net ResEnc-L peer (2 crops of 64^3; about 10 s a step on
  two CPU cores), whose first stage has 32 channels.

Each configuration reports the median step in each layout, the ratio (contiguous / channels-last: above 1,
channels-last is faster), which layout ``auto`` picks, and the loss of the first step in both layouts (the same
to float rounding).

    python benchmarks/bench_memory_format.py [--steps 8] [--large]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from _common import save, step_times

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def finetune_case(task: str, batch: int):
    """(model, loss of one batch, optimiser) of the demo's ``task`` fine-tuned in full from its shipped model."""
    import torch

    from neurofm.demo import DEFAULT_MODELS, DemoConfig, finetune_config
    from neurofm.models.downstream import DownstreamModel
    from neurofm.tasks.finetune import backbone_from

    cfg = DemoConfig()
    backbone, _, _ = backbone_from(finetune_config(cfg, DEFAULT_MODELS[task], task, "target"))
    n_out = {"seg": 2, "cls": 2, "reg": 1}[task]
    model = DownstreamModel(backbone, task, n_out, cfg.contrasts, "full")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, len(cfg.contrasts), 32, 32, 32, generator=g)
    present = torch.ones(batch, len(cfg.contrasts), dtype=torch.bool)

    def loss():
        return model(x, present).float().pow(2).mean()

    return model, loss, torch.optim.AdamW(model.parameters(), 1e-3)


def pretrain_case(name: str, crop: int):
    from bench_train import build

    model, loss_fn, batch_fn, opt = build(name, crop, "base")
    import torch

    torch.manual_seed(0)
    batch = batch_fn(2, torch.device("cpu"))
    return model, (lambda: loss_fn(batch)), opt


CASES = {
    "finetune reg (demo's age step, 8 x 2 x 32^3)": lambda: finetune_case("reg", 8),
    "finetune seg (demo's lesion step, 2 x 2 x 32^3)": lambda: finetune_case("seg", 2),
    "finetune cls (demo's health step, 2 x 2 x 32^3)": lambda: finetune_case("cls", 2),
    "pretrain fomo25-cmeans-tiny (2 x 32^3)": lambda: pretrain_case("fomo25-cmeans-tiny", 32),
    "pretrain ssl3d-tiny (2 x 32^3)": lambda: pretrain_case("ssl3d-tiny", 32),
}
LARGE = {
    "pretrain fomo25, paper size (2 x 64^3)": lambda: pretrain_case("fomo25", 64),
    "nnU-Net ResEnc-L peer (2 x 64^3)": lambda: pretrain_case("peer:resencl", 64),
}


def measure(make, fmt, steps: int, warmup: int) -> tuple[float, float, object]:
    """(median seconds per step, the first step's loss, the model) of a fresh copy of the case laid out in ``fmt``."""
    import torch

    torch.manual_seed(0)
    model, loss_fn, opt = make()
    model.to(memory_format=fmt)
    first = []

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        first.append(float(loss.detach()))

    step()  # the first step's loss comes from the same weights and inputs in both layouts
    for _ in range(warmup - 1):
        step()
    return statistics.median(step_times(step, steps)), first[0], model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--large", action="store_true", help="also paper-size fomo25 and ResEnc-L at 64^3 (minutes)")
    args = ap.parse_args()

    import torch

    from neurofm.train.config import TrainerConfig
    from neurofm.train.trainer import memory_format

    cases = {**CASES, **(LARGE if args.large else {})}
    rows = []
    for name, make in cases.items():
        steps = args.steps if "64^3" not in name else max(2, args.steps // 4)
        t_c, loss_c, model = measure(make, torch.contiguous_format, steps, args.warmup)
        t_l, loss_l, _ = measure(make, torch.channels_last_3d, steps, args.warmup)
        auto = memory_format(TrainerConfig(), model, torch.device("cpu"))
        row = {
            "case": name,
            "steps": steps,
            "contiguous_s": t_c,
            "channels_last_s": t_l,
            "contiguous_over_channels_last": t_c / t_l,
            "auto": "channels_last" if auto == torch.channels_last_3d else "contiguous",
            "first_loss_difference": abs(loss_c - loss_l),
        }
        rows.append(row)
        print(
            f"{name:50s} contiguous {t_c:7.3f} s  channels-last {t_l:7.3f} s  "
            f"{row['contiguous_over_channels_last']:.2f}x  auto: {row['auto']:13s} "
            f"first loss differs by {row['first_loss_difference']:.1e}",
            flush=True,
        )
    save("memory_format", {"threads": torch.get_num_threads(), "rows": rows})


if __name__ == "__main__":
    main()
