"""ADM's layout: one walk over guided-diffusion's construction order, shared by the network, the
closed-form counts and the surgery so that they cannot disagree, and the completion of a config
with its defaults and per-block widths."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Dict, List, Tuple

from cbs_convert.families.ddpm import DIFFUSION_STEPS

NORM_GROUPS = 32
#: How guided-diffusion computes what the weights do not fix. The original DDPM UNet (diffusers'
#: UNet2DModel) differs in each: sin before cos with frequencies over half - 1, GroupNorm eps 1e-6,
#: and a stride-2 convolution that pads only the far side. A config naming other values rebuilds
#: that network exactly.
GUIDED_DIFFUSION_NUMERICS = {"time_frequency_shift": 0, "time_sin_first": False, "norm_eps": 1e-5, "downsample_padding": 1}
ATTENTION_ORDERS = ("legacy", "new")


@dataclass(frozen=True)
class Layer:
    path: str  # module path in the state dict, e.g. "input_blocks.5.0"
    kind: str  # "conv_in", "res", "attn", "down" or "up" (a resampling layer that is not a ResBlock)
    channels: int  # input channels
    out: int  # output channels
    ds: int  # downsampling factor at its input
    updown: str = ""  # "down" or "up" for a resampling ResBlock
    index: int = -1  # position among the ResBlocks, or among the attention blocks
    heads: int = 0  # attention: the source model's head count
    head_dim: int = 0


@dataclass(frozen=True)
class Layout:
    input_blocks: Tuple[Tuple[Layer, ...], ...]
    middle_block: Tuple[Layer, ...]
    output_blocks: Tuple[Tuple[Layer, ...], ...]
    final_channels: int

    def layers(self) -> List[Layer]:
        return [l for b in self.input_blocks for l in b] + list(self.middle_block) + [
            l for b in self.output_blocks for l in b
        ]

    def res(self) -> List[Layer]:
        return [l for l in self.layers() if l.kind == "res"]

    def attn(self) -> List[Layer]:
        return [l for l in self.layers() if l.kind == "attn"]


def _level_widths(c) -> List[int]:
    return [int(m * c["model_channels"]) for m in c["channel_mult"]]


def _full_heads(c, channels: int, upsampling: bool) -> Tuple[int, int]:
    """guided-diffusion's rule: a fixed head width wins over a fixed head count."""
    if c["num_head_channels"] > 0:
        heads = channels // c["num_head_channels"]
        if heads * c["num_head_channels"] != channels:
            raise ValueError(f"attention width {channels} is not a multiple of num_head_channels {c['num_head_channels']}")
        return heads, c["num_head_channels"]
    heads = c["num_heads"]
    if upsampling and c.get("num_heads_upsample", -1) > 0:
        heads = c["num_heads_upsample"]
    if heads <= 0 or channels % heads:
        raise ValueError(f"attention width {channels} is not divisible by {heads} heads")
    return heads, channels // heads


@lru_cache(maxsize=64)
def _layout(key: Tuple) -> Layout:
    c = dict(key)
    widths = _level_widths(c)
    nrb = c["num_res_blocks"]
    attention_ds = set(c["attention_ds"])
    counts = {"res": 0, "attn": 0}

    def res(path, cin, cout, ds, updown=""):
        counts["res"] += 1
        return Layer(path, "res", cin, cout, ds, updown, counts["res"] - 1)

    def attn(path, ch, ds, upsampling):
        heads, head_dim = _full_heads(c, ch, upsampling)
        counts["attn"] += 1
        return Layer(path, "attn", ch, ch, ds, index=counts["attn"] - 1, heads=heads, head_dim=head_dim)

    # guided-diffusion sizes the input convolution by the first level, int(channel_mult[0] * model_channels),
    # which is not model_channels when that multiplier is not 1 (the 512x512 model's is 0.5)
    first = widths[0]
    inputs = [(Layer("input_blocks.0.0", "conv_in", c["in_channels"], first, 1),)]
    ch, ds, skips = first, 1, [first]
    for level, width in enumerate(widths):
        for _ in range(nrb):
            prefix = f"input_blocks.{len(inputs)}"
            block = [res(prefix + ".0", ch, width, ds)]
            ch = width
            if ds in attention_ds:
                block.append(attn(prefix + ".1", ch, ds, False))
            inputs.append(tuple(block))
            skips.append(ch)
        if level != len(widths) - 1:
            path = f"input_blocks.{len(inputs)}.0"
            inputs.append((res(path, ch, ch, ds, "down") if c["resblock_updown"] else Layer(path, "down", ch, ch, ds),))
            ds *= 2
            skips.append(ch)
    middle = (res("middle_block.0", ch, ch, ds), attn("middle_block.1", ch, ds, False), res("middle_block.2", ch, ch, ds))
    outputs = []
    for level in reversed(range(len(widths))):
        for i in range(nrb + 1):
            prefix = f"output_blocks.{len(outputs)}"
            block = [res(prefix + ".0", ch + skips.pop(), widths[level], ds)]
            ch = widths[level]
            if ds in attention_ds:
                block.append(attn(prefix + ".1", ch, ds, True))
            if level and i == nrb:
                path = f"{prefix}.{len(block)}"
                block.append(res(path, ch, ch, ds, "up") if c["resblock_updown"] else Layer(path, "up", ch, ch, ds))
                ds //= 2
            outputs.append(tuple(block))
    return Layout(tuple(inputs), middle, tuple(outputs), ch)


def layout(config: Dict[str, Any]) -> Layout:
    keys = ("in_channels", "model_channels", "channel_mult", "num_res_blocks", "attention_ds", "resblock_updown",
            "num_heads", "num_head_channels", "num_heads_upsample")
    return _layout(tuple((k, tuple(config[k]) if isinstance(config[k], list) else config[k]) for k in keys))


def inner_width(layer: Layer, groups: int) -> int:
    return groups * (layer.out // NORM_GROUPS)


def complete_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """Fill the defaults and, where absent, the per-block widths of the unpruned model."""
    c = {
        "num_heads_upsample": -1, "resblock_updown": True, "conv_resample": True, "use_scale_shift_norm": True,
        "attention_order": "legacy", "num_classes": 0, "beta_schedule": "linear", "diffusion_steps": DIFFUSION_STEPS,
        "use_checkpoint": False, "dropout": 0.0, **GUIDED_DIFFUSION_NUMERICS,
    }
    c.update(config)
    c["channel_mult"] = [int(m) if float(m).is_integer() else float(m) for m in c["channel_mult"]]
    c["attention_ds"] = sorted(int(d) for d in c["attention_ds"])
    c.setdefault("out_channels", c["in_channels"] * 2 if c.get("learn_sigma", True) else c["in_channels"])
    c["learn_sigma"] = c["out_channels"] == 2 * c["in_channels"]
    lay = layout(c)
    c.setdefault("res_groups", [NORM_GROUPS] * len(lay.res()))
    c.setdefault("attn_heads", [l.heads for l in lay.attn()])
    # The per-block lists define the architecture; the totals are the allocator's knobs (and what
    # the report shows), so they are always recomputed from the lists, never trusted.
    c["inner_groups"] = sum(c["res_groups"])
    c["attention_heads"] = sum(c["attn_heads"])
    return c


def validate(c: Dict[str, Any], lay: Layout) -> None:
    res, attn = lay.res(), lay.attn()
    if c["attention_order"] not in ATTENTION_ORDERS:
        raise ValueError(f"attention_order {c['attention_order']!r} is not one of {', '.join(ATTENTION_ORDERS)}")
    if len(c["res_groups"]) != len(res) or not all(1 <= g <= NORM_GROUPS for g in c["res_groups"]):
        raise ValueError(f"res_groups needs {len(res)} entries in 1..{NORM_GROUPS}, got {c['res_groups']}")
    if len(c["attn_heads"]) != len(attn) or not all(1 <= h <= l.heads for h, l in zip(c["attn_heads"], attn)):
        raise ValueError(f"attn_heads needs {len(attn)} entries, each from 1 to the block's head count, got {c['attn_heads']}")
    for l in res + attn:
        if l.channels % NORM_GROUPS or l.out % NORM_GROUPS:
            raise ValueError(f"{l.path}: {l.channels}->{l.out} channels do not split into {NORM_GROUPS} GroupNorm groups")
