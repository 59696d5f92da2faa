"""The parameter budget: what a budget string means, how it is shared among the experts, and the
widths that make one expert the size it was given, and (``--structure blockwise``) how those widths
are given out over its blocks.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

from cbs_convert.errors import BudgetError, RecipeError


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


def check_budget_feasible(family, config: Dict, total: int, k: int, floor_of: str = "", or_else: str = "") -> None:
    """Refuse, before any heavy work, a budget that cannot hold k experts of the smallest width
    (``floor_of``: what the floor is, where not the narrowest prunable model; ``or_else``: a way out
    beside a larger budget)."""
    floor = family.param_count(smallest_config(family, config))
    if total < k * floor * 0.99:
        raise BudgetError(
            f"a total budget of {total:,} parameters cannot hold {k} experts of at least {floor:,} each "
            f"({floor_of or f'the narrowest prunable {family.name}'}); raise --budget to {k * floor:,} or more, "
            f"or lower --k{or_else}"
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

    def widths_at(rho, fixed):
        widths = {}
        for knob in knobs:
            if knob.name in fixed:
                widths[knob.name] = fixed[knob.name]
                continue
            value = int(round(knob.full * rho / knob.multiple)) * knob.multiple
            widths[knob.name] = int(min(knob.full, max(knob.minimum, value)))
        return widths

    def scaled(rho, fixed):
        return family.with_widths(config, widths_at(rho, fixed))

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
        candidates.extend(_fit_finest(family, config, widths_at(shrink_factor(fixed), fixed), fine, target))
    def balance(c):
        return abs(c[coarse.name] / coarse.full - rho)

    def fitting(candidates):
        return [c for c in candidates if abs(family.param_count(c) - target) <= tolerance * target]

    within = fitting(candidates)
    if not within:
        # The middle knobs at the one shrink factor can leave the finest knob too coarse, or capped
        # (a narrowed source's blocks cap its MLP): at small widths a budget that can be met is then
        # missed. Widen the search to the middle knobs at every shrink factor before refusing.
        for value in values:
            fixed = {coarse.name: value}
            for middle in np.linspace(0.0, 1.0, 65):
                candidates.extend(_fit_finest(family, config, widths_at(float(middle), fixed), fine, target))
        within = fitting(candidates)
    if within:
        return min(within, key=lambda c: (balance(c), abs(family.param_count(c) - target)))
    closest = min(candidates, key=lambda c: abs(family.param_count(c) - target))
    raise BudgetError(
        f"no width choice gets within {tolerance:.0%} of {target:,} parameters (closest "
        f"{family.param_count(closest):,}); adjust --budget"
    )


def _fit_finest(family, config: Dict, widths: Dict[str, int], fine, target: int) -> List[Dict]:
    """Bisection on the finest knob alone (the count is monotone in it); both neighbours returned.
    Every candidate is ``config`` with all its widths set at once: a config already narrowed has lost
    the source's per-block widths that cap each block."""
    def at(width):
        return family.with_widths(config, {**widths, fine.name: width})

    low, high = fine.minimum, fine.full
    if family.param_count(at(low)) > target:
        return [at(low)]
    if family.param_count(at(high)) <= target:
        return [at(high)]
    while high - low > fine.multiple:
        mid = max(low + 1, (low + high) // 2 // fine.multiple * fine.multiple)
        if mid >= high:
            break
        if family.param_count(at(mid)) <= target:
            low = mid
        else:
            high = mid
    return [at(w) for w in (low, high)]


def spread_over_blocks(family, source_config: Dict, config: Dict, scores: Dict[str, Sequence[float]]) -> Dict:
    """``config`` with its units given out block by block by importance (``--structure blockwise``):
    for every knob the family lets vary per block, as many units as ``config`` keeps over all blocks
    go to the source's highest-scoring ones wherever they sit, each block keeping its best one. A head
    or an MLP channel costs the same in every block of one residual width, so the parameter count and
    the FLOPs stay ``config``'s exactly (the pipeline checks this)."""
    groups = {g.name: g for g in family.unit_groups(source_config, config)}
    multiples = {knob.name: knob.multiple for knob in family.width_knobs(source_config)}
    widths = {}
    for knob, names in family.block_unit_groups(source_config).items():
        keeps = [groups[name].keep for name in names]
        # units go in chunks of the knob's multiple (the matrix sizes fast kernels want), each chunk a
        # block's next-best units, ranked by their summed score; one chunk per block is its floor
        chunk = multiples.get(knob, 1) if all(keep % multiples.get(knob, 1) == 0 for keep in keeps) else 1
        chunks = []
        for block, name in enumerate(names):
            ordered = sorted((float(s) for s in scores[name]), reverse=True)
            for first in range(0, len(ordered) - chunk + 1, chunk):
                chunks.append((sum(ordered[first:first + chunk]), block, first))
        chunks.sort(key=lambda c: (-c[0], c[1], c[2]))
        counts = [chunk] * len(names)
        spare = sum(keeps) - chunk * len(names)
        for _, block, first in chunks:
            if spare <= 0:
                break
            if first > 0:
                counts[block] += chunk
                spare -= chunk
        widths[knob] = counts
    return family.with_block_widths(config, widths)
