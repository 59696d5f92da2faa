"""The SiT/DiT network: one latent diffusion transformer, run by two families (see sit.py).

The network is key-compatible with the official ``models.py`` of both projects (same module names,
timm layers, frozen ``pos_embed`` parameter, adaLN chunks ordered shift/scale/gate for attention then
for the MLP). Widths may differ from the published ones after pruning: the attention inner width is
``num_heads * head_dim`` (head_dim kept), the MLP hidden width is free, and the residual width is free.
Per-block widths (``block_heads``, ``block_mlp``) let each block keep its own heads and MLP width.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Tuple

import torch
from torch import nn
from timm.layers import Mlp, PatchEmbed
from timm.models.vision_transformer import Attention

FREQUENCY_EMBEDDING_SIZE = 256
#: The reference forward_with_cfg guides only the first three channels (a quirk kept for fidelity).
REFERENCE_GUIDED_CHANNELS = 3


#: the config entries of per-block widths (``--structure blockwise``): one value per block; absent,
#: every block has ``num_heads`` heads and an MLP of ``mlp_hidden``, as the official models do
BLOCK_WIDTH_KEYS = {"num_heads": "block_heads", "mlp_hidden": "block_mlp"}


def block_widths(config: Dict[str, Any]) -> List[Tuple[int, int]]:
    """(heads, MLP hidden width) of every block, in order."""
    heads = config.get("block_heads") or [config["num_heads"]] * config["depth"]
    mlp = config.get("block_mlp") or [config["mlp_hidden"]] * config["depth"]
    return [(int(h), int(m)) for h, m in zip(heads, mlp)]


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#: the two places where diffusers' DiT computes differently from the official code (see diffusers_dit.py)
NUMERICS = {
    "official": {"frequency_shift": 0, "mlp_norm_eps": 1e-6},
    "diffusers": {"frequency_shift": 1, "mlp_norm_eps": 1e-5},
}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, frequency_shift: int = 0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - frequency_shift))
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = FREQUENCY_EMBEDDING_SIZE, frequency_shift: int = 0):
        super().__init__()
        self.frequency_shift = frequency_shift
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t):
        freq = timestep_embedding(t, self.frequency_embedding_size, frequency_shift=self.frequency_shift)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class table with an extra null row when classifier-free guidance was trained."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float, table_rows: int):
        super().__init__()
        self.embedding_table = nn.Embedding(table_rows, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels):
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class TransformerBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, mlp_hidden: int, mlp_norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, attn_head_dim=head_dim, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp = Mlp(hidden_size, hidden_features=mlp_hidden, act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def sincos_pos_embed(dim: int, grid_size: int) -> torch.Tensor:
    """MAE-style 2-D sin/cos table; the checkpoint's own table overrides it on load."""
    if dim % 4:
        return torch.zeros(grid_size * grid_size, dim)
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")

    def one_axis(pos):
        omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([one_axis(grid_w), one_axis(grid_h)], dim=1).float()


class DiffusionTransformer(nn.Module):
    """The SiT/DiT network. ``drop_variance`` reproduces SiT's forward, which returns only the mean."""

    def __init__(self, config: Dict[str, Any], drop_variance: bool):
        super().__init__()
        c = config
        self.config = dict(c)
        self.in_channels = c["in_channels"]
        self.out_channels = c["in_channels"] * (2 if c["learn_sigma"] else 1)
        self.learn_sigma = c["learn_sigma"]
        self.patch_size = c["patch_size"]
        self.input_size = c["input_size"]
        self.num_classes = c["num_classes"]
        self.drop_variance = drop_variance
        hidden = c["hidden_size"]
        self.x_embedder = PatchEmbed(c["input_size"], c["patch_size"], c["in_channels"], hidden, bias=True)
        numerics = NUMERICS[c.get("numerics", "official")]
        self.t_embedder = TimestepEmbedder(hidden, frequency_shift=numerics["frequency_shift"])
        if c["label_rows"] > 0:
            self.y_embedder = LabelEmbedder(c["num_classes"], hidden, c["class_dropout_prob"], c["label_rows"])
        else:
            self.y_embedder = None
        grid = c["input_size"] // c["patch_size"]
        self.pos_embed = nn.Parameter(sincos_pos_embed(hidden, grid).unsqueeze(0), requires_grad=False)
        self.blocks = nn.ModuleList(
            TransformerBlock(hidden, heads, c["head_dim"], mlp, numerics["mlp_norm_eps"]) for heads, mlp in block_widths(c)
        )
        self.final_layer = FinalLayer(hidden, c["patch_size"], self.out_channels)
        self._init_weights()

    def _init_weights(self):
        # Not the zero-init of training from scratch: a freshly built model must compute something
        # non-trivial (tests build random models); checkpoints overwrite all of this anyway.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.normal_(module.bias, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)

    def unpatchify(self, x):
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y=None):
        x = self.x_embedder(x) + self.pos_embed
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            if y is None:
                raise ValueError("this model is class-conditional: pass labels y")
            c = c + self.y_embedder(y)
        for block in self.blocks:
            x = block(x, c)
        x = self.unpatchify(self.final_layer(x, c))
        if self.drop_variance and self.learn_sigma:
            x = x[:, : self.in_channels]
        return x

    def forward_with_cfg(self, x, t, y, cfg_scale):
        return reference_guidance(self.forward, x, t, y, cfg_scale)


def reference_guidance(forward, x, t, y, cfg_scale):
    """The official forward_with_cfg: the batch is [cond; uncond], the first half's x is used twice."""
    half = x[: len(x) // 2]
    out = forward(torch.cat([half, half], dim=0), t, y)
    guided, rest = out[:, :REFERENCE_GUIDED_CHANNELS], out[:, REFERENCE_GUIDED_CHANNELS:]
    cond, uncond = torch.split(guided, len(guided) // 2, dim=0)
    half_guided = uncond + cfg_scale * (cond - uncond)
    return torch.cat([torch.cat([half_guided, half_guided], dim=0), rest], dim=1)


def initialize_for_training(model: DiffusionTransformer) -> None:
    """DiT's zero-init of adaLN and output layers, for training a model from scratch."""
    for block in model.blocks:
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)
    for layer in (model.final_layer.adaLN_modulation[-1], model.final_layer.linear):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
