"""Probability-flow ODE sampling in canonical time, for any family and any model with its forward.

Used to draw the teacher's own samples for data-free profiling and distillation, and by anyone who
wants to sample a routed checkpoint without the family's original sampling code.
"""

from __future__ import annotations

from typing import Optional

import torch

from .families.base import Family, broadcast_to


@torch.no_grad()
def sample_ode(
    family: Family,
    model,
    shape,
    labels: Optional[torch.Tensor] = None,
    steps: int = 32,
    t_end: float = 0.0,
    generator: Optional[torch.Generator] = None,
    device="cpu",
    noise: Optional[torch.Tensor] = None,
    cfg_scale: float = 1.0,
) -> torch.Tensor:
    """Heun integration of dx/dt = v(x, t) from t = 1 to ``t_end`` on a uniform grid.

    ``cfg_scale`` > 1 guides with the family's null label (when it has one) by mixing the
    canonical velocities of the conditional and unconditional branches.
    """
    if noise is None:
        noise = torch.randn(shape, generator=generator).to(device)
    one = torch.ones(shape[0], device=device)
    _, sigma_start = family.schedule(one)
    x = broadcast_to(sigma_start, noise) * noise
    null = family.null_label(family.config)

    def velocity(x, t):
        if cfg_scale == 1.0 or labels is None or null is None:
            return family.velocity(model, x, t, labels)
        both = family.velocity(
            model, torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, null)])
        )
        cond, uncond = both.chunk(2)
        return uncond + cfg_scale * (cond - uncond)

    times = torch.linspace(1.0, t_end, steps + 1, device=device)
    for i in range(steps):
        t0, t1 = times[i] * one, times[i + 1] * one
        dt = float(times[i + 1] - times[i])
        v0 = velocity(x, t0)
        x_euler = x + dt * v0
        if i == steps - 1 and t_end == 0.0:
            x = x_euler
        else:
            x = x + dt * 0.5 * (v0 + velocity(x_euler, t1))
    return x
