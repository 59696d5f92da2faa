"""The file side of diffusers: finding a diffusers model folder (a pipeline's, a model's, or the
weights file in one), reading its config.json, weights (sharded or not) and scheduler config, and
writing and checking one expert as a model folder.

What the configs and tensors mean belongs to the families' counterparts (``families/diffusers*.py``):
this room only opens, lists and writes files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from cbs_convert.errors import CheckpointError
from cbs_convert.families import DIFFUSERS_COUNTERPARTS
from cbs_convert.families.diffusers import INSTEAD, check_scheduler

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
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


def diffusers_model(path) -> Optional[Tuple[Path, Any]]:
    """(model folder, the family counterpart that reads it) when ``path`` is a diffusers model this
    tool reads: a pipeline folder, a model folder or the weights file in one. A folder that looks
    like a diffusers model of another kind is refused here by name, rather than left to a reader
    that would misname it."""
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
    for counterpart in DIFFUSERS_COUNTERPARTS:
        if counterpart.claims(config, folder):
            return folder, counterpart
    if _weights_beside(folder):
        supported = " and ".join(counterpart.SUPPORTED for counterpart in DIFFUSERS_COUNTERPARTS)
        raise CheckpointError(f"{folder}: a diffusers {name or 'model without _class_name'}; only {supported} are "
                              "supported")
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
    folder, counterpart = found
    files = model_files(path)
    config = _read_json(folder / "config.json")
    weights = _weight_files(folder, Path(path))
    tensors = _read_weights(weights)
    where = str(weights[0])
    try:
        scheduler = _read_scheduler(folder)
        state_dict, args = counterpart.to_family(config, tensors, scheduler, folder, where)
        return state_dict, args, files
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
                from safetensors.torch import load_file  # safetensors loads only when a model ships in it

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
    return check_scheduler(_read_json(file), file)


# ---------------------------------------------------------------------------------------------
# Write-back: one expert as a diffusers model folder, the inverse of the readers above.

#: every file a written folder holds, and so all that --force may replace in one
WRITTEN_FILES = ("config.json", WEIGHT_FILES[0], SCHEDULER_FILE)
#: the key in a written config.json that marks the folder as this tool's output; diffusers drops
#: private ("_") keys before building the model
WRITTEN_MARK = "_cbs_convert_expert"


def expert_model_config(family, config: Dict[str, Any], what: str) -> Dict[str, Any]:
    """The config.json of the diffusers model that computes one expert of ``config``, or
    CheckpointError naming what diffusers cannot represent (decided before any tensor is read)."""
    if family.diffusers_counterpart is None:
        raise CheckpointError(family.diffusers_refusal(what))
    model_config = family.diffusers_counterpart.model_config(config, what)
    try:
        # optional: the folder is written without the version stamp where diffusers is not installed
        import diffusers

        model_config["_diffusers_version"] = diffusers.__version__
    except ImportError:
        pass
    return model_config


def check_expert_folder(folder: Path, family, config: Dict[str, Any], state_dict: Dict[str, torch.Tensor],
                        segment, what: str) -> str:
    """Load ``folder`` with diffusers' own from_pretrained and compare it with the expert on inputs
    of its segment: a line saying so, or CheckpointError where they differ (nothing is kept then).
    Without diffusers installed the folder is written unchecked, and the line says that."""
    try:
        import diffusers  # optional: without it the folder is written unchecked
    except ImportError:
        return "  not checked against diffusers, which is not installed (pip install 'cbs_convert[diffusers]')"
    name = family.diffusers_counterpart.MODEL_CLASS
    cls = getattr(diffusers, name, None)
    if cls is None:
        return f"  not checked: diffusers {diffusers.__version__} has no {name}"
    from diffusers.utils import logging as diffusers_logging  # diffusers' own, present when diffusers is

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
                              f"{gap:.3g} at outputs up to {scale:.3g}); nothing was written; {INSTEAD}")
    return f"  checked: diffusers' {cls.__name__}.from_pretrained equals the expert (max difference {gap:.1e})"
