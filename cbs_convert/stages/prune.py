"""Choosing which units each expert keeps. The family then slices the tensors.

A unit's importance is read where it is consumed: for every module that takes the unit's channels
as input, ``E|a_c| * ||W[:, c]||``, the mean input magnitude times the norm of the weights that carry
it onward, summed over a unit's channels and over all its consumers. ``segment`` measures the
activations on x_t with t drawn from the expert's own segment, so each expert keeps what its time
range uses. ``magnitude`` (weights only) and ``random`` are the baselines.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from cbs_convert.stages.batches import segment_inputs
from cbs_convert.families.base import Family, UnitGroup

CRITERIA = ("segment", "magnitude", "random")


def _input_channel_axis(module: nn.Module) -> int:
    return -1 if isinstance(module, nn.Linear) else 1


def _weight_column_norms(module: nn.Module) -> torch.Tensor:
    weight = module.weight.detach().float()
    dims = [d for d in range(weight.dim()) if d != 1]
    return weight.pow(2).sum(dim=dims).sqrt()


class _InputMagnitude:
    """Accumulates the mean |input| per input channel of one module."""

    def __init__(self, module: nn.Module):
        self.axis = _input_channel_axis(module)
        self.total: Optional[torch.Tensor] = None
        self.count = 0
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, inputs):
        a = inputs[0].detach().float().abs()
        a = a.movedim(self.axis, -1).reshape(-1, a.shape[self.axis])
        summed = a.sum(0)
        self.total = summed if self.total is None else self.total + summed
        self.count += a.shape[0]

    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)


def unit_scores(
    model: nn.Module,
    groups: Sequence[UnitGroup],
    criterion: str,
    calibration: Optional[List[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]] = None,
    forward=None,
    seed: int = 0,
) -> Dict[str, torch.Tensor]:
    """One score per unit of every group; higher means keep.

    ``calibration`` is a list of (x, native time, y) batches fed through ``forward`` (default
    ``model``) for the ``segment`` criterion.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown pruning criterion {criterion!r}; choose from {', '.join(CRITERIA)}")
    if criterion == "random":
        generator = torch.Generator().manual_seed(seed)
        return {g.name: torch.rand(g.size, generator=generator) for g in groups}
    modules = dict(model.named_modules())
    consumers = sorted({name for g in groups for name in g.consumers})
    channel_scores = {name: _weight_column_norms(modules[name]) for name in consumers}
    if criterion == "segment":
        if not calibration:
            raise ValueError("the segment criterion needs calibration batches")
        hooks = {name: _InputMagnitude(modules[name]) for name in consumers}
        run = forward or model
        try:
            with torch.no_grad():
                for x, native_t, y in calibration:
                    run(x, native_t, y)
        finally:
            for hook in hooks.values():
                hook.handle.remove()
        for name in consumers:
            channel_scores[name] = channel_scores[name].to(hooks[name].mean().device) * hooks[name].mean()
    scores = {}
    for g in groups:
        total = torch.zeros(g.size)
        for name in g.consumers:
            per_channel = channel_scores[name].cpu()
            total += per_channel[: g.size * g.unit_width].reshape(g.size, g.unit_width).sum(1)
        scores[g.name] = total
    return scores


def select_units(groups: Sequence[UnitGroup], scores: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The ``keep`` highest-scoring units of each group, in their original order (ties: lower index)."""
    kept = {}
    for g in groups:
        s = scores[g.name]
        order = sorted(range(g.size), key=lambda i: (-float(s[i]), i))
        kept[g.name] = torch.tensor(sorted(order[: g.keep]), dtype=torch.long)
    return kept


def calibration_batches(
    family: Family,
    x0_pool: torch.Tensor,
    labels_pool: Optional[torch.Tensor],
    segment: Tuple[float, float],
    batches: int,
    batch_size: int,
    seed: int,
):
    """(x_t, native time, labels) batches at times drawn uniformly from ``segment``."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        x_t, t, y = segment_inputs(family, x0_pool, labels_pool, segment, batch_size, generator)
        out.append((x_t, family.native_time(t), y))
    return out


def prune_state_dict(
    family: Family,
    teacher: nn.Module,
    state_dict: Dict[str, torch.Tensor],
    source_config: Dict,
    target_config: Dict,
    criterion: str,
    calibration=None,
    seed: int = 0,
) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """Slice ``state_dict`` down to ``target_config``; returns (pruned state dict, kept indices)."""
    groups = family.unit_groups(source_config, target_config)
    scores = unit_scores(teacher, groups, criterion, calibration, seed=seed)
    kept = select_units(groups, scores)
    return family.slice_state_dict(state_dict, source_config, kept), kept
