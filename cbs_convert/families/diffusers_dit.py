"""DiT's counterpart in diffusers: its DiT layout in and out, and the denoiser ``DiTPipeline`` calls.

A diffusers DiT (``DiTTransformer2DModel``, or the older ``Transformer2DModel`` with
``norm_type: ada_norm_zero`` that ``facebook/DiT-XL-2-256`` ships) holds the official DiT's weights
under other names:

* every block carries its own copy of the timestep and label embedders (``norm1.emb``), which the
  official model holds once; the last layer is conditioned through block 0's copy;
* q, k and v are three matrices instead of one ``qkv``;
* the sin/cos position table is not stored.

Its numerics differ in two small places from the official code: the timestep frequencies are
``exp(-log(10^4) i / (half - 1))`` where the official ones divide by ``half``, and the LayerNorm
before the MLP has eps 1e-5, not 1e-6. The transformer family reproduces either when its config
says ``numerics: diffusers``, so a diffusers DiT converts exactly; the weights themselves are mapped
here, at the border, and nowhere else.

Every part this module has is named in ``families/diffusers.py``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from cbs_convert.errors import CheckpointError
from cbs_convert.families.diffusers import INSTEAD, Denoiser as _Denoiser, positive, square
from cbs_convert.families.transformer_net import BLOCK_WIDTH_KEYS, sincos_pos_embed

CLASS_NAMES = ("DiTTransformer2DModel", "Transformer2DModel")
#: the class an expert is written as, and checked with
MODEL_CLASS = "DiTTransformer2DModel"
#: how a refusal of another class names these
SUPPORTED = "DiTTransformer2DModel, Transformer2DModel (DiT layout)"
#: DiTPipeline hands its scheduler only the noise channels
PIPELINE_SENDS_VARIANCE = False
EMBEDDER = "transformer_blocks.{i}.norm1.emb."

# official name <-> diffusers name, per block and for the layers outside the blocks
_BLOCK_PAIRS = [
    ("adaLN_modulation.1.{p}", "norm1.linear.{p}"),
    ("attn.proj.{p}", "attn1.to_out.0.{p}"),
    ("mlp.fc1.{p}", "ff.net.0.proj.{p}"),
    ("mlp.fc2.{p}", "ff.net.2.{p}"),
]
_OUTER_PAIRS = [
    ("x_embedder.proj.{p}", "pos_embed.proj.{p}"),
    ("final_layer.adaLN_modulation.1.{p}", "proj_out_1.{p}"),
    ("final_layer.linear.{p}", "proj_out_2.{p}"),
]
_EMBEDDER_PAIRS = [
    ("t_embedder.mlp.0.{p}", "timestep_embedder.linear_1.{p}"),
    ("t_embedder.mlp.2.{p}", "timestep_embedder.linear_2.{p}"),
]
_LABELS = ("y_embedder.embedding_table.weight", "class_embedder.embedding_table.weight")
# Training in diffusers updates each block's copy of the embedders apart; the DiT family has one
# shared embedder, so such a model would convert only by changing its function.
_PER_BLOCK = ("block {i}'s {what} differs from block 0's: a DiT trained in diffusers, with its own embedders in every "
              "block, is not supported (only one shared copy, as in the official DiT and its diffusers conversion, is)")


#: the constructor defaults of the DiT classes read, for keys a hand-written config leaves out
DIT_DEFAULTS = {
    "DiTTransformer2DModel": dict(num_attention_heads=16, in_channels=4, out_channels=None, num_layers=28,
                                  attention_bias=True, sample_size=32, patch_size=2, activation_fn="gelu-approximate",
                                  num_embeds_ada_norm=1000, norm_type="ada_norm_zero", norm_elementwise_affine=False,
                                  norm_eps=1e-5),
    "Transformer2DModel": dict(num_attention_heads=16, in_channels=None, out_channels=None, num_layers=1,
                               attention_bias=False, sample_size=None, patch_size=None, activation_fn="geglu",
                               num_embeds_ada_norm=None, norm_type="layer_norm", norm_elementwise_affine=True,
                               norm_eps=1e-5),
}
# what the DiT network computes; any other value changes the function (a Transformer2DModel's
# defaults differ from a DiT's, so a config that leaves one out is read with its class's default)
_DIT_REQUIRED = {"activation_fn": "gelu-approximate", "norm_eps": 1e-5, "norm_elementwise_affine": False,
                 "attention_bias": True, "cross_attention_dim": None, "caption_channels": None,
                 "num_vector_embeds": None, "attention_type": "default", "use_additional_conditions": None}


def claims(config: Dict[str, Any], folder) -> bool:
    """Whether the diffusers ``config`` in ``folder`` is one of these classes; one of them in
    another layout is refused by name."""
    name = config.get("_class_name")
    if name not in CLASS_NAMES:
        return False
    norm = config.get("norm_type", DIT_DEFAULTS[name]["norm_type"])
    if norm != "ada_norm_zero":
        raise CheckpointError(f"{folder}: a {name} with norm_type {norm!r} is not a DiT; only the DiT layout "
                              "(norm_type ada_norm_zero) is supported")
    return True


def to_family(config: Dict[str, Any], tensors: Dict[str, torch.Tensor], scheduler: Optional[Dict[str, Any]], folder,
              where: str):
    """(state dict in the official DiT layout, training-args equivalent) of a diffusers DiT."""
    config = _dit_config(config, where)
    return diffusers_to_official(tensors, config, where), _dit_args(config, scheduler)


def _dit_config(config: Dict[str, Any], where: str) -> Dict[str, Any]:
    """The config with its class's defaults filled in, refused where the DiT network differs."""
    config = {**DIT_DEFAULTS[config["_class_name"]], **config}
    for key, wanted in _DIT_REQUIRED.items():
        value = config.get(key, wanted)
        if wanted is None and not value:  # None, False and 0 all mean "not used"
            continue
        if value != wanted:
            raise CheckpointError(f"{where}: a DiT with {key}={value!r} is not supported (the DiT layout has {wanted!r})")
    for key in ("patch_size", "sample_size", "in_channels"):
        config[key] = square(config.get(key), key, where)
        if config[key] is None:
            raise CheckpointError(f"{where}: the config gives no {key}; a DiT needs one (add it to config.json)")
    for key in ("num_attention_heads", "num_layers"):
        config[key] = positive(config.get(key), key, where)
    if config["sample_size"] % config["patch_size"]:
        raise CheckpointError(f"{where}: sample_size {config['sample_size']} is not a multiple of patch_size "
                              f"{config['patch_size']}; compare config.json with the model's download")
    scale = config.get("interpolation_scale")
    if config["_class_name"] == "Transformer2DModel":
        scale = scale if scale is not None else max(config["sample_size"] // 64, 1)
    if scale not in (None, 1, 1.0):
        raise CheckpointError(f"{where}: position table interpolation_scale {scale}; only 1 (the DiT table) is supported")
    return config


def _dit_args(config: Dict[str, Any], scheduler: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    args = {
        "model": "DiT-diffusers",
        "family": "dit",
        "define_the_model": True,
        "num_heads": int(config["num_attention_heads"]),
        "numerics": "diffusers",
        "learn_sigma": int(config.get("out_channels") or config["in_channels"]) == 2 * int(config["in_channels"]),
    }
    if config.get("num_embeds_ada_norm"):
        # diffusers' label table always has the null row (its dropout defaults to 0.1)
        args.update(num_classes=int(config["num_embeds_ada_norm"]), class_dropout_prob=0.1)
    if scheduler is not None:
        args["beta_schedule"] = scheduler["beta_schedule"]
    return args


def diffusers_to_official(tensors: Dict[str, torch.Tensor], config: Dict[str, Any], where: str) -> Dict[str, torch.Tensor]:
    depth = int(config["num_layers"])
    out: Dict[str, torch.Tensor] = {}
    used = set()

    def take(name):
        if name not in tensors:
            raise CheckpointError(f"{where}: missing {name}; not a complete diffusers DiT")
        used.add(name)
        return tensors[name]

    for official, theirs in _OUTER_PAIRS:
        for p in ("weight", "bias"):
            out[official.format(p=p)] = take(theirs.format(p=p))
    # the official model has one embedder; diffusers copies it into every block and uses block 0's
    # for the last layer. A model fine-tuned in diffusers could have let the copies drift apart.
    for official, theirs in _EMBEDDER_PAIRS:
        for p in ("weight", "bias"):
            first = take(EMBEDDER.format(i=0) + theirs.format(p=p))
            for i in range(1, depth):
                if not torch.equal(take(EMBEDDER.format(i=i) + theirs.format(p=p)), first):
                    raise CheckpointError(f"{where}: {_PER_BLOCK.format(i=i, what='timestep embedder')}")
            out[official.format(p=p)] = first
    label_key = EMBEDDER.format(i=0) + _LABELS[1]
    if label_key in tensors:
        for i in range(1, depth):
            if not torch.equal(take(EMBEDDER.format(i=i) + _LABELS[1]), tensors[label_key]):
                raise CheckpointError(f"{where}: {_PER_BLOCK.format(i=i, what='label embedder')}")
        out[_LABELS[0]] = take(label_key)
    for i in range(depth):
        block = f"transformer_blocks.{i}."
        for official, theirs in _BLOCK_PAIRS:
            for p in ("weight", "bias"):
                out[f"blocks.{i}." + official.format(p=p)] = take(block + theirs.format(p=p))
        for p in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat([take(block + f"attn1.to_{n}.{p}") for n in "qkv"])
    stray = sorted(set(tensors) - used)
    if stray:
        raise CheckpointError(f"{where}: {len(stray)} tensors this DiT reader does not know (e.g. {stray[0]}); "
                              "only the DiT layout (norm_type ada_norm_zero) is supported")
    patch = out["x_embedder.proj.weight"]
    if tuple(patch.shape[1:]) != (config["in_channels"], config["patch_size"], config["patch_size"]):
        raise CheckpointError(f"{where}: the patch embedding's weights are {tuple(patch.shape[1:])} (channels, patch, "
                              f"patch) but the config says in_channels {config['in_channels']}, patch_size "
                              f"{config['patch_size']}; the config does not belong to these weights")
    hidden = patch.shape[0]
    heads, head_dim = config["num_attention_heads"], config.get("attention_head_dim")
    if hidden % heads or (head_dim and heads * head_dim != hidden):
        raise CheckpointError(f"{where}: {heads} attention heads{f' of {head_dim}' if head_dim else ''} do not make the "
                              f"weights' width {hidden}; the config does not belong to these weights")
    grid = config["sample_size"] // config["patch_size"]
    out["pos_embed"] = sincos_pos_embed(hidden, grid).unsqueeze(0)
    return out


def official_to_diffusers(state_dict: Dict[str, torch.Tensor], depth: int) -> Dict[str, torch.Tensor]:
    """The inverse map (the position table, which diffusers recomputes, is left out)."""
    out: Dict[str, torch.Tensor] = {}
    for official, theirs in _OUTER_PAIRS:
        for p in ("weight", "bias"):
            out[theirs.format(p=p)] = state_dict[official.format(p=p)]
    for i in range(depth):
        for official, theirs in _EMBEDDER_PAIRS:
            for p in ("weight", "bias"):
                out[EMBEDDER.format(i=i) + theirs.format(p=p)] = state_dict[official.format(p=p)].clone()
        if _LABELS[0] in state_dict:
            out[EMBEDDER.format(i=i) + _LABELS[1]] = state_dict[_LABELS[0]].clone()
        block = f"transformer_blocks.{i}."
        for official, theirs in _BLOCK_PAIRS:
            for p in ("weight", "bias"):
                out[block + theirs.format(p=p)] = state_dict[f"blocks.{i}." + official.format(p=p)]
        for p in ("weight", "bias"):
            for name, part in zip("qkv", state_dict[f"blocks.{i}.attn.qkv.{p}"].chunk(3)):
                out[block + f"attn1.to_{name}.{p}"] = part.contiguous()
    return out


def model_config(config: Dict[str, Any], what: str) -> Dict[str, Any]:
    """The DiTTransformer2DModel config that computes a DiT expert of ``config``, or CheckpointError
    naming what diffusers' class cannot hold."""
    if config.get("numerics", "official") != "diffusers":
        # diffusers hard-codes its timestep frequencies (over half - 1); no config value gives the official ones
        raise CheckpointError(f"{what} computes the official DiT's function (timestep frequencies over half, MLP norm eps "
                              "1e-6), which diffusers' DiTTransformer2DModel cannot (its frequencies over half - 1 are "
                              f"fixed in its code, so the same weights would compute another function); {INSTEAD}")
    hidden, heads, head_dim, mlp = config["hidden_size"], config["num_heads"], config["head_dim"], config["mlp_hidden"]
    if any(key in config for key in BLOCK_WIDTH_KEYS.values()):
        raise CheckpointError(f"{what} has widths of its own in each block (--structure blockwise), which diffusers' "
                              f"DiTTransformer2DModel cannot hold (one width for all its blocks); {INSTEAD}")
    if heads * head_dim != hidden or mlp != 4 * hidden:
        raise CheckpointError(f"{what} is width-pruned (width {hidden}, attention {heads}x{head_dim}, MLP {mlp}); "
                              "diffusers' DiTTransformer2DModel ties the width to heads x head_dim and the MLP to 4x it, "
                              f"so it cannot hold this expert; {INSTEAD}, or convert with --experts lora or a budget "
                              "of Kx for full-width experts")
    if not config["label_rows"] or config["label_rows"] != config["num_classes"] + 1:
        raise CheckpointError(f"{what} has a label table of {config['label_rows']} rows for {config['num_classes']} "
                              "classes; diffusers' DiT always holds the classes and a null row for guidance; "
                              + INSTEAD)
    channels = config["in_channels"]
    return {
        "_class_name": "DiTTransformer2DModel", "num_attention_heads": heads, "attention_head_dim": head_dim,
        "in_channels": channels, "out_channels": channels * (2 if config["learn_sigma"] else 1),
        "num_layers": config["depth"], "sample_size": config["input_size"], "patch_size": config["patch_size"],
        "num_embeds_ada_norm": config["num_classes"], "norm_type": "ada_norm_zero",
        # what the reader insists on (_DIT_REQUIRED), spelled out: a Transformer2DModel's defaults differ
        "activation_fn": "gelu-approximate", "norm_eps": 1e-5, "norm_elementwise_affine": False, "attention_bias": True,
        "dropout": 0.0, "upcast_attention": False, "norm_num_groups": 32,
    }


def expert_tensors(config: Dict[str, Any], model_config: Dict[str, Any],
                   state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The expert's tensors under diffusers' names, for the model ``model_config`` gave."""
    return official_to_diffusers(state_dict, config["depth"])


class Denoiser(_Denoiser):
    """As ``DiTPipeline`` calls its transformer; guidance is the pipeline's own."""

    def forward(self, hidden_states, timestep=None, class_labels=None, cross_attention_kwargs=None, return_dict=True):
        out = self._denoise(hidden_states, timestep, class_labels)
        if not return_dict:
            return (out,)
        # diffusers is optional: a pipeline calling this has it, nothing else needs it
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)
