"""The border with diffusers: its DiT layout in, and a routed model that diffusers pipelines call.

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
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from .errors import CheckpointError

DIT_CLASS_NAMES = ("DiTTransformer2DModel", "Transformer2DModel")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
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


def _model_folder(path: Path) -> Optional[Path]:
    """The folder holding a diffusers DiT's config.json and weights, if ``path`` is or is in one."""
    if path.is_file() and path.name.startswith("diffusion_pytorch_model"):
        path = path.parent
    if not path.is_dir():
        return None
    for folder in (path / "transformer", path):
        if (folder / "config.json").is_file():
            return folder
    return None


def diffusers_dit_folder(path) -> Optional[Path]:
    """The model folder when ``path`` is a diffusers DiT (pipeline folder, model folder or its weights)."""
    folder = _model_folder(Path(path))
    if folder is None:
        return None
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if config.get("_class_name") not in DIT_CLASS_NAMES or config.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
        return None
    return folder


def read_diffusers_dit(folder: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any], Path]:
    """(official state dict, training-args equivalent, weights file) of a diffusers DiT folder."""
    config = json.loads((folder / "config.json").read_text())
    weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{folder}: a diffusers DiT config without weights; expected {WEIGHT_FILES[0]} beside it")
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(weights), device="cpu")
        except Exception as exc:
            raise CheckpointError(f"{weights}: not a readable safetensors file ({str(exc).splitlines()[0][:200]})") from None
    else:
        tensors = torch.load(str(weights), map_location="cpu", weights_only=True)
    state_dict = diffusers_to_official(tensors, config, str(weights))
    heads = int(config["num_attention_heads"])
    args = {
        "model": "DiT-diffusers",
        "num_heads": heads,
        "numerics": "diffusers",
        "learn_sigma": int(config.get("out_channels") or config["in_channels"]) == 2 * int(config["in_channels"]),
    }
    if config.get("num_embeds_ada_norm"):
        # diffusers' label table always has the null row (its dropout defaults to 0.1)
        args.update(num_classes=int(config["num_embeds_ada_norm"]), class_dropout_prob=0.1)
    return state_dict, args, weights


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
                    raise CheckpointError(
                        f"{where}: block {i}'s timestep embedder differs from block 0's; the official DiT layout has "
                        "one shared embedder, so this model cannot be converted without changing it")
            out[official.format(p=p)] = first
    label_key = EMBEDDER.format(i=0) + _LABELS[1]
    if label_key in tensors:
        for i in range(1, depth):
            if not torch.equal(take(EMBEDDER.format(i=i) + _LABELS[1]), tensors[label_key]):
                raise CheckpointError(f"{where}: block {i}'s label embedder differs from block 0's; the official DiT "
                                      "layout has one shared table, so this model cannot be converted without changing it")
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
    from .families.sit import sincos_pos_embed

    hidden = out["x_embedder.proj.weight"].shape[0]
    grid = int(config["sample_size"]) // int(config["patch_size"])
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


def diffusers_config(family_config: Dict[str, Any]) -> Dict[str, Any]:
    """A ``DiTTransformer2DModel`` config for a full-width transformer config."""
    c = family_config
    return {
        "_class_name": "DiTTransformer2DModel",
        "num_attention_heads": c["num_heads"], "attention_head_dim": c["head_dim"], "in_channels": c["in_channels"],
        "out_channels": c["in_channels"] * (2 if c["learn_sigma"] else 1), "num_layers": c["depth"],
        "sample_size": c["input_size"], "patch_size": c["patch_size"], "num_embeds_ada_norm": c["num_classes"] or None,
        "activation_fn": "gelu-approximate", "norm_type": "ada_norm_zero", "norm_elementwise_affine": False,
        "norm_eps": 1e-5, "attention_bias": True,
    }


class DiffusersTransformer(nn.Module):
    """A routed (or plain) DiT-family model with the forward and attributes diffusers pipelines use.

    ``DiTPipeline`` reads ``config.in_channels``, ``config.sample_size`` and ``config.out_channels``,
    casts its latents to ``dtype``, calls ``forward(hidden_states, timestep=..., class_labels=...)``
    and takes ``.sample`` of the output. Guidance is the pipeline's own."""

    def __init__(self, model: nn.Module, family):
        super().__init__()
        from types import SimpleNamespace

        self.model = model
        config = family.config
        if getattr(family, "alphas_cumprod", None) is None:
            raise CheckpointError(f"a {family.name} model is not a DDPM noise predictor; diffusers' DiT pipelines "
                                  "expect one (load it with format='cbs_convert')")
        self.config = SimpleNamespace(
            in_channels=config["in_channels"], sample_size=config["input_size"], patch_size=config["patch_size"],
            out_channels=config["in_channels"] * (2 if config.get("learn_sigma") else 1),
            num_embeds_ada_norm=family.num_classes(config) or None,
        )

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, hidden_states, timestep=None, class_labels=None, cross_attention_kwargs=None, return_dict=True):
        if timestep is None:
            raise ValueError("timestep is required")
        if not torch.is_tensor(timestep) or timestep.dim() == 0:
            timestep = torch.as_tensor(timestep, device=hidden_states.device).reshape(1).expand(len(hidden_states))
        out = self.model(hidden_states, timestep, class_labels)
        if not return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)
