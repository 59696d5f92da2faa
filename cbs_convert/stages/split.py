"""Cutting canonical time into K segments of equal complexity (the budget they share: budget.py).

Equidistribution (de Boor): with Phi the cumulative trapezoid integral of the processed curve,
boundary k is Phi^-1(k/K * Phi(1)). Guards applied in order, each one's effect reported:

1. tempering phi^gamma (gamma = 1/2 makes Dirichlet cuts invariant to the time variable);
2. a uniform floor, phi' = (1 - lambda) phi / mean(phi) + lambda, against endpoint-dominated curves;
3. a minimum segment width, so that no expert starves for training times.

The curve is known on [t_min, t_max]; outside it is held at its end values, so that the segments
cover all of [0, 1].

Other rules, for comparison and as baselines: ``uniform`` (equal widths), ``snr`` (equal spacing in
log-SNR = log(alpha^2 / sigma^2) between t_min and t_max, from the family's schedule; the minimum
width applies too) and ``explicit`` boundaries. Cuts and budget shares are independent choices:
``allocation="mass:MONITOR"`` shares the budget by that monitor's processed curve mass per segment,
whatever rule placed the cuts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from cbs_convert.errors import RecipeError


@dataclass
class Split:
    boundaries: List[float]  # K + 1 values from 0 to 1
    shares: List[float]  # each segment's share of the processed phi-mass
    method: str
    monitor: Optional[str]
    guards: Dict[str, List[float]] = field(default_factory=dict)  # inner cuts after each stage
    notes: List[str] = field(default_factory=list)
    allocation: Optional[str] = None  # what set the shares: "equal", "mass" or "mass:MONITOR"
    #: the boundaries every other rule gives on the same profile ("uniform", "snr", "cbs:MONITOR")
    alternatives: Dict[str, List[float]] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return len(self.boundaries) - 1

    @property
    def segments(self):
        return [(self.boundaries[i], self.boundaries[i + 1]) for i in range(self.k)]

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, data):
        return cls(**data)


def extend_to_unit_interval(grid: Sequence[float], phi: Sequence[float]):
    grid = np.asarray(grid, dtype=np.float64)
    phi = np.asarray(phi, dtype=np.float64)
    if grid[0] > 0:
        grid, phi = np.concatenate([[0.0], grid]), np.concatenate([[phi[0]], phi])
    if grid[-1] < 1:
        grid, phi = np.concatenate([grid, [1.0]]), np.concatenate([phi, [phi[-1]]])
    return grid, phi


def cumulative(grid: np.ndarray, phi: np.ndarray) -> np.ndarray:
    steps = np.diff(grid) * 0.5 * (phi[1:] + phi[:-1])
    return np.concatenate([[0.0], np.cumsum(steps)])


def equidistribute(grid: Sequence[float], phi: Sequence[float], k: int) -> List[float]:
    """Boundaries (0, b_1, ..., 1) giving each of k segments an equal share of the integral of phi."""
    grid, phi = extend_to_unit_interval(grid, phi)
    total_curve = cumulative(grid, phi)
    total = total_curve[-1]
    if not np.isfinite(total) or total <= 0:
        return uniform_boundaries(k)
    levels = np.arange(1, k) / k * total
    # Phi is non-decreasing; where phi is zero it is flat, and interp picks the first crossing.
    inner = np.interp(levels, total_curve, grid)
    return [0.0, *[float(b) for b in inner], 1.0]


def uniform_boundaries(k: int) -> List[float]:
    return [i / k for i in range(k + 1)]


def enforce_min_width(boundaries: Sequence[float], min_width: float) -> List[float]:
    """Nearest feasible cuts: a forward sweep pushes cuts right, a backward sweep pulls them left."""
    b = list(boundaries)
    k = len(b) - 1
    if k * min_width > 1 + 1e-12:
        raise RecipeError(f"k={k} segments of minimum width {min_width} do not fit in [0, 1]; lower --k or --min-width")
    for i in range(1, k):
        b[i] = max(b[i], b[i - 1] + min_width)
    for i in range(k - 1, 0, -1):
        b[i] = min(b[i], b[i + 1] - min_width)
    return b


def temper(phi: np.ndarray, gamma: float, floor: float) -> np.ndarray:
    phi = np.clip(np.asarray(phi, dtype=np.float64), 0.0, None)
    # the cuts and shares read only the curve's shape: scaled to a peak of 1 first, a large
    # exponent cannot overflow (nor can the integral of what it gives)
    peak = phi.max() if phi.size else 0.0
    phi = (phi / peak if peak > 0 else phi) ** gamma
    if floor > 0:
        mean = phi.mean()
        phi = (1 - floor) * (phi / mean if mean > 0 else phi) + floor
    return phi


def segment_masses(grid, phi, boundaries) -> List[float]:
    grid, phi = extend_to_unit_interval(grid, phi)
    total_curve = cumulative(grid, phi)
    at = np.interp(np.asarray(boundaries), grid, total_curve)
    masses = np.diff(at)
    total = masses.sum()
    if total <= 0:
        return [1.0 / len(masses)] * len(masses)
    return [float(m / total) for m in masses]


#: allocation settings besides "mass:MONITOR"
ALLOCATIONS = ("auto", "mass", "equal")
#: where the log-SNR is infinite at an end of [t_min, t_max] (t = 0 or 1 on the linear path), the
#: snr rule starts or stops this far inside instead
SNR_END_CLAMP = 1e-3


def parse_allocation(allocation: str) -> Tuple[str, Optional[str]]:
    """("auto" | "mass" | "equal", None), or ("mass", MONITOR) for "mass:MONITOR"."""
    text = str(allocation).strip()
    if text in ALLOCATIONS:
        return text, None
    kind, _, monitor = text.partition(":")
    if kind == "mass" and monitor.strip():
        return "mass", monitor.strip()
    raise RecipeError(
        f"--allocation {allocation!r} is unknown; choose auto, mass, equal, or mass:MONITOR to share the budget by "
        f"another profiled curve (e.g. mass:sensitivity)"
    )


def check_curve(grid, curve, monitor: Optional[str], purpose: str, fix: str) -> None:
    """Refuse a curve with NaN or Inf: its integral, cuts and shares would all be meaningless."""
    values = np.asarray(curve, dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        where = ""
        if grid is not None and len(grid) == len(values):
            where = " (at t = " + ", ".join(f"{t:.3g}" for t in np.asarray(grid)[bad][:3]) + (" ..." if bad.sum() > 3 else "") + ")"
        raise RecipeError(f"the {monitor or 'profile'} curve has NaN or Inf values{where}, so it cannot {purpose}; {fix}")


def _is_zero(curve) -> bool:
    return not np.any(np.asarray(curve, dtype=np.float64) > 0)


def snr_boundaries(k: int, log_snr: Callable, t_range: Sequence[float]) -> Tuple[List[float], List[str]]:
    """Boundaries equally spaced in log-SNR between ``t_range``'s ends, and notes.

    ``log_snr`` maps an array of canonical times to log(alpha^2 / sigma^2), decreasing in t (the
    family's schedule: ``Family.log_snr``). The segments still cover [0, 1]; only the inner cuts
    are spaced in log-SNR, and each is found by bisection.
    """
    lo, hi = float(t_range[0]), float(t_range[1])
    notes: List[str] = []

    def at(t):
        return np.asarray(log_snr(np.asarray(t, dtype=np.float64)), dtype=np.float64)

    ends = at([lo, hi])
    if not np.isfinite(ends[0]) and lo < SNR_END_CLAMP:
        notes.append(f"log-SNR is infinite at t = {lo:g}, so the snr rule starts at t = {SNR_END_CLAMP:g}")
        lo = SNR_END_CLAMP
    if not np.isfinite(ends[1]) and hi > 1 - SNR_END_CLAMP:
        notes.append(f"log-SNR is infinite at t = {hi:g}, so the snr rule stops at t = {1 - SNR_END_CLAMP:g}")
        hi = 1 - SNR_END_CLAMP
    ends = at([lo, hi])
    if not np.all(np.isfinite(ends)) or not ends[0] > ends[1]:
        raise RecipeError(
            f"split 'snr' needs a finite log-SNR that decreases from t_min={lo:g} to t_max={hi:g} (got {ends[0]:.4g} "
            f"and {ends[1]:.4g}); change --t-min/--t-max or use --split uniform"
        )
    levels = ends[0] + (ends[1] - ends[0]) * np.arange(1, k) / k
    below, above = np.full(k - 1, lo), np.full(k - 1, hi)
    for _ in range(60):
        middle = 0.5 * (below + above)
        noisier = at(middle) < levels  # log-SNR falls with t: the cut lies before middle
        above = np.where(noisier, middle, above)
        below = np.where(noisier, below, middle)
    return [0.0, *[float(b) for b in 0.5 * (below + above)], 1.0], notes


def compare_rules(
    k: int,
    grid: Optional[Sequence[float]] = None,
    curves: Optional[Dict[str, Sequence[float]]] = None,
    log_snr: Optional[Callable] = None,
    t_range: Optional[Sequence[float]] = None,
    min_width: float = 0.05,
    gamma: float = 0.5,
    floor: float = 0.0,
) -> Tuple[Dict[str, List[float]], List[str]]:
    """The boundaries of every rule on one profile: "uniform", "snr" and "cbs:MONITOR" per curve,
    with the same guards as the chosen rule. A rule that cannot run here is left out with a note."""
    rules: Dict[str, List[float]] = {"uniform": uniform_boundaries(k)}
    notes: List[str] = []
    if log_snr is not None and t_range is not None:
        try:
            cuts, _ = snr_boundaries(k, log_snr, t_range)
            rules["snr"] = enforce_min_width(cuts, min_width)
        except RecipeError as exc:
            notes.append(f"snr cuts not shown: {exc}")
    for name, curve in (curves or {}).items() if grid is not None else ():
        if not np.all(np.isfinite(np.asarray(curve, dtype=np.float64))):
            notes.append(f"cbs:{name} cuts not shown: the {name} curve has NaN or Inf values")
            continue
        try:
            rules[f"cbs:{name}"] = enforce_min_width(equidistribute(grid, temper(curve, gamma, floor), k), min_width)
        except RecipeError as exc:
            notes.append(f"cbs:{name} cuts not shown: {exc}")
    return {name: [float(b) for b in cuts] for name, cuts in rules.items()}, notes


def plan_split(
    k: int,
    method: str = "cbs",
    grid: Optional[Sequence[float]] = None,
    phi: Optional[Sequence[float]] = None,
    monitor: Optional[str] = None,
    boundaries: Optional[Sequence[float]] = None,
    min_width: float = 0.05,
    gamma: float = 0.5,
    floor: float = 0.0,
    allocation: str = "auto",
    curves: Optional[Dict[str, Sequence[float]]] = None,
    log_snr: Optional[Callable] = None,
    t_range: Optional[Sequence[float]] = None,
) -> Split:
    """Boundaries and budget shares for ``method`` in {"cbs", "uniform", "snr", "explicit"}.

    ``phi`` is ``monitor``'s curve on ``grid``. ``allocation`` sets the shares: "mass" (each
    segment's share of the processed curve of ``monitor``), "mass:MONITOR" (of that monitor's
    curve, taken from ``curves``, the profile's curves by name), "equal", or "auto" (equal for the
    uniform and snr baselines, so that they are the plain rules they claim to be; mass otherwise).
    ``log_snr`` (an array of canonical times to log(alpha^2 / sigma^2), ``Family.log_snr``) and
    ``t_range`` (default: the grid's ends) are what the snr rule needs. ``Split.alternatives``
    holds every rule's boundaries on the same profile, for the report.
    """
    kind, allocation_monitor = parse_allocation(allocation)
    if kind == "auto":
        kind = "equal" if method in ("uniform", "snr") else "mass"
    if k < 1:
        raise RecipeError(f"k={k}: need at least one expert")
    notes: List[str] = []
    guards: Dict[str, List[float]] = {}
    have_curve = grid is not None and phi is not None
    if t_range is None and grid is not None:
        t_range = (float(grid[0]), float(grid[-1]))
    if method == "cbs":
        if not have_curve:
            raise RecipeError("split 'cbs' needs a profile; run the profile stage or use --split uniform")
        check_curve(grid, phi, monitor, "place the cuts",
                    "profile another monitor (--monitor), keep the grid away from the ends (--t-min/--t-max), "
                    "or cut without a curve (--split uniform or snr)")
    processed = temper(phi, gamma, floor) if have_curve else None
    if method == "cbs":
        guards["raw"] = equidistribute(grid, phi, k)[1:-1]
        guards["tempered"] = equidistribute(grid, temper(phi, gamma, 0.0), k)[1:-1]
        cuts = equidistribute(grid, processed, k)
        guards["floored"] = cuts[1:-1]
        if _is_zero(phi):
            notes.append(f"the {monitor} curve is zero everywhere, so the cuts fell back to uniform")
    elif method == "uniform":
        cuts = uniform_boundaries(k)
    elif method == "snr":
        if log_snr is None or t_range is None:
            raise RecipeError("split 'snr' needs the family's log-SNR and a time range (t_min, t_max)")
        cuts, snr_notes = snr_boundaries(k, log_snr, t_range)
        notes.extend(snr_notes)
        guards["snr"] = cuts[1:-1]
    elif method == "explicit":
        cuts = validate_boundaries(boundaries, k)
    else:
        raise RecipeError(f"split {method!r} is unknown; choose cbs, uniform, snr or explicit")
    final = enforce_min_width(cuts, min_width) if method in ("cbs", "snr") else cuts
    guards["final"] = final[1:-1]
    if method in ("cbs", "snr"):
        before = guards["floored"] if method == "cbs" else guards["snr"]
        moved = max((abs(a - b) for a, b in zip(before, guards["final"])), default=0.0)
        if moved > 1e-9:
            notes.append(f"the minimum width {min_width} moved a cut by up to {moved:.3f}")
    share_monitor = allocation_monitor or monitor
    share_curve = None
    if kind == "mass":
        if allocation_monitor is not None and curves is not None and allocation_monitor in curves:
            share_curve = curves[allocation_monitor]
        elif share_monitor == monitor and have_curve:
            share_curve = phi
        elif allocation_monitor is not None:
            raise RecipeError(
                f"--allocation mass:{allocation_monitor} needs the {allocation_monitor} curve; add it to --monitors"
            )
    if share_curve is not None:
        check_curve(grid, share_curve, share_monitor, "share the budget",
                    "share by another curve (--allocation mass:MONITOR) or equally (--allocation equal), "
                    "or keep the grid away from the ends (--t-min/--t-max)")
        shares = segment_masses(grid, temper(share_curve, gamma, floor), final)
        allocation_used = f"mass:{share_monitor}" if allocation_monitor else "mass"
        if _is_zero(share_curve):
            notes.append(f"the {share_monitor} curve is zero everywhere, so the budget shares are "
                         + ("equal" if floor == 0 else "the segments' widths (the floor alone)"))
        elif method == "cbs" and allocation_monitor in (None, monitor) and max(shares) - min(shares) < 1e-6:
            notes.append("exact equidistribution: every segment carries 1/K of the mass, so budget shares are equal")
        else:
            notes.append(f"budget shares are the segments' shares of the processed {share_monitor} curve's mass")
    else:
        shares = [1.0 / k] * k
        allocation_used = "equal"
        notes.append("equal budget shares" + ("" if kind == "equal" else " (no profile)"))
    if curves is None and have_curve and monitor is not None:
        curves = {monitor: phi}
    alternatives, alternative_notes = compare_rules(k, grid, curves, log_snr, t_range, min_width, gamma, floor)
    notes.extend(alternative_notes)
    return Split(boundaries=[float(b) for b in final], shares=shares, method=method, monitor=monitor, guards=guards,
                 notes=notes, allocation=allocation_used, alternatives=alternatives)


def validate_boundaries(boundaries, k: int) -> List[float]:
    if boundaries is None:
        raise RecipeError("split 'explicit' needs --boundaries, e.g. --boundaries 0.4,0.7")
    inner = [float(b) for b in boundaries]
    if inner and (inner[0] == 0.0 and inner[-1] == 1.0):
        inner = inner[1:-1]
    if len(inner) != k - 1:
        raise RecipeError(f"{len(inner)} inner boundaries given for k={k}; need exactly {k - 1}")
    if any(not (0.0 < b < 1.0) for b in inner):
        raise RecipeError(f"boundaries {inner} must lie strictly inside (0, 1)")
    if any(b >= a for a, b in zip(inner[1:], inner[:-1])):
        raise RecipeError(f"boundaries {inner} must be strictly increasing")
    return [0.0, *inner, 1.0]
