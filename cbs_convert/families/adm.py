"""ADM: the class-conditional or unconditional UNet of guided-diffusion ("Diffusion Models Beat GANs").

The network is key-compatible with guided-diffusion's ``UNetModel`` state dicts (module names,
GroupNorm32, 1-D convolutions for qkv/proj_out, ``Dropout`` kept as an index in ``out_layers``), and
is rebuilt from the state dict alone. What the shapes show: model_channels, channel_mult,
num_res_blocks, attention resolutions, learn_sigma, classes, scale-shift norm, resblock_updown.
What they do not show, and where it comes from instead (hints first, then the published flags of the
released ImageNet models, else a clear default or error):

* heads: ``num_head_channels`` 64 for the 64 and 256 (and 512) px models, ``num_heads`` 4 for 128 px;
* qkv order: the 64 px model was trained with ``use_new_attention_order`` ([q | k | v] over all
  heads), the others with the legacy order ([q_h, k_h, v_h] per head);
* beta schedule: cosine for 64 px, linear otherwise; image size: the published models all end at
  8x8, so ``8 * 2**(levels - 1)``.

Time is DiT's: integer-valued DDPM steps 0..999 (float accepted), noise prediction in the first
``in_channels`` outputs and the learned variance in the rest.

Width pruning keeps residual and skip widths and shrinks, per ResBlock, the inner width (conv1 out,
both emb halves, norm2, conv2 in) by whole GroupNorm groups, and per attention block whole heads.
Removing whole groups leaves every kept group's statistics exactly as they were, so norm2 of a
pruned block has fewer groups of the original size instead of 32 groups of a new size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cbs_convert.errors import CheckpointError, WarningNote
from cbs_convert.families.base import Family, NoisePredictionDDPM, UnitGroup, WidthKnob, check_keys, setting
from cbs_convert.families.sit import timestep_embedding

NORM_GROUPS = 32
#: How guided-diffusion computes what the weights do not fix. The original DDPM UNet (diffusers'
#: UNet2DModel) differs in each: sin before cos with frequencies over half - 1, GroupNorm eps 1e-6,
#: and a stride-2 convolution that pads only the far side. A config naming other values rebuilds
#: that network exactly.
GUIDED_DIFFUSION_NUMERICS = {"time_frequency_shift": 0, "time_sin_first": False, "norm_eps": 1e-5, "downsample_padding": 1}
DIFFUSION_STEPS = 1000
ATTENTION_ORDERS = ("legacy", "new")

#: The released guided-diffusion models: what their weights show, and the flags they were trained
#: with that the weights do not show (head split, qkv order, schedule, image size).
PUBLISHED = {
    "adm_64": dict(model_channels=192, channel_mult=[1, 2, 3, 4], num_res_blocks=3, attention_ds=[2, 4, 8],
                   image_size=64, num_heads=4, num_head_channels=64, attention_order="new", beta_schedule="cosine"),
    "adm_128": dict(model_channels=256, channel_mult=[1, 1, 2, 3, 4], num_res_blocks=2, attention_ds=[4, 8, 16],
                    image_size=128, num_heads=4, num_head_channels=-1, attention_order="legacy", beta_schedule="linear"),
    "adm_256": dict(model_channels=256, channel_mult=[1, 1, 2, 2, 4, 4], num_res_blocks=2, attention_ds=[8, 16, 32],
                    image_size=256, num_heads=4, num_head_channels=64, attention_order="legacy", beta_schedule="linear"),
    "adm_512": dict(model_channels=256, channel_mult=[0.5, 1, 1, 2, 2, 4, 4], num_res_blocks=2, attention_ds=[16, 32, 64],
                    image_size=512, num_heads=4, num_head_channels=64, attention_order="legacy", beta_schedule="linear"),
}
_SHAPE_FACTS = ("model_channels", "channel_mult", "num_res_blocks", "attention_ds")
_HIDDEN_FACTS = ("num_heads", "num_head_channels", "attention_order")


# ---------------------------------------------------------------------------------------------
# The layout: one walk over guided-diffusion's construction order, shared by the model, the
# closed-form counts and the surgery so that they cannot disagree.


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


def _unconfirmed(what: str, origin: str) -> str:
    """A head split from the checkpoint's args is a claim the weights cannot check: warn about it."""
    if origin == "checkpoint args":
        return WarningNote(f"{what} taken from the checkpoint's args, which the weights cannot confirm; "
                           "--num-heads / --num-head-channels override")
    return f"{what} ({origin})"


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


def _inner_width(layer: Layer, groups: int) -> int:
    return groups * (layer.out // NORM_GROUPS)


@lru_cache(maxsize=64)
def _growth_order(fulls: Tuple[int, ...]) -> Tuple[int, ...]:
    """The order in which blocks gain units, starting from one unit each.

    Each step goes to the block with the smallest kept fraction (ties: the earlier block), so every
    prefix keeps the blocks as evenly shrunk as integers allow and a larger total only ever adds
    units: the parameter count is monotone in the total, which the allocator's bisection needs.
    """
    kept = [1] * len(fulls)
    order = []
    while True:
        open_blocks = [i for i, f in enumerate(fulls) if kept[i] < f]
        if not open_blocks:
            return tuple(order)
        i = min(open_blocks, key=lambda j: (Fraction(kept[j], fulls[j]), j))
        kept[i] += 1
        order.append(i)


def spread(total: int, fulls: Sequence[int]) -> List[int]:
    """Per-block unit counts summing to ``total`` (clamped to [len, sum]), shrunk as evenly as possible."""
    fulls = tuple(int(f) for f in fulls)
    kept = [1] * len(fulls)
    steps = min(max(int(total), len(fulls)), sum(fulls)) - len(fulls)
    for i in _growth_order(fulls)[:steps]:
        kept[i] += 1
    return kept


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


def _validate(c: Dict[str, Any], lay: Layout) -> None:
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


# ---------------------------------------------------------------------------------------------
# The network.


class GroupNorm32(nn.GroupNorm):
    """guided-diffusion normalises in float32 whatever the activation dtype."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def _downsample(x):
    return F.avg_pool2d(x, kernel_size=2, stride=2)


def _upsample(x):
    return F.interpolate(x, scale_factor=2, mode="nearest")


class ResBlock(nn.Module):
    def __init__(self, layer: Layer, inner_groups: int, emb_channels: int, scale_shift: bool, dropout: float,
                 use_checkpoint: bool, norm_eps: float = 1e-5):
        super().__init__()
        self.channels, self.out_channels = layer.channels, layer.out
        inner = _inner_width(layer, inner_groups)
        self.updown = layer.updown
        self.scale_shift = scale_shift
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(GroupNorm32(NORM_GROUPS, layer.channels, eps=norm_eps), nn.SiLU(),
                                       nn.Conv2d(layer.channels, inner, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * inner if scale_shift else inner))
        self.out_layers = nn.Sequential(
            GroupNorm32(inner_groups, inner, eps=norm_eps), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(inner, layer.out, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if layer.out == layer.channels else nn.Conv2d(layer.channels, layer.out, 1)

    def forward(self, x, emb):
        if self.use_checkpoint and torch.is_grad_enabled():
            # Non-reentrant: gradients reach the parameters even when the inputs need none (frozen
            # layers in front), which guided-diffusion's own checkpoint function assumes away.
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x, emb):
        if self.updown:
            resample = _upsample if self.updown == "up" else _downsample
            h = resample(self.in_layers[:-1](x))
            x = resample(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.scale_shift:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    def __init__(self, layer: Layer, heads: int, order: str, use_checkpoint: bool, norm_eps: float = 1e-5):
        super().__init__()
        self.heads, self.head_dim, self.order = heads, layer.head_dim, order
        self.use_checkpoint = use_checkpoint
        width = heads * layer.head_dim
        self.norm = GroupNorm32(NORM_GROUPS, layer.channels, eps=norm_eps)
        self.qkv = nn.Conv1d(layer.channels, 3 * width, 1)
        self.proj_out = nn.Conv1d(width, layer.channels, 1)

    def forward(self, x):
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        length = qkv.shape[-1]
        if self.order == "legacy":  # rows per head: [q_h, k_h, v_h]
            q, k, v = qkv.reshape(b, self.heads, 3, self.head_dim, length).unbind(2)
        else:  # rows: [q of all heads | k of all heads | v of all heads]
            q, k, v = qkv.reshape(b, 3, self.heads, self.head_dim, length).unbind(1)
        # guided-diffusion scales q and k by d^-1/4 each: the same 1/sqrt(d) as the fused kernel.
        h = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        h = self.proj_out(h.transpose(-1, -2).reshape(b, self.heads * self.head_dim, length))
        return (x + h).reshape(b, c, *spatial)


class Downsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool, padding: int = 1):
        super().__init__()
        # padding 0: the original DDPM's (and diffusers') pad of one row and column at the far side
        self.pad_far_side = use_conv and padding == 0
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=padding) if use_conv else nn.AvgPool2d(2, 2)

    def forward(self, x):
        if self.pad_far_side:
            x = F.pad(x, (0, 1, 0, 1))
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        x = _upsample(x)
        return self.conv(x) if self.use_conv else x


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class ADMUNet(nn.Module):
    """guided-diffusion's UNetModel (2-D), with per-block inner widths and head counts for pruning."""

    def __init__(self, config: Dict[str, Any]):
        super().__init__()
        c = complete_config(config)
        lay = layout(c)
        _validate(c, lay)
        self.config = c
        self.image_size = c.get("image_size")
        self.in_channels = c["in_channels"]
        self.out_channels = c["out_channels"]
        self.model_channels = c["model_channels"]
        self.learn_sigma = c["learn_sigma"]
        self.num_classes = c["num_classes"] or None  # None when unconditional, as in guided-diffusion
        emb = 4 * c["model_channels"]
        self.time_embed = nn.Sequential(nn.Linear(c["model_channels"], emb), nn.SiLU(), nn.Linear(emb, emb))
        if self.num_classes:
            self.label_emb = nn.Embedding(c["num_classes"], emb)

        def make(layer: Layer) -> nn.Module:
            if layer.kind == "conv_in":
                return nn.Conv2d(layer.channels, layer.out, 3, padding=1)
            if layer.kind == "res":
                return ResBlock(layer, c["res_groups"][layer.index], emb, c["use_scale_shift_norm"], c["dropout"],
                                c["use_checkpoint"], c["norm_eps"])
            if layer.kind == "attn":
                return AttentionBlock(layer, c["attn_heads"][layer.index], c["attention_order"], c["use_checkpoint"], c["norm_eps"])
            if layer.kind == "down":
                return Downsample(layer.channels, c["conv_resample"], c["downsample_padding"])
            return Upsample(layer.channels, c["conv_resample"])

        self.input_blocks = nn.ModuleList(TimestepEmbedSequential(*map(make, b)) for b in lay.input_blocks)
        self.middle_block = TimestepEmbedSequential(*map(make, lay.middle_block))
        self.output_blocks = nn.ModuleList(TimestepEmbedSequential(*map(make, b)) for b in lay.output_blocks)
        ch = lay.final_channels
        self.out = nn.Sequential(GroupNorm32(NORM_GROUPS, ch, eps=c["norm_eps"]), nn.SiLU(), nn.Conv2d(ch, c["out_channels"], 3, padding=1))
        # PyTorch's default init rather than guided-diffusion's zeroed output convolutions: a freshly
        # built model must compute something non-trivial (tests); checkpoints overwrite all of it.

    def forward(self, x, timesteps, y=None):
        if (y is not None) != bool(self.num_classes):
            raise ValueError(
                "this model is class-conditional: pass labels y" if self.num_classes
                else "this model is unconditional: pass y=None"
            )
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])
        features = timestep_embedding(timesteps, self.model_channels, frequency_shift=self.config["time_frequency_shift"])
        if self.config["time_sin_first"]:
            half = self.model_channels // 2
            features = torch.cat([features[:, half: 2 * half], features[:, :half], features[:, 2 * half:]], dim=1)
        emb = self.time_embed(features.to(self.time_embed[0].weight.dtype))
        if self.num_classes:
            emb = emb + self.label_emb(y)
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


# ---------------------------------------------------------------------------------------------


def _published_name(c: Dict[str, Any]) -> Optional[str]:
    for name, facts in PUBLISHED.items():
        if all(c.get(k) == facts[k] for k in _SHAPE_FACTS) and c.get("resblock_updown") and c.get("use_scale_shift_norm"):
            return name
    return None


def _mismatches(state_dict, expected) -> int:
    keys = set(state_dict) ^ set(expected)
    wrong = sum(1 for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k]))
    return len(keys) + wrong


def _block_count(state_dict, section: str) -> int:
    found = [int(m.group(1)) for k in state_dict if (m := re.match(rf"{section}\.(\d+)\.", k))]
    return max(found) + 1 if found else 0


class ADMFamily(NoisePredictionDDPM, Family):
    """guided-diffusion UNet: noise (and variance) prediction on a 1000-step DDPM, like DiT."""

    name = "adm"
    native_time_name = "timesteps"
    # each residual block's two 3x3 convolutions and its time-embedding projection, and each
    # attention block's qkv and output projections: where the UNet's time dependence lives
    delta_layers = ("in_layers.2", "emb_layers.1", "out_layers.3", "qkv", "proj_out")

    def feature_taps(self, config):
        # the outputs of every input, middle and output block; pruning narrows only the insides of
        # residual blocks and the attention heads, so each keeps the teacher's channels
        lay = layout(complete_config(config))
        return ([f"input_blocks.{i}" for i in range(len(lay.input_blocks))] + ["middle_block"]
                + [f"output_blocks.{i}" for i in range(len(lay.output_blocks))])
    data_range = (-1.0, 1.0)  # pixels, as guided-diffusion's samplers clip them

    def __init__(self, config):
        super().__init__(complete_config(config))

    # -- architecture -------------------------------------------------------------------------
    @classmethod
    def matches(cls, state_dict):
        return "input_blocks.0.0.weight" in state_dict and "time_embed.0.weight" in state_dict

    @classmethod
    def config_from_state_dict(cls, state_dict, hints):
        sd = state_dict
        for key in ("input_blocks.0.0.weight", "time_embed.0.weight", "out.2.weight", "input_blocks.1.0.in_layers.2.weight",
                    "input_blocks.1.0.emb_layers.1.weight"):
            if key not in sd:
                raise CheckpointError(f"not a guided-diffusion UNet state dict: missing key {key}")
        notes: List[str] = []
        # The time embedding reads model_channels sinusoid features whatever the channel multipliers.
        model_channels = sd["time_embed.0.weight"].shape[1]
        in_channels = sd["input_blocks.0.0.weight"].shape[1]
        out_channels = sd["out.2.weight"].shape[0]
        if out_channels not in (in_channels, 2 * in_channels):
            raise CheckpointError(
                f"out.2.weight has {out_channels} output channels: not {in_channels} (noise) or "
                f"{2 * in_channels} (noise + variance) for {in_channels} input channels"
            )
        table = sd.get("label_emb.weight")
        num_classes = 0 if table is None else int(table.shape[0])
        given_classes, origin = setting(hints, "num_classes")
        if given_classes is not None and int(given_classes) != num_classes:
            flag = "--num-classes" if origin == "given" else "the checkpoint's args (num_classes)"
            raise CheckpointError(f"{flag} says {given_classes} classes, but label_emb has {num_classes} rows (ADM keeps no null row)")
        inner = sd["input_blocks.1.0.in_layers.2.weight"].shape[0]
        emb_rows = sd["input_blocks.1.0.emb_layers.1.weight"].shape[0]
        if emb_rows not in (inner, 2 * inner):
            raise CheckpointError(f"input_blocks.1.0.emb_layers.1.weight has {emb_rows} rows for {inner} channels")
        base = {
            "in_channels": int(in_channels), "model_channels": int(model_channels), "out_channels": int(out_channels),
            "num_classes": num_classes, "use_scale_shift_norm": emb_rows == 2 * inner,
            # Heads do not change shapes: one head per block while the layout is being found.
            "num_heads": 1, "num_head_channels": -1, "num_heads_upsample": -1,
        }
        structure = cls._find_structure(sd, base)
        base.update(structure)
        published = _published_name(base)
        facts = PUBLISHED.get(published, {})
        tag = f"published layout {published.upper().replace('_', '-')}" if published else None
        base.update(cls._hidden_facts(hints, facts, tag, notes))
        numerics = {k: hints[f"args_{k}"] for k in GUIDED_DIFFUSION_NUMERICS if hints.get(f"args_{k}") is not None}
        if numerics and numerics != {k: GUIDED_DIFFUSION_NUMERICS[k] for k in numerics}:
            base.update(numerics)
            notes.append("numerics of the original DDPM UNet: " + ", ".join(f"{k} {v}" for k, v in sorted(numerics.items())))
        levels = len(base["channel_mult"])
        image_size, origin = setting(hints, "image_size")
        if image_size:
            base["image_size"] = int(image_size)
            notes.append(f"image size {base['image_size']} ({origin})")
        elif facts:
            base["image_size"] = facts["image_size"]
            notes.append(f"image size {base['image_size']} ({tag})")
        else:
            base["image_size"] = 8 * 2 ** (levels - 1)
            notes.append(WarningNote(
                f"image size {base['image_size']} ASSUMED (not in the weights, nor in the file's args; the published "
                "models all end at 8x8); pass --image-size to change it"
            ))
        try:
            config = complete_config(base)
            expected = cls.expected_shapes(config)
        except ValueError as exc:
            raise CheckpointError(f"ADM checkpoint: {exc}; check the head settings (--num-heads)") from None
        check_keys(sd, expected, "ADM checkpoint does not match its own widths")
        notes.insert(0, cls(config).describe(config))
        return config, notes

    @classmethod
    def _find_structure(cls, sd, base) -> Dict[str, Any]:
        """num_res_blocks, channel_mult, attention resolutions and resampling kind from the keys.

        Every num_res_blocks that divides the output-block count is tried; the layout whose expected
        shapes match the state dict exactly is the one (resampling ResBlocks look like plain ones, so
        the key names alone cannot decide)."""
        n_out = _block_count(sd, "output_blocks")
        if n_out < 2:
            raise CheckpointError("ADM state dict has no output_blocks; not a guided-diffusion UNet")
        mc = base["model_channels"]
        tried = []
        for nrb in range(1, n_out):
            if n_out % (nrb + 1):
                continue
            levels = n_out // (nrb + 1)
            widths = []
            for level in range(levels):
                key = f"output_blocks.{(levels - 1 - level) * (nrb + 1)}.0.out_layers.3.weight"
                if key not in sd:
                    break
                widths.append(int(sd[key].shape[0]))
            if len(widths) != levels:
                continue
            attention_ds = sorted({
                2 ** ((i - 1) // (nrb + 1))
                for i in range(1, levels * (nrb + 1))
                if (i - 1) % (nrb + 1) < nrb and f"input_blocks.{i}.1.qkv.weight" in sd
            })
            down = f"input_blocks.{nrb + 1}.0."
            structure = {
                "num_res_blocks": nrb,
                "channel_mult": [w // mc if w % mc == 0 else w / mc for w in widths],
                "attention_ds": attention_ds,
                "resblock_updown": levels == 1 or down + "in_layers.2.weight" in sd,
                "conv_resample": down + "op.weight" in sd or levels == 1 or down + "in_layers.2.weight" in sd,
            }
            try:
                expected = cls.expected_shapes(complete_config({**base, **structure}))
            except ValueError:
                continue
            tried.append((_mismatches(sd, expected), nrb, structure, expected))
            if tried[-1][0] == 0:
                return structure
        if not tried:
            raise CheckpointError(f"ADM state dict: {n_out} output blocks fit no guided-diffusion UNet layout")
        _, nrb, _, expected = min(tried, key=lambda item: item[0])
        check_keys(sd, expected, f"ADM state dict fits no UNet layout (closest: {nrb} res blocks per level)")
        raise AssertionError("unreachable: check_keys accepted a layout with mismatches")

    @classmethod
    def _hidden_facts(cls, hints, facts, tag, notes) -> Dict[str, Any]:
        out = {}
        head_channels, head_channels_origin = setting(hints, "num_head_channels")
        heads, heads_origin = setting(hints, "num_heads")
        if head_channels:
            out.update(num_head_channels=int(head_channels), num_heads=-1)
            notes.append(_unconfirmed(f"{out['num_head_channels']} channels per attention head", head_channels_origin))
        elif heads:
            out.update(num_heads=int(heads), num_head_channels=-1)
            notes.append(_unconfirmed(f"{out['num_heads']} attention heads per block", heads_origin))
        elif facts:
            out.update(num_heads=facts["num_heads"], num_head_channels=facts["num_head_channels"])
            split = (f"{facts['num_head_channels']} channels per head" if facts["num_head_channels"] > 0
                     else f"{facts['num_heads']} heads per block")
            notes.append(f"attention {split} ({tag}'s flags)")
        else:
            raise CheckpointError(
                "cannot infer the attention head split of this ADM UNet from the weights; pass --num-heads N "
                "(or the num_head_channels hint)"
            )
        order, order_origin = setting(hints, "attention_order")
        if order is not None:
            order = str(order).lower()
            if order not in ATTENTION_ORDERS:
                raise CheckpointError(f"attention_order {order!r} is unknown; use legacy or new")
            out["attention_order"] = order
            notes.append(f"{order} qkv order ({order_origin})")
        elif facts:
            out["attention_order"] = facts["attention_order"]
            notes.append(f"{facts['attention_order']} qkv order ({tag}'s flags)")
        else:
            out["attention_order"] = "legacy"
            notes.append("legacy qkv order ASSUMED (guided-diffusion's default; not visible in the weights)")
        schedule, origin = setting(hints, "beta_schedule")
        if schedule:
            schedule = str(schedule).lower()
            source = origin
        else:
            schedule, source = facts.get("beta_schedule", "linear"), (f"{tag}'s flags" if facts else "default; --beta-schedule to change")
        if schedule not in ("linear", "cosine"):
            raise CheckpointError(f"beta schedule {schedule!r} is not supported; use linear or cosine")
        out.update(beta_schedule=schedule, diffusion_steps=DIFFUSION_STEPS)
        notes.append(f"{schedule} beta schedule, {DIFFUSION_STEPS} steps, noise prediction ({source})")
        if hints.get("use_checkpoint"):
            out["use_checkpoint"] = True
        return out

    @classmethod
    def build(cls, config):
        return ADMUNet(config)

    @classmethod
    def expected_shapes(cls, config):
        with torch.device("meta"):
            model = cls.build(config)
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}

    def describe(self, config):
        c = complete_config(config)
        name = _published_name(c)
        tag = f"ADM-{name.split('_')[1]}" if name else "ADM (custom)"
        heads = (f"{c['num_head_channels']}-channel heads" if c["num_head_channels"] > 0 else f"{c['num_heads']} heads")
        mult = ",".join(str(m) for m in c["channel_mult"])
        return (
            f"{tag}: {c['model_channels']} channels x ({mult}), {c['num_res_blocks']} res blocks per level, "
            f"attention at 1/{', 1/'.join(map(str, c['attention_ds']))} with {heads} ({c['attention_order']} qkv), "
            f"{c['image_size']}px, {c['num_classes'] or 'no'} classes"
        )

    def nonofficial_numerics(self, config):
        c = complete_config(config)
        return {k: c[k] for k, v in GUIDED_DIFFUSION_NUMERICS.items() if c[k] != v}

    def saved_args(self, config):
        c = complete_config(config)
        heads = {"num_head_channels": c["num_head_channels"]} if c["num_head_channels"] > 0 else {"num_heads": c["num_heads"]}
        numerics = {k: c[k] for k, v in GUIDED_DIFFUSION_NUMERICS.items() if c[k] != v}
        return {"model": "ADM-pruned", **heads, "attention_order": c["attention_order"],
                "beta_schedule": c["beta_schedule"], "image_size": c["image_size"], **numerics}

    def recipe_name(self, config):
        name = _published_name(config)
        if name is None or any(config[k] != PUBLISHED[name][k] for k in _HIDDEN_FACTS):
            return None
        return name

    def sample_shape(self, config):
        return (config["in_channels"], config["image_size"], config["image_size"])

    def num_classes(self, config):
        return config["num_classes"]

    def null_label(self, config):
        return None  # ADM trained no null class; guided-diffusion guides with a classifier instead

    def param_count(self, config):
        c = complete_config(config)
        lay = layout(c)
        emb = 4 * c["model_channels"]
        total = c["model_channels"] * emb + emb + emb * emb + emb + c["num_classes"] * emb
        for l in lay.layers():
            if l.kind == "conv_in":
                total += l.channels * l.out * 9 + l.out
            elif l.kind == "res":
                inner = _inner_width(l, c["res_groups"][l.index])
                rows = 2 * inner if c["use_scale_shift_norm"] else inner
                total += 2 * l.channels + l.channels * inner * 9 + inner + emb * rows + rows
                total += 2 * inner + inner * l.out * 9 + l.out
                if l.channels != l.out:
                    total += l.channels * l.out + l.out
            elif l.kind == "attn":
                width = c["attn_heads"][l.index] * l.head_dim
                total += 2 * l.channels + l.channels * 3 * width + 3 * width + width * l.channels + l.channels
            elif c["conv_resample"]:  # a resampling convolution
                total += l.channels * l.out * 9 + l.out
        ch = lay.final_channels
        return total + 2 * ch + ch * c["out_channels"] * 9 + c["out_channels"]

    def forward_flops(self, config):
        c = complete_config(config)
        lay = layout(c)
        size, emb = c["image_size"], 4 * c["model_channels"]
        macs = c["model_channels"] * emb + emb * emb
        for l in lay.layers():
            pixels_in = (size // l.ds) ** 2
            if l.kind == "conv_in":
                macs += pixels_in * l.channels * l.out * 9
            elif l.kind == "res":
                pixels = pixels_in * {"": 1, "down": 0.25, "up": 4}[l.updown]
                inner = _inner_width(l, c["res_groups"][l.index])
                macs += emb * inner * (2 if c["use_scale_shift_norm"] else 1)
                macs += pixels * (l.channels * inner + inner * l.out) * 9
                if l.channels != l.out:
                    macs += pixels_in * l.channels * l.out
            elif l.kind == "attn":
                width = c["attn_heads"][l.index] * l.head_dim
                macs += pixels_in * (4 * l.channels * width) + 2 * pixels_in * pixels_in * width
            elif c["conv_resample"]:
                pixels = pixels_in * (0.25 if l.kind == "down" else 4)
                macs += pixels * l.channels * l.out * 9
        macs += size * size * lay.final_channels * c["out_channels"] * 9
        return int(2 * macs)

    def guided_forward(self, forward, x, native_t, y, cfg_scale):
        """DiT's batch convention ([cond; uncond] halves, the first half's x used twice).

        guided-diffusion has no classifier-free guidance and ADM no null class: the second half of
        ``y`` is whatever labels the caller takes as the reference branch. Unlike the transformer
        reference helper's fixed first three channels, every noise channel is guided (for RGB models
        the two agree); the variance channels pass through.
        """
        if not self.config["num_classes"]:
            raise ValueError("classifier-free guidance needs a class-conditional ADM model; this one is unconditional")
        half = x[: len(x) // 2]
        out = forward(torch.cat([half, half], dim=0), native_t, y)
        channels = self.config["in_channels"]
        cond, uncond = out[:, :channels].split(len(out) // 2, dim=0)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided], dim=0), out[:, channels:]], dim=1)

    # -- surgery --------------------------------------------------------------------------------
    def width_knobs(self, config):
        """Total kept heads (coarse) and total kept GroupNorm groups over all ResBlocks (fine).

        Totals rather than a per-block fraction: one group in every ResBlock at once is about 15M
        parameters of ADM-256, too coarse to land within 1% of an expert's budget; a total moves one
        block at a time and ``spread`` keeps the blocks evenly shrunk."""
        lay = layout(complete_config(config))
        heads = [l.heads for l in lay.attn()]
        blocks = len(lay.res())
        return [
            WidthKnob("attention_heads", sum(heads), len(heads)),
            WidthKnob("inner_groups", NORM_GROUPS * blocks, blocks),
        ]

    def with_widths(self, config, widths):
        out = complete_config(config)
        lay = layout(out)
        for name, value in widths.items():
            if name == "attention_heads":
                out["attn_heads"] = spread(value, [l.heads for l in lay.attn()])
            elif name == "inner_groups":
                out["res_groups"] = spread(value, [NORM_GROUPS] * len(lay.res()))
            else:
                raise KeyError(f"ADM has no width knob {name!r}; knobs: attention_heads, inner_groups")
        out["inner_groups"] = sum(out["res_groups"])
        out["attention_heads"] = sum(out["attn_heads"])
        return out

    def unit_groups(self, source, target):
        source, target = complete_config(source), complete_config(target)
        groups = []
        for l in layout(source).layers():
            if l.kind == "res":
                groups.append(UnitGroup(
                    f"{l.path}.inner", source["res_groups"][l.index], target["res_groups"][l.index],
                    (f"{l.path}.out_layers.3",), l.out // NORM_GROUPS,
                ))
            elif l.kind == "attn":
                groups.append(UnitGroup(
                    f"{l.path}.heads", source["attn_heads"][l.index], target["attn_heads"][l.index],
                    (f"{l.path}.proj_out",), l.head_dim,
                ))
        return groups

    def slice_state_dict(self, state_dict, source, kept):
        source = complete_config(source)
        sd = dict(state_dict)

        def channels(units, width):
            return (units[:, None] * width + torch.arange(width)).reshape(-1)

        for l in layout(source).layers():
            p = l.path + "."
            if l.kind == "res":
                width = l.out // NORM_GROUPS
                ch = channels(kept[f"{l.path}.inner"], width)
                rows = torch.cat([ch, ch + source["res_groups"][l.index] * width]) if source["use_scale_shift_norm"] else ch
                for key, index in (("in_layers.2", ch), ("emb_layers.1", rows), ("out_layers.0", ch)):
                    sd[p + key + ".weight"] = sd[p + key + ".weight"][index]
                    sd[p + key + ".bias"] = sd[p + key + ".bias"][index]
                sd[p + "out_layers.3.weight"] = sd[p + "out_layers.3.weight"][:, ch]
            elif l.kind == "attn":
                heads, d = kept[f"{l.path}.heads"], l.head_dim
                ch = channels(heads, d)
                if source["attention_order"] == "legacy":
                    rows = channels(heads, 3 * d)
                else:
                    width = source["attn_heads"][l.index] * d
                    rows = torch.cat([j * width + ch for j in range(3)])
                sd[p + "qkv.weight"] = sd[p + "qkv.weight"][rows]
                sd[p + "qkv.bias"] = sd[p + "qkv.bias"][rows]
                sd[p + "proj_out.weight"] = sd[p + "proj_out.weight"][:, ch]
        return {k: v.contiguous() for k, v in sd.items()}
