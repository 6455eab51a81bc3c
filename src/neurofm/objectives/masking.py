"""Corruptions for masked image modelling: block masking and per-channel coarse dropout.

Both run on the training device, vectorised over the batch, and take an optional
``torch.Generator`` so tests can fix them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from neurofm.errors import ConfigError


def block_mask(
    batch: int,
    spatial: tuple[int, int, int],
    block: int,
    ratio: float,
    *,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mask exactly ``round(ratio * n_blocks)`` random cubes of ``block^3`` voxels per sample.

    Returns:
        ``(B, 1, X, Y, Z)`` bool, True where the input is hidden.
    """
    if not 0.0 < ratio < 1.0:
        raise ConfigError(f"mask ratio should be in (0, 1), got {ratio}")
    if block < 1 or any(s % block for s in spatial):
        raise ConfigError(f"patch size {tuple(spatial)} must be a multiple of the mask block {block}")
    grid = tuple(s // block for s in spatial)
    n = grid[0] * grid[1] * grid[2]
    k = int(round(ratio * n))
    noise = torch.rand(batch, n, device=device, generator=generator)
    order = noise.argsort(dim=1)
    mask = torch.zeros(batch, n, dtype=torch.bool, device=device)
    mask.scatter_(1, order[:, :k], True)
    mask = mask.view(batch, 1, *grid)
    for axis in range(3):
        mask = mask.repeat_interleave(block, dim=2 + axis)
    return mask


def coarse_dropout(
    x: torch.Tensor,
    hole: int,
    holes: int,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero ``holes`` random cubes of ``hole^3`` voxels, independently in every channel.

    A region missing in one contrast is usually present in the others, so restoring it
    needs cross-contrast context (LaMIM). Holes may overlap, as in MONAI's
    ``RandCoarseDropout``.

    Args:
        x: ``(B, C, X, Y, Z)``.

    Returns:
        The corrupted copy and the ``(B, C, X, Y, Z)`` bool mask of dropped voxels.
    """
    if x.ndim != 5:
        raise ValueError(f"expected (B, C, X, Y, Z), got {tuple(x.shape)}")
    b, c, *spatial = x.shape
    if hole < 1 or any(hole > s for s in spatial):
        raise ConfigError(f"hole size {hole} must be in [1, {min(spatial)}] for patch {tuple(spatial)}")
    if holes < 1:
        raise ConfigError(f"number of holes should be >= 1, got {holes}")
    # a 1 at each hole's first corner (holes lie fully inside the volume) ...
    starts = torch.zeros(
        b * c, (spatial[0] - hole + 1) * (spatial[1] - hole + 1) * (spatial[2] - hole + 1), device=x.device
    )
    idx = torch.randint(0, starts.shape[1], (b * c, holes), device=x.device, generator=generator)
    starts.scatter_(1, idx, 1.0)
    starts = starts.view(b * c, 1, *(s - hole + 1 for s in spatial))
    # ... grown into cubes by a separable running max (pad before: a corner covers hole voxels after it)
    m = F.pad(starts, (hole - 1, hole - 1, hole - 1, hole - 1, hole - 1, hole - 1))
    m = F.max_pool3d(m, (hole, 1, 1), stride=1)
    m = F.max_pool3d(m, (1, hole, 1), stride=1)
    m = F.max_pool3d(m, (1, 1, hole), stride=1)
    mask = m.view(b, c, *spatial) > 0
    return x.masked_fill(mask, 0.0), mask


def holes_for_fraction(spatial: tuple[int, int, int], hole: int, fraction: float = 0.4) -> int:
    """How many holes cover about ``fraction`` of the volume (counting overlaps once each, as the paper)."""
    vol = spatial[0] * spatial[1] * spatial[2]
    return max(1, int(round(fraction * vol / hole**3)))


def masked_reconstruction(
    model: torch.nn.Module, x: torch.Tensor, block: int, ratio: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None], torch.Tensor]:
    """Hide ``ratio`` of the ``block^3`` cubes of ``x`` (zeros), run ``model.forward_pretext`` on it and score
    the reconstruction on the hidden voxels (MSE). Returns (that loss, the model's outputs, the mask)."""
    mask = block_mask(x.shape[0], tuple(x.shape[2:]), block, ratio, device=x.device)
    pred = model.forward_pretext(x.masked_fill(mask, 0.0))
    m = mask.float()
    mse = (((pred["reconstruction"] - x) ** 2) * m).sum() / m.sum().clamp_min(1.0)
    return mse, pred, mask
