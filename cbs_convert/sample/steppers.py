"""One step of an ODE sampler, and the plain walk of such steps over a grid of canonical times.

The steppers are what the samplers (:mod:`.samplers`) and the schedule search (:mod:`.model_schedules`)
share: the search reruns single steps to score a placement, the samplers run them all. Nothing here
chooses where the steps go.
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


def step_model(family: Family, model, t0, t1):
    """What computes a whole step from ``t0`` to ``t1``: for a routed model, the expert owning the
    step's interior, also where the step starts or ends on one of its cuts.

    The router gives a time on a cut to one side (the expert above it, or the one float32 rounding
    of the time lands in), so one of the two steps that meet on a cut would mix two experts. With
    the step edges on the cuts (:mod:`.schedules` aligns them) pinning by the midpoint keeps every
    step within one expert; a routed model without ``expert_at`` is called as it is."""
    pick = getattr(model, "expert_at", None)
    if pick is None:
        return model
    middle = torch.tensor([0.5 * (float(t0) + float(t1))], dtype=torch.float64)
    return pick(float(family.native_time(middle)[0]))


def data_stepper(family: Family, model, labels: Optional[torch.Tensor] = None, cfg_scale: float = 1.0,
                 pin_experts: bool = False):
    """One step of ``sample_ode`` as a function ``step(x, t0, t1, last)`` of the state and the
    step's two times (0-dim tensors); ``last`` marks a final step that ends on the data (t = 0),
    which returns the predicted data. ``pin_experts``: each step computed by one expert of a routed
    model (:func:`step_model`)."""
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


def ode_stepper(family, model, labels, method: str = "heun", pin_experts: bool = False):
    """One step of ``samplers.sample_ode_x`` as a function ``step(x, t0, t1, last)`` of the state
    and the step's two times (0-dim tensors); ``last`` marks the final step. ``pin_experts``: each
    step computed by one expert of a routed model (:func:`step_model`)."""
    if method not in ("heun", "euler"):
        raise ValueError(f"unknown fixed-step ODE method {method!r}; choose heun or euler")

    def step(x, t0, t1, last: bool):
        forward = step_model(family, model, t0, t1) if pin_experts else model
        n = len(x)

        def velocity(t_scalar, x):
            return family.velocity(forward, x, t_scalar * torch.ones(n, device=x.device), labels)

        v0 = velocity(t0, x)
        # the last step is Euler's: a second evaluation there would sit at t = 0, where a noise
        # prediction is undefined (as EDM's Heun sampler ends)
        if method == "euler" or last:
            return x + (t1 - t0) * v0
        x_euler = x + (t1 - t0) * v0
        return x + (t1 - t0) * 0.5 * (v0 + velocity(t1, x_euler))

    return step


def run_steps(step, x: torch.Tensor, grid: torch.Tensor, finish: bool = True) -> torch.Tensor:
    """``x`` carried by ``step`` through every interval of ``grid``; the final step is told it is
    the last one only when ``finish``."""
    count = len(grid) - 1
    for i in range(count):
        x = step(x, grid[i], grid[i + 1], i == count - 1 and finish)
    return x


@torch.no_grad()
def integrate_data(family: Family, model, noise: torch.Tensor, labels: Optional[torch.Tensor], grid: torch.Tensor,
                   cfg_scale: float = 1.0, pin_experts: bool = False, finish: bool = True, device="cpu") -> torch.Tensor:
    """``sample_ode``'s integration from ``noise`` through the times of ``grid``; ``finish``: the
    grid ends on the data, so its last step returns the predicted data."""
    _, sigma_start = family.schedule(torch.ones(len(noise), device=device))
    x = broadcast_to(sigma_start, noise) * noise
    return run_steps(data_stepper(family, model, labels, cfg_scale, pin_experts), x, grid, finish)


__all__ = ["data_stepper", "integrate_data", "ode_stepper", "run_steps", "split_velocity", "step_model"]
