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
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from cbs_convert.errors import CheckpointError

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
# Training in diffusers updates each block's copy of the embedders apart; the DiT family has one
# shared embedder, so such a model would convert only by changing its function.
_PER_BLOCK = ("block {i}'s {what} differs from block 0's: a DiT trained in diffusers, with its own embedders in every "
              "block, is not supported (only one shared copy, as in the official DiT and its diffusers conversion, is)")


UNET_CLASS_NAMES = ("UNet2DModel",)
#: UNet2DModel's constructor defaults for the keys that shape the network
UNET_DEFAULTS = {"block_out_channels": [224, 448, 672, 896], "layers_per_block": 2,
                 "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
                 "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}
#: diffusers' schedulers over a discrete DDPM beta schedule: any of them may ship with a DDPM model
DDPM_SCHEDULERS = (
    "DDPMScheduler", "DDIMScheduler", "DDIMInverseScheduler", "DDPMParallelScheduler", "DDIMParallelScheduler",
    "PNDMScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "DPMSolverSDEScheduler",
    "DEISMultistepScheduler", "UniPCMultistepScheduler", "SASolverScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler", "LMSDiscreteScheduler",
)
#: diffusers' names for the beta schedules the DDPM families know
SCHEDULER_BETAS = {"linear": "linear", "squaredcos_cap_v2": "cosine"}
SCHEDULER_FILE = "scheduler_config.json"


def _model_folder(path: Path) -> Optional[Path]:
    """The folder holding a diffusers model's config.json and weights, if ``path`` is or is in one."""
    if path.is_file() and path.name.startswith("diffusion_pytorch_model"):
        path = path.parent
    if not path.is_dir():
        return None
    for folder in (path / "transformer", path / "unet", path):
        if (folder / "config.json").is_file():
            return folder
    for folder in (path / "transformer", path / "unet", path):
        if folder.is_dir() and _weights_beside(folder):
            raise CheckpointError(f"{folder}: diffusers weights without their config.json, which defines the network; "
                                  "restore it from the model's download")
    return None


def source_root(path) -> Optional[Path]:
    """The folder the user named as a diffusers source (the pipeline's, when it holds the model):
    nothing of the tool's may be written inside it, where loaders would take it for the model's own."""
    found = _model_folder(Path(path))
    if found is None:
        return None
    pipeline = found.parent
    if found.name in ("transformer", "unet") and (pipeline / "model_index.json").is_file():
        return pipeline
    return found


def _read_json(file: Path) -> Dict[str, Any]:
    try:
        found = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: not readable as JSON ({str(exc).splitlines()[0][:160]}); restore it from the "
                              "model's download") from None
    if not isinstance(found, dict):
        raise CheckpointError(f"{file}: holds a {type(found).__name__}, not a diffusers config; restore it from the model's download")
    return found


def _weights_beside(folder: Path) -> bool:
    return any(folder.glob("diffusion_pytorch_model*"))


def diffusers_model(path) -> Optional[Tuple[Path, str]]:
    """(model folder, "dit" or "unet") when ``path`` is a diffusers model this tool reads: a pipeline
    folder, a model folder or the weights file in one. A folder that looks like a diffusers model of
    another kind is refused here by name, rather than left to a reader that would misname it."""
    folder = _model_folder(Path(path))
    if folder is None:
        return None
    if not _weights_beside(folder) and not (folder / "model_index.json").is_file():
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            return None  # a config.json that belongs to something else entirely
    else:
        config = _read_json(folder / "config.json")
    name = config.get("_class_name")
    if name in DIT_CLASS_NAMES:
        norm = config.get("norm_type", DIT_DEFAULTS[name]["norm_type"])
        if norm != "ada_norm_zero":
            raise CheckpointError(f"{folder}: a {name} with norm_type {norm!r} is not a DiT; only the DiT layout "
                                  "(norm_type ada_norm_zero) is supported")
        return folder, "dit"
    if name in UNET_CLASS_NAMES:
        return folder, "unet"
    if _weights_beside(folder):
        raise CheckpointError(f"{folder}: a diffusers {name or 'model without _class_name'}; only DiTTransformer2DModel, "
                              "Transformer2DModel (DiT layout) and UNet2DModel are supported")
    return None


def model_files(path) -> Optional[List[Path]]:
    """Every file that reading the diffusers model at ``path`` opens (config, weights, scheduler), or
    None when ``path`` is not one: what an output must never replace, and what the model's identity
    is hashed from."""
    found = diffusers_model(path)
    if found is None:
        return None
    folder, _ = found
    files = [folder / "config.json", *_weight_files(folder, Path(path))]
    scheduler = _scheduler_file(folder)
    if scheduler is not None:
        files.append(scheduler)
    return files


def _scheduler_file(folder: Path) -> Optional[Path]:
    """The pipeline's scheduler config, when the model folder is a pipeline's transformer/ or unet/;
    else one beside config.json, where ``extract --format diffusers`` writes it (a model folder
    alone has no other place for the betas, and a cosine model must not read back as linear)."""
    file = folder.parent / "scheduler" / SCHEDULER_FILE
    if folder.name in ("transformer", "unet") and file.is_file():
        return file
    file = folder / SCHEDULER_FILE
    return file if file.is_file() else None


def read_diffusers(path) -> Optional[Tuple[Dict[str, torch.Tensor], Dict[str, Any], List[Path]]]:
    """(state dict in the family's official layout, training-args equivalent, files read), or None
    when ``path`` is not a diffusers model."""
    found = diffusers_model(path)
    if found is None:
        return None
    folder, kind = found
    files = model_files(path)
    config = _read_json(folder / "config.json")
    weights = _weight_files(folder, Path(path))
    tensors = _read_weights(weights)
    where = str(weights[0])
    try:
        scheduler = _read_scheduler(folder)
        if kind == "dit":
            config = _dit_config(config, where)
            return diffusers_to_official(tensors, config, where), _dit_args(config, scheduler), files
        config = {**UNET_DEFAULTS, **config}
        return unet_to_adm(tensors, config, where), _unet_args(config, folder, scheduler), files
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError) as exc:
        # a hand-edited or damaged config: a value of the wrong type or range, a key set to null
        detail = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{folder}: a config value this reader cannot use ({type(exc).__name__}: {detail}); "
                              "compare config.json and scheduler_config.json with the model's download") from None


def _weight_sets(folder: Path) -> Dict[Tuple[str, str], Path]:
    """Every set of weights save_pretrained may have left in ``folder``, by (variant, format), "" the
    plain one: a weights file, or the index of a sharded set
    (``diffusion_pytorch_model[.VARIANT].safetensors``, ``diffusion_pytorch_model.safetensors.index[.VARIANT].json``)."""
    sets: Dict[Tuple[str, str], Path] = {}
    for file in sorted(folder.glob("diffusion_pytorch_model*")):
        parts = file.name.split(".")
        if parts[-1] == "json" and len(parts) in (4, 5) and parts[2] == "index" and parts[1] in ("safetensors", "bin"):
            sets[(parts[3] if len(parts) == 5 else "", parts[1])] = file
        elif "-of-" not in file.name and parts[-1] in ("safetensors", "bin") and len(parts) in (2, 3):
            sets.setdefault((parts[1] if len(parts) == 3 else "", parts[-1]), file)
    return sets


def _with_shards(weights: Path) -> List[Path]:
    """A weights file alone, or an index followed by the shards it names."""
    if not weights.name.endswith(".json"):
        return [weights]
    try:
        names = json.loads(weights.read_text())["weight_map"].values()
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{weights}: not a readable shard index ({str(exc).splitlines()[0][:160]})") from None
    if not all(isinstance(name, str) and name and "/" not in name for name in names):
        raise CheckpointError(f"{weights}: its weight_map names something other than shard files beside it; restore "
                              "the index from the model's download")
    return [weights, *(weights.parent / name for name in sorted(set(names)))]


def _weight_files(folder: Path, given: Path) -> List[Path]:
    """The weights to read: the file the user named, else the folder's plain weights, else its only
    variant (each one file, or an index and its shards; an index comes first)."""
    if given.is_file() and given.name.startswith("diffusion_pytorch_model"):
        if "-of-" in given.name:
            raise CheckpointError(f"{given} is one shard of sharded weights; give the folder, or the .index.json "
                                  "file that lists the shards")
        return _with_shards(given)
    sets = _weight_sets(folder)
    for fmt in ("safetensors", "bin"):
        if ("", fmt) in sets:
            return _with_shards(sets[("", fmt)])
    variants = sorted({variant for variant, _ in sets})
    if len(variants) == 1:
        fmt = "safetensors" if (variants[0], "safetensors") in sets else "bin"
        return _with_shards(sets[(variants[0], fmt)])
    if variants:
        named = ", ".join(sets[(v, f)].name for v, f in sorted(sets))
        raise CheckpointError(f"{folder}: no plain weights but {len(variants)} variants ({named}); give the one to "
                              "convert as the checkpoint path")
    raise CheckpointError(f"{folder}: a diffusers config without weights; expected {WEIGHT_FILES[0]} (or "
                          f"{WEIGHT_FILES[1]}, sharded weights with their .index.json, or a variant) beside it")


def _read_weights(files: List[Path]) -> Dict[str, torch.Tensor]:
    tensors: Dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".json":  # an index: its shards follow it in the list
            continue
        if not file.is_file():
            raise CheckpointError(f"{file}: named by the shard index but missing; restore it from the model's download")
        try:
            if file.suffix == ".safetensors":
                from safetensors.torch import load_file

                tensors.update(load_file(str(file), device="cpu"))
            else:
                tensors.update(torch.load(str(file), map_location="cpu", weights_only=True))
        except Exception as exc:
            raise CheckpointError(f"{file}: not a readable weights file ({str(exc).splitlines()[0][:200]})") from None
    return tensors


def _read_scheduler(folder: Path) -> Optional[Dict[str, Any]]:
    """The pipeline's scheduler config beside the model folder, checked, or None without one."""
    file = _scheduler_file(folder)
    if file is None:
        return None
    scheduler = _read_json(file)
    name = scheduler.get("_class_name")
    if name not in DDPM_SCHEDULERS:
        raise CheckpointError(f"{file}: a {name or 'scheduler without _class_name'}; the DDPM families here need one of "
                              "diffusers' discrete-beta schedulers (DDPMScheduler, DDIMScheduler, ...), which sample "
                              "the process the model was trained on")
    unsupported = [(key, scheduler[key]) for key in ("trained_betas", "rescale_betas_zero_snr") if scheduler.get(key)]
    if scheduler.get("prediction_type", "epsilon") != "epsilon":
        unsupported.insert(0, ("prediction_type", scheduler["prediction_type"]))
    if unsupported:
        key, value = unsupported[0]
        raise CheckpointError(f"{file}: {key}={value!r} is not supported; the DDPM families here are noise predictors "
                              "on DDPM's own betas (prediction_type epsilon, no trained_betas, no zero-SNR rescaling)")
    scheduler["beta_schedule"] = _scheduler_betas(scheduler, file)
    return scheduler


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


def _positive(value, key: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{where}: {key} {value!r} in the config must be a positive whole number; compare "
                              "config.json with the model's download")
    return value


def _square(value, key: str, where: str) -> Optional[int]:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise CheckpointError(f"{where}: {key} {list(value)}; only square inputs are supported")
        value = value[0]
    return None if value is None else _positive(value, key, where)


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
        config[key] = _square(config.get(key), key, where)
        if config[key] is None:
            raise CheckpointError(f"{where}: the config gives no {key}; a DiT needs one (add it to config.json)")
    for key in ("num_attention_heads", "num_layers"):
        config[key] = _positive(config.get(key), key, where)
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
    from cbs_convert.families.sit import sincos_pos_embed

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


# ---------------------------------------------------------------------------------------------
# UNet2DModel (the original DDPM's UNet) <-> guided-diffusion's UNet, whose family prunes it.

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
    size = _square(config.get("sample_size"), "sample_size", str(folder))
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


def _scheduler_betas(scheduler: Dict[str, Any], where: Path) -> str:
    kind = scheduler.get("beta_schedule", "linear")
    if kind not in SCHEDULER_BETAS:
        raise CheckpointError(f"{where}: beta schedule {kind!r} is not supported; only linear and squaredcos_cap_v2")
    if int(scheduler.get("num_train_timesteps", 1000)) != 1000:
        raise CheckpointError(f"{where}: {scheduler['num_train_timesteps']} training steps; only 1000 are supported")
    if kind == "linear" and (abs(float(scheduler.get("beta_start", 1e-4)) - 1e-4) > 1e-12
                             or abs(float(scheduler.get("beta_end", 0.02)) - 0.02) > 1e-12):
        raise CheckpointError(f"{where}: linear betas from {scheduler.get('beta_start')} to {scheduler.get('beta_end')}; "
                              "only DDPM's 1e-4 to 0.02 are supported")
    return SCHEDULER_BETAS[kind]


# ---------------------------------------------------------------------------------------------
# The routed model, as diffusers pipelines call their denoisers.


class _DiffusersDenoiser(nn.Module):
    """A routed (or plain) DDPM-family model with the attributes diffusers pipelines read:
    ``config.in_channels``, ``config.sample_size``, ``config.out_channels``, ``dtype``, ``device``."""

    def __init__(self, model: nn.Module, family):
        super().__init__()
        from types import SimpleNamespace

        if getattr(family, "alphas_cumprod", None) is None:
            raise CheckpointError(f"a {family.name} model is not a DDPM noise predictor, which diffusers' DiT and DDPM "
                                  "pipelines expect; load it with format='cbs_convert'")
        self.model = model
        channels, size, _ = family.sample_shape(family.config)
        self.config = SimpleNamespace(in_channels=channels, sample_size=size,
                                      out_channels=channels * (2 if family.config.get("learn_sigma") else 1),
                                      num_embeds_ada_norm=family.num_classes(family.config) or None)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _denoise(self, x, timestep, class_labels):
        if timestep is None:
            raise ValueError("timestep is required")
        if not torch.is_tensor(timestep) or timestep.dim() == 0:
            timestep = torch.as_tensor(timestep, device=x.device).reshape(1).expand(len(x))
        return self.model(x, timestep, class_labels)


class DiffusersTransformer(_DiffusersDenoiser):
    """As ``DiTPipeline`` calls its transformer; guidance is the pipeline's own."""

    def forward(self, hidden_states, timestep=None, class_labels=None, cross_attention_kwargs=None, return_dict=True):
        out = self._denoise(hidden_states, timestep, class_labels)
        if not return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)


class DiffusersUNet(_DiffusersDenoiser):
    """As ``DDPMPipeline`` and ``DDIMPipeline`` call their UNet2DModel."""

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        out = self._denoise(sample, timestep, class_labels)
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d import UNet2DOutput

        return UNet2DOutput(sample=out)


#: the diffusers module each family's networks stand in for
ADAPTERS = {"dit": DiffusersTransformer, "adm": DiffusersUNet}


def as_diffusers(model: nn.Module, family) -> nn.Module:
    if family.name not in ADAPTERS:
        raise CheckpointError(f"a {family.name} model has no diffusers counterpart; diffusers pipelines take DiT "
                              "(DiTPipeline) and UNet (DDPMPipeline, DDIMPipeline) models")
    return ADAPTERS[family.name](model, family).eval()


# ---------------------------------------------------------------------------------------------
# Write-back: one expert as a diffusers model folder, the inverse of the readers above.

#: every file a written folder holds, and so all that --force may replace in one
WRITTEN_FILES = ("config.json", WEIGHT_FILES[0], SCHEDULER_FILE)
#: the key in a written config.json that marks the folder as this tool's output; diffusers drops
#: private ("_") keys before building the model
WRITTEN_MARK = "_cbs_convert_expert"
_INSTEAD = ("extract it as .safetensors instead (cbs_convert reads it back exactly), or drop the routed file into a "
            "diffusers pipeline with cbs_convert.load(ROUTED, format='diffusers')")


def dit_model_config(config: Dict[str, Any], what: str) -> Dict[str, Any]:
    """The DiTTransformer2DModel config that computes a DiT expert of ``config``, or CheckpointError
    naming what diffusers' class cannot hold."""
    if config.get("numerics", "official") != "diffusers":
        # diffusers hard-codes its timestep frequencies (over half - 1); no config value gives the official ones
        raise CheckpointError(f"{what} computes the official DiT's function (timestep frequencies over half, MLP norm eps "
                              "1e-6), which diffusers' DiTTransformer2DModel cannot (its frequencies over half - 1 are "
                              f"fixed in its code, so the same weights would compute another function); {_INSTEAD}")
    hidden, heads, head_dim, mlp = config["hidden_size"], config["num_heads"], config["head_dim"], config["mlp_hidden"]
    if heads * head_dim != hidden or mlp != 4 * hidden:
        raise CheckpointError(f"{what} is width-pruned (width {hidden}, attention {heads}x{head_dim}, MLP {mlp}); "
                              "diffusers' DiTTransformer2DModel ties the width to heads x head_dim and the MLP to 4x it, "
                              f"so it cannot hold this expert; {_INSTEAD}, or convert with --experts lora or a budget "
                              "of Kx for full-width experts")
    if not config["label_rows"] or config["label_rows"] != config["num_classes"] + 1:
        raise CheckpointError(f"{what} has a label table of {config['label_rows']} rows for {config['num_classes']} "
                              "classes; diffusers' DiT always holds the classes and a null row for guidance; "
                              + _INSTEAD)
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


def unet_model_config(config: Dict[str, Any], what: str) -> Dict[str, Any]:
    """The UNet2DModel config that computes an ADM expert of ``config``, or CheckpointError naming
    what diffusers' class cannot hold. The inverse of ``_unet_args``."""
    from cbs_convert.families.adm import NORM_GROUPS, complete_config, layout

    c = complete_config(config)
    lay = layout(c)
    if any(g != NORM_GROUPS for g in c["res_groups"]) or list(c["attn_heads"]) != [l.heads for l in lay.attn()]:
        raise CheckpointError(f"{what} is width-pruned ({c['inner_groups']} of {NORM_GROUPS * len(c['res_groups'])} "
                              f"ResBlock groups, {c['attention_heads']} of {sum(l.heads for l in lay.attn())} heads); "
                              "diffusers' UNet2DModel has no per-block inner widths, so it cannot hold this expert; "
                              f"{_INSTEAD}, or convert with --experts lora or a budget of Kx for full-width experts")
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
        raise CheckpointError(f"{what} has {found[0]}, which diffusers' UNet2DModel cannot compute; {_INSTEAD}")
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
    from cbs_convert.families.adm import complete_config, layout

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


def scheduler_config(family) -> Optional[Dict[str, Any]]:
    """A DDPMScheduler config for the family's training chain, or None where diffusers has no name
    for its betas. The inverse of ``_read_scheduler``."""
    names = {ours: theirs for theirs, ours in SCHEDULER_BETAS.items()}
    kind = family.config.get("beta_schedule")
    if kind not in names or int(family.config.get("diffusion_steps", 0)) != 1000:
        return None
    # DDPMPipeline hands the scheduler every output channel, DiTPipeline only the noise
    learned = family.name == "adm" and family.config.get("learn_sigma")
    return {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
            "beta_schedule": names[kind], "prediction_type": "epsilon", "trained_betas": None,
            "variance_type": "learned_range" if learned else "fixed_small",
            # pixels stay in [-1, 1]; SD-VAE latents do not
            "clip_sample": family.data_space(family.config) == "pixels", "clip_sample_range": 1.0}


def expert_model_config(family, config: Dict[str, Any], what: str) -> Dict[str, Any]:
    """The config.json of the diffusers model that computes one expert of ``config``, or
    CheckpointError naming what diffusers cannot represent (decided before any tensor is read)."""
    if family.name == "sit":
        raise CheckpointError(f"{what} is a SiT, a flow-matching velocity model; diffusers has no SiT class (its DiT "
                              "and UNet models are DDPM noise predictors), so it cannot be written as a diffusers folder; "
                              "extract it as .safetensors or .pt for the SiT code")
    if family.name == "dit":
        model_config = dit_model_config(config, what)
    elif family.name == "adm":
        model_config = unet_model_config(config, what)
    else:
        raise CheckpointError(f"{what}: a {family.name} model has no diffusers counterpart")
    try:
        import diffusers

        model_config["_diffusers_version"] = diffusers.__version__
    except ImportError:
        pass
    return model_config


def expert_tensors(family, config: Dict[str, Any], model_config: Dict[str, Any],
                   state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The expert's tensors under diffusers' names, for the model ``expert_model_config`` gave."""
    if family.name == "dit":
        return official_to_diffusers(state_dict, config["depth"])
    if config.get("attention_order", "legacy") == "legacy":
        state_dict = _legacy_qkv_to_new(state_dict, config)
    return adm_to_unet(state_dict, model_config)


def check_expert_folder(folder: Path, family, config: Dict[str, Any], state_dict: Dict[str, torch.Tensor],
                        segment, what: str) -> str:
    """Load ``folder`` with diffusers' own from_pretrained and compare it with the expert on inputs
    of its segment: a line saying so, or CheckpointError where they differ (nothing is kept then).
    Without diffusers installed the folder is written unchecked, and the line says that."""
    try:
        import diffusers
    except ImportError:
        return "  not checked against diffusers, which is not installed (pip install 'cbs_convert[diffusers]')"
    cls = getattr(diffusers, "DiTTransformer2DModel" if family.name == "dit" else "UNet2DModel", None)
    if cls is None:
        return f"  not checked: diffusers {diffusers.__version__} has no {'DiTTransformer2DModel' if family.name == 'dit' else 'UNet2DModel'}"
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its advice (install accelerate, ...) is about its loading, not this folder
    try:
        model, info = cls.from_pretrained(str(folder), output_loading_info=True, torch_dtype=torch.float32)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    wrong = [f"{kind} {names[0]}" for kind, names in info.items() if names]
    if wrong:
        raise CheckpointError(f"{what}: diffusers read the written folder with {wrong[0]}; nothing was written")
    ours = family.instantiate(config, state_dict).float().eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, *family.sample_shape(config), generator=generator)
    lo, hi = segment
    t = family.native_time(torch.tensor([lo + 0.25 * (hi - lo), lo + 0.75 * (hi - lo)], dtype=torch.float64))
    t = t.round().float()
    classes = family.num_classes(config)
    y = torch.arange(2) % classes if classes else None
    with torch.no_grad():
        expected = ours(x, t, y)
        got = model.eval()(x, t, class_labels=y).sample
    gap = float((got - expected).abs().max())
    scale = float(expected.abs().max())
    if not gap <= 1e-4 * (1 + scale):  # float32 rounding of two implementations; a wrong mapping is far larger
        raise CheckpointError(f"{what}: diffusers' {cls.__name__} computes differently from the expert (max difference "
                              f"{gap:.3g} at outputs up to {scale:.3g}); nothing was written; {_INSTEAD}")
    return f"  checked: diffusers' {cls.__name__}.from_pretrained equals the expert (max difference {gap:.1e})"
