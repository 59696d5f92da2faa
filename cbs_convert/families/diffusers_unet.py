"""ADM's counterpart in diffusers: ``UNet2DModel`` (the original DDPM's UNet) in and out of
guided-diffusion's UNet, whose family prunes it, and the denoiser ``DDPMPipeline`` calls.

A UNet2DModel's config says how it computes what the weights do not fix (the timestep features,
the GroupNorm eps, the padding of a stride-2 convolution); the ADM family rebuilds those numerics
from its own config. Its q, k and v are three matrices where ADM has one 1-D convolution. Every
part this module has is named in ``families/diffusers.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import torch

from cbs_convert.errors import CheckpointError
from cbs_convert.families.adm_layout import NORM_GROUPS, complete_config, layout
from cbs_convert.families.diffusers import INSTEAD, Denoiser as _Denoiser, square

CLASS_NAMES = ("UNet2DModel",)
#: the class an expert is written as, and checked with
MODEL_CLASS = "UNet2DModel"
#: how a refusal of another class names these
SUPPORTED = "UNet2DModel"
#: DDPMPipeline hands its scheduler every output channel, the learned variance included
PIPELINE_SENDS_VARIANCE = True
#: UNet2DModel's constructor defaults for the keys that shape the network
UNET_DEFAULTS = {"block_out_channels": [224, 448, 672, 896], "layers_per_block": 2,
                 "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
                 "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}


def claims(config: Dict[str, Any], folder) -> bool:
    """Whether the diffusers ``config`` in ``folder`` is a UNet2DModel."""
    return config.get("_class_name") in CLASS_NAMES


def to_family(config: Dict[str, Any], tensors: Dict[str, torch.Tensor], scheduler: Optional[Dict[str, Any]], folder,
              where: str):
    """(state dict in guided-diffusion's layout, training-args equivalent) of a UNet2DModel."""
    config = {**UNET_DEFAULTS, **config}
    return unet_to_adm(tensors, config, where), _unet_args(config, folder, scheduler)


_RES_PAIRS = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
              ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
# each pair: diffusers module, ADM module, whether the weight gains the 1-D convolution's last axis
_ATTN_PAIRS = [("group_norm", "norm", False), ("to_out.0", "proj_out", True)]


def _unet_modules(config: Dict[str, Any]) -> list:
    """(diffusers module, ADM module, kind) for every module, in both networks' construction order."""
    levels = len(config["block_out_channels"])
    down_attention = [kind.startswith("Attn") for kind in config["down_block_types"]]
    up_attention = [kind.startswith("Attn") for kind in config["up_block_types"]]
    per_level = int(config["layers_per_block"])
    pairs = [("conv_in", "input_blocks.0.0", "plain"), ("time_embedding.linear_1", "time_embed.0", "plain"),
             ("time_embedding.linear_2", "time_embed.2", "plain")]
    block = 1
    for level in range(levels):
        for j in range(per_level):
            pairs.append((f"down_blocks.{level}.resnets.{j}", f"input_blocks.{block}.0", "res"))
            if down_attention[level]:
                pairs.append((f"down_blocks.{level}.attentions.{j}", f"input_blocks.{block}.1", "attn"))
            block += 1
        if level != levels - 1:
            pairs.append((f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{block}.0.op", "plain"))
            block += 1
    pairs += [("mid_block.resnets.0", "middle_block.0", "res"), ("mid_block.attentions.0", "middle_block.1", "attn"),
              ("mid_block.resnets.1", "middle_block.2", "res")]
    block = 0
    for level in range(levels):  # up_blocks.0 is the deepest
        for j in range(per_level + 1):
            pairs.append((f"up_blocks.{level}.resnets.{j}", f"output_blocks.{block}.0", "res"))
            slot = 1
            if up_attention[level]:
                pairs.append((f"up_blocks.{level}.attentions.{j}", f"output_blocks.{block}.1", "attn"))
                slot = 2
            if level != levels - 1 and j == per_level:
                pairs.append((f"up_blocks.{level}.upsamplers.0.conv", f"output_blocks.{block}.{slot}.conv", "plain"))
            block += 1
    pairs += [("conv_norm_out", "out.0", "plain"), ("conv_out", "out.2", "plain"), ("class_embedding", "label_emb", "plain")]
    return pairs


def _check_unet_config(config: Dict[str, Any], where: str) -> None:
    """Refuse the UNet2DModel options the guided-diffusion network cannot compute."""
    unsupported = {
        "time_embedding_type": ("positional",), "center_input_sample": (False, None), "resnet_time_scale_shift": ("default",),
        "class_embed_type": (None,), "act_fn": ("silu",), "add_attention": (True, None), "num_train_timesteps": (None,),
        "mid_block_type": ("UNetMidBlock2D",), "downsample_type": ("conv",), "upsample_type": ("conv",),
        "mid_block_scale_factor": (1, 1.0), "attn_norm_num_groups": (None, 32),
    }
    for key, allowed in unsupported.items():
        if config.get(key, allowed[0]) not in allowed:
            raise CheckpointError(f"{where}: UNet2DModel with {key}={config[key]!r} is not supported (only {allowed[0]!r})")
    widths = config.get("block_out_channels") or (224, 448, 672, 896)
    if config.get("time_embedding_dim") not in (None, 4 * widths[0]):
        raise CheckpointError(f"{where}: UNet2DModel with time_embedding_dim {config['time_embedding_dim']} is not "
                              f"supported (only 4 x the first width, {4 * widths[0]})")
    if int(config.get("norm_num_groups") or 32) != 32:
        raise CheckpointError(f"{where}: UNet2DModel with {config['norm_num_groups']} GroupNorm groups is not supported (only 32)")
    kinds = {"DownBlock2D", "AttnDownBlock2D"}
    if not set(config["down_block_types"]) <= kinds or not set(config["up_block_types"]) <= {"UpBlock2D", "AttnUpBlock2D"}:
        raise CheckpointError(f"{where}: UNet2DModel blocks {config['down_block_types']} / {config['up_block_types']}: only "
                              "DownBlock2D, AttnDownBlock2D, UpBlock2D and AttnUpBlock2D are supported")
    down_attention = [t.startswith("Attn") for t in config["down_block_types"]]
    if [t.startswith("Attn") for t in config["up_block_types"]] != down_attention[::-1]:
        raise CheckpointError(f"{where}: attention at different resolutions on the way down and up is not supported")


def unet_to_adm(tensors: Dict[str, torch.Tensor], config: Dict[str, Any], where: str) -> Dict[str, torch.Tensor]:
    _check_unet_config(config, where)
    out: Dict[str, torch.Tensor] = {}
    used = set()

    def move(theirs: str, ours: str, conv1d: bool = False, optional: bool = False):
        if f"{theirs}.weight" not in tensors:
            if optional:
                return
            raise CheckpointError(f"{where}: missing {theirs}.weight; not a complete UNet2DModel of this config")
        for p in ("weight", "bias"):
            name = f"{theirs}.{p}"
            if name in tensors:
                used.add(name)
                value = tensors[name]
                out[f"{ours}.{p}"] = value[..., None] if conv1d and p == "weight" else value

    for theirs, ours, kind in _unet_modules(config):
        if kind == "plain":
            move(theirs, ours, optional=theirs == "class_embedding" and not config.get("num_class_embeds"))
        elif kind == "res":
            for a, b in _RES_PAIRS:  # the shortcut exists only where the width changes
                move(f"{theirs}.{a}", f"{ours}.{b}", optional=a == "conv_shortcut")
        else:
            for a, b, conv1d in _ATTN_PAIRS:
                move(f"{theirs}.{a}", f"{ours}.{b}", conv1d)
            for p in ("weight", "bias"):
                parts = [f"{theirs}.to_{n}.{p}" for n in "qkv"]
                missing = [name for name in parts if name not in tensors]
                if missing:
                    raise CheckpointError(f"{where}: missing {missing[0]}; not a complete UNet2DModel")
                used.update(parts)
                joined = torch.cat([tensors[name] for name in parts])
                out[f"{ours}.qkv.{p}"] = joined[..., None] if p == "weight" else joined
    stray = sorted(set(tensors) - used)
    if stray:
        raise CheckpointError(f"{where}: {len(stray)} tensors this UNet2DModel reader does not know (e.g. {stray[0]})")
    return out


def adm_to_unet(state_dict: Dict[str, torch.Tensor], config: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The inverse of ``unet_to_adm`` for a full-width network (``config`` is the UNet2DModel's)."""
    out: Dict[str, torch.Tensor] = {}
    for theirs, ours, kind in _unet_modules(config):
        if kind == "plain":
            pairs = [("", "", False)]
        elif kind == "res":
            pairs = [(f".{a}", f".{b}", False) for a, b in _RES_PAIRS]
        else:
            pairs = [(f".{a}", f".{b}", conv1d) for a, b, conv1d in _ATTN_PAIRS]
            for p in ("weight", "bias"):
                joined = state_dict[f"{ours}.qkv.{p}"]
                for n, part in zip("qkv", joined.chunk(3)):
                    out[f"{theirs}.to_{n}.{p}"] = (part[..., 0] if p == "weight" else part).contiguous()
        for a, b, conv1d in pairs:
            for p in ("weight", "bias"):
                if f"{ours}{b}.{p}" in state_dict:
                    value = state_dict[f"{ours}{b}.{p}"]
                    out[f"{theirs}{a}.{p}"] = value[..., 0] if conv1d and p == "weight" else value
    return out


def _unet_args(config: Dict[str, Any], folder: Path, scheduler: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    widths = config["block_out_channels"]
    size = square(config.get("sample_size"), "sample_size", str(folder))
    args: Dict[str, Any] = {
        "model": "DDPM-UNet2DModel",
        "family": "adm",
        "define_the_model": True,
        "attention_order": "new",  # to_q, to_k, to_v stack as [q of all heads | k | v]
        "image_size": size,
        "time_frequency_shift": int(config.get("freq_shift", 0)),
        "time_sin_first": not bool(config.get("flip_sin_to_cos", True)),
        "norm_eps": float(config.get("norm_eps", 1e-5)),
        "downsample_padding": int(config.get("downsample_padding", 1)),
    }
    head_dim = config.get("attention_head_dim", 8)  # UNet2DModel's default when the key is absent
    if head_dim:
        args["num_head_channels"] = int(head_dim)
    else:  # diffusers: one head as wide as the block
        args["num_heads"] = 1
    if config.get("num_class_embeds"):
        args["num_classes"] = int(config["num_class_embeds"])
    if scheduler is not None:
        args["beta_schedule"] = scheduler["beta_schedule"]
    if widths[0] % 32:
        raise CheckpointError(f"{folder}: UNet2DModel widths {widths} do not split into 32 GroupNorm groups")
    return args


def model_config(config: Dict[str, Any], what: str) -> Dict[str, Any]:
    """The UNet2DModel config that computes an ADM expert of ``config``, or CheckpointError naming
    what diffusers' class cannot hold. The inverse of ``_unet_args``."""
    c = complete_config(config)
    lay = layout(c)
    if any(g != NORM_GROUPS for g in c["res_groups"]) or list(c["attn_heads"]) != [l.heads for l in lay.attn()]:
        raise CheckpointError(f"{what} is width-pruned ({c['inner_groups']} of {NORM_GROUPS * len(c['res_groups'])} "
                              f"ResBlock groups, {c['attention_heads']} of {sum(l.heads for l in lay.attn())} heads); "
                              "diffusers' UNet2DModel has no per-block inner widths, so it cannot hold this expert; "
                              f"{INSTEAD}, or convert with --experts lora or a budget of Kx for full-width experts")
    unsupported = [(c["resblock_updown"], "resampling ResBlocks (resblock_updown)"),
                   (c["use_scale_shift_norm"], "scale-shift ResBlocks (use_scale_shift_norm)"),
                   (not c["conv_resample"], "resampling without convolutions (conv_resample off)"),
                   (c["channel_mult"][0] != 1, f"a first width of {c['channel_mult'][0]} x model_channels "
                                               "(UNet2DModel sizes its time embedding by the first width)")]
    heads = None
    if c["num_head_channels"] > 0:
        heads = c["num_head_channels"]
    elif c["num_heads"] != 1 or c["num_heads_upsample"] not in (-1, 1):
        # one head as wide as each block is the only fixed head count UNet2DModel has
        unsupported.append((True, f"{c['num_heads']} heads per block (only fixed head widths, or one head)"))
    found = [name for flag, name in unsupported if flag]
    if found:
        raise CheckpointError(f"{what} has {found[0]}, which diffusers' UNet2DModel cannot compute; {INSTEAD}")
    levels = len(c["channel_mult"])
    attention = [2 ** level in c["attention_ds"] for level in range(levels)]
    return {
        "_class_name": "UNet2DModel", "sample_size": c["image_size"], "in_channels": c["in_channels"],
        "out_channels": c["out_channels"], "center_input_sample": False, "time_embedding_type": "positional",
        "time_embedding_dim": None, "freq_shift": c["time_frequency_shift"], "flip_sin_to_cos": not c["time_sin_first"],
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "block_out_channels": [int(m * c["model_channels"]) for m in c["channel_mult"]],
        "layers_per_block": c["num_res_blocks"], "mid_block_scale_factor": 1,
        "downsample_padding": c["downsample_padding"], "downsample_type": "conv", "upsample_type": "conv",
        "dropout": 0.0, "act_fn": "silu", "attention_head_dim": heads, "norm_num_groups": NORM_GROUPS,
        "attn_norm_num_groups": None, "norm_eps": c["norm_eps"], "resnet_time_scale_shift": "default",
        "add_attention": True, "class_embed_type": None, "num_class_embeds": c["num_classes"] or None,
        "num_train_timesteps": None,
    }


def _legacy_qkv_to_new(state_dict: Dict[str, torch.Tensor], config: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """guided-diffusion's legacy qkv rows ([q_h, k_h, v_h] per head) in the [q | k | v] order that
    diffusers' to_q/to_k/to_v split: a permutation of rows, so the function is unchanged."""
    c = complete_config(config)
    out = dict(state_dict)
    for layer in layout(c).attn():
        heads = c["attn_heads"][layer.index]
        for p in ("weight", "bias"):
            key = f"{layer.path}.qkv.{p}"
            value = state_dict[key]
            rows = value.reshape(heads, 3, layer.head_dim, *value.shape[1:]).transpose(0, 1)
            out[key] = rows.reshape(value.shape).contiguous()
    return out


def expert_tensors(config: Dict[str, Any], model_config: Dict[str, Any],
                   state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The expert's tensors under diffusers' names, for the model ``model_config`` gave."""
    if config.get("attention_order", "legacy") == "legacy":
        state_dict = _legacy_qkv_to_new(state_dict, config)
    return adm_to_unet(state_dict, model_config)


class Denoiser(_Denoiser):
    """As ``DDPMPipeline`` and ``DDIMPipeline`` call their UNet2DModel."""

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        out = self._denoise(sample, timestep, class_labels)
        if not return_dict:
            return (out,)
        # diffusers is optional: a pipeline calling this has it, nothing else needs it
        from diffusers.models.unets.unet_2d import UNet2DOutput

        return UNet2DOutput(sample=out)
