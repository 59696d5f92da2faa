"""Cutting canonical time into K segments of equal complexity, and sharing the parameter budget.

Equidistribution (de Boor): with Phi the cumulative trapezoid integral of the processed curve,
boundary k is Phi^-1(k/K * Phi(1)). Guards applied in order, each one's effect reported:

1. tempering phi^gamma (gamma = 1/2 makes Dirichlet cuts invariant to the time variable);
2. a uniform floor, phi' = (1 - lambda) phi / mean(phi) + lambda, against endpoint-dominated curves;
3. a minimum segment width, so that no expert starves for training times.

The curve is known on [t_min, t_max]; outside it is held at its end values, so that the segments
cover all of [0, 1].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from .errors import BudgetError, RecipeError


@dataclass
class Split:
    boundaries: List[float]  # K + 1 values from 0 to 1
    shares: List[float]  # each segment's share of the processed phi-mass
    method: str
    monitor: Optional[str]
    guards: Dict[str, List[float]] = field(default_factory=dict)  # inner cuts after each stage
    notes: List[str] = field(default_factory=list)

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
    phi = np.clip(np.asarray(phi, dtype=np.float64), 0.0, None) ** gamma
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
) -> Split:
    """Boundaries and budget shares for ``method`` in {"cbs", "uniform", "explicit"}.

    ``allocation`` sets the shares: "mass" (each segment's share of the processed curve), "equal",
    or "auto" (equal for the uniform baseline, so that it is the plain equal split it claims to be;
    mass otherwise).
    """
    if allocation not in ("auto", "mass", "equal"):
        raise RecipeError(f"allocation {allocation!r} is unknown; choose auto, mass or equal")
    if allocation == "auto":
        allocation = "equal" if method == "uniform" else "mass"
    if k < 1:
        raise RecipeError(f"k={k}: need at least one expert")
    notes: List[str] = []
    guards: Dict[str, List[float]] = {}
    have_curve = grid is not None and phi is not None
    processed = temper(phi, gamma, floor) if have_curve else None
    if method == "cbs":
        if not have_curve:
            raise RecipeError("split 'cbs' needs a profile; run the profile stage or use --split uniform")
        guards["raw"] = equidistribute(grid, phi, k)[1:-1]
        guards["tempered"] = equidistribute(grid, temper(phi, gamma, 0.0), k)[1:-1]
        cuts = equidistribute(grid, processed, k)
        guards["floored"] = cuts[1:-1]
    elif method == "uniform":
        cuts = uniform_boundaries(k)
    elif method == "explicit":
        cuts = validate_boundaries(boundaries, k)
    else:
        raise RecipeError(f"split {method!r} is unknown; choose cbs, uniform or explicit")
    final = enforce_min_width(cuts, min_width) if method == "cbs" else cuts
    guards["final"] = final[1:-1]
    if method == "cbs":
        moved = max((abs(a - b) for a, b in zip(guards["floored"], guards["final"])), default=0.0)
        if moved > 1e-9:
            notes.append(f"the minimum width {min_width} moved a cut by up to {moved:.3f}")
    if have_curve and allocation == "mass":
        shares = segment_masses(grid, processed, final)
        if method == "cbs" and max(shares) - min(shares) < 1e-6:
            notes.append("exact equidistribution: every segment carries 1/K of the mass, so budget shares are equal")
        else:
            notes.append("budget shares are the segments' shares of the processed curve's mass")
    else:
        shares = [1.0 / k] * k
        notes.append("equal budget shares" + ("" if have_curve else " (no profile)"))
    return Split(boundaries=[float(b) for b in final], shares=shares, method=method, monitor=monitor, guards=guards, notes=notes)


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


def parse_budget(budget, source_params: int) -> int:
    """'1x' (default, the source's own count), '2x', or an absolute count such as 300e6 or 300M."""
    text = str(budget).strip().lower().replace("_", "")
    try:
        if text.endswith("x"):
            value = float(text[:-1]) * source_params
        elif text[-1:] in ("k", "m", "b"):
            value = float(text[:-1]) * {"k": 1e3, "m": 1e6, "b": 1e9}[text[-1]]
        else:
            value = float(text)
    except ValueError:
        raise RecipeError(f"budget {budget!r} is not understood; use 1x, 2x, or a count like 300M") from None
    if not np.isfinite(value) or value <= 0:
        raise RecipeError(f"budget {budget!r} must be positive")
    return int(round(value))


def budget_targets(total: int, shares: Sequence[float], per_expert_cap: int) -> List[int]:
    """Split ``total`` by ``shares``; an expert cannot grow past the source, so its excess is
    redistributed to the others in proportion to their shares (water-filling)."""
    shares = np.asarray(shares, dtype=np.float64)
    targets = np.zeros(len(shares))
    free = np.ones(len(shares), dtype=bool)
    remaining = float(total)
    while free.any():
        proposal = remaining * shares[free] / shares[free].sum()
        over = proposal > per_expert_cap
        if not over.any():
            targets[free] = proposal
            break
        idx = np.flatnonzero(free)[over]
        targets[idx] = per_expert_cap
        remaining -= per_expert_cap * len(idx)
        free[idx] = False
    return [int(round(t)) for t in targets]


def smallest_config(family, config: Dict) -> Dict:
    """Every width knob at its minimum: the floor of what pruning can reach."""
    return family.with_widths(config, {knob.name: knob.minimum for knob in family.width_knobs(config)})


def check_budget_feasible(family, config: Dict, total: int, k: int) -> None:
    """Refuse, before any heavy work, a budget that cannot hold k experts of the smallest width."""
    floor = family.param_count(smallest_config(family, config))
    if total < k * floor * 0.99:
        raise BudgetError(
            f"a total budget of {total:,} parameters cannot hold {k} experts of at least {floor:,} each "
            f"(the narrowest prunable {family.name}); raise --budget to {k * floor:,} or more, or lower --k"
        )


def allocate_widths(family, config: Dict, target: int, tolerance: float = 0.01) -> Dict:
    """The config of ``family`` whose parameter count is closest to ``target``.

    Knobs come coarsest first (heads), finest last. For each value of the coarsest knob near the
    common shrink factor, the middle knobs shrink together by bisection and the finest knob is then
    moved alone to land on the target. Among the choices within ``tolerance`` the one closest to
    uniform shrinking wins. Raises BudgetError if none gets within ``tolerance``.
    """
    knobs = family.width_knobs(config)
    full = family.param_count(config)
    if target >= full:
        return dict(config)

    def scaled(rho, fixed):
        widths = {}
        for knob in knobs:
            if knob.name in fixed:
                widths[knob.name] = fixed[knob.name]
                continue
            value = int(round(knob.full * rho / knob.multiple)) * knob.multiple
            widths[knob.name] = int(min(knob.full, max(knob.minimum, value)))
        return family.with_widths(config, widths)

    def shrink_factor(fixed):
        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            if family.param_count(scaled(mid, fixed)) <= target:
                lo = mid
            else:
                hi = mid
        return lo

    smallest = family.param_count(smallest_config(family, config))
    if target < smallest * (1 - tolerance):
        raise BudgetError(
            f"a budget of {target:,} parameters per expert is below the smallest prunable model "
            f"({smallest:,}); raise --budget or lower --k"
        )
    rho = shrink_factor({})
    coarse, fine = knobs[0], knobs[-1]
    values = list(range(coarse.minimum, coarse.full + 1))
    if coarse.multiple > 1 or len(values) > 64:
        centre = int(round(coarse.full * rho))
        values = sorted({min(coarse.full, max(coarse.minimum, centre + d * coarse.multiple)) for d in range(-3, 4)})
    candidates = []
    for value in values:
        fixed = {coarse.name: value}
        base = scaled(shrink_factor(fixed), fixed)
        candidates.extend(_fit_finest(family, base, fine, target))
    def balance(c):
        return abs(c[coarse.name] / coarse.full - rho)

    within = [c for c in candidates if abs(family.param_count(c) - target) <= tolerance * target]
    if within:
        return min(within, key=lambda c: (balance(c), abs(family.param_count(c) - target)))
    closest = min(candidates, key=lambda c: abs(family.param_count(c) - target))
    raise BudgetError(
        f"no width choice gets within {tolerance:.0%} of {target:,} parameters (closest "
        f"{family.param_count(closest):,}); adjust --budget"
    )


def _fit_finest(family, base: Dict, fine, target: int) -> List[Dict]:
    """Bisection on the finest knob alone (the count is monotone in it); both neighbours returned."""
    low, high = fine.minimum, fine.full
    if family.param_count(family.with_widths(base, {fine.name: low})) > target:
        return [family.with_widths(base, {fine.name: low})]
    if family.param_count(family.with_widths(base, {fine.name: high})) <= target:
        return [family.with_widths(base, {fine.name: high})]
    while high - low > fine.multiple:
        mid = max(low + 1, (low + high) // 2 // fine.multiple * fine.multiple)
        if mid >= high:
            break
        if family.param_count(family.with_widths(base, {fine.name: mid})) <= target:
            low = mid
        else:
            high = mid
    return [family.with_widths(base, {fine.name: w}) for w in (low, high)]
