"""Schedules built for one model: the rules of :mod:`.schedules` given the model's cuts and profile,
and the two that need the model itself to run.

* ``profile`` without a profile at hand (a source checkpoint, or a routed file whose stored profile
  lacks the monitor): the model is profiled here on a small pool of its own ODE samples
  (``measure_profile``);
* ``ots``: a start schedule (``edm`` unless ``ots:NAME``) moved point by point to bring the
  sampler's result on a small batch closest to a reference solution of many fine Heun steps, as
  Optimized Time Steps (Xue et al., CVPR 2024) fits steps to the exact solution: coordinate descent,
  each interior time in turn by golden-section search between its neighbours, a move kept only when
  it lowers the error, so the result is never worse than its start on that batch.

``build_schedule`` is the one entry point; ``sampler_times`` is what the samplers ask it through.
"""

from __future__ import annotations

import math
import time
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from cbs_convert.errors import RecipeError
from cbs_convert.sample.schedules import (
    DEFAULT_RHO, PROFILE_GAMMA, PROFILE_MONITOR, Schedule, base_rule, check_times, edm_rule, model_boundaries,
    parse_schedule, place,
)
from cbs_convert.sample.steppers import data_stepper, integrate_data, ode_stepper, run_steps
from cbs_convert.stages.profile import profile_model
from cbs_convert.storage.routed_schema import check_stored_curves

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


def stored_profile(model, monitor: str = PROFILE_MONITOR):
    """The curves a routed file recorded at conversion that hold ``monitor``: its step profile (the
    schedule's own curve, measured for it) before the profile of the cuts; else whichever it has, or None."""
    meta = getattr(model, "metadata", None) or {}
    if not isinstance(meta, dict):
        return None
    stored = [(key, meta[key]) for key in ("step_profile", "profile") if isinstance(meta.get(key), dict)]
    holding = [(k, p) for k, p in stored if isinstance(p.get("mean"), dict) and monitor in p["mean"]]
    if not holding:
        return stored[0][1] if stored else None
    key, profile = holding[0]
    # the load checked the step profile; the cut profile's curve is checked here, where it places steps
    check_stored_curves(profile, key, monitor)
    return profile


def measure_profile(family, model, monitors: Sequence[str] = (PROFILE_MONITOR,), seed: int = 0, device="cpu",
                    pool_size: int = PROFILE_POOL, pool_steps: int = PROFILE_POOL_STEPS, grid=PROFILE_GRID,
                    batches: int = 2, batch_size: int = 16):
    """The model's own profile of ``monitors`` on a small pool of its ODE samples, as a conversion
    measures it (data-free), at a size meant for placing steps rather than cuts."""
    generator = torch.Generator().manual_seed(seed)
    classes = family.num_classes(family.config)
    labels = torch.randint(0, classes, (pool_size,), generator=generator).to(device) if classes else None
    shape = (pool_size, *family.sample_shape(family.config))
    noise = torch.randn(shape, generator=generator).to(device)
    pool_grid = torch.linspace(1.0, 0.0, pool_steps + 1, device=device)
    x0 = integrate_data(family, model, noise, labels, pool_grid, device=device)
    if not torch.isfinite(x0).all():
        raise RecipeError("the model's ODE samples diverged (NaN/Inf), so there is no profile to place steps by; "
                          "use another schedule")
    points = np.linspace(grid[0], grid[1], int(grid[2])).tolist()
    return profile_model(family, model, x0, labels, points, list(monitors), batches, batch_size, seed,
                         f"model ODE samples ({pool_size}, {pool_steps} Heun steps)", derivatives="fd")


# -- optimised against a reference ---------------------------------------------------------------------


@torch.no_grad()
def optimise_times(stepper, times: Sequence[float], x_start: torch.Tensor, reference: torch.Tensor,
                   fixed: Sequence[int] = (), sweeps: int = OTS_SWEEPS, evaluations: int = OTS_EVALUATIONS
                   ) -> Tuple[List[float], Dict[str, float]]:
    """``times`` moved to bring ``stepper``'s result from ``x_start`` closest to ``reference``.

    ``stepper(x, t0, t1, last)`` is one step of the sampler being fitted (``steppers.ode_stepper``,
    ``steppers.data_stepper``). The error is the mean square over the batch. Interior time i moves within
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
        cuts = [b for b in boundaries[1:-1] if b > t_end]
        if cuts and all(b in times for b in cuts):
            # a list with a step edge on every cut (as `schedule --json` saves an aligned one) steps as
            # that aligned schedule did: each step by the one expert that owns it
            counts = [sum(1 for a, b in zip(times, times[1:]) if lo <= b and a <= hi)
                      for lo, hi in zip([t_end, *cuts], [*cuts, 1.0])]
            return Schedule(times, "custom", counts, cuts, ["the times as given, a step edge on every expert cut"],
                            time.time() - began)
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
            profile = stored_profile(model, monitor)
            if profile is not None and monitor not in profile.get("mean", {}):
                held = ", ".join(profile.get("mean", {})) or "no curve"
                notes.append(f"the stored profile holds {held}, not {monitor}: measured here")
                profile = None
            elif profile is not None:
                notes.append(f"{monitor} from the profile stored at conversion")
        if profile is None and monitor == "sensitivity":
            raise RecipeError("--schedule profile:sensitivity: that curve measures a pruned student, so only a conversion "
                              "records it, and this model holds none; choose another monitor")
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
                          seed, device, labels_for, ots_batch, ots_reference_steps, ots_sweeps, ots_evaluations)
        details.update(fit)
        notes.append(f"fitted from {start} on {ots_batch} samples against {ots_reference_steps} Heun steps: mean square "
                     f"error {fit['error_start']:.3g} -> {fit['error']:.3g} ({fit['trials']} trials, "
                     f"{fit['sample_evaluations']:,} model evaluations of one sample in the fit)")
    if start_name == "edm":
        details["rho"] = rho
    check_times(times, t_end, f"the {parsed} schedule")  # a rule that misplaced a step is ours to know about
    return Schedule(times, parsed, counts, [float(c) for c in cuts] if cuts else [], notes, time.time() - began,
                    details)


class _CountedFamily:
    """``family`` with a count of the network passes of one sample its velocity makes (two per sample
    under guidance, ``samplers.Guided.network_passes``): the cost of a fit in model evaluations,
    which, unlike its seconds, carries over from a small model to a large one."""

    def __init__(self, family):
        self._family = family
        self.sample_evaluations = 0

    def __getattr__(self, name):
        return getattr(self._family, name)

    def velocity(self, model, x, t, y):
        self.sample_evaluations += len(x) * getattr(model, "network_passes", 1)
        return self._family.velocity(model, x, t, y)


def _ots(family, model, forward, times, cuts, method, sampler, seed, device, labels_for, batch, reference_steps,
         sweeps, evaluations):
    family = _CountedFamily(family)
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

    # the reference does not follow --rho: the fit's target stays the same whatever schedule it starts from
    fine, _, _ = place(edm_rule(family, DEFAULT_RHO), reference_steps, times[-1])
    reference_stepper = stepper_of(False, "heun")
    with torch.no_grad():
        reference = run_steps(reference_stepper, x_start, torch.tensor(fine, dtype=torch.float32, device=device))
    if not torch.isfinite(reference).all():
        raise RecipeError("the reference solution of the ots schedule diverged (NaN/Inf); use another schedule")
    fixed = [i for i, t in enumerate(times) if t in set(cuts)]
    times, fit = optimise_times(stepper_of(pin, method), times, x_start, reference, fixed, sweeps, evaluations)
    return times, {**fit, "sample_evaluations": family.sample_evaluations}


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


__all__ = ["OTS_BATCH", "OTS_EVALUATIONS", "OTS_REFERENCE_STEPS", "OTS_SWEEPS", "PROFILE_GRID", "PROFILE_POOL",
           "PROFILE_POOL_STEPS", "build_schedule", "measure_profile", "optimise_times", "sampler_times",
           "stored_profile"]
