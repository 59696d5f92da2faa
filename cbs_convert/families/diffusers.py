"""What the families' diffusers counterparts share: diffusers' DDPM schedulers in and out, the
denoiser that diffusers pipelines call, and the bounds of a diffusers config value.

Each family with a counterpart among diffusers' model classes names its translator module as
``Family.diffusers_counterpart`` (``diffusers_dit``, ``diffusers_unet``); every such module has the
same parts: ``CLASS_NAMES``, ``MODEL_CLASS``, ``SUPPORTED``, ``PIPELINE_SENDS_VARIANCE``,
``claims``, ``to_family``, ``model_config``, ``expert_tensors`` and ``Denoiser``. The files and
folders themselves are ``storage/diffusers.py``'s.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Dict, Optional

import torch
from torch import nn

from cbs_convert.errors import CheckpointError

#: diffusers' schedulers over a discrete DDPM beta schedule: any of them may ship with a DDPM model
DDPM_SCHEDULERS = (
    "DDPMScheduler", "DDIMScheduler", "DDIMInverseScheduler", "DDPMParallelScheduler", "DDIMParallelScheduler",
    "PNDMScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "DPMSolverSDEScheduler",
    "DEISMultistepScheduler", "UniPCMultistepScheduler", "SASolverScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler", "LMSDiscreteScheduler",
)
#: diffusers' names for the beta schedules the DDPM families know
SCHEDULER_BETAS = {"linear": "linear", "squaredcos_cap_v2": "cosine"}
#: what a refusal to write an expert as a diffusers folder offers instead
INSTEAD = ("extract it as .safetensors instead (cbs_convert reads it back exactly), or drop the routed file into a "
           "diffusers pipeline with cbs_convert.load(ROUTED, format='diffusers')")


def positive(value, key: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{where}: {key} {value!r} in the config must be a positive whole number; compare "
                              "config.json with the model's download")
    return value


def square(value, key: str, where: str) -> Optional[int]:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise CheckpointError(f"{where}: {key} {list(value)}; only square inputs are supported")
        value = value[0]
    return None if value is None else positive(value, key, where)


def check_scheduler(scheduler: Dict[str, Any], file) -> Dict[str, Any]:
    """A pipeline's scheduler config, refused unless it samples the DDPM process a family here was
    trained on; its ``beta_schedule`` becomes the family's name for the betas."""
    name = scheduler.get("_class_name")
    if name not in DDPM_SCHEDULERS:
        raise CheckpointError(f"{file}: a {name or 'scheduler without _class_name'}; the DDPM families here need one of "
                              "diffusers' discrete-beta schedulers (DDPMScheduler, DDIMScheduler, ...), which sample "
                              "the process the model was trained on")
    unsupported = [(key, scheduler[key]) for key in ("trained_betas", "rescale_betas_zero_snr") if scheduler.get(key)]
    if scheduler.get("prediction_type", "epsilon") != "epsilon":
        unsupported.insert(0, ("prediction_type", scheduler["prediction_type"]))
    if unsupported:
        key, value = unsupported[0]
        raise CheckpointError(f"{file}: {key}={value!r} is not supported; the DDPM families here are noise predictors "
                              "on DDPM's own betas (prediction_type epsilon, no trained_betas, no zero-SNR rescaling)")
    scheduler["beta_schedule"] = _scheduler_betas(scheduler, file)
    return scheduler


def _scheduler_betas(scheduler: Dict[str, Any], where) -> str:
    kind = scheduler.get("beta_schedule", "linear")
    if kind not in SCHEDULER_BETAS:
        raise CheckpointError(f"{where}: beta schedule {kind!r} is not supported; only linear and squaredcos_cap_v2")
    if int(scheduler.get("num_train_timesteps", 1000)) != 1000:
        raise CheckpointError(f"{where}: {scheduler['num_train_timesteps']} training steps; only 1000 are supported")
    if kind == "linear" and (abs(float(scheduler.get("beta_start", 1e-4)) - 1e-4) > 1e-12
                             or abs(float(scheduler.get("beta_end", 0.02)) - 0.02) > 1e-12):
        raise CheckpointError(f"{where}: linear betas from {scheduler.get('beta_start')} to {scheduler.get('beta_end')}; "
                              "only DDPM's 1e-4 to 0.02 are supported")
    return SCHEDULER_BETAS[kind]


def scheduler_config(family) -> Optional[Dict[str, Any]]:
    """A DDPMScheduler config for the family's training chain, or None where diffusers has no name
    for its betas. The inverse of ``check_scheduler``."""
    names = {ours: theirs for theirs, ours in SCHEDULER_BETAS.items()}
    kind = family.config.get("beta_schedule")
    if kind not in names or int(family.config.get("diffusion_steps", 0)) != 1000:
        return None
    # DDPMPipeline hands the scheduler every output channel, DiTPipeline only the noise
    counterpart = family.diffusers_counterpart
    learned = counterpart is not None and counterpart.PIPELINE_SENDS_VARIANCE and family.config.get("learn_sigma")
    return {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
            "beta_schedule": names[kind], "prediction_type": "epsilon", "trained_betas": None,
            "variance_type": "learned_range" if learned else "fixed_small",
            # pixels stay in [-1, 1]; SD-VAE latents do not
            "clip_sample": family.data_space(family.config) == "pixels", "clip_sample_range": 1.0}


class Denoiser(nn.Module):
    """A routed (or plain) DDPM-family model with the attributes diffusers pipelines read:
    ``config.in_channels``, ``config.sample_size``, ``config.out_channels``, ``dtype``, ``device``."""

    def __init__(self, model: nn.Module, family):
        super().__init__()
        if getattr(family, "alphas_cumprod", None) is None:
            raise CheckpointError(f"a {family.name} model is not a DDPM noise predictor, which diffusers' DiT and DDPM "
                                  "pipelines expect; load it with format='cbs_convert'")
        self.model = model
        channels, size, _ = family.sample_shape(family.config)
        self.config = SimpleNamespace(in_channels=channels, sample_size=size,
                                      out_channels=channels * (2 if family.config.get("learn_sigma") else 1),
                                      num_embeds_ada_norm=family.num_classes(family.config) or None)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _denoise(self, x, timestep, class_labels):
        if timestep is None:
            raise ValueError("timestep is required")
        if not torch.is_tensor(timestep) or timestep.dim() == 0:
            timestep = torch.as_tensor(timestep, device=x.device).reshape(1).expand(len(x))
        return self.model(x, timestep, class_labels)


def as_diffusers(model: nn.Module, family) -> nn.Module:
    """``model``, a model of ``family``, as the denoiser module of a diffusers pipeline."""
    if family.diffusers_counterpart is None:
        raise CheckpointError(f"a {family.name} model has no diffusers counterpart; diffusers pipelines take DiT "
                              "(DiTPipeline) and UNet (DDPMPipeline, DDIMPipeline) models")
    return family.diffusers_counterpart.Denoiser(model, family).eval()
