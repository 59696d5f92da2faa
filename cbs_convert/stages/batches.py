"""Training and measurement inputs: x_t at times drawn from a segment of canonical time."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from cbs_convert.families.base import Family, broadcast_to


def noised(family: Family, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = alpha(t) x0 + sigma(t) noise, in the family's own forward process."""
    alpha, sigma = family.schedule(t)
    return broadcast_to(alpha, x0) * x0 + broadcast_to(sigma, x0) * noise


def draw_batch(
    family: Family,
    x0_pool: torch.Tensor,
    labels_pool: Optional[torch.Tensor],
    segment: Tuple[float, float],
    batch_size: int,
    generator: torch.Generator,
    margin: float = 0.0,
    label_dropout: float = 0.0,
):
    """x0, labels, canonical t and noise; t uniform on the segment widened by ``margin``.

    Labels are replaced by the null class with probability ``label_dropout`` (when the model has
    one). All draws come from ``generator`` on the CPU, so they do not depend on the device.
    """
    lo, hi = max(0.0, segment[0] - margin), min(1.0, segment[1] + margin)
    index = torch.randint(0, x0_pool.shape[0], (batch_size,), generator=generator)
    t = lo + (hi - lo) * torch.rand(batch_size, generator=generator)
    noise = torch.randn((batch_size, *x0_pool.shape[1:]), generator=generator)
    drop = torch.rand(batch_size, generator=generator) < label_dropout
    device = x0_pool.device
    x0 = x0_pool[index.to(device)]
    y = None
    if labels_pool is not None:
        y = labels_pool[index.to(device)]
        null = family.null_label(family.config)
        if null is not None and label_dropout > 0:
            y = torch.where(drop.to(device), torch.full_like(y, null), y)
    return x0, y, t.to(device), noise.to(device)


def segment_inputs(family: Family, x0_pool, labels_pool, segment, batch_size: int, generator: torch.Generator):
    """(x_t, canonical t, labels) for measuring a model on ``segment``."""
    x0, y, t, noise = draw_batch(family, x0_pool, labels_pool, segment, batch_size, generator)
    return noised(family, x0, t, noise), t, y
