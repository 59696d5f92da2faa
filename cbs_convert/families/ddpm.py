"""The discrete DDPM time convention that DiT and ADM share: a schedule of T steps extended to
continuous canonical time, and the border of a noise predictor on it."""

from __future__ import annotations

import math
from typing import Tuple

import torch

from cbs_convert.families.base import broadcast_to, schedule_and_derivative

#: the training chain of every DDPM family here (DDPM's 1000 steps)
DIFFUSION_STEPS = 1000


class DiscreteVPSchedule:
    """A DDPM schedule with ``T`` steps, extended to continuous canonical time.

    Canonical ``t`` maps to the fractional step ``n = t * (T - 1)``; integer steps are exact.
    """

    def __init__(self, kind: str = "linear", steps: int = 1000):
        if kind == "linear":
            scale = 1000.0 / steps
            betas = torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64)
        elif kind == "cosine":
            def f(s):
                return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

            betas = torch.tensor(
                [min(1 - f((i + 1) / steps) / f(i / steps), 0.999) for i in range(steps)],
                dtype=torch.float64,
            )
        else:
            raise ValueError(f"unknown beta schedule {kind!r}")
        self.kind = kind
        self.steps = steps
        self.log_alpha_bar = torch.cumsum(torch.log1p(-betas), 0)
        self.slopes = torch.gradient(self.log_alpha_bar)[0]

    def native_time(self, t: torch.Tensor) -> torch.Tensor:
        return t * (self.steps - 1)

    def canonical_time(self, n: torch.Tensor) -> torch.Tensor:
        return n.to(torch.get_default_dtype() if not n.is_floating_point() else n.dtype) / (self.steps - 1)

    def __call__(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        # Cubic Hermite interpolation of log(alpha_bar) between integer steps: exact at the steps
        # and continuously differentiable, so the velocity is smooth in t and its t-derivative (the
        # acceleration monitor) does not jump at every step. No clamp on n: a clamp has zero
        # derivative at t = 0 and t = 1, which would zero the velocity where sampling starts.
        table = self.log_alpha_bar.to(device=t.device, dtype=torch.float32)
        slopes = self.slopes.to(device=t.device, dtype=torch.float32)
        n = t.float() * (self.steps - 1)
        lo = n.floor().clamp(0, self.steps - 2).long()
        s = n - lo.to(n.dtype)
        s2, s3 = s * s, s * s * s
        log_ab = (
            (2 * s3 - 3 * s2 + 1) * table[lo]
            + (s3 - 2 * s2 + s) * slopes[lo]
            + (-2 * s3 + 3 * s2) * table[lo + 1]
            + (s3 - s2) * slopes[lo + 1]
        )
        alpha = torch.exp(0.5 * log_ab)
        sigma = torch.sqrt((-torch.expm1(log_ab)).clamp_min(1e-12))
        return alpha.to(t.dtype), sigma.to(t.dtype)


class NoisePredictionDDPM:
    """The border of a family trained as a discrete DDPM that predicts noise (DiT, ADM).

    Native time is the step ``n = t (T - 1)``; the first C output channels are the noise and any
    further ones a learned variance. Needs ``beta_schedule`` and ``diffusion_steps`` in the config.
    """

    default_sampler = "ddpm"

    def __init__(self, config):
        super().__init__(config)
        self._vp = DiscreteVPSchedule(self.config["beta_schedule"], self.config["diffusion_steps"])

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """The training chain's alpha-bar at every integer step (float64), for the DDPM samplers."""
        return torch.exp(self._vp.log_alpha_bar)

    def schedule(self, t):
        return self._vp(t)

    def native_time(self, t):
        return self._vp.native_time(t)

    def canonical_time(self, native):
        return self._vp.canonical_time(native)

    def velocity_from_native(self, native_out, x, t):
        return eps_to_velocity(self.schedule, native_out[:, : x.shape[1]], x, t)

    def data_loss(self, model, x0, y, t, noise, teacher_out=None, prediction=None):
        out = prediction
        if out is None:
            alpha, sigma = self.schedule(t)
            out = model(broadcast_to(alpha, x0) * x0 + broadcast_to(sigma, x0) * noise, self.native_time(t), y)
        channels = x0.shape[1]
        loss = torch.nn.functional.mse_loss(out[:, :channels], noise)
        if teacher_out is not None and out.shape[1] > channels:
            # The learned variance has no simple data target here; keep it by matching the teacher.
            loss = loss + torch.nn.functional.mse_loss(out[:, channels:], teacher_out[:, channels:])
        return loss



def eps_to_velocity(schedule, eps: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """dx/dt for x = alpha x0 + sigma eps given a noise prediction.

    Written as ``(alpha'/alpha) x + (sigma' - sigma alpha'/alpha) eps`` so that it stays finite
    where alpha is tiny (t near 1), instead of dividing by alpha to recover x0.
    """
    alpha, sigma, d_alpha, d_sigma = schedule_and_derivative(schedule, t)
    ratio = broadcast_to(d_alpha / alpha, x)
    return ratio * x + (broadcast_to(d_sigma, x) - broadcast_to(sigma, x) * ratio) * eps
