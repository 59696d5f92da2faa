"""ADM's network: guided-diffusion's ``UNetModel`` (2-D), with per-block inner widths and head
counts for pruning.

Key-compatible with guided-diffusion's state dicts (module names, GroupNorm32, 1-D convolutions for
qkv/proj_out, ``Dropout`` kept as an index in ``out_layers``).
"""

from __future__ import annotations

from typing import Any, Dict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cbs_convert.families.adm_layout import NORM_GROUPS, Layer, complete_config, inner_width, layout, validate
from cbs_convert.families.transformer_net import timestep_embedding


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
        inner = inner_width(layer, inner_groups)
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
        validate(c, lay)
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
