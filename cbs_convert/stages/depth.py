"""Depth pruning: which whole blocks an expert keeps, chosen on the expert's own time segment.

Two selectors:

* ``importance`` (cheap): greedy removal. Each round skips, one at a time, every block still in the
  network (its output replaced by its input, which a residual block makes the natural "off") and
  removes the one whose absence changes the network's output least on the segment's calibration
  batches, given the blocks already removed. Blocks that matter only together are seen together.
* ``recovery`` (TinyFusion's point: what counts is how well the network recovers, not how much it
  loses at once): a handful of candidate sets, the greedy one and its nearest alternatives, each
  given a short low-rank recovery (rank-R deltas on the layers a shared-base expert adapts, among
  them the kept blocks', distilled from the teacher on the segment); the set whose recovered error
  is lowest wins.

Width pruning then fits what remains to the budget exactly (``allocate_depth`` leaves the smallest
depth that still holds the target).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from cbs_convert.errors import BudgetError
from cbs_convert.families.base import Family
from cbs_convert.stages.finetune import FinetuneSettings, finetune_expert, relative_error
from cbs_convert.models.shared_base import SharedBaseModel

SELECTORS = ("importance", "recovery")


def allocate_depth(family: Family, config: Dict[str, Any], target: int) -> Dict[str, Any]:
    """The shallowest config of ``family`` at full width that still holds ``target`` parameters
    (at least one block): width pruning takes it the rest of the way."""
    blocks = len(family.removable_blocks(config))
    if not blocks:
        raise BudgetError(f"--structure depth: the {family.name} family has no blocks that can be removed whole; "
                          "use --structure width")
    for depth in range(1, blocks + 1):
        shallower = family.with_depth(config, depth)
        if family.param_count(shallower) >= target:
            return shallower
    return dict(config)


@contextmanager
def skipping(model: nn.Module, names: Sequence[str]):
    """``model`` with the named blocks computing the identity (their input passed on)."""
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(lambda module, args, output: args[0]) for name in names]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def _output_error(model: nn.Module, calibration, reference) -> float:
    num, den = 0.0, 0.0
    for (x, native_t, y), expected in zip(calibration, reference):
        out = model(x, native_t, y).float()
        num += float((out - expected).pow(2).sum())
        den += float(expected.pow(2).sum())
    return (num / max(den, 1e-30)) ** 0.5


def greedy_removal(model: nn.Module, blocks: Sequence[str], remove: int, calibration) -> Tuple[List[str], List[float], Dict[str, float]]:
    """The ``remove`` blocks dropped one round at a time, each the one whose skipping (beside those
    already skipped) changes the output least; with each round's error and every block's error
    when skipped alone."""
    with torch.no_grad():
        reference = [model(x, t, y).float() for x, t, y in calibration]
    alone = {}
    for block in blocks:
        with skipping(model, [block]):
            alone[block] = _output_error(model, calibration, reference)
    removed: List[str] = []
    trail: List[float] = []
    for round_ in range(remove):
        candidates = [b for b in blocks if b not in removed]
        if round_ == 0:
            errors = {b: alone[b] for b in candidates}
        else:
            errors = {}
            for block in candidates:
                with skipping(model, removed + [block]):
                    errors[block] = _output_error(model, calibration, reference)
        best = min(candidates, key=lambda b: (errors[b], blocks.index(b)))
        removed.append(best)
        trail.append(errors[best])
    return removed, trail, alone


@dataclass
class RecoverySettings:
    """The short recovery each candidate set gets under the ``recovery`` selector."""
    candidates: int = 4
    steps: int = 40
    rank: int = 4
    lr: float = 1e-3
    batch_size: int = 16
    seed: int = 0


def _alternatives(blocks: Sequence[str], removed: Sequence[str], alone: Dict[str, float], count: int) -> List[List[str]]:
    """The greedy set and up to ``count - 1`` neighbours: its most harmful removal swapped for the
    least harmful block it kept, then the next pair, and so on."""
    sets = [sorted(removed, key=blocks.index)]
    dropped = sorted(removed, key=lambda b: -alone[b])
    kept = sorted((b for b in blocks if b not in removed), key=lambda b: alone[b])
    for j in range(min(count - 1, len(dropped), len(kept))):
        swapped = [b for b in removed if b != dropped[j]] + [kept[j]]
        candidate = sorted(swapped, key=blocks.index)
        if candidate not in sets:
            sets.append(candidate)
    return sets


def choose_blocks(
    family: Family,
    teacher: nn.Module,
    state_dict: Dict[str, torch.Tensor],
    config: Dict[str, Any],
    depth: int,
    calibration,
    selector: str = "importance",
    *,
    segment: Tuple[float, float] = (0.0, 1.0),
    x0_pool: Optional[torch.Tensor] = None,
    labels_pool: Optional[torch.Tensor] = None,
    recovery: Optional[RecoverySettings] = None,
) -> Tuple[List[int], Dict[str, Any]]:
    """The indices (into ``family.removable_blocks``) of the ``depth`` blocks an expert keeps, and a
    record of how they were chosen (for the report)."""
    if selector not in SELECTORS:
        raise ValueError(f"unknown block selector {selector!r}; choose from {', '.join(SELECTORS)}")
    blocks = family.removable_blocks(config)
    if not 1 <= depth <= len(blocks):
        raise BudgetError(f"cannot keep {depth} of the {len(blocks)} blocks")
    removed, trail, alone = greedy_removal(teacher, blocks, len(blocks) - depth, calibration)
    record: Dict[str, Any] = {"selector": selector, "skip_error_alone": alone, "greedy_removed": removed,
                              "greedy_error": trail}
    if selector == "recovery" and removed:
        if x0_pool is None:
            raise ValueError("the recovery selector needs the x0 pool to train its candidates on")
        recovery = recovery or RecoverySettings()
        scored = []
        for candidate in _alternatives(blocks, removed, alone, recovery.candidates):
            kept = [i for i, b in enumerate(blocks) if b not in candidate]
            scored.append((_recovered_error(family, teacher, state_dict, config, kept, segment, x0_pool, labels_pool,
                                            recovery), candidate))
        record["candidates"] = [{"removed": c, "recovered_error": e} for e, c in scored]
        removed = min(scored, key=lambda pair: pair[0])[1]
    kept = [i for i, b in enumerate(blocks) if b not in removed]
    record["kept"] = kept
    return kept, record


def _recovered_error(family, teacher, state_dict, config, kept, segment, x0_pool, labels_pool, recovery: RecoverySettings) -> float:
    """The segment error of the network holding ``kept`` after a short rank-R recovery."""
    sd, shallow = family.keep_blocks(state_dict, config, kept)
    network = family.instantiate(shallow, {key: value.clone() for key, value in sd.items()}).to(x0_pool.device)
    student = SharedBaseModel(family, network, [0.0, 1.0], recovery.rank, seed=recovery.seed)
    settings = FinetuneSettings(steps=recovery.steps, batch_size=recovery.batch_size, lr=recovery.lr, loss="distill",
                                ema_decay=0.0, warmup_steps=0, lr_schedule="constant", label_dropout=0.0, margin=0.0,
                                seed=recovery.seed, checkpoint_every=max(1, recovery.steps))
    result = finetune_expert(family, teacher, student, segment, x0_pool, labels_pool, settings, progress=False,
                             param_groups=[(student.delta_parameters(), 1.0), (student.base_parameters(), 0.0)])
    return relative_error(family, result.model, teacher, segment, x0_pool, labels_pool)


def target_depth(family: Family, config: Dict[str, Any]) -> int:
    """How many removable blocks ``config`` holds."""
    return len(family.removable_blocks(config))
