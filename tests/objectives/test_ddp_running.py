"""Under DDP the fomo25 objective's running estimates move by the global batch, so every rank holds the same ones."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch

from neurofm.objectives.fomo25 import Fomo25Config, Fomo25Loss

RANKS = 2


def _batches(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Three training calls of crop-mean anatomy vectors ``(RANKS * 4, 6)``, their contrasts (some unknown, -1, one
    contrast on one rank only) and anatomy maps for the ``_running`` estimates; rank r takes rows r*4..r*4+3."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(3):
        ids = torch.randint(-1, 5, (RANKS * 4,), generator=g)
        ids[:4] = torch.where(ids[:4] == 4, 0, ids[:4])  # contrast 4 only on the second rank
        m = torch.randn(RANKS * 4, 6, generator=g) * torch.linspace(0.5, 3, 6) + ids.clamp_min(0)[:, None]
        maps = torch.randn(RANKS * 4, 6, 2, 2, 2, generator=g)
        out.append((m, ids, maps))
    return out


def _run(loss: Fomo25Loss, rows: slice) -> dict[str, torch.Tensor]:
    loss.train()
    for m, ids, maps in _batches():
        loss._means_spread(m[rows], ids[rows], "contrast", 0.02)
        loss._running("anatomy_mean", maps[rows].mean(0))
    names = ("contrast_means", "contrast_seen", "contrast_means_scale", "anatomy_mean")
    return {n: getattr(loss, n).clone() for n in names}


METRICS = ("diagonal", "whitened")


def _rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=RANKS)
    try:
        for metric in METRICS:
            loss = Fomo25Loss(Fomo25Config(w_contrast_means=1.0, contrast_means_metric=metric))
            state = _run(loss, slice(rank * 4, rank * 4 + 4))
            torch.save(state, Path(out) / f"{metric}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(sys.platform == "win32", reason="gloo on two local processes")
def test_ranks_hold_the_running_estimates_of_the_whole_global_batch(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(_free_port(), str(tmp_path)), nprocs=RANKS, join=True)
    for metric in METRICS:
        ranks = [torch.load(tmp_path / f"{metric}-rank{r}.pt", weights_only=True) for r in range(RANKS)]
        # one process fed the concatenated batch: the estimates DDP must reproduce
        single = _run(Fomo25Loss(Fomo25Config(w_contrast_means=1.0, contrast_means_metric=metric)), slice(None))
        alone = _run(Fomo25Loss(Fomo25Config(w_contrast_means=1.0, contrast_means_metric=metric)), slice(0, 4))
        for name, want in single.items():
            for r, state in enumerate(ranks):
                assert state[name].shape == want.shape, (metric, name, r)
                assert torch.allclose(state[name].to(want.dtype), want, atol=1e-5), (metric, name, r)
        assert bool(ranks[0]["contrast_seen"][4])  # seen through the other rank's scans
        assert not bool(alone["contrast_seen"][4])  # what rank 0 would hold without the others
        assert not torch.allclose(alone["contrast_means"], single["contrast_means"], atol=1e-3)
