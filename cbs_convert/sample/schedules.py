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
  tempering exponent are ``PROFILE_MONITOR`` and ``PROFILE_GAMMA`` (see there for why); a routed
  file's stored profile is used when it holds that monitor, otherwise the model is profiled here;
* ``ots``: a start schedule (``edm`` unless ``ots:NAME``) moved point by point to bring the
  sampler's result on a small batch closest to a reference solution of many fine Heun steps, as
  Optimized Time Steps (Xue et al., CVPR 2024) fits steps to the exact solution: coordinate descent,
  each interior time in turn by golden-section search between its neighbours, a move kept only when
  it lowers the error, so the result is never worse than its start on that batch.

The first and last times are the sampler's own ends whatever the rule: the density only places the
steps between them. For a routed model every expert boundary inside the interval is also a step
edge (``align``): each segment gets steps in proportion to its share of the density, at least one,
or the counts given per expert, and is filled by the same rule, so no step spans two experts (the
samplers then pin each step to one expert, ``samplers.step_model``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from cbs_convert.errors import RecipeError
from cbs_convert.stages.split import equidistribute, extend_to_unit_interval, segment_masses, temper

SCHEDULES = ("uniform", "edm", "logsnr", "profile", "ots")
#: EDM's published noise-level range (Karras et al. 2022), where a family's own one is wider
EDM_SIGMA_RANGE = (0.002, 80.0)
DEFAULT_RHO = 7.0
#: The curve whose tempered integral the profile schedule equidistributes. Euler's local error on a
#: step of length h is h^2/2 |x''|, and x'' along the ODE path is the material derivative of v that
#: this monitor averages squared; equal local errors, de Boor's optimal mesh for piecewise-linear
#: paths, want a step density of |x''|^(1/2), so the squared monitor is tempered by 1/4. Measured on
#: the Fashion-MNIST teacher at 8 Heun steps (1,000 samples, one seed; the fine solution's FD 25.8):
#: FD 26.3 with it, 26.3 for acceleration^(1/4), 27.8 for dirichlet^(1/4), 28.5 for it at 1/2 and
#: 46.1 for dirichlet^(1/2); edm 29.8, logsnr 30.4 (uniform 24.5, below the fine solution's FD).
PROFILE_MONITOR = "path_acceleration"
PROFILE_GAMMA = 0.25
#: where a profile is measured for the schedule alone (a source checkpoint, or a routed file whose
#: stored profile lacks the monitor): the conversion's default grid range, a small teacher pool
PROFILE_GRID = (0.02, 0.98, 16)
PROFILE_POOL = 32
PROFILE_POOL_STEPS = 16
#: the OTS search: batch, reference Heun steps (on the EDM schedule), sweeps over the interior
#: times, and evaluations of the error per time and sweep
OTS_BATCH = 8
OTS_REFERENCE_STEPS = 64
OTS_SWEEPS = 2
OTS_EVALUATIONS = 6
_GOLDEN = (math.sqrt(5) - 1) / 2


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
            from cbs_convert.stages.profile import MONITORS

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

    def __init__(self, u: Callable[[np.ndarray], np.ndarray], inverse: Optional[Callable[[np.ndarray], np.ndarray]] = None):
        self.u, self.inverse = u, inverse

    def masses(self, edges: Sequence[float]) -> np.ndarray:
        return np.diff(self.u(np.asarray(edges, dtype=np.float64)))

    def place(self, lo: float, hi: float, n: int) -> np.ndarray:
        """n + 1 times from lo to hi, ascending; the interior ones equally spaced in u, each found
        by bisection (u may be flat where a range clips it)."""
        ends = self.u(np.asarray([lo, hi], dtype=np.float64))
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


def edm_rule(family, rho: float = DEFAULT_RHO) -> _Coordinate:
    low, high = EDM_SIGMA_RANGE
    return _Coordinate(lambda t: np.clip(_sigma_ratio(family, t), low, high) ** (1.0 / rho))


def logsnr_rule(family) -> _Coordinate:
    low, high = EDM_SIGMA_RANGE
    return _Coordinate(lambda t: 2.0 * np.log(np.clip(_sigma_ratio(family, t), low, high)))


def uniform_rule() -> _Coordinate:
    return _Coordinate(lambda t: np.asarray(t, dtype=np.float64), lambda u: u)


def profile_rule(profile, monitor: Optional[str] = None, gamma: Optional[float] = None, floor: float = 0.0) -> _Curve:
    """The tempered curve of ``monitor`` (``PROFILE_MONITOR``) from ``profile`` (a ``Profile`` or
    its dict, as a routed file stores it)."""
    from cbs_convert.stages.split import check_curve

    monitor = monitor or PROFILE_MONITOR
    gamma = PROFILE_GAMMA if gamma is None else gamma
    mean = profile.mean if hasattr(profile, "mean") else profile["mean"]
    grid = profile.grid if hasattr(profile, "grid") else profile["grid"]
    if monitor not in mean:
        raise RecipeError(f"the profile holds {', '.join(mean)}, not {monitor}; use --schedule profile:{next(iter(mean))}")
    check_curve(grid, mean[monitor], monitor, "place the steps", "use another schedule, or --schedule profile:MONITOR")
    return _Curve(grid, temper(np.asarray(mean[monitor], dtype=np.float64), gamma, floor))


# -- placing the steps -------------------------------------------------------------------------------


def allocate(total: int, masses: Sequence[float]) -> List[int]:
    """``total`` steps over segments in proportion to ``masses``, at least one each (largest
    remainders first)."""
    masses = np.clip(np.asarray(masses, dtype=np.float64), 0.0, None)
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
            raise RecipeError(f"--steps-per-expert: the sampler stops at t = {t_end:g}, above the segment of expert 0; "
                              "give counts without it or sample to t = 0")
        counts = [int(c) for c in steps_per_expert]
    else:
        if steps < len(edges) - 1:
            raise RecipeError(f"--steps {steps} is below the {len(edges) - 1} experts the steps are aligned to: give at "
                              f"least {len(edges) - 1} steps (one per expert), or --no-align")
        counts = allocate(steps, rule.masses(edges))
    pieces = [rule.place(lo, hi, n) for lo, hi, n in zip(edges, edges[1:], counts)]
    ascending = np.concatenate([pieces[0]] + [p[1:] for p in pieces[1:]])
    times = [float(t) for t in ascending[::-1]]
    times[0], times[-1] = 1.0, float(t_end)
    return times, counts, cuts


def model_boundaries(model) -> List[float]:
    """A routed model's cuts [0, b_1, ..., 1], or [] for a model with one time segment."""
    values = list(getattr(model, "boundary_values", ()) or ())
    return [float(b) for b in values] if len(values) > 2 else []


def stored_profile(model):
    """The profile a routed file recorded at conversion, or None."""
    meta = getattr(model, "metadata", None) or {}
    return meta.get("profile") if isinstance(meta, dict) else None


def measure_profile(family, model, monitors: Sequence[str] = (PROFILE_MONITOR,), seed: int = 0, device="cpu",
                    pool_size: int = PROFILE_POOL, pool_steps: int = PROFILE_POOL_STEPS, grid=PROFILE_GRID,
                    batches: int = 2, batch_size: int = 16):
    """The model's own profile of ``monitors`` on a small pool of its ODE samples, as a conversion
    measures it (data-free), at a size meant for placing steps rather than cuts."""
    from cbs_convert.stages.profile import profile_model
    from cbs_convert.sample import sample_ode

    generator = torch.Generator().manual_seed(seed)
    classes = family.num_classes(family.config)
    labels = torch.randint(0, classes, (pool_size,), generator=generator).to(device) if classes else None
    shape = (pool_size, *family.sample_shape(family.config))
    noise = torch.randn(shape, generator=generator).to(device)
    x0 = sample_ode(family, model, shape, labels, steps=pool_steps, noise=noise, device=device)
    if not torch.isfinite(x0).all():
        raise RecipeError("the model's ODE samples diverged (NaN/Inf), so there is no profile to place steps by; "
                          "use another schedule")
    points = np.linspace(grid[0], grid[1], int(grid[2])).tolist()
    return profile_model(family, model, x0, labels, points, list(monitors), batches, batch_size, seed,
                         f"model ODE samples ({pool_size}, {pool_steps} Heun steps)", derivatives="fd")


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


# -- optimised against a reference ---------------------------------------------------------------------


@torch.no_grad()
def optimise_times(stepper, times: Sequence[float], x_start: torch.Tensor, reference: torch.Tensor,
                   fixed: Sequence[int] = (), sweeps: int = OTS_SWEEPS, evaluations: int = OTS_EVALUATIONS
                   ) -> Tuple[List[float], Dict[str, float]]:
    """``times`` moved to bring ``stepper``'s result from ``x_start`` closest to ``reference``.

    ``stepper(x, t0, t1, last)`` is one step of the sampler being fitted (``samplers.ode_stepper``,
    ``data_stepper``). The error is the mean square over the batch. Interior time i moves within
    (t_{i+1}, t_{i-1}) by golden-section search; ``fixed`` indices (the expert cuts) stay. Each
    trial reruns the sampler from the state before time i, kept from the last accepted schedule."""
    times = [float(t) for t in times]
    count = len(times) - 1
    fixed = set(int(i) for i in fixed)

    def grid(values):
        return torch.tensor(values, dtype=torch.float32, device=x_start.device)

    def run(values, start, x):
        g = grid(values)
        for k in range(start, count):
            x = stepper(x, g[k], g[k + 1], k == count - 1)
        return x

    def error(x):
        return float((x.double() - reference.double()).pow(2).mean())

    trials = 0
    best = error(run(times, 0, x_start))
    first = best
    for _ in range(sweeps):
        states = [x_start]  # the state at times[i - 1] when time i is searched
        for i in range(1, count):
            if i not in fixed:
                lo, hi = times[i + 1], times[i - 1]
                margin = 1e-3 * (hi - lo)

                def trial(t):
                    nonlocal trials
                    trials += 1
                    values = times[:i] + [t] + times[i + 1:]
                    if not grid([values[i - 1], t, values[i + 1]]).diff().lt(0).all():
                        return math.inf  # too close to a neighbour to be a float32 step
                    found = error(run(values, i - 1, states[-1]))
                    return found if math.isfinite(found) else math.inf

                t, found = _golden_section(trial, lo + margin, hi - margin, evaluations)
                if found < best:
                    times[i], best = t, found
            g = grid(times)
            states.append(stepper(states[-1], g[i - 1], g[i], False))
    return times, {"error_start": first, "error": best, "trials": trials}


def _golden_section(f, a: float, b: float, evaluations: int) -> Tuple[float, float]:
    """The best (t, f(t)) seen in ``evaluations`` golden-section trials on [a, b]."""
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = f(c), f(d)
    seen = [(fc, c), (fd, d)]
    for _ in range(max(0, evaluations - 2)):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = f(c)
            seen.append((fc, c))
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = f(d)
            seen.append((fd, d))
    value, t = min(seen)
    return t, value


# -- one entry point ---------------------------------------------------------------------------------


def build_schedule(family, model, schedule: Union[str, Sequence[float], None] = "uniform", steps: Optional[int] = None,
                   *, method: str = "heun", sampler: str = "ode", t_end: float = 0.0, rho: float = DEFAULT_RHO,
                   align: bool = True, steps_per_expert: Optional[Sequence[int]] = None, profile=None,
                   gamma: Optional[float] = None, forward=None, labels_for=None, seed: int = 0, device="cpu",
                   ots_batch: int = OTS_BATCH, ots_reference_steps: int = OTS_REFERENCE_STEPS,
                   ots_sweeps: int = OTS_SWEEPS, ots_evaluations: int = OTS_EVALUATIONS) -> Schedule:
    """The step schedule ``schedule`` (a name, ``profile:MONITOR``, ``ots:START``, or a list of
    times) of ``steps`` steps for ``model``.

    ``model`` gives the cuts (a routed model's) and the stored profile; ``forward`` (default
    ``model``, e.g. a ``samplers.Guided``) is what the ots search samples with. ``sampler``:
    ``"ode"`` (``samplers.sample_ode_x``, with ``method``) or ``"data"`` (``sample_ode``), the sampler
    the ots search fits. ``profile`` overrides the stored one; without either the model is
    profiled here (``measure_profile``). ``steps_per_expert`` fixes each expert's count (their sum
    is the step count); ``align=False`` ignores the cuts."""
    began = time.time()
    parsed = parse_schedule(schedule if schedule is not None else "uniform")
    boundaries = model_boundaries(model) if align or steps_per_expert is not None else []
    if steps_per_expert is not None:
        if not boundaries:
            raise RecipeError("--steps-per-expert needs a routed model (its experts' segments); this model has one")
        if steps is not None and steps != sum(steps_per_expert):
            raise RecipeError(f"--steps {steps} and --steps-per-expert {','.join(map(str, steps_per_expert))} "
                              f"(total {sum(steps_per_expert)}) disagree; give one of them")
        steps = sum(steps_per_expert)
    notes: List[str] = []
    if isinstance(parsed, list):
        if steps is not None and steps != len(parsed) - 1:
            raise RecipeError(f"--steps {steps}: the schedule given has {len(parsed) - 1} steps; drop --steps")
        if steps_per_expert is not None:
            raise RecipeError("--steps-per-expert places the steps itself; it cannot apply to a list of times")
        times = check_times(parsed, t_end, "--schedule")
        return Schedule(times, "custom", [len(times) - 1], [], ["the times as given"], time.time() - began)
    if steps is None or steps < 1:
        raise RecipeError(f"--steps {steps}: a schedule needs at least 1 step")
    name, _, option = parsed.partition(":")
    start = (option or "edm") if name == "ots" else parsed
    start_name, _, monitor = start.partition(":")
    details: Dict[str, object] = {}
    if start_name == "profile":
        monitor = monitor or PROFILE_MONITOR
        if profile is None:
            profile = stored_profile(model)
            if profile is not None and monitor not in profile.get("mean", {}):
                notes.append(f"the stored profile holds {', '.join(profile.get('mean', {}))}, not {monitor}: "
                             "measured here")
                profile = None
            elif profile is not None:
                notes.append(f"{monitor} from the profile stored at conversion")
        if profile is None:
            measured = time.time()
            profile = measure_profile(family, model, (monitor,), seed, device)
            details["profile_seconds"] = time.time() - measured
            notes.append(f"{monitor} measured on {profile.samples_per_point} samples per time at "
                         f"{len(profile.grid)} times ({details['profile_seconds']:.1f} s)")
        details.update(monitor=monitor, gamma=PROFILE_GAMMA if gamma is None else gamma)
    rule = base_rule(family, start_name, rho, profile, monitor, gamma)
    times, counts, cuts = place(rule, steps, t_end, boundaries, steps_per_expert)
    if name == "ots":
        times, fit = _ots(family, model, forward if forward is not None else model, times, cuts, method, sampler,
                          seed, device, labels_for, ots_batch, ots_reference_steps, ots_sweeps, ots_evaluations, rho)
        details.update(fit)
        notes.append(f"fitted from {start} on {ots_batch} samples against {ots_reference_steps} Heun steps: mean square "
                     f"error {fit['error_start']:.3g} -> {fit['error']:.3g} ({fit['trials']} trials)")
    if start_name == "edm":
        details["rho"] = rho
    check_times(times, t_end, f"the {parsed} schedule")  # a rule that misplaced a step is ours to know about
    return Schedule(times, parsed, counts, [float(c) for c in cuts] if cuts else [], notes, time.time() - began,
                    details)


def _ots(family, model, forward, times, cuts, method, sampler, seed, device, labels_for, batch, reference_steps,
         sweeps, evaluations, rho):
    from cbs_convert.sample import data_stepper
    from cbs_convert.sample.samplers import ode_stepper

    generator = torch.Generator().manual_seed(seed)
    shape = (batch, *family.sample_shape(family.config))
    noise = torch.randn(shape, generator=generator).to(device)
    classes = family.num_classes(family.config)
    if labels_for is not None:
        labels = labels_for(batch, generator)
    else:
        labels = torch.randint(0, classes, (batch,), generator=generator) if classes else None
    labels = None if labels is None else labels.to(device)
    _, sigma_start = family.schedule(torch.ones(batch, device=device))
    x_start = sigma_start.reshape(-1, *([1] * (noise.dim() - 1))) * noise
    pin = bool(cuts)

    # sample_ode's final step returns its prediction only where it ends on the data
    finish = sampler != "data" or times[-1] == 0.0

    def stepper_of(pinned, fitted_method):
        if sampler == "data":
            base = data_stepper(family, forward, labels, 1.0, pinned)
        else:
            base = ode_stepper(family, forward, labels, fitted_method, pinned)
        return lambda x, t0, t1, last: base(x, t0, t1, last and finish)

    fine, _, _ = place(edm_rule(family, rho), reference_steps, times[-1])
    reference_stepper = stepper_of(False, "heun")
    reference = x_start
    grid = torch.tensor(fine, dtype=torch.float32, device=device)
    with torch.no_grad():
        for k in range(len(fine) - 1):
            reference = reference_stepper(reference, grid[k], grid[k + 1], k == len(fine) - 2)
    if not torch.isfinite(reference).all():
        raise RecipeError("the reference solution of the ots schedule diverged (NaN/Inf); use another schedule")
    fixed = [i for i, t in enumerate(times) if t in set(cuts)]
    return optimise_times(stepper_of(pin, method), times, x_start, reference, fixed, sweeps, evaluations)


def sampler_times(family, model, times=None, schedule: Optional[str] = None, steps: Optional[int] = None,
                  pin_experts: Optional[bool] = None, **build) -> Tuple[Optional[List[float]], bool]:
    """What a library sampler steps through: (times or None for its own uniform grid, whether each
    step is pinned to one expert). ``times``: a list or a :class:`Schedule`; ``schedule``: a name,
    built here for ``model`` with ``steps`` and ``build``'s keywords. ``pin_experts`` None: pinned
    exactly when the schedule is aligned to the model's cuts."""
    if times is not None and schedule is not None:
        raise ValueError("give times or a schedule name, not both")
    if schedule is not None:
        times = build_schedule(family, model, schedule, steps, **build)
    if isinstance(times, Schedule):
        return times.times, times.aligned if pin_experts is None else bool(pin_experts)
    return (None if times is None else list(times)), bool(pin_experts)


# -- what a user sees ------------------------------------------------------------------------------------


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
        out["diffusers_timesteps"] = steps
        ratio = (sigma / alpha).tolist()
        out["diffusers_sigmas"] = [*ratio[:-1], 0.0]
        if len(set(steps)) < len(steps):
            out["diffusers_note"] = "rounding to whole training steps merged some times; the timesteps list repeats them"
    elif torch.allclose(alpha + sigma, torch.ones_like(alpha), atol=1e-12):
        # a rectified-flow path (x = (1 - s) x0 + s eps): diffusers' flow-matching sigma is s itself
        out["diffusers_flow_sigmas"] = [float(s) for s in sigma[:-1].tolist()]
    else:
        out["diffusers_note"] = "no diffusers scheduler integrates this path; use the canonical times"
    out["evaluated"] = evaluated
    return out


def describe(family, schedule: Schedule, model_name: str = "the model") -> List[str]:
    """Lines that show a schedule: canonical and native times, what diffusers takes, where it came from."""
    lists = native_lists(family, schedule.times)

    def show(values, spec=".6g"):
        return ",".join(format(v, spec) for v in values)

    split = ""
    if schedule.aligned:
        split = (f", aligned to the expert cuts {', '.join(f'{b:.4g}' for b in schedule.boundaries)}: "
                 + " + ".join(str(c) for c in schedule.counts) + " steps (expert 0, nearest the data, first)")
    lines = [f"{schedule.name} schedule for {model_name}: {schedule.steps} steps{split}; computed in {schedule.seconds:.3g} s"]
    lines += [f"  {note}" for note in schedule.notes]
    lines.append("canonical t (1 = noise, 0 = data; python -m cbs_convert.sample --schedule takes this list):")
    lines.append(f"  {show(schedule.times)}")
    direction = "0 = noise" if lists["native"][0] < lists["native"][-1] else f"{lists['native'][0]:g} = noise"
    lines.append(f"native {lists['native_name']} ({family.name}, {direction}):")
    lines.append(f"  {show(lists['native'])}")
    if "diffusers_timesteps" in lists:
        lines.append("diffusers: scheduler.set_timesteps(timesteps=[...]) (DDPMScheduler, EulerDiscreteScheduler, "
                     "DPMSolverMultistepScheduler), one per model call:")
        lines.append(f"  [{', '.join(str(t) for t in lists['diffusers_timesteps'])}]")
        lines.append("diffusers: EulerDiscreteScheduler.set_timesteps(sigmas=[...]) (sigma/alpha, the final 0 the data):")
        lines.append(f"  [{', '.join(format(s, '.6g') for s in lists['diffusers_sigmas'])}]")
    if "diffusers_flow_sigmas" in lists:
        lines.append("diffusers: FlowMatchEulerDiscreteScheduler(shift=1.0).set_timesteps(sigmas=[...]), one per model "
                     "call (it appends the final 0):")
        lines.append(f"  [{', '.join(format(s, '.6g') for s in lists['diffusers_flow_sigmas'])}]")
    if "diffusers_note" in lists:
        lines.append(f"  note: {lists['diffusers_note']}")
    return lines


def add_arguments(parser, steps_help: Optional[str] = None) -> None:
    """The flags that choose a schedule, shared by ``python -m cbs_convert.sample`` and the
    ``schedule`` command."""
    import argparse

    parser.add_argument("--schedule", help="where the ode sampler's steps go: uniform (the default), edm (rho), "
                        "logsnr, profile (equal shares of the profiled path acceleration; profile:MONITOR for "
                        "another), ots (edm fitted to a fine reference; ots:START), or a comma-separated list of "
                        "canonical times from 1 (noise) down to 0 (data)")
    parser.add_argument("--rho", type=float, default=DEFAULT_RHO, help="edm only: the exponent (default 7)")
    parser.add_argument("--align", action=argparse.BooleanOptionalAction, default=True,
                        help="routed models: put a step edge on every expert cut, so that no step spans two experts "
                        "(default on)")
    parser.add_argument("--steps-per-expert", help="routed models: steps of each expert, expert 0 (nearest the data) "
                        "first, e.g. 4,8 (their sum is the step count)")


def command_parser():
    """``python -m cbs_convert schedule CHECKPOINT``'s flags."""
    from cbs_convert.cli.main import _Parser

    parser = _Parser(prog="python -m cbs_convert schedule",
                     description="Compute a sampling step schedule for a routed file or a source checkpoint and print it in "
                     "canonical time, in the family's native time, and as the lists diffusers' schedulers take.")
    parser.add_argument("model", help="a routed .safetensors file or a source checkpoint (file or diffusers folder)")
    parser.add_argument("--steps", type=int, help="the number of steps (or --steps-per-expert)")
    add_arguments(parser)
    parser.add_argument("--method", choices=("heun", "euler"), default="heun",
                        help="the ode sampler's method the ots schedule is fitted to (default heun)")
    parser.add_argument("--seed", type=int, default=0, help="the noise of the profile's pool and of the ots batch")
    parser.add_argument("--family", choices=("sit", "dit", "adm"), help="source checkpoints only, as for a conversion")
    parser.add_argument("--num-heads", type=int, help="source checkpoints only, as for a conversion")
    parser.add_argument("--path", choices=("linear", "gvp"), help="SiT source checkpoints only")
    parser.add_argument("--image-size", type=int, help="ADM source checkpoints whose files do not say it")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="also write the schedule and its native lists to this JSON file")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def run_command(args) -> List[str]:
    """The ``schedule`` command: the lines it prints."""
    from cbs_convert.storage.checkpoint import bundled_or_given
    from cbs_convert.errors import CheckpointError
    from cbs_convert.storage.loading import is_routed, load_model
    from cbs_convert.pipeline.ranks import resolve_device

    check_arguments(args)
    if args.steps is not None and args.steps < 1:
        raise RecipeError(f"--steps {args.steps}: a sampler takes at least 1 step")
    if args.seed < 0:
        raise RecipeError(f"--seed {args.seed}: seeds are whole numbers from 0 up")
    if args.steps is None and args.steps_per_expert is None and not isinstance(parse_schedule(args.schedule), list):
        raise RecipeError("give --steps N (or --steps-per-expert, or the times themselves as --schedule)")
    path = bundled_or_given(args.model)
    if not path.exists():
        raise CheckpointError(f"{args.model}: no such file or folder; give a routed .safetensors or a source checkpoint")
    hints = {"family": args.family, "num_heads": args.num_heads, "path": args.path, "image_size": args.image_size}
    if is_routed(path) and any(v is not None for v in hints.values()):
        given = ", ".join(f"--{k.replace('_', '-')}" for k, v in hints.items() if v is not None)
        raise RecipeError(f"{given}: {path} is a routed file, which records its own architecture; drop {given}")
    device = resolve_device(args.device)
    family, model = load_model(path, device=device, hints=hints)
    schedule = build_schedule(family, model, args.schedule or "uniform", args.steps, method=args.method, rho=args.rho,
                              align=args.align, steps_per_expert=parse_counts(args.steps_per_expert), seed=args.seed,
                              device=device)
    lines = describe(family, schedule, str(path))
    if args.json:
        from cbs_convert.storage.files import atomic_write_json

        atomic_write_json(Path(args.json), {"schedule": schedule.name, "times": schedule.times, "counts": schedule.counts,
                                            "boundaries": schedule.boundaries, "notes": schedule.notes,
                                            "seconds": schedule.seconds, **native_lists(family, schedule.times)})
        lines.append(f"wrote {args.json}")
    return lines


def check_arguments(args) -> None:
    """What the shared flags alone can show."""
    if not (math.isfinite(args.rho) and args.rho > 0):
        raise RecipeError(f"--rho {args.rho}: give a positive number (EDM's is 7)")
    parse_schedule(args.schedule)
    parse_counts(args.steps_per_expert)
    if args.steps_per_expert and not args.align:
        raise RecipeError("--steps-per-expert places steps within each expert's segment; drop --no-align")


__all__ = ["DEFAULT_RHO", "EDM_SIGMA_RANGE", "PROFILE_GAMMA", "PROFILE_MONITOR", "SCHEDULES", "Schedule", "allocate",
           "build_schedule", "check_times", "describe", "measure_profile", "native_lists", "optimise_times",
           "parse_schedule", "place", "sampler_times", "time_grid"]
