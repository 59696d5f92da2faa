"""SiT and DiT: one latent diffusion transformer, two time conventions.

The network is key-compatible with the official ``models.py`` of both projects (same module names,
timm layers, frozen ``pos_embed`` parameter, adaLN chunks ordered shift/scale/gate for attention then
for the MLP). The two families differ only at the border:

* SiT takes ``tau = 1 - t`` (``tau = 1`` is data) and predicts the velocity ``d x / d tau`` of the
  Linear or GVP path; its ``forward`` drops the variance half of a learn-sigma head.
* DiT takes a DDPM step ``n = t * 999`` (float accepted) and returns noise and variance channels.

Widths may differ from the published ones after pruning: the attention inner width is
``num_heads * head_dim`` (head_dim kept), the MLP hidden width is free, and the residual width is free.
"""

from __future__ import annotations

import math
import re
from typing import Any, Dict, List

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import Mlp, PatchEmbed
from timm.models.vision_transformer import Attention

from cbs_convert.errors import CheckpointError, WarningNote
from cbs_convert.families.base import (
    Family,
    NoisePredictionDDPM,
    UnitGroup,
    WidthKnob,
    broadcast_to,
    check_keys,
    schedule_and_derivative,
    setting,
)

# Published hidden width -> head count (SiT/DiT S, B, L, XL). Head count is invisible in the weights.
PUBLISHED_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}
PUBLISHED_SIZES = {(28, 1152): "xl", (24, 1024): "l", (12, 768): "b", (12, 384): "s"}
#: 1000 ImageNet classes and the null row of classifier-free guidance
PUBLISHED_LABEL_ROWS = 1001
#: the SD VAE the published models work in: an image of 8x the latent's side
LATENT_DOWNSAMPLING = 8
#: its latent channels, and the factor the models' training latents were multiplied by
VAE_CHANNELS = 4
VAE_SCALE = 0.18215


def _published_name(model_name):
    """(size, patch) of a published model name such as "SiT-XL/2" or "DiT-B/4"; None otherwise."""
    if not model_name:
        return None
    match = re.fullmatch(r"\s*(?:SiT|DiT)-(S|B|L|XL)/(\d+)\s*", str(model_name), flags=re.IGNORECASE)
    return (match.group(1).lower(), int(match.group(2))) if match else None
FREQUENCY_EMBEDDING_SIZE = 256
#: The reference forward_with_cfg guides only the first three channels (a quirk kept for fidelity).
REFERENCE_GUIDED_CHANNELS = 3


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#: the two places where diffusers' DiT computes differently from the official code (see diffusers_io)
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
            TransformerBlock(hidden, c["num_heads"], c["head_dim"], c["mlp_hidden"], numerics["mlp_norm_eps"])
            for _ in range(c["depth"])
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


# ---------------------------------------------------------------------------------------------


class TransformerFamily(Family):
    """Architecture, counting and surgery shared by SiT and DiT."""

    drop_variance = False
    # every block's attention and MLP linears and the adaLN modulations (the blocks' and the final
    # layer's: where time enters); the embedders and the output projection stay shared
    delta_layers = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")
    feature_channel_dim = -1  # tokens x channels

    def feature_taps(self, config):
        return [f"blocks.{i}" for i in range(config["depth"])]

    def feature_channels(self, kept):
        return kept["residual"]  # the residual stream keeps a subset of the teacher's channels

    def removable_blocks(self, config):
        return [f"blocks.{i}" for i in range(config["depth"])]

    def with_depth(self, config, depth):
        return {**config, "depth": int(depth)}

    def keep_blocks(self, state_dict, config, kept):
        # every block reads and writes the residual stream at one width, so any subset, renumbered
        # in order, is a network of the same family: a plain checkpoint of a shallower SiT or DiT
        kept = sorted(int(i) for i in kept)
        renumbered = {f"blocks.{old}.": f"blocks.{new}." for new, old in enumerate(kept)}
        out = {}
        for key, value in state_dict.items():
            if not key.startswith("blocks."):
                out[key] = value
                continue
            prefix = key[: key.index(".", len("blocks.")) + 1]
            if prefix in renumbered:
                out[renumbered[prefix] + key[len(prefix):]] = value
        return out, self.with_depth(config, len(kept))

    @classmethod
    def matches(cls, state_dict):
        return "x_embedder.proj.weight" in state_dict and "blocks.0.attn.qkv.weight" in state_dict

    @classmethod
    def config_from_state_dict(cls, state_dict, hints):
        notes: List[str] = []
        for key in ("x_embedder.proj.weight", "pos_embed", "final_layer.linear.weight", "t_embedder.mlp.0.weight"):
            if key not in state_dict:
                raise CheckpointError(f"not a {cls.name.upper()} state dict: missing key {key}")
        hidden, in_channels, patch, patch_w = state_dict["x_embedder.proj.weight"].shape
        tokens = state_dict["pos_embed"].shape[1]
        grid = int(round(tokens ** 0.5))
        if grid * grid != tokens:
            raise CheckpointError(f"pos_embed has {tokens} tokens, not a square grid; only square inputs are supported")
        depth = len({m.group(1) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.attn\.qkv\.weight$", k))})
        if depth == 0:
            raise CheckpointError("no transformer blocks found (blocks.0.attn.qkv.weight missing)")
        attn_dim = state_dict["blocks.0.attn.qkv.weight"].shape[0] // 3
        mlp_hidden = state_dict["blocks.0.mlp.fc1.weight"].shape[0] if "blocks.0.mlp.fc1.weight" in state_dict else 0
        named = _published_name(hints.get("args_model"))
        if named is not None:
            size, named_patch = named
            named_depth, named_hidden = next(k for k, v in PUBLISHED_SIZES.items() if v == size)
            if (named_depth, named_hidden, named_patch) != (depth, hidden, patch):
                raise CheckpointError(
                    f"the checkpoint's args name {hints['args_model']} (depth {named_depth}, width {named_hidden}, "
                    f"patch {named_patch}) but its weights have depth {depth}, width {hidden}, patch {patch}: the args "
                    "belong to another model; re-save the weights without them (e.g. as safetensors)"
                )
        heads, origin = setting(hints, "num_heads")
        if heads is not None:
            heads = int(heads)
            published_heads = PUBLISHED_HEADS.get(hidden) if named is not None else None
            if origin == "checkpoint args" and published_heads is not None and heads != published_heads:
                raise CheckpointError(
                    f"the checkpoint's args give {heads} attention heads, but {hints['args_model']} has "
                    f"{published_heads}; pass --num-heads to say which is right"
                )
            if origin in ("given", "model config"):
                notes.append(f"{heads} attention heads ({origin})")
            elif published_heads is not None:
                notes.append(f"{heads} attention heads (checkpoint args, as published for {hints['args_model']})")
            else:
                notes.append(WarningNote(
                    f"{heads} attention heads taken from the checkpoint's args, which the weights cannot confirm "
                    f"(a head count does not show in tensor shapes); --num-heads overrides"
                ))
        elif attn_dim == hidden and hidden in PUBLISHED_HEADS:
            heads = PUBLISHED_HEADS[hidden]
            notes.append(f"{heads} attention heads (published head count for width {hidden})")
        else:
            raise CheckpointError(
                f"cannot infer the attention head count for width {hidden} from the weights; pass --num-heads N"
            )
        if attn_dim % heads:
            raise CheckpointError(f"attention width {attn_dim} is not divisible by {heads} heads; check --num-heads")
        out_features = state_dict["final_layer.linear.weight"].shape[0]
        out_channels = out_features // (patch * patch)
        if out_channels == 2 * in_channels:
            learn_sigma = True
        elif out_channels == in_channels:
            learn_sigma = False
        else:
            raise CheckpointError(
                f"final_layer.linear.weight has {out_features} rows: not {in_channels} or {2 * in_channels} "
                f"channels of patch {patch}x{patch}"
            )
        table = state_dict.get("y_embedder.embedding_table.weight")
        rows = 0 if table is None else table.shape[0]
        num_classes, class_note = cls._read_classes(rows, hints)
        notes.append(class_note)
        image_size, origin = setting(hints, "image_size")
        if origin == "checkpoint args" and int(image_size) not in (grid * patch, LATENT_DOWNSAMPLING * grid * patch):
            raise CheckpointError(
                f"the checkpoint's args give image size {image_size}, but pos_embed holds a {grid * patch}x{grid * patch} "
                f"input (an image of {LATENT_DOWNSAMPLING * grid * patch} through the VAE); the args belong to another model"
            )
        learn_sigma_arg, origin = setting(hints, "learn_sigma")
        config = {
            "input_size": grid * patch,
            "patch_size": patch,
            "in_channels": in_channels,
            "hidden_size": hidden,
            "depth": depth,
            "num_heads": heads,
            "head_dim": attn_dim // heads,
            "mlp_hidden": mlp_hidden,
            "num_classes": num_classes,
            "label_rows": rows,
            "class_dropout_prob": 0.1 if rows == num_classes + 1 and rows else 0.0,
            "learn_sigma": learn_sigma,
        }
        if learn_sigma_arg is not None and bool(learn_sigma_arg) != learn_sigma:
            raise CheckpointError(
                f"the checkpoint's args say learn_sigma={learn_sigma_arg}, but the final layer has "
                f"{out_channels} channels for {in_channels} inputs (learn_sigma={learn_sigma}); the args belong to another model"
            )
        numerics = str(hints.get("args_numerics") or "official")
        if numerics not in NUMERICS:
            raise CheckpointError(f"the checkpoint's args say numerics={numerics!r}; known: {', '.join(NUMERICS)}")
        if numerics != "official":
            config["numerics"] = numerics
            notes.append(f"{numerics} numerics (timestep frequencies and MLP norm as its code computes them)")
        config.update(cls.time_config(hints, notes))
        check_keys(state_dict, cls.expected_shapes(config), f"{cls.name.upper()} checkpoint does not match its own widths")
        return config, notes

    @classmethod
    def _read_classes(cls, rows: int, hints) -> "tuple[int, str]":
        """Real classes in a label table of ``rows`` rows, and how that was decided.

        The reference LabelEmbedder adds a null row for guidance only when it trains with label
        dropout, so N classes give N + 1 rows or N rows. The file decides where it can (the
        classes or the dropout in its args, or the flag); 1001 rows are the published ImageNet
        models. Anything else is an assumption, and said to be one.
        """
        if rows == 0:
            return 0, "unconditional"
        classes, origin = setting(hints, "num_classes")
        dropout = hints.get("args_class_dropout_prob")
        if classes is not None:
            classes = int(classes)
            if rows not in (classes, classes + 1):
                flag = "--num-classes" if origin == "given" else "the checkpoint's args (num_classes)"
                raise CheckpointError(f"{flag} says {classes} classes, but the label table has {rows} rows "
                                      f"(it holds {classes} or {classes + 1} with a null row); fix {flag}")
            how = origin
        elif dropout is not None:
            classes = rows - 1 if float(dropout) > 0 else rows
            how = f"checkpoint args: class_dropout_prob={dropout}"
        elif rows == PUBLISHED_LABEL_ROWS:
            classes, how = rows - 1, "the published ImageNet layout"
        else:
            classes = rows - 1
            return classes, WarningNote(
                f"label table of {rows} rows read as {classes} classes + a null row for guidance: the file does not "
                f"say (the reference code has no null row when trained without label dropout); pass --num-classes {rows} "
                "if every row is a class"
            )
        null = rows == classes + 1
        return classes, f"{classes} classes" + (" + null row for guidance" if null else " (no null row: no guidance)") + f" ({how})"

    @classmethod
    def time_config(cls, hints, notes) -> Dict[str, Any]:
        return {}

    @classmethod
    def expected_shapes(cls, config):
        with torch.device("meta"):
            model = cls.build(config)
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}

    @classmethod
    def build(cls, config):
        return DiffusionTransformer(config, drop_variance=cls.drop_variance)

    def describe(self, config):
        size = PUBLISHED_SIZES.get((config["depth"], config["hidden_size"]))
        tag = f"{self.name.upper()}-{size.upper()}/{config['patch_size']}" if size else f"{self.name.upper()} (custom)"
        return (
            f"{tag}: depth {config['depth']}, width {config['hidden_size']}, {config['num_heads']}x{config['head_dim']} "
            f"heads, mlp {config['mlp_hidden']}, {config['input_size']}px latents of {config['in_channels']} channels"
        )

    def nonofficial_numerics(self, config):
        numerics = config.get("numerics", "official")
        return {} if numerics == "official" else {"numerics": numerics}

    def saved_args(self, config):
        args = {"model": f"{self.name.upper()}-pruned", "num_heads": config["num_heads"]}
        if config["label_rows"]:
            args.update(num_classes=config["num_classes"], class_dropout_prob=config["class_dropout_prob"])
        if config.get("numerics", "official") != "official":
            args["numerics"] = config["numerics"]
        args.update(self._time_args())
        return args

    def _time_args(self):
        return {}

    def recipe_name(self, config):
        size = PUBLISHED_SIZES.get((config["depth"], config["hidden_size"]))
        if size is None or config["num_heads"] != PUBLISHED_HEADS[config["hidden_size"]]:
            return None
        return f"{self.name}_{size}_{config['patch_size']}"

    def sample_shape(self, config):
        return (config["in_channels"], config["input_size"], config["input_size"])

    def data_space(self, config):
        # the published models and anything trained like them work in SD-VAE latents; a model of
        # 1 or 3 channels (the bundled teachers) works on pixels directly
        return "latents" if config["in_channels"] == VAE_CHANNELS else "pixels"

    latent_scale = VAE_SCALE

    def num_classes(self, config):
        return config["num_classes"] if config["label_rows"] else 0

    def null_label(self, config):
        return config["num_classes"] if config["label_rows"] == config["num_classes"] + 1 else None

    def param_count(self, config):
        d, a, m = config["hidden_size"], config["num_heads"] * config["head_dim"], config["mlp_hidden"]
        p, cin = config["patch_size"], config["in_channels"]
        cout = cin * (2 if config["learn_sigma"] else 1)
        tokens = (config["input_size"] // p) ** 2
        block = (d * 3 * a + 3 * a) + (a * d + d) + (d * m + m) + (m * d + d) + (d * 6 * d + 6 * d)
        embed = tokens * d + (p * p * cin * d + d) + (FREQUENCY_EMBEDDING_SIZE * d + d + d * d + d)
        embed += config["label_rows"] * d
        final = (d * p * p * cout + p * p * cout) + (d * 2 * d + 2 * d)
        return config["depth"] * block + embed + final

    def forward_flops(self, config):
        d, a, m = config["hidden_size"], config["num_heads"] * config["head_dim"], config["mlp_hidden"]
        p, cin = config["patch_size"], config["in_channels"]
        cout = cin * (2 if config["learn_sigma"] else 1)
        n = (config["input_size"] // p) ** 2
        per_block = n * (d * 3 * a + a * d + 2 * d * m) + 2 * n * n * a + d * 6 * d
        macs = config["depth"] * per_block + n * p * p * cin * d + n * d * p * p * cout + d * 2 * d
        macs += FREQUENCY_EMBEDDING_SIZE * d + d * d
        return 2 * macs

    def guided_forward(self, forward, x, native_t, y, cfg_scale):
        return reference_guidance(forward, x, native_t, y, cfg_scale)

    # -- surgery --------------------------------------------------------------------------------
    def width_knobs(self, config):
        def multiple(full):
            return 8 if full >= 256 else 1

        return [
            WidthKnob("num_heads", config["num_heads"], 1),
            WidthKnob("hidden_size", config["hidden_size"], min(8, config["hidden_size"]), multiple(config["hidden_size"])),
            WidthKnob("mlp_hidden", config["mlp_hidden"], 1, multiple(config["mlp_hidden"])),
        ]

    def with_widths(self, config, widths):
        out = dict(config)
        out.update({k: int(v) for k, v in widths.items()})
        return out

    def unit_groups(self, source, target):
        depth = source["depth"]
        adaln = tuple(f"blocks.{i}.adaLN_modulation.1" for i in range(depth)) + ("final_layer.adaLN_modulation.1",)
        residual_readers = tuple(
            name for i in range(depth) for name in (f"blocks.{i}.attn.qkv", f"blocks.{i}.mlp.fc1")
        ) + ("final_layer.linear",)
        d, d_new = source["hidden_size"], target["hidden_size"]
        # The residual stream, the conditioning vector c and the timestep MLP's inner layer are three
        # different spaces that merely share one width; each gets its own choice of kept channels.
        groups = [
            UnitGroup("residual", d, d_new, residual_readers),
            UnitGroup("condition", d, d_new, adaln),
            UnitGroup("timestep_hidden", d, d_new, ("t_embedder.mlp.2",)),
        ]
        for i in range(depth):
            groups.append(
                UnitGroup(f"heads.{i}", source["num_heads"], target["num_heads"], (f"blocks.{i}.attn.proj",), source["head_dim"])
            )
            groups.append(UnitGroup(f"mlp.{i}", source["mlp_hidden"], target["mlp_hidden"], (f"blocks.{i}.mlp.fc2",)))
        return groups

    def slice_state_dict(self, state_dict, source, kept):
        sd = dict(state_dict)
        d, hd = source["hidden_size"], source["head_dim"]
        attn = source["num_heads"] * hd
        r, c, h = kept["residual"], kept["condition"], kept["timestep_hidden"]

        def chunks(index, width, n):
            return torch.cat([j * width + index for j in range(n)])

        sd["pos_embed"] = sd["pos_embed"][:, :, r]
        sd["x_embedder.proj.weight"] = sd["x_embedder.proj.weight"][r]
        sd["x_embedder.proj.bias"] = sd["x_embedder.proj.bias"][r]
        sd["t_embedder.mlp.0.weight"] = sd["t_embedder.mlp.0.weight"][h]
        sd["t_embedder.mlp.0.bias"] = sd["t_embedder.mlp.0.bias"][h]
        sd["t_embedder.mlp.2.weight"] = sd["t_embedder.mlp.2.weight"][c][:, h]
        sd["t_embedder.mlp.2.bias"] = sd["t_embedder.mlp.2.bias"][c]
        if "y_embedder.embedding_table.weight" in sd:
            sd["y_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"][:, c]
        for i in range(source["depth"]):
            b = f"blocks.{i}."
            heads = kept[f"heads.{i}"]
            channels = (heads[:, None] * hd + torch.arange(hd)).reshape(-1)
            qkv_rows = chunks(channels, attn, 3)
            sd[b + "attn.qkv.weight"] = sd[b + "attn.qkv.weight"][qkv_rows][:, r]
            sd[b + "attn.qkv.bias"] = sd[b + "attn.qkv.bias"][qkv_rows]
            sd[b + "attn.proj.weight"] = sd[b + "attn.proj.weight"][r][:, channels]
            sd[b + "attn.proj.bias"] = sd[b + "attn.proj.bias"][r]
            m = kept[f"mlp.{i}"]
            sd[b + "mlp.fc1.weight"] = sd[b + "mlp.fc1.weight"][m][:, r]
            sd[b + "mlp.fc1.bias"] = sd[b + "mlp.fc1.bias"][m]
            sd[b + "mlp.fc2.weight"] = sd[b + "mlp.fc2.weight"][r][:, m]
            sd[b + "mlp.fc2.bias"] = sd[b + "mlp.fc2.bias"][r]
            rows = chunks(r, d, 6)
            sd[b + "adaLN_modulation.1.weight"] = sd[b + "adaLN_modulation.1.weight"][rows][:, c]
            sd[b + "adaLN_modulation.1.bias"] = sd[b + "adaLN_modulation.1.bias"][rows]
        sd["final_layer.linear.weight"] = sd["final_layer.linear.weight"][:, r]
        rows = chunks(r, d, 2)
        sd["final_layer.adaLN_modulation.1.weight"] = sd["final_layer.adaLN_modulation.1.weight"][rows][:, c]
        sd["final_layer.adaLN_modulation.1.bias"] = sd["final_layer.adaLN_modulation.1.bias"][rows]
        return {k: v.contiguous() for k, v in sd.items()}


class SiTFamily(TransformerFamily):
    """SiT: velocity prediction on the Linear or GVP interpolant, native time tau = 1 - t."""

    name = "sit"
    native_time_name = "t"
    drop_variance = True

    @classmethod
    def time_config(cls, hints, notes):
        path = (hints.get("path") or "linear").lower()
        if path not in ("linear", "gvp"):
            raise CheckpointError(f"SiT path {path!r} is not supported; use --path linear or --path gvp")
        notes.append(f"SiT {path} path, velocity prediction" + ("" if hints.get("path") else " (default; --path to change)"))
        return {"path": path}

    def _time_args(self):
        return {"path_type": self.config["path"].upper() if self.config["path"] == "gvp" else "Linear"}

    def schedule(self, t):
        if self.config["path"] == "linear":
            return 1 - t, t
        tau = 1 - t
        return torch.sin(tau * math.pi / 2), torch.cos(tau * math.pi / 2)

    def native_time(self, t):
        return 1 - t

    def canonical_time(self, native):
        return 1 - (native if native.is_floating_point() else native.float())

    def velocity_from_native(self, native_out, x, t):
        # SiT's velocity is d/dtau with tau = 1 - t, so the canonical one is its negative.
        return -native_out[:, : x.shape[1]]

    def data_loss(self, model, x0, y, t, noise, teacher_out=None, prediction=None):
        alpha, sigma, d_alpha, d_sigma = schedule_and_derivative(self.schedule, t)
        x_t = broadcast_to(alpha, x0) * x0 + broadcast_to(sigma, x0) * noise
        target = broadcast_to(d_alpha, x0) * x0 + broadcast_to(d_sigma, x0) * noise
        if prediction is None:
            prediction = model(x_t, self.native_time(t), y)
        return F.mse_loss(self.velocity_from_native(prediction, x_t, t), target)


class DiTFamily(NoisePredictionDDPM, TransformerFamily):
    """DiT: noise (and variance) prediction on a 1000-step DDPM, linear betas by default."""

    name = "dit"
    native_time_name = "timesteps"

    @classmethod
    def time_config(cls, hints, notes):
        schedule, origin = setting(hints, "beta_schedule")
        schedule = str(schedule or "linear").lower()
        if schedule not in ("linear", "cosine"):
            raise CheckpointError(f"beta schedule {schedule!r} is not supported; use linear or cosine")
        notes.append(f"DiT {schedule} beta schedule, 1000 steps, noise prediction ({origin or 'default'})")
        return {"beta_schedule": schedule, "diffusion_steps": 1000}

    def _time_args(self):
        return {"beta_schedule": self.config["beta_schedule"]}
