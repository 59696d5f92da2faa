"""Routing by time: which segment, and so which expert, owns each sample of a batch.

Both kinds of routed model share it: K separate experts (``routed.RoutedModel``) and one shared
base with K low-rank deltas (``shared_base.SharedBaseModel``). Segments are canonical [lo, hi), the
last one closed; the comparison is made in the family's native time, in float64.
"""

from __future__ import annotations

import bisect
from typing import List, Sequence

import torch
from torch import nn

from cbs_convert.families.base import Family

#: attributes of the source network that samplers and pipelines read off the model
MODEL_ATTRIBUTES = ("in_channels", "out_channels", "learn_sigma", "input_size", "patch_size", "num_classes")


def native_boundaries(family: Family, boundaries: Sequence[float]) -> List[float]:
    """The cuts in the family's native time, in float64: what the metadata stores and the router uses."""
    return family.native_time(torch.tensor([float(b) for b in boundaries], dtype=torch.float64)).tolist()


class TimeRouted(nn.Module):
    """The drop-in surface of a routed model: the source's ``forward(x, t, y)`` in native time,
    ``forward_with_cfg``, and the source network's attributes (copied from ``network``)."""

    def __init__(self, family: Family, boundaries: Sequence[float], network: nn.Module, metadata=None):
        super().__init__()
        self.family = family
        self.boundary_values = tuple(float(b) for b in boundaries)
        # Routing compares native times with the boundaries in native time, so that a time given
        # exactly at a stored native boundary (metadata's native_boundaries) lands on the documented
        # side: canonical [lo, hi), the last segment closed. Converting it back to canonical time
        # instead could move it one rounding step across the cut.
        native = native_boundaries(family, self.boundary_values)
        self.native_rises = native[-1] > native[0]
        self.native_inner_values = tuple(native[1:-1] if self.native_rises else native[-2:0:-1])
        self.register_buffer("native_inner", torch.tensor(self.native_inner_values, dtype=torch.float64), persistent=False)
        self.metadata = metadata or {}
        for attribute in MODEL_ATTRIBUTES:
            if hasattr(network, attribute):
                setattr(self, attribute, getattr(network, attribute))

    @property
    def segment_count(self) -> int:
        return len(self.boundary_values) - 1

    @property
    def boundaries(self) -> torch.Tensor:
        return torch.tensor(self.boundary_values, dtype=torch.float64)

    def _apply(self, fn, recurse=True):
        # .half(), .bfloat16() and .to(dtype) cast every floating buffer: the cuts must stay float64
        # (a bf16 cut at 0.4988 moves to 0.4980), so only the device is taken from the cast.
        result = super()._apply(fn, recurse)
        self.native_inner = torch.tensor(self.native_inner_values, dtype=torch.float64, device=self.native_inner.device)
        return result

    def expert_index(self, native_t: torch.Tensor) -> torch.Tensor:
        """The segment of each native time, as a tensor op (no host sync)."""
        n = native_t.to(device=self.native_inner.device, dtype=torch.float64)
        if self.native_rises:  # a native time at a cut belongs to the segment above it
            return torch.bucketize(n, self.native_inner, right=True)
        # native time falls as canonical time rises (SiT): count the cuts at or above n
        return len(self.native_inner) - torch.bucketize(n, self.native_inner, right=False)

    def segment_of(self, native_t: float) -> int:
        """The segment owning native time ``native_t``, found on the host with no tensor op."""
        n = float(native_t)
        cuts = self.native_inner_values
        return bisect.bisect_right(cuts, n) if self.native_rises else len(cuts) - bisect.bisect_left(cuts, n)

    def forward_with_cfg(self, x, t, y, cfg_scale, **kwargs):
        return self.family.guided_forward(lambda a, b, c: self.forward(a, b, c, **kwargs), x, t, y, cfg_scale)
