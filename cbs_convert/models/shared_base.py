"""Shared-base experts: one copy of the source network, and per time segment a low-rank delta.

Expert k computes ``W x + up_k (down_k x)`` at every layer its family names in ``delta_layers``
(a transformer's attention and MLP linears and adaLN modulation, a UNet's convolutions and
attention projections) and the source's own layers everywhere else. Memory is the source plus K
small deltas instead of K copies, and a sampler step costs the source's forward plus the delta's
``rank x (fan_in + fan_out)`` multiply-adds per position.

Routing is per sample and stays on the device: the batch's segment indices gather each sample's
own delta (a batched matmul, or for a convolution one grouped convolution over the batch), so a
mixed-time training batch trains every segment's delta at once, a one-segment batch needs no host
sync, and the forward has no data-dependent branch for ``torch.compile`` to break on.

The deltas sit in forward hooks, so the base keeps the source's module tree and key names: the
base's state dict is a plain checkpoint of the source's architecture, and merging delta k into it
(``merged_state_dict``) gives expert k as a plain checkpoint.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from cbs_convert.families.base import Family
from cbs_convert.models.time_routed import MODEL_ATTRIBUTES, TimeRouted

_CONVOLUTIONS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d}


class _Route:
    """The segment of each sample in the batch being computed; None outside a routed forward (the
    bare base then computes the source's function)."""

    index: Optional[torch.Tensor] = None


def _geometry(layer: nn.Module) -> Tuple[int, int]:
    """(fan_in, fan_out) of a layer that can carry a delta; anything else is refused by name."""
    if type(layer) is nn.Linear:
        return layer.in_features, layer.out_features
    if type(layer) in _CONVOLUTIONS:
        if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ValueError(f"a delta needs an ungrouped, zero-padded convolution with numeric padding, not {layer}")
        return layer.in_channels * math.prod(layer.kernel_size), layer.out_channels
    raise ValueError(f"a delta sits on nn.Linear, nn.Conv1d or nn.Conv2d layers, not {type(layer).__name__}")


class SegmentDeltas(nn.Module):
    """The K low-rank deltas of one layer: ``down`` [K, rank, fan_in] and ``up`` [K, fan_out, rank].

    ``up`` starts at zero, so every expert starts as the source exactly; ``down`` starts random
    (LoRA's initialisation) so that the first gradient step on ``up`` is not zero too.
    """

    def __init__(self, layer: nn.Module, segments: int, rank: int, route: _Route, generator: Optional[torch.Generator] = None):
        super().__init__()
        fan_in, fan_out = _geometry(layer)
        weight = layer.weight
        bound = 1.0 / math.sqrt(fan_in)
        down = (torch.rand((segments, rank, fan_in), generator=generator) * 2 - 1) * bound
        self.down = nn.Parameter(down.to(device=weight.device, dtype=weight.dtype))
        self.up = nn.Parameter(torch.zeros((segments, fan_out, rank), device=weight.device, dtype=weight.dtype))
        self.convolution = _CONVOLUTIONS.get(type(layer))
        if self.convolution is not None:
            self.in_channels = layer.in_channels
            self.kernel_size = tuple(layer.kernel_size)
            self.conv_args = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
        self._route = route
        self.positions = 0  # output positions per sample, counted by the last routed forward

    @property
    def rank(self) -> int:
        return self.down.shape[1]

    def delta(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (self.down.requires_grad or self.up.requires_grad) and self._masking_saves_memory():
            return self._delta_through_every_segment(x, index)
        return self._delta_gathered(x, index)

    def _masking_saves_memory(self) -> bool:
        """Whether backward keeps less per sample through every segment (about 2K - 1 activations
        of rank values per position) than with gathered weights (the delta's rank x (fan_in +
        fan_out) values): true for a transformer's few hundred tokens, false for a UNet's
        full-resolution convolutions."""
        fan_out, fan_in = self.up.shape[1], self.down.shape[2]
        return self.positions * (2 * self.down.shape[0] - 1) < fan_in + fan_out

    def _delta_through_every_segment(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Training's form where it saves memory: x through all K down-projections at once, the
        other segments' outputs zeroed, then all K up-projections. Autograd keeps a [batch,
        positions, K x rank] activation, where gathering saves each sample's own copy of its
        delta's weights (for SiT-XL/2 at rank 16, about 12M values per sample over all layers). It
        costs K times the delta's FLOPs in that layer, so sampling (no gradient) gathers."""
        segments, rank, batch = self.down.shape[0], self.rank, x.shape[0]
        keep = F.one_hot(index.to(device=x.device, dtype=torch.long), segments).to(x.dtype)  # [batch, K]
        if self.convolution is None:
            flat = x.reshape(batch, -1, x.shape[-1])
            inner = flat @ self.down.reshape(segments * rank, -1).transpose(0, 1).to(x.dtype)
            inner = (inner.view(batch, -1, segments, rank) * keep[:, None, :, None]).view(batch, -1, segments * rank)
            out = inner @ self.up.transpose(1, 2).reshape(segments * rank, -1).to(x.dtype)
            return out.reshape(*x.shape[:-1], out.shape[-1])
        weight = self.down.reshape(segments * rank, self.in_channels, *self.kernel_size).to(x.dtype)
        inner = self.convolution(x, weight, None, **self.conv_args)
        spatial = inner.shape[2:]
        inner = (inner.reshape(batch, segments, rank, -1) * keep[:, :, None, None]).reshape(batch, segments * rank, -1)
        out = self.up.transpose(0, 1).reshape(self.up.shape[1], segments * rank).to(x.dtype) @ inner
        return out.reshape(batch, out.shape[1], *spatial)

    def _delta_gathered(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        down, up = self.down[index], self.up[index]
        batch = x.shape[0]
        if self.convolution is None:  # a linear map of the last dimension
            flat = x.reshape(batch, -1, x.shape[-1])
            out = torch.bmm(torch.bmm(flat, down.transpose(1, 2)), up.transpose(1, 2))
            return out.reshape(*x.shape[:-1], out.shape[-1])
        # each sample's own down-projection at once: the batch as the groups of one convolution
        weight = down.reshape(batch * self.rank, self.in_channels, *self.kernel_size)
        inner = self.convolution(x.reshape(1, batch * self.in_channels, *x.shape[2:]), weight, None,
                                 groups=batch, **self.conv_args)
        spatial = inner.shape[2:]
        out = torch.bmm(up, inner.reshape(batch, self.rank, -1))
        return out.reshape(batch, out.shape[1], *spatial)

    def hook(self, layer: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        index = self._route.index
        if index is None:
            return output
        self.positions = output[0].numel() // output.shape[1 if self.convolution is not None else -1]
        return output + self.delta(args[0], index).to(output.dtype)

    def file_tensors(self, segment: int) -> Dict[str, torch.Tensor]:
        """Segment ``segment``'s delta as the file stores it: ``down`` shaped like a weight of
        ``rank`` outputs (a convolution's kernel kept), ``up`` as [fan_out, rank]."""
        down = self.down[segment]
        if self.convolution is not None:
            down = down.reshape(self.rank, self.in_channels, *self.kernel_size)
        return {"down": down, "up": self.up[segment]}

    def load_file_tensors(self, segment: int, down: torch.Tensor, up: torch.Tensor) -> None:
        with torch.no_grad():
            self.down[segment].copy_(down.reshape(self.down.shape[1:]))
            self.up[segment].copy_(up)

    def params_per_segment(self) -> int:
        return self.down[0].numel() + self.up[0].numel()


def _module_key(name: str) -> str:
    return name.replace(".", "/")  # a ModuleDict key cannot hold a dot


class SharedBaseModel(TimeRouted):
    """A drop-in for the source model: ``forward(x, t, y)`` in native time, each sample computed by
    the base plus the delta of the segment that owns its time ([lo, hi), the last segment closed)."""

    def __init__(self, family: Family, base: nn.Module, boundaries: Sequence[float], rank: int,
                 layers: Optional[Sequence[str]] = None, metadata=None, seed: int = 0):
        super().__init__(family, boundaries, base, metadata)
        if rank < 1:
            raise ValueError(f"a delta's rank must be 1 or more, not {rank}")
        self.base = base
        self.rank = int(rank)
        self._route = _Route()
        modules = dict(base.named_modules())
        layers = list(layers) if layers is not None else [name for name in modules if family.carries_delta(name)]
        missing = [name for name in layers if name not in modules]
        if missing or not layers:
            raise ValueError(f"the {family.name} network has no layer {missing[0]!r}" if missing
                             else f"the {family.name} family names no layer for deltas")
        # A layer named twice would get its delta's hook twice (the delta added twice in the routed
        # forward) while merge_delta folds it in once: load and extract would disagree.
        repeated = sorted({name for name in layers if layers.count(name) > 1})
        if repeated:
            raise ValueError(f"layer {repeated[0]!r} is named more than once; each layer carries one delta")
        # Activation checkpointing (ADM's use_checkpoint) recomputes a block during backward, after
        # forward() has cleared the routing: the recomputed layers would run without their deltas,
        # and torch.utils.checkpoint refuses the mismatch at the first backward. It only saves
        # memory, so the shared base computes without it.
        for module in base.modules():
            if getattr(module, "use_checkpoint", False):
                module.use_checkpoint = False
        self.layers = tuple(layers)
        generator = torch.Generator().manual_seed(seed)
        self.deltas = nn.ModuleDict(
            {_module_key(name): SegmentDeltas(modules[name], self.segment_count, rank, self._route, generator) for name in layers})
        for name in layers:
            modules[name].register_forward_hook(self.deltas[_module_key(name)].hook)
        self._pinned: List[nn.Module] = []  # a plain list: the views must not enter the state dict

    def forward(self, x, t, y=None, **kwargs):
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        return self.forward_segments(x, t, y, self.expert_index(t).to(x.device), **kwargs)

    def forward_segments(self, x, t, y, index: torch.Tensor, **kwargs):
        """The base with each sample's delta chosen by ``index`` (one segment per sample), not by its time."""
        self._route.index = index
        try:
            return self.base(x, t, y, **kwargs)
        finally:
            self._route.index = None

    def expert_at(self, native_t: float) -> nn.Module:
        """Expert ``segment_of(native_t)`` alone, for a sampler step pinned to one expert
        (``steppers.step_model``): a step that starts or ends on a cut then uses one delta at both
        of its times, as a file of separate experts does."""
        if len(self._pinned) != self.segment_count:
            self._pinned = [PinnedSegment(self, k) for k in range(self.segment_count)]
        return self._pinned[self.segment_of(native_t)]

    def delta(self, name: str) -> SegmentDeltas:
        return self.deltas[_module_key(name)]

    def base_parameters(self) -> List[nn.Parameter]:
        return list(self.base.parameters())

    def delta_parameters(self) -> List[nn.Parameter]:
        return list(self.deltas.parameters())

    def delta_params(self) -> int:
        """Parameters of one segment's delta (every segment's is the same size)."""
        return sum(self.delta(name).params_per_segment() for name in self.layers)

    @torch.no_grad()
    def delta_flops(self) -> int:
        """Multiply-adds times two that one segment's delta adds to a forward pass of one sample,
        counted from the positions each layer computes in a probe forward."""
        shape = self.family.sample_shape(self.family.config)
        parameter = next(self.base.parameters())
        x = torch.zeros((1, *shape), device=parameter.device, dtype=parameter.dtype)
        classes = self.family.num_classes(self.family.config)
        y = torch.zeros(1, dtype=torch.long, device=x.device) if classes else None
        # routed by hand: on the meta device (``describe_shared_base``) the time cannot be read
        self._route.index = torch.zeros(1, dtype=torch.long, device=x.device)
        try:
            self.base(x, self.family.native_time(torch.full((1,), 0.5)).to(x.device), y)
        finally:
            self._route.index = None
        return sum(2 * self.delta(name).positions * self.delta(name).params_per_segment() for name in self.layers)

    @torch.no_grad()
    def merged_state_dict(self, segment: int) -> Dict[str, torch.Tensor]:
        """Expert ``segment`` as a plain state dict of the source's architecture."""
        return merge_delta(self.base.state_dict(), {name: self.delta(name).file_tensors(segment) for name in self.layers})

    def file_tensors(self) -> Dict[str, torch.Tensor]:
        """``base.{source key}`` once, and ``deltas.{k}.{layer}.down`` / ``.up`` per segment."""
        tensors = {f"base.{key}": value for key, value in self.base.state_dict().items()}
        for k in range(self.segment_count):
            for name in self.layers:
                for part, value in self.delta(name).file_tensors(k).items():
                    tensors[f"deltas.{k}.{name}.{part}"] = value
        return tensors

    def describe(self) -> Dict[str, object]:
        """What the routed file's metadata says of the shared base and its deltas."""
        return {"rank": self.rank, "layers": list(self.layers), "base_params": sum(p.numel() for p in self.base_parameters()),
                "delta_params": self.delta_params(), "delta_flops": self.delta_flops()}


class PinnedSegment(nn.Module):
    """One segment's expert of a shared-base model: every sample gets that segment's delta,
    whatever its time. The shared model is its one child (no copy), so what the module tree
    carries (``parameters()``, ``.to()``, ``.train()``, DDP, ``torch.export``, a parent's state
    dict) reaches the shared weights: the base and every segment's delta. The shared model keeps
    its views in a plain list, outside its own tree, so there is no cycle. Its state dict is
    therefore the shared model's (``shared.``-prefixed); the expert as a plain checkpoint of the
    source's architecture is ``view.shared.merged_state_dict(view.segment)``.
    """

    def __init__(self, shared: SharedBaseModel, segment: int):
        super().__init__()
        self.shared = shared
        self.segment = int(segment)
        for attribute in MODEL_ATTRIBUTES:
            if hasattr(shared, attribute):
                setattr(self, attribute, getattr(shared, attribute))

    def forward(self, x, t, y=None, **kwargs):
        index = torch.full((x.shape[0],), self.segment, dtype=torch.long, device=x.device)
        return self.shared.forward_segments(x, t.expand(x.shape[0]) if t.dim() == 0 else t, y, index, **kwargs)

    def forward_with_cfg(self, x, t, y, cfg_scale, **kwargs):
        return self.shared.family.guided_forward(lambda a, b, c: self.forward(a, b, c, **kwargs), x, t, y, cfg_scale)

    # The shared model's mode, so that it never goes stale when the shared model is switched
    # directly; setting it switches the shared model. (nn.Module.__init__ sets it before the
    # shared model is attached.)
    def _attached(self) -> Optional[SharedBaseModel]:
        return self.__dict__.get("_modules", {}).get("shared")

    @property
    def training(self) -> bool:
        shared = self._attached()
        return True if shared is None else shared.training

    @training.setter
    def training(self, mode: bool) -> None:
        shared = self._attached()
        if shared is not None:
            shared.train(mode)


def merge_delta(base_state: Dict[str, torch.Tensor], deltas: Dict[str, Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """A plain expert from a base state dict and one segment's deltas as the file stores them
    (``{layer: {"down": ..., "up": ...}}``), without building the network."""
    state = dict(base_state)
    for name, parts in deltas.items():
        key = f"{name}.weight"
        weight = state[key]
        update = parts["up"].double() @ parts["down"].double().reshape(parts["up"].shape[1], -1)
        state[key] = (weight.double() + update.reshape(weight.shape)).to(weight.dtype)
    return state


def describe_shared_base(family: Family, boundaries: Sequence[float], rank: int,
                         layers: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """``SharedBaseModel.describe()`` of the source's architecture, computed on the meta device:
    what a plan or a report says before (or without) any weights exist."""
    with torch.device("meta"):
        base = family.build(family.config)
    return SharedBaseModel(family, base, boundaries, rank, layers).describe()
