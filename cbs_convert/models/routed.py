"""K separate experts behind one time router: the model of a routed file in format 1."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from cbs_convert.families.base import Family
from cbs_convert.models.time_routed import TimeRouted


class RoutedModel(TimeRouted):
    """A drop-in for the source model: same ``forward`` arguments, native time in, native output out.

    Each sample goes to the expert whose segment [lo, hi) holds its time (the last segment is closed),
    so mixed-time training batches work; the loop runs over experts, never over samples.
    """

    def __init__(self, family: Family, experts: Sequence[nn.Module], boundaries: Sequence[float], metadata=None):
        if len(boundaries) != len(experts) + 1:
            raise ValueError(f"{len(experts)} experts need {len(experts) + 1} boundaries, got {len(boundaries)}")
        super().__init__(family, boundaries, experts[0], metadata)
        self.experts = nn.ModuleList(experts)

    def expert_at(self, native_t: float) -> nn.Module:
        """The expert owning native time ``native_t``, chosen on the host with no tensor op.

        For a sampler that knows its step's time as a number: calling the bare expert keeps the step
        free of routing, so ``torch.compile`` and CUDA graph capture see one static module."""
        return self.experts[self.segment_of(native_t)]

    def forward(self, x, t, y=None, **kwargs):
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if len(self.experts) == 1:
            return self.experts[0](x, t, y, **kwargs)
        which = self.expert_index(t)
        lo, hi = which.aminmax()
        lo, hi = int(lo), int(hi)  # one host sync, instead of a gather and scatter per expert
        if lo == hi:  # the sampling case: one expert owns the whole batch
            return self.experts[lo](x, t, y, **kwargs)
        out = None
        for k in range(lo, hi + 1):
            expert = self.experts[k]
            index = torch.nonzero(which == k, as_tuple=True)[0]
            if index.numel() == 0:
                continue
            part = expert(x[index], t[index], None if y is None else y[index], **kwargs)
            if out is None:
                out = part.new_empty((x.shape[0], *part.shape[1:]))
            out.index_copy_(0, index, part)
        return out
