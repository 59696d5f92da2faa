"""Step schedules: where along canonical time an ODE sampler puts its steps.

A schedule is a list of canonical times decreasing from 1 (noise, where every sampler starts) to
the sampler's end, 0 (data) unless it stops early; N steps are N + 1 times. Every named rule is a
step density on that interval, and N steps are placed so that each carries an equal share of it:

* ``uniform``: equal steps in t (what the samplers do without a schedule, to the bit);
* ``edm``: equal steps in s^(1/rho), s = sigma/alpha the noise level of EDM (rho = 7 by default),
  s held within EDM's published [0.002, 80] where the family's own range is wider (s is infinite at
  t = 1 on SiT's paths);
* ``logsnr``: equal steps in log(alpha^2 / sigma^2) over the same range of s;
* ``profile``: an equal share of a profiled curve's integral per step, de Boor's equidistribution
  that places the experts' cuts (``split.equidistribute``) applied to the steps. The monitor and its
  tempering exponent are ``PROFILE_MONITOR`` and ``PROFILE_GAMMA`` (see there for why);
* ``ots``: a start schedule fitted to one model's sampler; it, and a profile measured where the
  model holds none, belong to the schedules built for a model (:mod:`.model_schedules`).

The first and last times are the sampler's own ends whatever the rule: the density only places the
steps between them. For a routed model every expert boundary inside the interval is also a step
edge (``align``): each segment gets steps in proportion to its share of the density, at least one,
or the counts given per expert, and is filled by the same rule, so no step spans two experts (the
samplers then pin each step to one expert, ``steppers.step_model``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from cbs_convert.errors import RecipeError
from cbs_convert.stages.profile import MONITORS
from cbs_convert.stages.split import check_curve, equidistribute, extend_to_unit_interval, segment_masses, temper

SCHEDULES = ("uniform", "edm", "logsnr", "profile", "ots")
#: EDM's published noise-level range (Karras et al. 2022), where a family's own one is wider
EDM_SIGMA_RANGE = (0.002, 80.0)
DEFAULT_RHO = 7.0
#: the exponents the edm rule accepts: beyond them s^(1/rho) overflows float64 (rho below about
#: 0.006) or flattens until neighbouring steps coincide
RHO_RANGE = (0.1, 100.0)
#: The curve whose tempered integral the profile schedule equidistributes. Euler's local error on a
#: step of length h is h^2/2 |x''|, and x'' along the ODE path is the material derivative of v that
#: this monitor averages squared; equal local errors, de Boor's optimal mesh for piecewise-linear
#: paths, want a step density of |x''|^(1/2), so the squared monitor is tempered by 1/4. Measured on
#: the Fashion-MNIST teacher at 8 Heun steps (1,000 samples, one seed; the fine solution's FD 25.8):
#: FD 26.3 with it, 26.3 for acceleration^(1/4), 27.8 for dirichlet^(1/4), 28.5 for it at 1/2 and
#: 46.1 for dirichlet^(1/2); edm 29.8, logsnr 30.4 (uniform 24.5, below the fine solution's FD).
PROFILE_MONITOR = "path_acceleration"
PROFILE_GAMMA = 0.25


@dataclass
class Schedule:
    """The canonical times of a sampler's steps and how they were placed."""

    times: List[float]  # decreasing from 1 to the sampler's end
    name: str
    counts: List[int]  # steps per expert segment, expert 0 (nearest the data) first; one entry without cuts
    boundaries: List[float]  # the cuts the steps are aligned to, ascending; [] when not aligned
    notes: List[str] = field(default_factory=list)
    seconds: float = 0.0
    details: Dict[str, object] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return len(self.times) - 1

    @property
    def aligned(self) -> bool:
        return bool(self.boundaries)


# -- checking a list of times ----------------------------------------------------------------------


def check_times(times: Sequence[float], t_end: Optional[float] = 0.0, what: str = "the schedule") -> List[float]:
    """``times`` as floats when they run strictly down from 1 to ``t_end`` (any end in [0, 1) when
    None); otherwise a RecipeError that says which rule they break."""
    try:
        values = [float(t) for t in times]
    except (TypeError, ValueError):
        raise RecipeError(f"{what} must be a list of numbers (canonical times, 1 = noise, 0 = data)") from None
    if len(values) < 2:
        raise RecipeError(f"{what} needs at least two times (one step), from 1 down to {t_end if t_end is not None else 0:g}")
    bad = [t for t in values if not (math.isfinite(t) and 0.0 <= t <= 1.0)]
    if bad:
        raise RecipeError(f"{what}: time {bad[0]:g} is outside [0, 1] (canonical time: 1 = noise, 0 = data)")
    if values[0] != 1.0:
        raise RecipeError(f"{what} starts at {values[0]:g}; every sampler starts from pure noise at t = 1")
    if t_end is not None and values[-1] != t_end:
        raise RecipeError(f"{what} ends at {values[-1]:g}; this sampler ends at t = {t_end:g}")
    for a, b in zip(values, values[1:]):
        if not b < a:
            raise RecipeError(f"{what} is not strictly decreasing ({a:g} then {b:g}): steps go from noise (1) to data (0)")
        if not np.float32(b) < np.float32(a):  # the samplers step in float32: a step there must not vanish
            raise RecipeError(f"{what}: {a!r} and {b!r} are the same time in float32, a step of length 0; "
                              "drop one of them")
    return values


def time_grid(times: Sequence[float], device=None, t_end: Optional[float] = 0.0) -> torch.Tensor:
    """``times`` checked (:func:`check_times`) as the float32 tensor the samplers step through."""
    return torch.tensor(check_times(times, t_end), dtype=torch.float32, device=device)


def parse_schedule(text: Union[str, Sequence[float], None]) -> Union[str, List[float], None]:
    """A ``--schedule`` value: a rule name (``profile:MONITOR``, ``ots:START`` included) or a
    comma-separated list of canonical times, checked as far as the text alone allows."""
    if text is None or isinstance(text, (list, tuple)):
        return None if text is None else check_times(text, None, "--schedule")
    value = str(text).strip()
    name, _, option = value.partition(":")
    if name in SCHEDULES:
        if option and name not in ("profile", "ots"):
            raise RecipeError(f"--schedule {value}: only profile:MONITOR and ots:START take an option")
        if name == "profile" and option:
            if option not in MONITORS:
                raise RecipeError(f"--schedule {value}: unknown monitor {option!r}; choose from {', '.join(MONITORS)}")
        if name == "ots" and option:
            parse_schedule(option)
            if option.partition(":")[0] not in ("uniform", "edm", "logsnr", "profile"):
                raise RecipeError(f"--schedule {value}: ots starts from uniform, edm, logsnr or profile")
        return value
    if "," in value:
        try:
            times = [float(part) for part in value.split(",") if part.strip()]
        except ValueError:
            times = None
        if times is not None:
            return check_times(times, None, f"--schedule {value}")
    raise RecipeError(f"--schedule {value!r} is unknown; choose {', '.join(SCHEDULES)} (profile:MONITOR, ots:START), "
                      "or give the times as a comma-separated list from 1 (noise) down to 0 (data)")


def _per_expert(text, convert, valid, complaint: str) -> Optional[list]:
    """A comma-separated list (or a sequence) of one value per expert, or None when not given."""
    if text is None:
        return None
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        values = [convert(str(p).strip()) for p in parts if str(p).strip()]
    except ValueError:
        values = []
    if not values or not all(valid(v) for v in values):
        raise RecipeError(complaint)
    return values


def parse_counts(text: Union[str, Sequence[int], None], flag: str = "--steps-per-expert") -> Optional[List[int]]:
    return _per_expert(text, int, lambda c: c >= 1,
                       f"{flag} {text}: give whole numbers of at least 1, one per expert, expert 0 (nearest the data) first")


def parse_scales(text: Union[str, Sequence[float], None], flag: str = "--cfg-scale-per-expert") -> Optional[List[float]]:
    return _per_expert(text, float, math.isfinite,
                       f"{flag} {text}: give finite numbers, one per expert, expert 0 (nearest the data) first")


# -- the rules as step densities -----------------------------------------------------------------------


class _Coordinate:
    """A rule given by a coordinate u(t), nondecreasing in t: steps equally spaced in u. ``inverse``,
    where known in closed form, replaces the bisection."""

    def __init__(self, u: Callable[[np.ndarray], np.ndarray], inverse: Optional[Callable[[np.ndarray], np.ndarray]] = None,
                 is_t: bool = False):
        self.u, self.inverse, self.is_t = u, inverse, is_t

    def masses(self, edges: Sequence[float]) -> np.ndarray:
        return np.diff(self.u(np.asarray(edges, dtype=np.float64)))

    def place(self, lo: float, hi: float, n: int) -> np.ndarray:
        """n + 1 times from lo to hi, ascending; the interior ones equally spaced in u, each found
        by bisection (u may be flat where a range clips it)."""
        ends = self.u(np.asarray([lo, hi], dtype=np.float64))
        if not ends[1] > ends[0]:
            # the whole segment lies where the rule's range clips u flat (a cut close to t = 0 or 1):
            # the rule says nothing there, so its steps are equal in t
            return np.linspace(lo, hi, n + 1)
        levels = ends[0] + (ends[1] - ends[0]) * np.arange(1, n) / n
        if self.inverse is not None:
            return np.concatenate([[lo], self.inverse(levels), [hi]])
        below, above = np.full(n - 1, lo), np.full(n - 1, hi)
        for _ in range(64):
            middle = 0.5 * (below + above)
            low = self.u(middle) < levels
            below = np.where(low, middle, below)
            above = np.where(low, above, middle)
        return np.concatenate([[lo], 0.5 * (below + above), [hi]])


class _Curve:
    """A rule given by a profiled curve on a grid: steps carrying equal shares of its integral."""

    def __init__(self, grid: Sequence[float], curve: Sequence[float]):
        self.grid, self.curve = extend_to_unit_interval(grid, curve)

    def masses(self, edges: Sequence[float]) -> np.ndarray:
        return np.asarray(segment_masses(self.grid, self.curve, edges), dtype=np.float64)

    def place(self, lo: float, hi: float, n: int) -> np.ndarray:
        # equidistribute works on [0, 1]: hand it the curve on [lo, hi] stretched to that interval
        inside = (self.grid > lo) & (self.grid < hi)
        grid = np.concatenate([[lo], self.grid[inside], [hi]])
        values = np.interp(grid, self.grid, self.curve)
        cuts = np.asarray(equidistribute((grid - lo) / (hi - lo), values, n), dtype=np.float64)
        times = lo + (hi - lo) * cuts
        times[0], times[-1] = lo, hi
        return times


def _sigma_ratio(family, t: np.ndarray) -> np.ndarray:
    """EDM's noise level sigma/alpha at canonical times, from the family's log-SNR."""
    with np.errstate(over="ignore"):
        return np.exp(-0.5 * np.asarray(family.log_snr(t), dtype=np.float64))


def check_rho(rho: float) -> float:
    low, high = RHO_RANGE
    if not (isinstance(rho, (int, float)) and math.isfinite(rho) and low <= rho <= high):
        raise RecipeError(f"--rho {rho}: give a number from {low:g} to {high:g} (EDM's is {DEFAULT_RHO:g})")
    return float(rho)


def edm_rule(family, rho: float = DEFAULT_RHO) -> _Coordinate:
    rho = check_rho(rho)
    low, high = EDM_SIGMA_RANGE
    return _Coordinate(lambda t: np.clip(_sigma_ratio(family, t), low, high) ** (1.0 / rho))


def logsnr_rule(family) -> _Coordinate:
    low, high = EDM_SIGMA_RANGE
    return _Coordinate(lambda t: 2.0 * np.log(np.clip(_sigma_ratio(family, t), low, high)))


def uniform_rule() -> _Coordinate:
    return _Coordinate(lambda t: np.asarray(t, dtype=np.float64), lambda u: u, is_t=True)


def profile_rule(profile, monitor: Optional[str] = None, gamma: Optional[float] = None, floor: float = 0.0) -> _Curve:
    """The tempered curve of ``monitor`` (``PROFILE_MONITOR``) from ``profile`` (a ``Profile`` or
    its dict, as a routed file stores it)."""
    monitor = monitor or PROFILE_MONITOR
    gamma = PROFILE_GAMMA if gamma is None else gamma
    mean = profile.mean if hasattr(profile, "mean") else profile["mean"]
    grid = profile.grid if hasattr(profile, "grid") else profile["grid"]
    if monitor not in mean:
        raise RecipeError(f"the profile holds {', '.join(mean)}, not {monitor}; use --schedule profile:{next(iter(mean))}")
    check_curve(grid, mean[monitor], monitor, "place the steps", "use another schedule, or --schedule profile:MONITOR")
    if not np.any(np.asarray(mean[monitor], dtype=np.float64) > 0):  # equal shares of nothing: no step has a place
        raise RecipeError(f"the {monitor} curve is zero everywhere, so it cannot say where steps go; use another "
                          "schedule, or --schedule profile:MONITOR")
    return _Curve(grid, temper(np.asarray(mean[monitor], dtype=np.float64), gamma, floor))


# -- placing the steps -------------------------------------------------------------------------------


def allocate(total: int, masses: Sequence[float]) -> List[int]:
    """``total`` steps over segments in proportion to ``masses``, at least one each (largest
    remainders first)."""
    masses = np.asarray(masses, dtype=np.float64)
    if not np.isfinite(masses).all():
        raise RecipeError("the schedule's step density is not finite over an expert's segment; use another schedule")
    masses = np.clip(masses, 0.0, None)
    k = len(masses)
    if total < k:
        raise ValueError(f"{total} steps cannot give each of {k} segments one")
    shares = masses / masses.sum() if masses.sum() > 0 else np.full(k, 1.0 / k)
    ideal = total * shares
    counts = np.maximum(1, np.floor(ideal)).astype(int)
    while counts.sum() > total:
        spare = np.where(counts > 1, counts - ideal, -np.inf)
        counts[int(np.argmax(spare))] -= 1
    while counts.sum() < total:
        counts[int(np.argmax(ideal - counts))] += 1
    return [int(c) for c in counts]


def place(rule, steps: int, t_end: float = 0.0, boundaries: Sequence[float] = (),
          steps_per_expert: Optional[Sequence[int]] = None) -> Tuple[List[float], List[int], List[float]]:
    """(times from 1 down to ``t_end``, steps per segment, the cuts used) for ``rule``.

    ``boundaries``: a routed model's [0, b_1, ..., 1]; every cut above ``t_end`` becomes a step edge.
    ``steps_per_expert`` (one count per expert, expert 0 first) replaces the proportional share."""
    inner = [float(b) for b in list(boundaries)[1:-1]]
    cuts = [b for b in inner if b > t_end]
    edges = [t_end, *cuts, 1.0]
    if steps_per_expert is not None:
        if len(steps_per_expert) != len(inner) + 1:
            raise RecipeError(f"--steps-per-expert gives {len(steps_per_expert)} counts; the model has {len(inner) + 1} "
                              "experts: give one each, expert 0 (nearest the data) first")
        if len(cuts) < len(inner):
            raise RecipeError(f"--steps-per-expert gives every expert its steps, and this sampler stops at t = {t_end:g}, "
                              "above expert 0's segment; give --steps instead, or sample to t = 0")
        counts = [int(c) for c in steps_per_expert]
    else:
        if steps < len(edges) - 1:
            raise RecipeError(f"--steps {steps} is below the {len(edges) - 1} experts the steps are aligned to: give at "
                              f"least {len(edges) - 1} steps (one per expert), or --no-align")
        counts = allocate(steps, rule.masses(edges))
    if len(counts) == 1 and getattr(rule, "is_t", False):
        # the uniform rule over the whole range is the samplers' own float32 grid, so that naming
        # it steps to the bit as giving no schedule does
        times = torch.linspace(1.0, t_end, counts[0] + 1).tolist()
    else:
        pieces = [rule.place(lo, hi, n) for lo, hi, n in zip(edges, edges[1:], counts)]
        ascending = np.concatenate([pieces[0]] + [p[1:] for p in pieces[1:]])
        times = [float(t) for t in ascending[::-1]]
    times[0], times[-1] = 1.0, float(t_end)
    return times, counts, cuts


def model_boundaries(model) -> List[float]:
    """A routed model's cuts [0, b_1, ..., 1], or [] for a model with one time segment."""
    values = list(getattr(model, "boundary_values", ()) or ())
    return [float(b) for b in values] if len(values) > 2 else []


def base_rule(family, name: str, rho: float = DEFAULT_RHO, profile=None, monitor: Optional[str] = None,
              gamma: Optional[float] = None):
    if name == "uniform":
        return uniform_rule()
    if name == "edm":
        return edm_rule(family, rho)
    if name == "logsnr":
        return logsnr_rule(family)
    if name == "profile":
        return profile_rule(profile, monitor, gamma)
    raise RecipeError(f"schedule {name!r} is not a placement rule; choose uniform, edm, logsnr or profile")


# -- in the family's own terms ------------------------------------------------------------------------


def native_lists(family, times: Sequence[float]) -> Dict[str, object]:
    """The schedule in the family's own terms: its native time argument for every time, and the
    lists diffusers' schedulers take (``set_timesteps(timesteps=...)`` / ``(sigmas=...)``)."""
    canonical = torch.tensor(list(times), dtype=torch.float64)
    native = family.native_time(canonical).tolist()
    out: Dict[str, object] = {"native": native, "native_name": family.native_time_name}
    alpha, sigma = family.schedule(canonical)
    evaluated = list(times)[:-1]  # a scheduler's list holds the times it calls the model at; the end is its own
    if getattr(family, "alphas_cumprod", None) is not None:
        steps = [int(round(n)) for n in native[:-1]]
        if len(set(steps)) == len(steps):
            out["diffusers_timesteps"] = steps
        else:
            # diffusers refuses a timesteps list that does not strictly descend
            out["diffusers_note"] = (f"rounded to whole training steps, {len(steps) - len(set(steps))} of these times "
                                     "repeat a neighbour, and diffusers refuses repeated timesteps: use fewer steps "
                                     "(the sigmas list serves only a loop that scales its starting noise by "
                                     "EulerDiscreteScheduler's init_noise_sigma, which DiTPipeline does not)")
        ratio = (sigma / alpha).tolist()
        out["diffusers_sigmas"] = [*ratio[:-1], 0.0]
    elif torch.allclose(alpha + sigma, torch.ones_like(alpha), atol=1e-12):
        # a rectified-flow path (x = (1 - s) x0 + s eps): diffusers' flow-matching sigma is s itself
        out["diffusers_flow_sigmas"] = [float(s) for s in sigma[:-1].tolist()]
    else:
        out["diffusers_note"] = "no diffusers scheduler integrates this path; use the canonical times"
    out["evaluated"] = evaluated
    return out


def scheduler_with_timesteps(scheduler, timesteps: Optional[Sequence[int]] = None, sigmas: Optional[Sequence[float]] = None):
    """``scheduler`` (a diffusers scheduler) set to step through ``timesteps`` (or ``sigmas``) whatever
    step count a pipeline then asks of it: ``DiTPipeline`` calls ``set_timesteps(num_inference_steps)``
    itself and offers no way to pass a list, so the list is kept here and the count ignored.
    The scheduler is changed in place and returned."""
    import inspect

    if (timesteps is None) == (sigmas is None):
        raise ValueError("give the timesteps or the sigmas (from python -m cbs_convert schedule), one of them")
    key, values = ("timesteps", [int(t) for t in timesteps]) if timesteps is not None else ("sigmas", [float(s) for s in sigmas])
    # wrapped before: wrap the scheduler's own method again, not the earlier wrapper
    original = getattr(scheduler, "_set_timesteps_unwrapped", scheduler.set_timesteps)
    takers = ("DPMSolverMultistepScheduler or DDPMScheduler" if key == "timesteps"
              else "FlowMatchEulerDiscreteScheduler for a flow model (for a DDPM model, pass the timesteps list, "
                   "from fewer steps if none was written)")
    if key not in inspect.signature(original).parameters:
        raise RecipeError(f"{type(scheduler).__name__}.set_timesteps takes no {key} list; use a scheduler that does, such "
                          f"as {takers}, built with from_config(pipe.scheduler.config)")
    # DiTPipeline and DDPMPipeline draw their starting latents at unit variance and never scale them by
    # the scheduler's init_noise_sigma: a sigma-space scheduler (EulerDiscreteScheduler's is about 157
    # for DiT's betas) then starts from far too little noise, and its samples collapse to the mean
    start = float(getattr(scheduler, "init_noise_sigma", None) or 1.0)  # flow matching's is None: unit noise
    if abs(start - 1.0) > 1e-6:
        raise RecipeError(f"{type(scheduler).__name__} starts from noise of std {start:.4g} (its init_noise_sigma), which "
                          f"the pipelines this wrapper serves do not scale their starting latents to; use {takers}")
    scheduler._set_timesteps_unwrapped = original

    def set_timesteps(num_inference_steps=None, device=None, mu=None, **ignored):
        # mu: the resolution shift a flow-matching pipeline computes for dynamic shifting
        original(device=device, **{key: values}, **({} if mu is None else {"mu": mu}))

    scheduler.set_timesteps = set_timesteps
    return scheduler


__all__ = ["DEFAULT_RHO", "EDM_SIGMA_RANGE", "PROFILE_GAMMA", "PROFILE_MONITOR", "RHO_RANGE", "SCHEDULES", "Schedule",
           "allocate", "base_rule", "check_rho", "check_times", "model_boundaries", "native_lists", "parse_counts", "parse_scales",
           "parse_schedule", "place", "scheduler_with_timesteps", "time_grid"]
