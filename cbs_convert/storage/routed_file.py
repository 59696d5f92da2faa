"""The routed checkpoint: K experts (or a shared base and K deltas) in one self-describing
.safetensors file, written and read back as the model of ``models/``.

File layout: tensors ``experts.{k}.{source key}``; metadata key ``cbs_convert`` holds JSON with the
format version, family, time convention, boundaries (canonical and native), every expert's segment,
config and parameter count, the profile, the source hash and parameter count, and the recipe.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from cbs_convert.errors import CheckpointError, WorkdirError
from cbs_convert.storage.checkpoint import refuse_nonfinite
from cbs_convert.storage.files import atomic_write
from cbs_convert.families import family_from_config
from cbs_convert.families.base import Family, check_keys
from cbs_convert.families.diffusers import as_diffusers
from cbs_convert.storage.routed_schema import (
    PER_BLOCK_FORMAT,
    PER_BLOCK_SHARED_BASE_FORMAT,
    SHARED_BASE_FORMAT,
    SHARED_BASE_FORMATS,
    WHOLE_EXPERTS_FORMAT,
    validate_routed,
)
from cbs_convert.storage.schema import tensor_shapes
from cbs_convert.models.routed import RoutedModel
from cbs_convert.models.time_routed import native_boundaries
from cbs_convert.models.shared_base import SharedBaseModel, merge_delta

METADATA_KEY = "cbs_convert"


def save_safetensors_atomic(tensors: Dict[str, torch.Tensor], path, metadata: Optional[Dict[str, str]] = None):
    """``safetensors.torch.save_file``'s format, written one tensor at a time: save_file builds the
    bytes of every tensor before writing (a second copy of the whole state dict in memory)."""
    entries = [(name, _SAFETENSORS_DTYPES[t.dtype], list(t.shape), (lambda t=t: t.detach().cpu())) for name, t in tensors.items()]
    _write_safetensors(path, entries, metadata)


def routed_metadata(
    family: Family,
    expert_configs: Sequence[Dict[str, Any]],
    boundaries: Sequence[float],
    extra: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """The JSON description of a routed checkpoint (what ``load`` rebuilds it from)."""
    experts_meta = [
        {"segment": [float(boundaries[k]), float(boundaries[k + 1])], "config": config,
         "params": int(family.param_count(config))}
        for k, config in enumerate(expert_configs)
    ]
    # per-block widths have a version of their own, so that a reader without them refuses the file as
    # newer instead of naming a field it does not expect (a shared base's: ``save_shared_base``)
    per_block = any(family.per_block_widths(config) for config in [family.config, *expert_configs])
    meta = {
        "format_version": PER_BLOCK_FORMAT if per_block else WHOLE_EXPERTS_FORMAT,
        "family": family.name,
        "time_convention": {
            "canonical": "t in [0, 1], t = 1 noise, t = 0 data",
            "native_argument": family.native_time_name,
            "native_boundaries": native_boundaries(family, boundaries),
        },
        "boundaries": [float(b) for b in boundaries],
        "experts": experts_meta,
        "family_config": family.config,
    }
    meta.update(extra or {})
    return meta


def save_shared_base(path, model: SharedBaseModel, extra: Optional[Dict[str, Any]] = None, *, source=None,
                     profile=None, split=None, recipe=None) -> Path:
    """Write a shared-base model atomically: the base once, each segment's delta beside it."""
    family = model.family
    extra = {**run_description(family, source, profile, split, recipe), **(extra or {})}
    described = model.describe()
    meta = routed_metadata(family, [family.config] * model.segment_count, model.boundary_values, extra)
    meta["format_version"] = PER_BLOCK_SHARED_BASE_FORMAT if family.per_block_widths(family.config) else SHARED_BASE_FORMAT
    meta["shared_base"] = described
    for entry in meta["experts"]:  # what an expert adds to the shared base
        entry.update(params=described["delta_params"], flops=family.forward_flops(family.config) + described["delta_flops"])
    save_safetensors_atomic(model.file_tensors(), path, {METADATA_KEY: json.dumps(meta)})
    return Path(path)


def run_description(family: Family, source=None, profile=None, split=None, recipe=None) -> Dict[str, Any]:
    """The entries a conversion adds to a routed file's metadata beside the routing: the profile,
    the split, the source (hash, size, architecture, container) and the recipe; whatever is given."""
    extra: Dict[str, Any] = {}
    if profile is not None:
        extra["profile"] = profile if isinstance(profile, dict) else profile.to_dict()
    if split is not None:
        extra["split"] = split if isinstance(split, dict) else split.to_dict()
    if source is not None:
        extra["source"] = {"sha256": source.sha256, "params": int(family.param_count(family.config)),
                           "architecture": family.describe(family.config), "container": source.container}
    if recipe is not None:
        extra["recipe"] = recipe if isinstance(recipe, dict) else recipe.to_dict()
    return extra


def save_routed(
    path,
    family: Family,
    expert_state_dicts: Sequence[Dict[str, torch.Tensor]],
    expert_configs: Sequence[Dict[str, Any]],
    boundaries: Sequence[float],
    extra: Optional[Dict[str, Any]] = None,
    overwrite: bool = True,
    *,
    source=None,
    profile=None,
    split=None,
    recipe=None,
) -> Path:
    """Write the routed checkpoint atomically.

    ``source`` (what ``read_checkpoint`` returned), ``profile``, ``split`` and ``recipe`` are recorded
    as the CLI records them, so ``python -m cbs_convert info`` shows a library-made file fully;
    ``extra`` adds any other entries."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise WorkdirError(f"{path} exists; pass --force to overwrite it")
    extra = {**run_description(family, source, profile, split, recipe), **(extra or {})}
    tensors = {f"experts.{k}.{key}": value for k, sd in enumerate(expert_state_dicts) for key, value in sd.items()}
    meta = routed_metadata(family, expert_configs, boundaries, extra)
    save_safetensors_atomic(tensors, path, {METADATA_KEY: json.dumps(meta)})
    return path


def save_routed_from_files(
    path,
    family: Family,
    expert_files: Sequence,
    expert_configs: Sequence[Dict[str, Any]],
    boundaries: Sequence[float],
    extra: Optional[Dict[str, Any]] = None,
) -> Path:
    """The same file as ``save_routed``, streamed from one .safetensors file per expert: one tensor
    in memory at a time, however large the experts."""
    from safetensors import safe_open

    sources = []
    for k, expert_file in enumerate(expert_files):
        with safe_open(str(expert_file), framework="pt") as handle:
            sources += [(f"experts.{k}.{key}", str(expert_file), key) for key in handle.keys()]
    meta = routed_metadata(family, expert_configs, boundaries, extra)
    stream_safetensors(path, sources, {METADATA_KEY: json.dumps(meta)})
    return Path(path)


#: bytes per element of the safetensors dtype names, and the names of torch's dtypes
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                       torch.bool: "BOOL"}


def stream_safetensors(path, sources: Sequence, metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write a .safetensors file whose tensor ``name`` is tensor ``key`` of file ``file``, for each
    (name, file, key) of ``sources``, copying one tensor at a time."""
    from safetensors import safe_open

    handles: Dict[str, Any] = {}

    def fetch(file, key):
        if file not in handles:
            handles.clear()  # sources come grouped by file: one open at a time
            handles[file] = safe_open(file, framework="pt")
        return handles[file].get_tensor(key)

    entries = []
    for name, file, key in sources:
        with safe_open(file, framework="pt") as handle:
            view = handle.get_slice(key)
            entries.append((name, view.get_dtype(), list(view.get_shape()), (lambda f=file, k=key: fetch(f, k))))
    try:
        _write_safetensors(path, entries, metadata)
    finally:
        handles.clear()
    return Path(path)


def _write_safetensors(path, entries: Sequence, metadata: Optional[Dict[str, str]]) -> None:
    """The safetensors format from (name, dtype name, shape, fetch) entries, atomically, holding one
    tensor at a time: 8 bytes of little-endian header length, a JSON header of dtype, shape and byte
    offsets per tensor (padded with spaces to a multiple of 8), then the tensors' bytes back to back."""
    header: Dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape, _ in entries:
        size = _DTYPE_BYTES[dtype]
        for dim in shape:
            size *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)

    def write(tmp):
        with open(tmp, "wb") as out:
            out.write(len(encoded).to_bytes(8, "little"))
            out.write(encoded)
            for _, _, _, fetch in entries:
                tensor = fetch().contiguous()
                if tensor.numel():
                    out.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
                del tensor

    atomic_write(path, write)


def read_metadata(path) -> Dict[str, Any]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such routed checkpoint")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(METADATA_KEY)
            shapes = tensor_shapes(handle) if raw is not None else {}
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0][:200]})") from None
    if raw is None:
        raise CheckpointError(f"{path}: has no '{METADATA_KEY}' metadata; it is not a routed checkpoint")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: routed metadata is not valid JSON ({exc})") from None
    # every entry point (load, info, extract, sample) reads through here: the metadata is checked
    # against itself and the header's tensors before anything is built from it
    return validate_routed(meta, shapes, path)


CORRUPT_ROUTED = "the file is corrupt; convert the source again"


def load(path, device="cpu", format: str = "cbs_convert"):
    """Rebuild the routed model of a checkpoint written by cbs_convert, in eval mode.

    ``format="diffusers"`` wraps a DiT or UNet result for diffusers pipelines
    (``pipe.transformer = load(path, format="diffusers")``, or ``pipe.unet = ...``): their forward
    signature and output type.
    """
    if format not in ("cbs_convert", "diffusers"):
        raise ValueError(f"format {format!r}: choose 'cbs_convert' or 'diffusers'")
    routed = _load_routed(path, device)
    if format == "diffusers":
        return as_diffusers(routed, routed.family)
    return routed


def _load_routed(path, device):
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_metadata(path)
    experts_meta = meta.get("experts") or []
    boundaries = meta.get("boundaries") or []
    if len(boundaries) != len(experts_meta) + 1:
        raise CheckpointError(
            f"{path}: metadata lists {len(experts_meta)} experts but {len(boundaries)} boundaries (need experts + 1)"
        )
    if any(b >= a for a, b in zip(boundaries[1:], boundaries[:-1])) or boundaries[0] != 0.0 or boundaries[-1] != 1.0:
        raise CheckpointError(f"{path}: boundaries {boundaries} must increase from 0 to 1")
    family = family_from_config(meta["family"], meta["family_config"])
    tensors = load_file(str(path), device="cpu")
    refuse_nonfinite(tensors, path, CORRUPT_ROUTED)
    if meta["format_version"] in SHARED_BASE_FORMATS:
        return _shared_base_from(path, family, meta, tensors).to(device).eval()
    experts: List[nn.Module] = []
    for k, entry in enumerate(experts_meta):
        prefix = f"experts.{k}."
        names = [key for key in tensors if key.startswith(prefix)]
        # clone: freshly allocated (aligned) storage computes bit for bit like the model that was saved
        sd = {key[len(prefix):]: tensors.pop(key).clone() for key in names}
        config = entry["config"]
        check_keys(sd, family.expected_shapes(config), f"{path}: expert {k} does not match its config")
        experts.append(family.instantiate(config, sd))
    stray = list(tensors)
    if stray:
        raise CheckpointError(f"{path}: tensors {', '.join(stray[:3])} belong to no expert in the metadata")
    routed = RoutedModel(family, experts, boundaries, meta)
    return routed.to(device).eval()


def _split_shared_base(meta: Dict[str, Any], tensors: Dict[str, torch.Tensor]):
    """(base state dict, per segment {layer: {"down", "up"}}) of a shared-base file's tensors; the
    schema (``read_metadata``) has already matched every listed delta and the base to the header."""
    layers = meta["shared_base"]["layers"]
    base = {key[len("base."):]: value for key, value in tensors.items() if key.startswith("base.")}
    deltas = [{layer: {part: tensors[f"deltas.{k}.{layer}.{part}"] for part in ("down", "up")} for layer in layers}
              for k in range(len(meta["experts"]))]
    return base, deltas


def _shared_base_from(path, family: Family, meta: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> SharedBaseModel:
    base_state, deltas = _split_shared_base(meta, tensors)
    base_state = {key: value.clone() for key, value in base_state.items()}
    check_keys(base_state, family.expected_shapes(family.config), f"{path}: the shared base does not match its config")
    described = meta["shared_base"]
    model = SharedBaseModel(family, family.instantiate(family.config, base_state), meta["boundaries"],
                            int(described["rank"]), described["layers"], meta)
    for k, segment in enumerate(deltas):
        for layer, parts in segment.items():
            model.delta(layer).load_file_tensors(k, parts["down"], parts["up"])
    return model


def expert_state_dict(path, expert: int) -> Dict[str, torch.Tensor]:
    """Expert ``expert``'s tensors under the source's own key names: read alone from a file of
    separate experts, merged from the base and its delta in a shared-base file."""
    from safetensors import safe_open

    meta = read_metadata(path)
    count = len(meta["experts"])
    if not 0 <= expert < count:
        raise CheckpointError(f"--expert {expert}: {path} holds experts 0 to {count - 1}")
    if meta["format_version"] in SHARED_BASE_FORMATS:
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        refuse_nonfinite(tensors, path, CORRUPT_ROUTED)
        base, deltas = _split_shared_base(meta, tensors)
        return merge_delta(base, deltas[expert])
    prefix = f"experts.{expert}."
    with safe_open(str(path), framework="pt") as handle:
        state = {key[len(prefix):]: handle.get_tensor(key) for key in handle.keys() if key.startswith(prefix)}
    refuse_nonfinite({f"{prefix}{key}": value for key, value in state.items()}, path, CORRUPT_ROUTED)
    return state
