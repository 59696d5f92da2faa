"""One schema for every self-describing file the tool reads back.

Two kinds of file describe themselves in JSON beside their tensors:

* a routed checkpoint: the ``cbs_convert`` metadata of ``routed.routed_metadata`` (format version,
  family, the source's config, boundaries in canonical and native time, each expert's segment,
  config and parameter count, and the run's profile, split, source and recipe);
* a plain checkpoint with training args: the ``args`` metadata that ``extract`` writes (with the
  expert's whole config under ``cbs_convert_config``) or that a training script saved.

Both are checked here before anything is built from them: types, required keys, finite boundaries
that rise from 0 to 1, a family that the config is a config of, and every size the config claims
against the tensors the file actually holds, read from the safetensors header alone. Depth and
block counts are compared before any closed-form count or meta-device build runs, so a file that
claims a billion blocks is refused at once instead of being built. Every violation is one
``CheckpointError`` line: the file, the field, what was expected, and how to fix it.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from cbs_convert.errors import CheckpointError

#: routed formats this reader knows: 1, every expert whole; 2, a shared base with low-rank deltas
SUPPORTED_FORMAT_VERSIONS = (1, 2)
SHARED_BASE_FORMAT = 2
#: No tensor dimension of a real model comes near 2^31; a larger width only makes the closed-form
#: counts overflow floats (``info`` divides them) or ask for impossible memory.
MAX_SIZE = 2**31 - 1
#: ADM's image size is not in its tensors, and the sampler allocates noise of that side: a side
#: beyond this is a multi-gigabyte sample, which no released diffusion model works at.
MAX_IMAGE_SIZE = 16384
#: the training chain every supported family was trained with (DDPM's 1000 steps)
DIFFUSION_STEPS = 1000

ROUTED_FIX = "restore the metadata as cbs_convert wrote it, or convert the source again"
EXTRACTED_FIX = "extract the expert again (python -m cbs_convert extract), or correct the field"
ARGS_FIX = "correct the field, or re-save the weights without it"

_MISSING = object()

Shapes = Mapping[str, Tuple[int, ...]]


class _Check:
    """Raises the one-line refusal for one file, worded for its kind."""

    def __init__(self, path, kind: str, fix: str):
        self.path, self.kind, self.fix = path, kind, fix

    def fail(self, field: str, expected: str, got: Any = _MISSING) -> CheckpointError:
        found = "is missing" if got is _MISSING else f"is {_shown(got)}"
        return CheckpointError(f"{self.path}: {self.kind} field '{field}' {found}; expected {expected}; {self.fix}")

    def get(self, obj: Mapping, key: str, field: str, expected: str) -> Any:
        if key not in obj:
            raise self.fail(field, expected)
        return obj[key]

    def integer(self, value, field: str, low: int = 0, high: int = MAX_SIZE, lenient: bool = False) -> int:
        # bool is an int to Python, never to a config; ``lenient`` admits the 4.0 or "4" that
        # third-party args may hold where the reader converts with int() anyway
        if lenient and isinstance(value, float) and value.is_integer():
            value = int(value)
        elif lenient and isinstance(value, str) and re.fullmatch(r"-?\d{1,12}", value.strip()):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.fail(field, f"a whole number from {low} to {high}", value)
        return value

    def number(self, value, field: str, low: float = -math.inf, high: float = math.inf) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
            bounds = "" if (low, high) == (-math.inf, math.inf) else f" from {low:g} to {high:g}"
            raise self.fail(field, f"a finite number{bounds}", value)
        return float(value)

    def boolean(self, value, field: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(field, "true or false", value)
        return value

    def text(self, value, field: str, choices: Optional[Sequence[str]] = None) -> str:
        if not isinstance(value, str) or (choices is not None and value not in choices):
            raise self.fail(field, f"one of {', '.join(map(repr, choices))}" if choices else "a string", value)
        return value

    def mapping(self, value, field: str) -> Dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(field, "a JSON object", value)
        return value

    def sequence(self, value, field: str, low: int = 0, high: int = MAX_SIZE) -> list:
        if not isinstance(value, list) or not low <= len(value) <= high:
            size = (f"exactly {low}" if low == high else f"{low} to {high}") if high < MAX_SIZE else f"at least {low}"
            raise self.fail(field, f"a JSON list of {size} entries", value)
        return value


class _Raw(str):
    """A description of what was found, shown as it is rather than as a JSON value."""


def _shown(value: Any) -> str:
    if isinstance(value, _Raw):
        return str(value)
    try:
        text = json.dumps(value, allow_nan=True, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    kind = {dict: "an object ", list: "a list "}.get(type(value), "")
    text = " ".join(text.split())
    return kind + (text if len(text) <= 60 else text[:57] + "...")


# ---------------------------------------------------------------------------------------------
# The safetensors header


def tensor_shapes(handle) -> Dict[str, Tuple[int, ...]]:
    """Every tensor's shape from an open ``safetensors.safe_open`` handle: the header only, no data."""
    return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


def read_header(path) -> Tuple[Dict[str, str], Dict[str, Tuple[int, ...]]]:
    """(metadata, tensor shapes) of a .safetensors file, without reading any tensor."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {}), tensor_shapes(handle)
    except Exception as exc:  # safetensors raises its own error types for every kind of damage
        first = str(exc).strip().splitlines()
        raise CheckpointError(f"{path}: not a readable safetensors file ({first[0][:200] if first else type(exc).__name__}); "
                              "it may be truncated") from None


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count


def _indices(shapes: Shapes, section: str) -> set:
    pattern = re.compile(rf"{re.escape(section)}\.(\d+)\.")
    return {int(m.group(1)) for key in shapes if (m := pattern.match(key))}


# ---------------------------------------------------------------------------------------------
# Model configs, per family


def _config_kind(config: Mapping) -> Optional[str]:
    """Which family a config's own keys say it belongs to, when they say."""
    if "channel_mult" in config or "model_channels" in config:
        return "adm"
    if "hidden_size" in config or "depth" in config:
        if "path" in config and "beta_schedule" not in config:
            return "sit"
        if "beta_schedule" in config and "path" not in config:
            return "dit"
    return None


def _check_transformer_config(check: _Check, name: str, config: Dict[str, Any], field: str) -> None:
    from cbs_convert.families.sit import NUMERICS

    for key in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "head_dim", "mlp_hidden"):
        check.integer(check.get(config, key, f"{field}.{key}", "a whole number from 1"), f"{field}.{key}", low=1)
    classes = check.integer(check.get(config, "num_classes", f"{field}.num_classes", "a whole number"), f"{field}.num_classes")
    rows = check.integer(check.get(config, "label_rows", f"{field}.label_rows", "a whole number"), f"{field}.label_rows")
    if rows not in (0, classes, classes + 1):
        raise check.fail(f"{field}.label_rows", f"0, {classes} or {classes + 1} for {classes} classes", rows)
    check.number(check.get(config, "class_dropout_prob", f"{field}.class_dropout_prob", "a number from 0 to 1"),
                 f"{field}.class_dropout_prob", 0.0, 1.0)
    check.boolean(check.get(config, "learn_sigma", f"{field}.learn_sigma", "true or false"), f"{field}.learn_sigma")
    if config["input_size"] % config["patch_size"]:
        raise check.fail(f"{field}.input_size", f"a multiple of patch_size {config['patch_size']}", config["input_size"])
    if "numerics" in config:
        check.text(config["numerics"], f"{field}.numerics", tuple(NUMERICS))
    if name == "sit":
        check.text(check.get(config, "path", f"{field}.path", "'linear' or 'gvp'"), f"{field}.path", ("linear", "gvp"))
    else:
        check.text(check.get(config, "beta_schedule", f"{field}.beta_schedule", "'linear' or 'cosine'"),
                   f"{field}.beta_schedule", ("linear", "cosine"))
        steps = check.get(config, "diffusion_steps", f"{field}.diffusion_steps", str(DIFFUSION_STEPS))
        check.integer(steps, f"{field}.diffusion_steps", DIFFUSION_STEPS, DIFFUSION_STEPS)


def _check_adm_config(check: _Check, config: Dict[str, Any], field: str) -> None:
    from cbs_convert.families.adm import ATTENTION_ORDERS, NORM_GROUPS

    def need(key, expected):
        return check.get(config, key, f"{field}.{key}", expected)

    for key in ("in_channels", "model_channels", "num_res_blocks"):
        check.integer(need(key, "a whole number from 1"), f"{field}.{key}", low=1)
    mult = check.sequence(need("channel_mult", "a list of positive numbers"), f"{field}.channel_mult", low=1)
    for i, m in enumerate(mult):
        check.number(m, f"{field}.channel_mult[{i}]", low=1 / config["model_channels"], high=MAX_SIZE)
    attention = check.sequence(need("attention_ds", "a list of downsampling factors"), f"{field}.attention_ds",
                               high=len(mult) + 1)
    for i, ds in enumerate(attention):
        check.integer(ds, f"{field}.attention_ds[{i}]", low=1)
    heads = check.integer(need("num_heads", "a whole number"), f"{field}.num_heads", low=-1)
    head_channels = check.integer(need("num_head_channels", "a whole number"), f"{field}.num_head_channels", low=-1)
    if head_channels <= 0 and heads < 1:
        raise check.fail(f"{field}.num_heads", "a head count from 1 when num_head_channels is not set", heads)
    check.integer(need("image_size", "a whole number from 1"), f"{field}.image_size", 1, MAX_IMAGE_SIZE)
    typed = {
        "out_channels": lambda v, f: check.integer(v, f, low=1), "num_heads_upsample": lambda v, f: check.integer(v, f, low=-1),
        "num_classes": check.integer, "diffusion_steps": lambda v, f: check.integer(v, f, DIFFUSION_STEPS, DIFFUSION_STEPS),
        "time_frequency_shift": lambda v, f: check.integer(v, f, 0, 1), "downsample_padding": lambda v, f: check.integer(v, f, 0, 1),
        "inner_groups": check.integer, "attention_heads": check.integer,
        "resblock_updown": check.boolean, "conv_resample": check.boolean, "use_scale_shift_norm": check.boolean,
        "use_checkpoint": check.boolean, "time_sin_first": check.boolean, "learn_sigma": check.boolean,
        "dropout": lambda v, f: check.number(v, f, 0.0, 0.999), "norm_eps": lambda v, f: check.number(v, f, 1e-12, 1.0),
        "attention_order": lambda v, f: check.text(v, f, ATTENTION_ORDERS),
        "beta_schedule": lambda v, f: check.text(v, f, ("linear", "cosine")),
    }
    for key, checker in typed.items():
        if key in config:
            checker(config[key], f"{field}.{key}")
    if "out_channels" in config and config["out_channels"] not in (config["in_channels"], 2 * config["in_channels"]):
        raise check.fail(f"{field}.out_channels", f"{config['in_channels']} or {2 * config['in_channels']} "
                         f"for {config['in_channels']} input channels", config["out_channels"])
    for key, high in (("res_groups", NORM_GROUPS), ("attn_heads", MAX_SIZE)):
        if key in config:
            for i, value in enumerate(check.sequence(config[key], f"{field}.{key}")):
                check.integer(value, f"{field}.{key}[{i}]", 1, high)


def check_config(check: _Check, name: str, config: Any, field: str) -> Dict[str, Any]:
    """Types, required keys and the family's own keys of one model config."""
    config = check.mapping(config, field)
    kind = _config_kind(config)
    if kind is not None and kind != name:
        raise check.fail("family", f"{kind!r}, the family of {field} ({_kind_evidence(kind)}); the family and its "
                         "config must agree", name)
    if name == "adm":
        _check_adm_config(check, config, field)
    else:
        _check_transformer_config(check, name, config, field)
    return config


def _kind_evidence(kind: str) -> str:
    return {"adm": "it has channel_mult", "sit": "it has a path and no beta_schedule",
            "dit": "it has a beta_schedule and no path"}[kind]


def _family(check: _Check, name: str, config: Dict[str, Any], field: str):
    from cbs_convert.families import family_from_config

    return _guarded(check, field, name, lambda: family_from_config(name, config))


def _guarded(check: _Check, field: str, name: str, work):
    """Run family code on a config whose fields passed their checks: what the family still finds
    wrong (a width that does not split into heads or GroupNorm groups, ...) is the file's problem."""
    try:
        return work()
    except CheckpointError as exc:
        raise check.fail(field, f"a config the {name} family can build ({exc})", _Raw("inconsistent")) from None
    except (KeyError, TypeError, ValueError, ZeroDivisionError, IndexError, OverflowError, RuntimeError) as exc:
        message = str(exc).strip().splitlines()
        reason = f"{type(exc).__name__}: {message[0][:160]}" if message else type(exc).__name__
        raise check.fail(field, f"a config the {name} family can build ({reason})", _Raw("inconsistent")) from None


def check_structure(check: _Check, name: str, config: Dict[str, Any], shapes: Shapes, field: str, what: str) -> None:
    """Block counts and the base width against the tensors, from the key names alone: nothing that
    grows with a claimed depth (a layout, a count, a build) may run before the claim is confirmed."""
    if not shapes:
        raise check.fail(field, f"tensors for {what} in the file", _Raw("a config without tensors"))
    if name == "adm":
        levels, per_level = len(config["channel_mult"]), config["num_res_blocks"]
        outputs, inputs = len(_indices(shapes, "output_blocks")), len(_indices(shapes, "input_blocks"))
        if levels * (per_level + 1) != outputs:
            raise check.fail(f"{field}.num_res_blocks", f"a layout of the {outputs} output blocks {what} holds "
                             f"(with the {levels} levels of channel_mult)", per_level)
        if 1 + levels * per_level + levels - 1 != inputs:
            raise check.fail(f"{field}.channel_mult", f"levels that lay out the {inputs} input blocks {what} holds",
                             config["channel_mult"])
        width = shapes.get("time_embed.0.weight")
        if width is None or len(width) != 2 or width[1] != config["model_channels"]:
            raise check.fail(f"{field}.model_channels", f"the width of {what}'s time_embed.0.weight "
                             f"({'absent' if width is None else width[-1]})", config["model_channels"])
    else:
        depth = len(_indices(shapes, "blocks"))
        if config["depth"] != depth:
            raise check.fail(f"{field}.depth", f"{depth}, the number of blocks {what} holds", config["depth"])
        embed = shapes.get("x_embedder.proj.weight")
        if embed is None or len(embed) != 4 or embed[0] != config["hidden_size"]:
            raise check.fail(f"{field}.hidden_size", f"the width of {what}'s x_embedder.proj.weight "
                             f"({'absent' if embed is None else embed[0]})", config["hidden_size"])


def check_counts(check: _Check, family, config: Dict[str, Any], shapes: Shapes, field: str, what: str) -> None:
    """The parameter count, then every key and shape, from a meta-device build that the structure
    check has bounded by the tensors themselves."""
    from cbs_convert.families.base import check_keys

    name = family.name
    held = sum(_numel(shape) for shape in shapes.values())
    claimed = _guarded(check, field, name, lambda: family.param_count(config))
    if claimed != held:
        raise check.fail(field, f"a config of the {held:,} parameters {what} holds ({what} does not match its config, "
                         f"which counts {claimed:,}: a width, the head split or the classes contradict the tensors)",
                         _Raw("inconsistent"))
    expected = _guarded(check, field, name, lambda: family.expected_shapes(config))
    try:
        check_keys(shapes_as_tensors(shapes), expected, f"{what} does not match its config")
    except CheckpointError as exc:
        raise check.fail(field, f"the keys and shapes of the tensors ({exc})", _Raw("inconsistent")) from None


class _Shape:
    """Stands in for a tensor where only its ``shape`` is read (``check_keys``)."""

    __slots__ = ("shape",)

    def __init__(self, shape):
        self.shape = tuple(shape)


def shapes_as_tensors(shapes: Shapes) -> Dict[str, _Shape]:
    return {key: _Shape(shape) for key, shape in shapes.items()}


# ---------------------------------------------------------------------------------------------
# The routed checkpoint

#: the sizes pruning may shrink, per family (widths, and a transformer's depth when whole blocks are
#: dropped); every other entry of an expert's config is the source's own (patch, channels, classes,
#: time convention), and the totals ADM derives from its per-block lists follow them
_WIDTHS = {"sit": ("hidden_size", "num_heads", "mlp_hidden", "depth"), "dit": ("hidden_size", "num_heads", "mlp_hidden", "depth"),
           "adm": ("res_groups", "attn_heads", "inner_groups", "attention_heads")}
#: how a model runs, not what it computes: an expert may differ from its source here
_RUNTIME = ("use_checkpoint", "dropout")


def validate_routed(meta: Any, header: Shapes, path) -> Dict[str, Any]:
    """Check a routed checkpoint's metadata against itself and the tensors of its header; returns it.

    Format 1 is checked whole. Format 2 (shared base and low-rank deltas) gets the entries both
    formats share here, and its own in ``validate_shared_base``."""
    from cbs_convert.families import FAMILIES

    check = _Check(path, "routed metadata", ROUTED_FIX)
    meta = check.mapping(meta, "(top level)")
    version = check.get(meta, "format_version", "format_version", f"one of {SUPPORTED_FORMAT_VERSIONS}")
    if isinstance(version, bool) or version not in SUPPORTED_FORMAT_VERSIONS:
        raise CheckpointError(f"{path}: routed format version {_shown(version)} is not supported (this cbs_convert reads "
                              f"{' and '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}); a newer cbs_convert wrote it: upgrade "
                              "cbs_convert, or restore the field if it was edited")
    name = check.text(check.get(meta, "family", "family", "a family name"), "family", tuple(sorted(FAMILIES)))
    source_config = check_config(check, name, check.get(meta, "family_config", "family_config", "the source's config"),
                                 "family_config")
    boundaries = _boundaries(check, check.get(meta, "boundaries", "boundaries", "a list of cuts from 0 to 1"))
    experts = check.sequence(check.get(meta, "experts", "experts", f"{len(boundaries) - 1} experts"), "experts", low=1)
    if len(experts) != len(boundaries) - 1:
        raise check.fail("experts", f"{len(boundaries) - 1} experts for {len(boundaries)} boundaries "
                         f"(metadata lists {len(experts)} experts but {len(boundaries)} boundaries; need experts + 1)", experts)
    for k, entry in enumerate(experts):
        entry = check.mapping(entry, f"experts[{k}]")
        segment = check.sequence(check.get(entry, "segment", f"experts[{k}].segment", "[lo, hi]"), f"experts[{k}].segment", 2, 2)
        for i, value in enumerate(segment):
            check.number(value, f"experts[{k}].segment[{i}]")
            if abs(value - boundaries[k + i]) > 1e-9:
                raise check.fail(f"experts[{k}].segment[{i}]", f"{boundaries[k + i]!r}, boundary {k + i}", value)
    if version == SHARED_BASE_FORMAT:
        # the shared base is the source model itself: its tensors bound the source's config
        base = {key[len("base."):]: shape for key, shape in header.items() if key.startswith("base.")}
        check_structure(check, name, source_config, base, "family_config", "the shared base")
        family = _family(check, name, source_config, "family_config")
        _time_convention(check, meta, family, boundaries)
        _run_description(check, meta, family, source_config)
        validate_shared_base(meta, header, path)
        return meta
    by_expert: Dict[int, Dict[str, Tuple[int, ...]]] = {}
    for key, shape in header.items():
        match = re.match(r"experts\.(\d+)\.(.+)$", key)
        if match is None or int(match.group(1)) >= len(experts):
            raise CheckpointError(f"{path}: tensor {key} belongs to no expert in the metadata (it lists {len(experts)}); "
                                  f"{ROUTED_FIX}")
        by_expert.setdefault(int(match.group(1)), {})[match.group(2)] = shape
    configs = []
    for k, entry in enumerate(experts):
        field = f"experts[{k}].config"
        config = check_config(check, name, check.get(entry, "config", field, "the expert's config"), field)
        _against_source(check, name, config, source_config, field)
        check_structure(check, name, config, by_expert.get(k, {}), field, f"expert {k}")
        configs.append(config)
    # the source differs from its experts only in what pruning shrinks: its layout is theirs, now
    # confirmed (a transformer's depth may exceed theirs, but its family object builds no blocks)
    family = _family(check, name, source_config, "family_config")
    _time_convention(check, meta, family, boundaries)
    _run_description(check, meta, family, source_config)
    for k, (entry, config) in enumerate(zip(experts, configs)):
        check_counts(check, family, config, by_expert[k], f"experts[{k}].config", f"expert {k}")
        params = check.integer(check.get(entry, "params", f"experts[{k}].params", "its parameter count"),
                               f"experts[{k}].params", high=2**63 - 1)
        count = family.param_count(config)
        if params != count:
            raise check.fail(f"experts[{k}].params", f"{count:,}, the count of its config and tensors", params)
    return meta


def validate_shared_base(meta: Dict[str, Any], header: Shapes, path) -> None:
    """Format 2's own entries: the ``shared_base`` metadata, and the ``base.*`` and ``deltas.*``
    tensors against it, all from the header (the common fields are already checked)."""
    check = _Check(path, "routed metadata", ROUTED_FIX)
    name, source_config = meta["family"], meta["family_config"]
    family = _family(check, name, source_config, "family_config")
    base = {key[len("base."):]: shape for key, shape in header.items() if key.startswith("base.")}
    check_counts(check, family, source_config, base, "family_config", "the shared base")
    shared = check.mapping(check.get(meta, "shared_base", "shared_base", "the shared base's description"), "shared_base")
    rank = check.integer(check.get(shared, "rank", "shared_base.rank", "the deltas' rank"), "shared_base.rank", low=1)
    layers = check.sequence(check.get(shared, "layers", "shared_base.layers", "the layers holding deltas"),
                            "shared_base.layers", low=1)
    for i, layer in enumerate(layers):
        check.text(layer, f"shared_base.layers[{i}]")
        weight = base.get(f"{layer}.weight")
        if not family.carries_delta(layer) or weight is None or len(weight) < 2:
            raise check.fail(f"shared_base.layers[{i}]", f"a layer of the base that the {name} family gives deltas", layer)
        # a layer listed twice (delta_params doubled to match) would be hooked twice at load, its
        # delta added twice, while extract folds it in once: load and extract would disagree
        if layer in layers[:i]:
            raise check.fail(f"shared_base.layers[{i}]", "a layer not listed before (each carries one delta)", layer)
    segments = len(meta["experts"])
    listed = set()
    per_segment = 0
    for layer in layers:
        weight = base[f"{layer}.weight"]
        fan_out, fan_in = weight[0], _numel(weight[1:])
        per_segment += rank * (fan_in + fan_out)
        for k in range(segments):
            for part, rows, size in (("down", rank, fan_in), ("up", fan_out, rank)):
                key = f"deltas.{k}.{layer}.{part}"
                shape = header.get(key)
                if shape is None or len(shape) < 2 or shape[0] != rows or _numel(shape[1:]) != size:
                    got = _Raw("absent") if shape is None else _Raw(f"a tensor of shape {list(shape)}")
                    raise check.fail(f"shared_base.layers ({layer})", f"tensor {key} of {rows} x {size} (rank {rank})", got)
                listed.add(key)
    stray = [key for key in header if not key.startswith("base.") and key not in listed]
    if stray:
        raise CheckpointError(f"{path}: tensor {stray[0]} belongs neither to the shared base nor to a listed delta; {ROUTED_FIX}")
    counts = {"base_params": family.param_count(source_config), "delta_params": per_segment}
    for key, value in counts.items():
        if check.integer(check.get(shared, key, f"shared_base.{key}", f"{value:,}"), f"shared_base.{key}", high=2**63 - 1) != value:
            raise check.fail(f"shared_base.{key}", f"{value:,}, the count of the tensors", shared[key])
    check.integer(check.get(shared, "delta_flops", "shared_base.delta_flops", "a FLOP count"), "shared_base.delta_flops",
                  high=2**63 - 1)
    for k, entry in enumerate(meta["experts"]):
        config = check.get(entry, "config", f"experts[{k}].config", "the source's config")
        if config != source_config:
            raise check.fail(f"experts[{k}].config", "family_config itself (every expert is the shared base plus its delta)",
                             _Raw("another config"))
        params = check.integer(check.get(entry, "params", f"experts[{k}].params", "its delta's parameters"),
                               f"experts[{k}].params", high=2**63 - 1)
        if params != per_segment:
            raise check.fail(f"experts[{k}].params", f"{per_segment:,}, the parameters of its delta", params)


def _boundaries(check: _Check, value) -> list:
    cuts = check.sequence(value, "boundaries", low=2)
    for i, cut in enumerate(cuts):
        check.number(cut, f"boundaries[{i}]")
    if cuts[0] != 0.0 or cuts[-1] != 1.0:
        raise check.fail("boundaries", "cuts that start at 0 and end at 1", cuts)
    for i in range(1, len(cuts)):
        if not cuts[i] > cuts[i - 1]:
            raise check.fail(f"boundaries[{i}]", f"a cut above boundaries[{i - 1}] = {cuts[i - 1]!r} "
                             "(boundaries must increase from 0 to 1)", cuts[i])
    return cuts


def _time_convention(check: _Check, meta, family, boundaries) -> None:
    if "time_convention" not in meta:
        return
    convention = check.mapping(meta["time_convention"], "time_convention")
    if "native_argument" in convention:
        check.text(convention["native_argument"], "time_convention.native_argument")
    if "native_boundaries" not in convention:
        return
    native = check.sequence(convention["native_boundaries"], "time_convention.native_boundaries",
                            len(boundaries), len(boundaries))
    import torch

    expected = family.native_time(torch.tensor(boundaries, dtype=torch.float64)).tolist()
    for i, (value, want) in enumerate(zip(native, expected)):
        field = f"time_convention.native_boundaries[{i}]"
        check.number(value, field)
        if abs(value - want) > 1e-9 * max(1.0, abs(want)):
            raise check.fail(field, f"{want!r}, boundaries[{i}] in the {family.name} family's native time", value)


def _run_description(check: _Check, meta, family, source_config) -> None:
    """The entries ``info`` shows beside the routing: types only, and the source's parameter count."""
    if "source" in meta:
        source = check.mapping(meta["source"], "source")
        for key in ("sha256", "container", "architecture"):
            if key in source:
                check.text(source[key], f"source.{key}")
        if "params" in source:
            params = check.integer(source["params"], "source.params", high=2**63 - 1)
            count = _guarded(check, "family_config", family.name, lambda: family.param_count(source_config))
            if params != count:
                raise check.fail("source.params", f"{count:,}, the count of family_config", params)
    if "split" in meta:
        split = check.mapping(meta["split"], "split")
        for key in ("method", "monitor"):
            if split.get(key) is not None:
                check.text(split[key], f"split.{key}")
        if "shares" in split:
            for i, share in enumerate(check.sequence(split["shares"], "split.shares")):
                check.number(share, f"split.shares[{i}]")
    for key in ("recipe", "profile"):
        if key in meta:
            check.mapping(meta[key], key)


def _against_source(check: _Check, name: str, config, source, field: str) -> None:
    """An expert is its source pruned: everything but the sizes pruning shrinks is the source's."""
    widths = _WIDTHS[name]
    for key in sorted(set(config) | set(source)):
        if key in _RUNTIME:
            continue
        mine, theirs = config.get(key, _MISSING), source.get(key, _MISSING)
        if key not in widths:
            if mine != theirs:
                expected = "absent" if theirs is _MISSING else f"{_shown(theirs)}"
                raise check.fail(f"{field}.{key}", f"{expected} as in family_config (pruning changes only "
                                 f"{', '.join(widths)})", _Raw("absent") if mine is _MISSING else mine)
        elif isinstance(mine, list) and isinstance(theirs, list):
            if len(mine) != len(theirs) or any(a > b for a, b in zip(mine, theirs)):
                raise check.fail(f"{field}.{key}", f"{len(theirs)} entries, none above family_config's {_shown(theirs)}", mine)
        elif mine is not _MISSING and theirs is not _MISSING:
            if isinstance(mine, int) and isinstance(theirs, (int, float)) and mine > theirs:
                raise check.fail(f"{field}.{key}", f"at most family_config's {theirs} (pruning only removes units)", mine)


# ---------------------------------------------------------------------------------------------
# Training args: what ``extract`` writes, and what a training script saved


def _families():
    from cbs_convert.families import FAMILIES

    return FAMILIES


def _positive(check: _Check, value, field: str):
    return check.integer(value, field, low=1, lenient=True)


#: the args a checkpoint may carry that cbs_convert reads (``checkpoint.hints_from_args``), each
#: with its check; anything else in the args is the training script's business and left alone
_ARG_CHECKS = {
    "model": lambda c, v, f: c.text(v, f),
    # names whose values the families judge (a SiT path, a schedule, a qkv order): only the type here
    "path_type": lambda c, v, f: c.text(v, f),
    "family": lambda c, v, f: c.text(v, f, tuple(sorted(_families()))),
    "cbs_convert_config": lambda c, v, f: c.mapping(v, f),
    "num_heads": _positive,
    "num_head_channels": lambda c, v, f: c.integer(v, f, low=-1, lenient=True),
    "num_classes": lambda c, v, f: c.integer(v, f, lenient=True),
    "class_dropout_prob": lambda c, v, f: c.number(v, f, 0.0, 1.0),
    "image_size": lambda c, v, f: c.integer(v, f, 1, MAX_IMAGE_SIZE, lenient=True),
    "learn_sigma": lambda c, v, f: c.boolean(v, f),
    "beta_schedule": lambda c, v, f: c.text(v, f),
    "noise_schedule": lambda c, v, f: c.text(v, f),
    "attention_order": lambda c, v, f: c.text(v, f),
    "numerics": lambda c, v, f: c.text(v, f),
    "time_frequency_shift": lambda c, v, f: c.integer(v, f, 0, 1),
    "time_sin_first": lambda c, v, f: c.boolean(v, f),
    "norm_eps": lambda c, v, f: c.number(v, f, 1e-12, 1.0),
    "downsample_padding": lambda c, v, f: c.integer(v, f, 0, 1),
    "define_the_model": lambda c, v, f: c.boolean(v, f),
}


def validate_args(args: Any, shapes: Shapes, path, where: str = "args metadata") -> Dict[str, Any]:
    """Check a checkpoint's training args before ``detect`` reads them; returns them.

    Every arg cbs_convert reads gets its type and range. An expert written by ``extract`` (its
    whole config under ``cbs_convert_config``) is checked like a routed file's expert: the config
    against the family and against the tensors ``shapes``, and every other arg against the config."""
    extracted = isinstance(args, dict) and "cbs_convert_config" in args
    check = _Check(path, where, EXTRACTED_FIX if extracted else ARGS_FIX)
    args = check.mapping(args, "(top level)")
    for key, checker in _ARG_CHECKS.items():
        if args.get(key) is not None:
            checker(check, args[key], key)
    if not extracted or args.get("cbs_convert_config") is None:
        return args
    name = check.get(args, "family", "family", "the family of cbs_convert_config")
    if name is None:
        raise check.fail("family", "the family of cbs_convert_config", None)
    config = check_config(check, name, args["cbs_convert_config"], "cbs_convert_config")
    check_structure(check, name, config, shapes, "cbs_convert_config", "the file")
    family = _family(check, name, config, "cbs_convert_config")
    check_counts(check, family, config, shapes, "cbs_convert_config", "the file")
    _args_agree(check, family, config, args)
    return args


def _same(given, value) -> bool:
    if isinstance(given, str) and isinstance(value, str):
        return given.lower() == value.lower()  # path_type is "Linear" in SiT's args, "linear" in a config
    if isinstance(given, bool) or isinstance(value, bool):
        return given is value
    if isinstance(value, int) and isinstance(given, (str, float)):
        return int(given) == value  # a "4" or 4.0 the lenient checks admitted
    return given == value


def _args_agree(check: _Check, family, config, args) -> None:
    """The args ``extract`` writes beside the config repeat what the config says (the head split,
    classes, time convention); an arg that says otherwise leaves two models in one file."""
    from cbs_convert.families import FAMILIES

    stated = dict(family.saved_args(config))
    stated.pop("model", None)
    # the family's own copy of the config: ADM's is completed with what it derives (learn_sigma)
    stated.update(learn_sigma=family.config["learn_sigma"], num_classes=family.num_classes(family.config))
    for key, value in stated.items():
        given = args.get(key)
        if given is None:
            continue
        if not _same(given, value):
            raise check.fail(key, f"{_shown(value)}, as cbs_convert_config gives it", given)
    if family.name != "adm" and args.get("image_size") is not None:
        side = config["input_size"]
        if int(args["image_size"]) not in (side, 8 * side):
            raise check.fail("image_size", f"{side} (or {8 * side} through the VAE), the input cbs_convert_config gives",
                             args["image_size"])
    model = args.get("model")
    if isinstance(model, str):
        named = {n for n in FAMILIES if re.search(rf"(^|[^a-z]){n}([^a-z]|$)", model.lower())}
        if len(named) == 1 and family.name not in named:
            raise check.fail("model", f"a {family.name} model name, as family says", model)
