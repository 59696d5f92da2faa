"""The samplers people evaluate these models with, for any model with its family's forward.

* ``ode`` (any family): the probability-flow ODE dx/dt = v(x, t) in x, from t = 1 to 0, with Euler,
  Heun (its last step Euler's) or, with torchdiffeq, dopri5, as SiT's ODE sampler integrates it.
* ``sde`` (any family): Euler-Maruyama on the reverse SDE whose marginals are the ODE's, with
  diffusion w(t) = norm * sigma(t) and a last noise-free step, as SiT's SDE sampler defaults.
* ``ddpm`` and ``ddim`` (families trained as a discrete DDPM: DiT, ADM): ancestral and DDIM steps on a
  respaced subset of the training steps, the learned variance used where the model has one,
  as guided-diffusion (and DiT through it) sample.

``sample_ode`` is the library's own: Heun in the data-prediction form, which draws the teacher's
samples for data-free profiling and distillation.

Each takes ``model(x, native_t, y)`` (a source model, a routed model, or a guided wrapper) and the
starting noise, and returns the sample; nothing here knows which architecture it calls.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from cbs_convert.families.base import Family, broadcast_to
from cbs_convert.sample.model_schedules import sampler_times
from cbs_convert.sample.schedules import time_grid
from cbs_convert.sample.steppers import integrate_data, ode_stepper, run_steps, split_velocity

SAMPLERS = ("ode", "sde", "ddpm", "ddim")
ODE_METHODS = ("heun", "euler", "dopri5")


class Guided(nn.Module):
    """``model`` under classifier-free guidance as the family's reference code applies it.

    Takes a batch of n conditional inputs and returns n outputs: the family's guided forward sees
    the doubled batch [x; x] with labels [y; null] and its first half is kept.

    ``segment_scales`` (a routed ``model`` only): one scale per expert, expert 0 nearest the data,
    each sample guided by the scale of the expert that owns its time, as Wan2.2 guides its
    high-noise and low-noise experts differently."""

    #: network passes per sample: the conditional and the unconditional half (what a cost count multiplies by)
    network_passes = 2

    def __init__(self, family: Family, model, cfg_scale: float, segment_scales: Optional[Sequence[float]] = None):
        super().__init__()
        null = family.null_label(family.config)
        if null is None:
            raise ValueError("classifier-free guidance needs a model with a null class; this one has none")
        if segment_scales is not None:
            count = len(getattr(model, "boundary_values", ())) - 1
            if count < 1 or not hasattr(model, "expert_index"):
                raise ValueError("a guidance scale per expert needs a routed model")
            if len(segment_scales) != count:
                raise ValueError(f"{len(segment_scales)} guidance scales given for {count} experts")
            segment_scales = tuple(float(s) for s in segment_scales)
        self.family, self.model, self.cfg_scale, self.null = family, model, cfg_scale, null
        self.segment_scales = segment_scales

    def _scale(self, native_t):
        if self.segment_scales is None:
            return self.cfg_scale
        which = self.model.expert_index(native_t).to(native_t.device)
        return torch.tensor(self.segment_scales, dtype=torch.float32, device=native_t.device)[which]

    def forward(self, x, native_t, y):
        scale = self._scale(native_t)
        if not isinstance(scale, float):
            scale = scale.reshape(len(x), *([1] * (x.dim() - 1))).to(x.dtype)
        both = self.family.guided_forward(
            self.model, torch.cat([x, x]), torch.cat([native_t, native_t]),
            torch.cat([y, torch.full_like(y, self.null)]), scale,
        )
        return both[: len(x)]

    def expert_at(self, native_t: float) -> nn.Module:
        """Guidance of the expert owning ``native_t`` alone, at that expert's scale (see
        ``steppers.step_model``)."""
        scale = self.cfg_scale
        if self.segment_scales is not None:
            at = torch.tensor([float(native_t)], dtype=torch.float64)
            scale = self.segment_scales[int(self.model.expert_index(at)[0])]
        pick = getattr(self.model, "expert_at", None)
        return Guided(self.family, self.model if pick is None else pick(native_t), scale)


def respaced_steps(total: int, spacing: str) -> List[int]:
    """The training steps a respaced sampler visits, ascending.

    ``"250"``: 250 steps spread evenly over 0 ... total-1, both ends included (rounded).
    ``"ddim50"``: the stride that gives exactly 50 steps starting at 0.
    ``"10,15,25"``: the range cut into equal sections with that many steps in each.
    """
    spacing = str(spacing).strip()
    if spacing.startswith("ddim"):
        count = int(spacing[4:])
        for stride in range(1, total + 1):
            steps = list(range(0, total, stride))
            if len(steps) == count:
                return steps
        raise ValueError(f"no integer stride gives exactly {count} of {total} steps; use a plain count such as {count}")
    counts = [int(c) for c in spacing.split(",")]
    size, extra = divmod(total, len(counts))
    steps, start = [], 0
    for i, count in enumerate(counts):
        length = size + (1 if i < extra else 0)
        if count > length or count < 1:
            raise ValueError(f"cannot take {count} steps from a section of {length}")
        stride = (length - 1) / (count - 1) if count > 1 else 1
        steps += [start + round(stride * j) for j in range(count)]
        start += length
    return sorted(set(steps))


def _x0_and_eps(out, x, alpha_bar, clip):
    channels = x.shape[1]
    eps = out[:, :channels]
    root, root_c = broadcast_to(alpha_bar.sqrt(), x), broadcast_to((1 - alpha_bar).sqrt(), x)
    x0 = (x - root_c * eps) / root
    if clip:
        x0 = x0.clamp(-1, 1)
        eps = (x - root * x0) / root_c
    return x0, eps


@torch.no_grad()
def sample_ddpm(family, model, noise, labels, steps: str = "250", clip: bool = False, generator=None,
                ddim: bool = False, eta: float = 0.0):
    """Ancestral DDPM (or DDIM with ``ddim``) over the respaced steps; noise from ``generator``."""
    alphas_cumprod = family.alphas_cumprod.to(noise.device)
    kept = respaced_steps(len(alphas_cumprod), steps)
    bars = alphas_cumprod[kept]
    prev_bars = torch.cat([bars.new_ones(1), bars[:-1]])
    betas = 1 - bars / prev_bars  # the respaced chain's own betas
    posterior = betas * (1 - prev_bars) / (1 - bars)
    # the first posterior variance is 0: its log is taken from the next step, as the reference does
    log_posterior = torch.log(torch.cat([posterior[1:2], posterior[1:]]))
    # without a learned variance: the larger choice (betas), its first entry the posterior's
    log_fixed = torch.log(torch.cat([posterior[1:2], betas[1:]]))
    x = noise
    n = len(x)
    for i in reversed(range(len(kept))):
        native = torch.full((n,), kept[i], device=x.device, dtype=torch.long)
        out = model(x, native, labels).float()
        bar, prev_bar = bars[i].float(), prev_bars[i].float()
        x0, eps = _x0_and_eps(out, x, bar.expand(n), clip)
        z = torch.randn(x.shape, generator=generator, device="cpu").to(x.device) if i > 0 else None
        if ddim:
            sigma = eta * torch.sqrt((1 - prev_bar) / (1 - bar) * (1 - bar / prev_bar))
            x = prev_bar.sqrt() * x0 + torch.sqrt((1 - prev_bar - sigma**2).clamp_min(0)) * eps
            if z is not None and eta > 0:
                x = x + sigma * z
            continue
        beta = betas[i].float()
        mean = (beta * prev_bar.sqrt() / (1 - bar)) * x0 + ((1 - prev_bar) * (1 - beta).sqrt() / (1 - bar)) * x
        if out.shape[1] >= 2 * x.shape[1]:
            # the model's second half interpolates log variance between the posterior's and beta's
            fraction = (out[:, x.shape[1]: 2 * x.shape[1]] + 1) / 2
            log_var = fraction * torch.log(beta) + (1 - fraction) * log_posterior[i].float()
        else:
            log_var = log_fixed[i].float().expand_as(x)
        x = mean if z is None else mean + torch.exp(0.5 * log_var) * z
    return x


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
    ``steps`` steps to ``t_end``, built for ``model`` (:mod:`.model_schedules`). ``pin_experts``: each step
    computed by one expert of a routed model; by default exactly when the schedule is aligned to
    its cuts.
    """
    if noise is None:
        noise = torch.randn(shape, generator=generator).to(device)
    if times is not None or schedule is not None:
        times, pin_experts = sampler_times(family, model, times, schedule, steps, pin_experts, t_end=t_end,
                                           sampler="data", device=noise.device)
    if times is None:
        grid = torch.linspace(1.0, t_end, steps + 1, device=device)
    else:
        grid = time_grid(times, device, t_end=None)
        t_end = float(times[-1])
    return integrate_data(family, model, noise, labels, grid, cfg_scale, bool(pin_experts), t_end == 0.0, device)


@torch.no_grad()
def sample_ode_x(family, model, noise, labels, steps: int = 250, method: str = "heun", atol=1e-6, rtol=1e-3,
                 times=None, pin_experts: Optional[bool] = None, schedule: Optional[str] = None):
    """dx/dt = v from t = 1 to 0 on a uniform grid (Euler, Heun) or adaptively (dopri5).

    ``times``: the canonical times of the steps instead, decreasing from 1 to 0, as a list or a
    ``schedules.Schedule``; ``schedule``: a schedule by name (``"edm"``, ``"profile"``...) of
    ``steps`` steps, built for ``model`` (:mod:`.model_schedules`). ``pin_experts``: each step computed by
    one expert of a routed model; by default exactly when the schedule is aligned to its cuts."""
    if method != "dopri5" and (times is not None or schedule is not None):
        times, pin_experts = sampler_times(family, model, times, schedule, steps, pin_experts, method=method,
                                           device=noise.device)  # a fit or a profile runs the model where it lives
    n = len(noise)
    _, sigma_start = family.schedule(torch.ones(n, device=noise.device))
    x = broadcast_to(sigma_start, noise) * noise

    def velocity(t_scalar, x):
        return family.velocity(model, x, t_scalar * torch.ones(n, device=x.device), labels)

    if method == "dopri5":
        if times is not None or schedule is not None:
            raise ValueError("dopri5 chooses its own steps; a step schedule applies to the heun and euler methods")
        try:
            from torchdiffeq import odeint
        except ImportError:
            raise ImportError("the dopri5 method needs torchdiffeq: pip install torchdiffeq, or use --method heun") from None
        times = torch.tensor([1.0, 0.0], device=x.device)
        return odeint(velocity, x, times, method="dopri5", atol=atol, rtol=rtol)[-1]
    if method not in ("heun", "euler"):
        raise ValueError(f"unknown ODE method {method!r}; choose from {', '.join(ODE_METHODS)}")
    grid = torch.linspace(1.0, 0.0, steps + 1, device=x.device) if times is None else time_grid(times, x.device)
    return run_steps(ode_stepper(family, model, labels, method, bool(pin_experts)), x, grid)


@torch.no_grad()
def sample_sde(family, model, noise, labels, steps: int = 250, diffusion_norm: float = 1.0,
               last_step: float = 0.04, generator=None):
    """Euler-Maruyama from t = 1 to ``last_step``, then one noise-free step to 0.

    In tau = 1 - t the ODE is dx/dtau = -v; adding (w/2) * score to that drift and sqrt(w) dB keeps
    every marginal (the Fokker-Planck terms cancel), with score = -eps / sigma."""
    n = len(noise)
    ones = torch.ones(n, device=noise.device)
    _, sigma_start = family.schedule(ones)
    x = broadcast_to(sigma_start, noise) * noise
    times = torch.linspace(1.0, last_step, steps, device=x.device)

    def drift(x, t):
        t_batch = t * ones
        v = family.velocity(model, x, t_batch, labels)
        _, eps = split_velocity(family, x, v, t_batch)
        _, sigma = family.schedule(t_batch)
        w = diffusion_norm * broadcast_to(sigma, x)
        score = -eps / broadcast_to(sigma, x)
        return -v + 0.5 * w * score, w

    for i in range(steps - 1):
        d_tau = float(times[i] - times[i + 1])
        step, w = drift(x, times[i])
        z = torch.randn(x.shape, generator=generator, device="cpu").to(x.device)
        x = x + step * d_tau + torch.sqrt(w * d_tau) * z
    step, _ = drift(x, times[-1])
    return x + step * float(times[-1])  # the last step: the drift's mean only, no noise


#: the steps SiT's and DiT's sampling scripts default to, for every sampler
DEFAULT_STEPS = 250


def draw(family: Family, model, sampler: str, noise, labels, *, steps: Optional[int] = None, generator=None,
         method: str = "heun", clip: Optional[bool] = None, eta: float = 0.0, diffusion_norm: float = 1.0,
         last_step: float = 0.04, atol: float = 1e-6, rtol: float = 1e-3, times=None,
         pin_experts: Optional[bool] = None, schedule: Optional[str] = None):
    """One batch from ``noise`` by the named sampler; ``times``, ``schedule`` and ``pin_experts`` as
    for :func:`sample_ode_x` (the ode sampler only)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    if (times is not None or schedule is not None or pin_experts) and sampler != "ode":
        raise ValueError(f"a step schedule applies to the ode sampler; {sampler} takes its own steps")
    steps = steps or DEFAULT_STEPS
    if sampler in ("ddpm", "ddim"):
        if getattr(family, "alphas_cumprod", None) is None:
            raise ValueError(f"the {sampler} sampler needs a model trained as a discrete DDPM; "
                             f"a {family.name} model samples with --sampler ode or sde")
        if clip is None:
            clip = family.data_space(family.config) == "pixels"
        return sample_ddpm(family, model, noise, labels, str(steps), clip=clip, generator=generator,
                           ddim=sampler == "ddim", eta=eta)
    if sampler == "ode":
        return sample_ode_x(family, model, noise, labels, steps, method, atol, rtol, times, pin_experts, schedule)
    return sample_sde(family, model, noise, labels, steps, diffusion_norm, last_step, generator)


def to_uint8_nhwc(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images as the reference sampling scripts store them: 127.5 x + 128, clamped, truncated."""
    return (127.5 * images.float() + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


__all__ = ["DEFAULT_STEPS", "Guided", "ODE_METHODS", "SAMPLERS", "draw", "respaced_steps", "sample_ddpm", "sample_ode",
           "sample_ode_x", "sample_sde", "to_uint8_nhwc"]
