"""Probability-flow ODE sampling in canonical time, for any family and any model with its forward.

Used to draw the teacher's own samples for data-free profiling and distillation, and by anyone who
wants to sample a routed checkpoint without the family's original sampling code.
"""

from __future__ import annotations

from typing import Optional

import torch

from cbs_convert.families.base import Family, broadcast_to, schedule_and_derivative


def split_velocity(family: Family, x: torch.Tensor, v: torch.Tensor, t: torch.Tensor):
    """The (x0, eps) pair that gives state x and velocity v at time t.

    x = alpha x0 + sigma eps and v = alpha' x0 + sigma' eps are two equations in two unknowns;
    their determinant alpha sigma' - sigma alpha' is 1 on the linear path and sigma'/alpha on a
    variance-preserving one, never zero inside (0, 1].
    """
    alpha, sigma, d_alpha, d_sigma = schedule_and_derivative(family.schedule, t)
    det = broadcast_to(alpha * d_sigma - sigma * d_alpha, x)
    x0 = (broadcast_to(d_sigma, x) * x - broadcast_to(sigma, x) * v) / det
    eps = (broadcast_to(alpha, x) * v - broadcast_to(d_alpha, x) * x) / det
    return x0, eps


def data_stepper(family: Family, model, labels: Optional[torch.Tensor] = None, cfg_scale: float = 1.0,
                 pin_experts: bool = False):
    """One step of :func:`sample_ode` as a function ``step(x, t0, t1, last)`` of the state and the
    step's two times (0-dim tensors); ``last`` marks a final step that ends on the data (t = 0),
    which returns the predicted data. ``pin_experts``: each step computed by one expert of a routed
    model (``samplers.step_model``)."""
    from cbs_convert.sample.samplers import step_model

    null = family.null_label(family.config)
    data_range = getattr(family, "data_range", None)

    def predict(forward, x, t):
        if cfg_scale == 1.0 or labels is None or null is None:
            v = family.velocity(forward, x, t, labels)
        else:
            both = family.velocity(
                forward, torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, null)])
            )
            cond, uncond = both.chunk(2)
            v = uncond + cfg_scale * (cond - uncond)
        x0, eps = split_velocity(family, x, v, t)
        if data_range is not None:
            clipped = x0.clamp(*data_range)
            # keep x consistent with the clipped prediction, as DDIM does
            alpha, sigma = family.schedule(t)
            eps = (x - broadcast_to(alpha, x) * clipped) / broadcast_to(sigma, x)
            x0 = clipped
        return x0, eps

    def step(x, t0, t1, last: bool):
        forward = step_model(family, model, t0, t1) if pin_experts else model
        one = torch.ones(len(x), device=x.device)
        t0, t1 = t0 * one, t1 * one
        alpha0, sigma0 = (broadcast_to(v, x) for v in family.schedule(t0))
        alpha1, sigma1 = (broadcast_to(v, x) for v in family.schedule(t1))
        x0_a, eps_a = predict(forward, x, t0)
        if last:
            return x0_a
        x_euler = alpha1 * x0_a + sigma1 * eps_a
        x0_b, _ = predict(forward, x_euler, t1)
        # y1 = y0 + (r1 - r0) (x0_a + x0_b) / 2, written back in x = sigma * y
        return sigma1 / sigma0 * x + (alpha1 - sigma1 * alpha0 / sigma0) * 0.5 * (x0_a + x0_b)

    return step


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
    times=None,
    pin_experts: Optional[bool] = None,
    schedule: Optional[str] = None,
) -> torch.Tensor:
    """Heun's method for dx/dt = v(x, t) from t = 1 to ``t_end`` on a uniform grid, in the
    data-prediction form: with r = alpha/sigma and y = x/sigma the ODE is dy/dr = x0_hat(x, t).

    Its Euler step is DDIM. Unlike Heun in x it stays stable where alpha'/alpha is huge (the cosine
    schedule near t = 1), and it starts cleanly at t = 1 where alpha = 0 (SiT). The last step to
    t = 0 returns the predicted data, as the reference DDPM samplers do. A family whose data has a
    known range (``family.data_range``, pixels in [-1, 1]) has its predicted x0 clipped to it.
    ``cfg_scale`` > 1 mixes the conditional and null-label velocities.

    ``times``: the canonical times of the steps instead of the uniform grid, decreasing from 1 to
    their last value, which takes the place of ``steps`` and ``t_end``, as a list or a
    ``schedules.Schedule``; ``schedule``: a schedule by name (``"edm"``, ``"profile"``...) of
    ``steps`` steps to ``t_end``, built for ``model`` (:mod:`.schedules`). ``pin_experts``: each step
    computed by one expert of a routed model; by default exactly when the schedule is aligned to
    its cuts.
    """
    if noise is None:
        noise = torch.randn(shape, generator=generator).to(device)
    one = torch.ones(shape[0], device=device)
    _, sigma_start = family.schedule(one)
    x = broadcast_to(sigma_start, noise) * noise
    if times is not None or schedule is not None:
        from cbs_convert.sample.schedules import sampler_times

        times, pin_experts = sampler_times(family, model, times, schedule, steps, pin_experts, t_end=t_end,
                                           sampler="data")
    if times is None:
        grid = torch.linspace(1.0, t_end, steps + 1, device=device)
    else:
        from cbs_convert.sample.schedules import time_grid

        grid = time_grid(times, device, t_end=None)
        t_end = float(times[-1])
    step = data_stepper(family, model, labels, cfg_scale, bool(pin_experts))
    count = len(grid) - 1
    for i in range(count):
        x = step(x, grid[i], grid[i + 1], i == count - 1 and t_end == 0.0)
    return x
