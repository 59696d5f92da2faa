"""SiT and DiT: one latent diffusion transformer (transformer.py), two time conventions.

* SiT takes ``tau = 1 - t`` (``tau = 1`` is data) and predicts the velocity ``d x / d tau`` of the
  Linear or GVP path; its ``forward`` drops the variance half of a learn-sigma head.
* DiT takes a DDPM step ``n = t * 999`` (float accepted) and returns noise and variance channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cbs_convert.errors import CheckpointError
from cbs_convert.families import diffusers_dit
from cbs_convert.families.base import broadcast_to, schedule_and_derivative, setting
from cbs_convert.families.ddpm import DIFFUSION_STEPS, NoisePredictionDDPM
from cbs_convert.families.transformer import TransformerFamily


class SiTFamily(TransformerFamily):
    """SiT: velocity prediction on the Linear or GVP interpolant, native time tau = 1 - t."""

    name = "sit"
    native_time_name = "t"
    drop_variance = True

    @classmethod
    def time_config(cls, hints, notes):
        path = (hints.get("path") or "linear").lower()
        if path not in ("linear", "gvp"):
            raise CheckpointError(f"SiT path {path!r} is not supported; use --path linear or --path gvp")
        notes.append(f"SiT {path} path, velocity prediction" + ("" if hints.get("path") else " (default; --path to change)"))
        return {"path": path}

    @classmethod
    def check_time_config(cls, check, config, field):
        check.text(check.get(config, "path", f"{field}.path", "'linear' or 'gvp'"), f"{field}.path", ("linear", "gvp"))

    def diffusers_refusal(self, what):
        return (f"{what} is a SiT, a flow-matching velocity model; diffusers has no SiT class (its DiT and UNet models "
                "are DDPM noise predictors), so it cannot be written as a diffusers folder; extract it as .safetensors "
                "or .pt for the SiT code")

    def _time_args(self):
        return {"path_type": self.config["path"].upper() if self.config["path"] == "gvp" else "Linear"}

    def schedule(self, t):
        if self.config["path"] == "linear":
            return 1 - t, t
        tau = 1 - t
        return torch.sin(tau * math.pi / 2), torch.cos(tau * math.pi / 2)

    def native_time(self, t):
        return 1 - t

    def canonical_time(self, native):
        return 1 - (native if native.is_floating_point() else native.float())

    def velocity_from_native(self, native_out, x, t):
        # SiT's velocity is d/dtau with tau = 1 - t, so the canonical one is its negative.
        return -native_out[:, : x.shape[1]]

    def data_loss(self, model, x0, y, t, noise, teacher_out=None, prediction=None):
        alpha, sigma, d_alpha, d_sigma = schedule_and_derivative(self.schedule, t)
        x_t = broadcast_to(alpha, x0) * x0 + broadcast_to(sigma, x0) * noise
        target = broadcast_to(d_alpha, x0) * x0 + broadcast_to(d_sigma, x0) * noise
        if prediction is None:
            prediction = model(x_t, self.native_time(t), y)
        return F.mse_loss(self.velocity_from_native(prediction, x_t, t), target)


class DiTFamily(NoisePredictionDDPM, TransformerFamily):
    """DiT: noise (and variance) prediction on a 1000-step DDPM, linear betas by default."""

    name = "dit"
    native_time_name = "timesteps"
    diffusers_counterpart = diffusers_dit

    @classmethod
    def time_config(cls, hints, notes):
        schedule, origin = setting(hints, "beta_schedule")
        schedule = str(schedule or "linear").lower()
        if schedule not in ("linear", "cosine"):
            raise CheckpointError(f"beta schedule {schedule!r} is not supported; use linear or cosine")
        notes.append(f"DiT {schedule} beta schedule, {DIFFUSION_STEPS} steps, noise prediction ({origin or 'default'})")
        return {"beta_schedule": schedule, "diffusion_steps": DIFFUSION_STEPS}

    @classmethod
    def check_time_config(cls, check, config, field):
        check.text(check.get(config, "beta_schedule", f"{field}.beta_schedule", "'linear' or 'cosine'"),
                   f"{field}.beta_schedule", ("linear", "cosine"))
        steps = check.get(config, "diffusion_steps", f"{field}.diffusion_steps", str(DIFFUSION_STEPS))
        check.integer(steps, f"{field}.diffusion_steps", DIFFUSION_STEPS, DIFFUSION_STEPS)

    def _time_args(self):
        return {"beta_schedule": self.config["beta_schedule"]}
