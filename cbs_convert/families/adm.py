"""ADM: the class-conditional or unconditional UNet of guided-diffusion ("Diffusion Models Beat GANs"),
as a family: counting, surgery and the checks of a stored config. Its layout is adm_layout.py, its
network adm_net.py, the reading of its config from a state dict adm_detect.py.

Time is DiT's: integer-valued DDPM steps 0..999 (float accepted), noise prediction in the first
``in_channels`` outputs and the learned variance in the rest.

Width pruning keeps residual and skip widths and shrinks, per ResBlock, the inner width (conv1 out,
both emb halves, norm2, conv2 in) by whole GroupNorm groups, and per attention block whole heads.
Removing whole groups leaves every kept group's statistics exactly as they were, so norm2 of a
pruned block has fewer groups of the original size instead of 32 groups of a new size.
"""

from __future__ import annotations

from fractions import Fraction
from functools import lru_cache
from typing import List, Sequence, Tuple

import torch

from cbs_convert.families import diffusers_unet
from cbs_convert.families.adm_detect import HIDDEN_FACTS, PUBLISHED, ADMDetection, published_name
from cbs_convert.families.adm_layout import (
    ATTENTION_ORDERS,
    GUIDED_DIFFUSION_NUMERICS,
    NORM_GROUPS,
    complete_config,
    inner_width,
    layout,
)
from cbs_convert.families.adm_net import ADMUNet
from cbs_convert.families.base import MAX_IMAGE_SIZE, MAX_SIZE, Family, UnitGroup, WidthKnob, block_indices
from cbs_convert.families.ddpm import DIFFUSION_STEPS, NoisePredictionDDPM

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


class ADMFamily(NoisePredictionDDPM, ADMDetection, Family):
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
    # pruning shrinks the per-block lists; the totals follow them
    pruned_keys = ("res_groups", "attn_heads", "inner_groups", "attention_heads")
    diffusers_counterpart = diffusers_unet

    def __init__(self, config):
        super().__init__(complete_config(config))

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
        name = published_name(c)
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
        name = published_name(config)
        if name is None or any(config[k] != PUBLISHED[name][k] for k in HIDDEN_FACTS):
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
                inner = inner_width(l, c["res_groups"][l.index])
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
                inner = inner_width(l, c["res_groups"][l.index])
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
        c = complete_config(config)
        return [
            WidthKnob("attention_heads", sum(c["attn_heads"]), len(c["attn_heads"])),
            WidthKnob("inner_groups", sum(c["res_groups"]), len(c["res_groups"])),
        ]

    def with_widths(self, config, widths):
        # each block's own count in ``config`` is its cap: a source that is itself pruned block by
        # block (or a trunk narrowed into experts) can only lose units, never regain ones it lacks
        out = complete_config(config)
        for name, value in widths.items():
            if name == "attention_heads":
                out["attn_heads"] = spread(value, out["attn_heads"])
            elif name == "inner_groups":
                out["res_groups"] = spread(value, out["res_groups"])
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

    # -- stored configs -------------------------------------------------------------------------
    @classmethod
    def check_config(cls, check, config, field):
        def need(key, expected):
            return check.get(config, key, f"{field}.{key}", expected)

        for key in ("in_channels", "model_channels", "num_res_blocks"):
            check.integer(need(key, "a whole number from 1"), f"{field}.{key}", low=1)
        mult = check.sequence(need("channel_mult", "a list of positive numbers"), f"{field}.channel_mult", low=1)
        for i, m in enumerate(mult):
            check.number(m, f"{field}.channel_mult[{i}]", low=1 / config["model_channels"], high=MAX_SIZE)
        attention = check.sequence(need("attention_ds", "a list of downsampling factors"), f"{field}.attention_ds",
                                   high=len(mult) + 1)
        for i, ds in enumerate(attention):
            check.integer(ds, f"{field}.attention_ds[{i}]", low=1)
        heads = check.integer(need("num_heads", "a whole number"), f"{field}.num_heads", low=-1)
        head_channels = check.integer(need("num_head_channels", "a whole number"), f"{field}.num_head_channels", low=-1)
        if head_channels <= 0 and heads < 1:
            raise check.fail(f"{field}.num_heads", "a head count from 1 when num_head_channels is not set", heads)
        check.integer(need("image_size", "a whole number from 1"), f"{field}.image_size", 1, MAX_IMAGE_SIZE)
        typed = {
            "out_channels": lambda v, f: check.integer(v, f, low=1), "num_heads_upsample": lambda v, f: check.integer(v, f, low=-1),
            "num_classes": check.integer, "diffusion_steps": lambda v, f: check.integer(v, f, DIFFUSION_STEPS, DIFFUSION_STEPS),
            "time_frequency_shift": lambda v, f: check.integer(v, f, 0, 1), "downsample_padding": lambda v, f: check.integer(v, f, 0, 1),
            "inner_groups": check.integer, "attention_heads": check.integer,
            "resblock_updown": check.boolean, "conv_resample": check.boolean, "use_scale_shift_norm": check.boolean,
            "use_checkpoint": check.boolean, "time_sin_first": check.boolean, "learn_sigma": check.boolean,
            "dropout": lambda v, f: check.number(v, f, 0.0, 0.999), "norm_eps": lambda v, f: check.number(v, f, 1e-12, 1.0),
            "attention_order": lambda v, f: check.text(v, f, ATTENTION_ORDERS),
            "beta_schedule": lambda v, f: check.text(v, f, ("linear", "cosine")),
        }
        for key, checker in typed.items():
            if key in config:
                checker(config[key], f"{field}.{key}")
        if "out_channels" in config and config["out_channels"] not in (config["in_channels"], 2 * config["in_channels"]):
            raise check.fail(f"{field}.out_channels", f"{config['in_channels']} or {2 * config['in_channels']} "
                             f"for {config['in_channels']} input channels", config["out_channels"])
        for key, high in (("res_groups", NORM_GROUPS), ("attn_heads", MAX_SIZE)):
            if key in config:
                for i, value in enumerate(check.sequence(config[key], f"{field}.{key}")):
                    check.integer(value, f"{field}.{key}[{i}]", 1, high)

    @classmethod
    def check_structure(cls, check, config, shapes, field, what):
        levels, per_level = len(config["channel_mult"]), config["num_res_blocks"]
        outputs, inputs = len(block_indices(shapes, "output_blocks")), len(block_indices(shapes, "input_blocks"))
        if levels * (per_level + 1) != outputs:
            raise check.fail(f"{field}.num_res_blocks", f"a layout of the {outputs} output blocks {what} holds "
                             f"(with the {levels} levels of channel_mult)", per_level)
        if 1 + levels * per_level + levels - 1 != inputs:
            raise check.fail(f"{field}.channel_mult", f"levels that lay out the {inputs} input blocks {what} holds",
                             config["channel_mult"])
        width = shapes.get("time_embed.0.weight")
        if width is None or len(width) != 2 or width[1] != config["model_channels"]:
            raise check.fail(f"{field}.model_channels", f"the width of {what}'s time_embed.0.weight "
                             f"({'absent' if width is None else width[-1]})", config["model_channels"])
