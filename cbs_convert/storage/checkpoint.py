"""Reading source checkpoints safely, in every form they are published in.

* a flat state dict in a ``.pt``/``.pth`` file (the released SiT, DiT and ADM weights);
* a training dict ``{"model", "ema", "opt", "args"}`` (the EMA weights are the ones to convert);
* a ``.safetensors`` file, optionally with its training args as JSON under the metadata key
  ``args`` (what a training dict keeps in an ``argparse.Namespace``, without a pickle);
* a diffusers DiT or UNet2DModel: a pipeline folder, its ``transformer/`` or ``unet/`` folder, or
  the weights file in it (mapped to the official DiT or guided-diffusion layout by the family's
  diffusers counterpart in ``families/``).

Pickles are read with ``torch.load(weights_only=True)`` and an explicit allow-list holding only
``argparse.Namespace`` (what the training dict stores its args in): a pickle that asks for anything
else is refused before any of its code can run. The source file is only ever opened for reading.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from cbs_convert.bundled import TEACHER_FAMILIES, bundled_or_given, bundled_teacher
from cbs_convert.errors import CheckpointError, RecipeError
from cbs_convert.storage.diffusers import model_files, read_diffusers, source_root
from cbs_convert.storage.schema import read_header, validate_args

SAFE_GLOBALS = [argparse.Namespace]
WEIGHT_KEYS_IN_ORDER = ("ema", "model", "state_dict", "module")


@dataclass
class SourceCheckpoint:
    path: Path
    state_dict: Dict[str, torch.Tensor]
    sha256: str
    container: str  # "state dict", "training dict (ema)", "safetensors", ...
    dtype: str
    args: Dict[str, Any] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    files: List[Path] = field(default_factory=list)  # every file read; the path itself for a single file

    @property
    def hints(self) -> Dict[str, Any]:
        """What the file itself says about what its shapes cannot show, for ``detect``: its saved
        args and its name. Add the user's settings (``family``, ``num_heads``, ...) on top."""
        return {**hints_from_args(self.args), "source_name": str(self.path)}


def refuse_nonfinite(tensors: Dict[str, torch.Tensor], path, fix: str = "the checkpoint is corrupt") -> None:
    """One line naming the first tensor that holds NaN or Inf: weights like that sample nothing."""
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            raise CheckpointError(f"{path}: tensor {key} holds {bad} NaN/Inf values; {fix}")


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while True:
            block = handle.read(chunk)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


def content_sha256(files: List[Path]) -> str:
    """The identity of a model stored in ``files``: a single file's own SHA-256 (what ``sha256sum``
    prints), or for several (a diffusers folder) the SHA-256 of their names and digests."""
    if len(files) == 1:
        return file_sha256(files[0])
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name} {file_sha256(file)}\n".encode())
    return digest.hexdigest()


def source_folder(path) -> Optional[Path]:
    """The folder of a diffusers source, inside which nothing of the tool's may be written (a loader
    would take a stray weights file there for the model's own); None for a single-file checkpoint."""
    path = bundled_or_given(path)
    return source_root(path) if path.exists() else None


def is_inside(path, folder: Path) -> bool:
    try:
        Path(path).resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def source_files(path) -> List[Path]:
    """The files a source checkpoint at ``path`` consists of: what no output may replace."""
    path = bundled_or_given(path)
    return (model_files(path) if path.exists() else None) or [path]


def model_name(path) -> str:
    """A short name for the outputs named after a model: a file's stem, or for a diffusers model the
    name of its pipeline folder (never "diffusion_pytorch_model", "transformer", or "" for ".")."""
    path = Path(path).resolve()
    if path.name.startswith("diffusion_pytorch_model"):
        path = path.parent
    if path.name in ("transformer", "unet") and (path / "config.json").is_file():
        path = path.parent
    return (path.name if path.is_dir() else path.stem) or "model"


def _check_path(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file; check the checkpoint path")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory but not a diffusers DiT or UNet2DModel folder; "
                              "pass the checkpoint file inside it")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty; re-download or re-save the checkpoint")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{path}: not readable; check its permissions")


#: safetensors metadata key holding JSON training args (model, num_heads, path_type, ...), the
#: pickle-free counterpart of a training dict's argparse.Namespace
ARGS_METADATA_KEY = "args"


def _load_safetensors(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    from safetensors.torch import load_file

    metadata, shapes = read_header(path)
    args: Dict[str, Any] = {}
    if ARGS_METADATA_KEY in metadata:
        try:
            args = json.loads(metadata[ARGS_METADATA_KEY])
        except json.JSONDecodeError:
            raise CheckpointError(f"{path}: metadata '{ARGS_METADATA_KEY}' is not JSON; re-save the file") from None
        if not isinstance(args, dict):
            raise CheckpointError(f"{path}: metadata '{ARGS_METADATA_KEY}' must be a JSON object")
        # from the header alone: a config that claims more than the file holds is refused before
        # a single tensor is read or anything is built from it
        validate_args(args, {_strip_wrappers(k): v for k, v in shapes.items()}, path)
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for every kind of damage
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(exc)}); it may be truncated") from None
    return tensors, args


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _load_pickle(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            # mmap: a training dict's unused entries (the raw weights, the optimizer: 3x the model)
            # are never read into memory. Only the zip format can be mapped.
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:
        message = _first_line(exc)
        if "Unsupported global" in str(exc) or "weights_only" in str(exc):
            bad = _unsupported_global(str(exc))
            raise CheckpointError(
                f"{path}: refused an unsafe pickle that asks for {bad}; only tensors and "
                "argparse.Namespace are allowed. Re-save the weights as a state dict or safetensors"
            ) from None
        if zipfile.is_zipfile(path) or "zip" in message.lower() or "central directory" in message.lower():
            raise CheckpointError(f"{path}: damaged torch archive ({message}); the file may be truncated, re-download it") from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({message})") from None


def _unsupported_global(text: str) -> str:
    for line in text.splitlines():
        if "Unsupported global" in line:
            return line.split("GLOBAL", 1)[-1].split("was not")[0].strip() or "a non-tensor object"
    return "a non-tensor object"


def _unwrap(obj: Any, path: Path) -> Tuple[Dict[str, torch.Tensor], str, Dict[str, Any]]:
    args: Dict[str, Any] = {}
    container = "state dict"
    if isinstance(obj, dict) and "args" in obj:
        raw = obj["args"]
        args = vars(raw) if isinstance(raw, argparse.Namespace) else dict(raw) if isinstance(raw, dict) else {}
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in WEIGHT_KEYS_IN_ORDER:
            if isinstance(obj.get(key), dict):
                container = f"training dict ({key})"
                obj = obj[key]
                break
        else:
            raise CheckpointError(
                f"{path}: a dict without weights; expected a state dict or one with an "
                f"'ema' or 'model' entry, found keys {', '.join(map(str, list(obj)[:5]))}"
            )
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: holds {type(obj).__name__}, not a state dict of tensors")
    tensors = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is {type(value).__name__}, not a tensor")
        tensors[_strip_wrappers(key)] = value
    return tensors, container, args


#: Prefixes that wrappers add to every key when their state dict is saved: DataParallel/DDP
#: ("module.") and torch.compile ("_orig_mod."), in either order. A saving accident, not architecture.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _strip_wrappers(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def read_checkpoint(path) -> SourceCheckpoint:
    path = bundled_or_given(path)
    found = read_diffusers(path) if path.exists() else None
    files = [path]
    if found is not None:
        state_dict, args, files = found
        container = f"diffusers folder ({', '.join(f.name for f in files[1:3])}{', ...' if len(files) > 3 else ''})"
    else:
        _check_path(path)
        with open(path, "rb") as handle:
            magic = handle.read(8)
        if path.suffix == ".safetensors" or (len(magic) == 8 and int.from_bytes(magic, "little") < (1 << 27) and path.suffix not in (".pt", ".pth", ".ckpt", ".bin")):
            state_dict, args = _load_safetensors(path)
            state_dict = {_strip_wrappers(k): v for k, v in state_dict.items()}
            container = "safetensors"
        elif path.suffix in (".pt", ".pth", ".ckpt", ".bin") or zipfile.is_zipfile(path):
            state_dict, container, args = _unwrap(_load_pickle(path), path)
            if args:  # a training dict's args meet the same schema as a safetensors file's
                validate_args(args, {k: tuple(v.shape) for k, v in state_dict.items()}, path, "saved args")
        else:
            raise CheckpointError(
                f"{path}: unknown file type {path.suffix or '(no suffix)'}; expected .pt, .pth or .safetensors"
            )
    notes: List[str] = []
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in state_dict.values()})
    refuse_nonfinite(state_dict, path)
    if dtypes != ["float32"]:
        notes.append(f"weights stored as {'/'.join(dtypes)}; converted in float32")
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    sha256 = content_sha256(files)
    teacher = bundled_teacher(sha256)
    if teacher is not None:  # our own teacher: its args are the ones it was built with
        args = {**args, "define_the_model": True, "family": TEACHER_FAMILIES[teacher]}
    return SourceCheckpoint(
        path=path,
        state_dict=state_dict,
        sha256=sha256,
        container=container,
        dtype="/".join(dtypes),
        args=args,
        notes=notes,
        files=files,
    )


def hints_from_args(args: Dict[str, Any]) -> Dict[str, Any]:
    """What a checkpoint's saved args say, each under ``args_<name>``.

    Kept apart from the user's flags (plain names), so that a family can check the args against the
    weights and say which of the two a setting came from. ``path`` is the exception: the weights
    cannot contradict a SiT path, so the args' one is used like a flag.
    """
    hints: Dict[str, Any] = {}
    if "model" in args:
        hints["args_model"] = str(args["model"])
    if "path_type" in args:
        hints["args_path_type"] = str(args["path_type"])
        hints["path"] = str(args["path_type"]).lower()
    for key in ("family", "cbs_convert_config", "num_heads", "num_head_channels", "num_classes", "class_dropout_prob", "image_size", "learn_sigma",
                "beta_schedule", "attention_order", "numerics", "time_frequency_shift", "time_sin_first", "norm_eps",
                "downsample_padding"):
        if args.get(key) is not None:
            hints[f"args_{key}"] = args[key]
    if args.get("define_the_model"):  # a diffusers config: it builds the network, so it is not a claim to check
        hints["args_define_the_model"] = True
    if args.get("noise_schedule") is not None:  # guided-diffusion's name for it
        hints.setdefault("args_beta_schedule", args["noise_schedule"])
    return hints


#: the flags that describe a source's architecture, as they are named among the hints
ARCHITECTURE_FLAGS = ("family", "path", "num_heads", "num_classes", "beta_schedule", "num_head_channels",
                      "attention_order", "image_size", "use_checkpoint")


def with_user_hints(hints: Dict[str, Any], user: Dict[str, Any]) -> Dict[str, Any]:
    """The file's hints with the user's architecture flags on top.

    A file whose config builds the network (a diffusers config, a bundled teacher) is not a claim
    to check: a flag that contradicts it would make the tool compute another function than the
    one the file holds, so it is refused rather than obeyed."""
    merged = dict(hints)
    heads = ("num_heads", "num_head_channels")  # two spellings of one setting: the split into heads
    defined_heads = {k: hints[f"args_{k}"] for k in heads if hints.get(f"args_{k}") is not None}
    for key in ARCHITECTURE_FLAGS:
        value = user.get(key)
        if value is None:
            continue
        defined = hints.get(f"args_{key}")
        if key in heads and defined is None and defined_heads and hints.get("args_define_the_model"):
            other, count = next(iter(defined_heads.items()))
            flag = f"--{key.replace('_', '-')}"
            raise RecipeError(f"{flag} {value}: the model's own config splits attention by {other} {count}, and that "
                              f"config builds the network; drop {flag}")
        if key == "path" and hints.get("args_path_type") is not None:
            defined = str(hints["args_path_type"]).lower()
        same = str(value).lower() == str(defined).lower() if isinstance(value, str) else value == defined
        if hints.get("args_define_the_model") and defined is not None and not same:
            flag = f"--{key.replace('_', '-')}"
            raise RecipeError(f"{flag} {value}: the model's own config gives {key} {defined}, and that config builds "
                              f"the network; drop {flag}")
        merged[key] = value
    return merged
