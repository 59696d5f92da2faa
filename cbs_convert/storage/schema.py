"""One schema for every self-describing file the tool reads back: the checker that words each
refusal, the safetensors header, the checks of a model config (each family checks its own keys), and
a plain checkpoint's training args.

Two kinds of file describe themselves in JSON beside their tensors:

* a routed checkpoint: the ``cbs_convert`` metadata, checked in routed_schema.py with the pieces here;
* a plain checkpoint with training args: the ``args`` metadata that ``extract`` writes (with the
  expert's whole config under ``cbs_convert_config``) or that a training script saved.

Both are checked before anything is built from them: types, required keys, a family that the config
is a config of, and every size the config claims against the tensors the file actually holds, read
from the safetensors header alone. Depth and block counts are compared before any closed-form count
or meta-device build runs, so a file that claims a billion blocks is refused at once instead of being
built. Every violation is one ``CheckpointError`` line: the file, the field, what was expected, and
how to fix it.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from cbs_convert.errors import CheckpointError
from cbs_convert.families import CONFIG_EVIDENCE, FAMILIES, config_family, family_from_config, named_in
from cbs_convert.families.base import MAX_IMAGE_SIZE, MAX_SIZE, check_keys

EXTRACTED_FIX = "extract the expert again (python -m cbs_convert extract), or correct the field"
ARGS_FIX = "correct the field, or re-save the weights without it"

MISSING = object()

Shapes = Mapping[str, Tuple[int, ...]]


class Check:
    """Raises the one-line refusal for one file, worded for its kind."""

    def __init__(self, path, kind: str, fix: str):
        self.path, self.kind, self.fix = path, kind, fix

    def fail(self, field: str, expected: str, got: Any = MISSING) -> CheckpointError:
        found = "is missing" if got is MISSING else f"is {shown(got)}"
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


class Raw(str):
    """A description of what was found, shown as it is rather than as a JSON value."""


def shown(value: Any) -> str:
    if isinstance(value, Raw):
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


def numel(shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count


# ---------------------------------------------------------------------------------------------
# Model configs: each family checks its own, with the checker of the file


def check_config(check: Check, name: str, config: Any, field: str) -> Dict[str, Any]:
    """Types, required keys and the family's own keys of one model config."""
    config = check.mapping(config, field)
    kind = config_family(config)
    if kind is not None and kind != name:
        raise check.fail("family", f"{kind!r}, the family of {field} ({CONFIG_EVIDENCE[kind]}); the family and its "
                         "config must agree", name)
    FAMILIES[name].check_config(check, config, field)
    return config


def build_family(check: Check, name: str, config: Dict[str, Any], field: str):
    return guarded(check, field, name, lambda: family_from_config(name, config))


def guarded(check: Check, field: str, name: str, work):
    """Run family code on a config whose fields passed their checks: what the family still finds
    wrong (a width that does not split into heads or GroupNorm groups, ...) is the file's problem."""
    try:
        return work()
    except CheckpointError as exc:
        raise check.fail(field, f"a config the {name} family can build ({exc})", Raw("inconsistent")) from None
    except (KeyError, TypeError, ValueError, ZeroDivisionError, IndexError, OverflowError, RuntimeError) as exc:
        message = str(exc).strip().splitlines()
        reason = f"{type(exc).__name__}: {message[0][:160]}" if message else type(exc).__name__
        raise check.fail(field, f"a config the {name} family can build ({reason})", Raw("inconsistent")) from None


def check_structure(check: Check, name: str, config: Dict[str, Any], shapes: Shapes, field: str, what: str) -> None:
    """Block counts and the base width against the tensors, from the key names alone: nothing that
    grows with a claimed depth (a layout, a count, a build) may run before the claim is confirmed."""
    if not shapes:
        raise check.fail(field, f"tensors for {what} in the file", Raw("a config without tensors"))
    FAMILIES[name].check_structure(check, config, shapes, field, what)


def check_counts(check: Check, family, config: Dict[str, Any], shapes: Shapes, field: str, what: str) -> None:
    """The parameter count, then every key and shape, from a meta-device build that the structure
    check has bounded by the tensors themselves."""
    name = family.name
    held = sum(numel(shape) for shape in shapes.values())
    claimed = guarded(check, field, name, lambda: family.param_count(config))
    if claimed != held:
        raise check.fail(field, f"a config of the {held:,} parameters {what} holds ({what} does not match its config, "
                         f"which counts {claimed:,}: a width, the head split or the classes contradict the tensors)",
                         Raw("inconsistent"))
    expected = guarded(check, field, name, lambda: family.expected_shapes(config))
    try:
        check_keys(shapes_as_tensors(shapes), expected, f"{what} does not match its config")
    except CheckpointError as exc:
        raise check.fail(field, f"the keys and shapes of the tensors ({exc})", Raw("inconsistent")) from None


class _Shape:
    """Stands in for a tensor where only its ``shape`` is read (``check_keys``)."""

    __slots__ = ("shape",)

    def __init__(self, shape):
        self.shape = tuple(shape)


def shapes_as_tensors(shapes: Shapes) -> Dict[str, _Shape]:
    return {key: _Shape(shape) for key, shape in shapes.items()}


# ---------------------------------------------------------------------------------------------
# Training args: what ``extract`` writes, and what a training script saved


def _positive(check: Check, value, field: str):
    return check.integer(value, field, low=1, lenient=True)


#: the args a checkpoint may carry that cbs_convert reads (``checkpoint.hints_from_args``), each
#: with its check; anything else in the args is the training script's business and left alone
_ARG_CHECKS = {
    "model": lambda c, v, f: c.text(v, f),
    # names whose values the families judge (a SiT path, a schedule, a qkv order): only the type here
    "path_type": lambda c, v, f: c.text(v, f),
    "family": lambda c, v, f: c.text(v, f, tuple(sorted(FAMILIES))),
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
    check = Check(path, where, EXTRACTED_FIX if extracted else ARGS_FIX)
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
    family = build_family(check, name, config, "cbs_convert_config")
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


def _args_agree(check: Check, family, config, args) -> None:
    """The args ``extract`` writes beside the config repeat what the config says (the head split,
    classes, time convention); an arg that says otherwise leaves two models in one file."""
    stated = dict(family.saved_args(config))
    stated.pop("model", None)
    # the family's own copy of the config: ADM's is completed with what it derives (learn_sigma)
    stated.update(learn_sigma=family.config["learn_sigma"], num_classes=family.num_classes(family.config))
    for key, value in stated.items():
        given = args.get(key)
        if given is None:
            continue
        if not _same(given, value):
            raise check.fail(key, f"{shown(value)}, as cbs_convert_config gives it", given)
    family.check_args(check, config, args)
    model = args.get("model")
    if isinstance(model, str):
        named = named_in(model)
        if named is not None and named != family.name:
            raise check.fail("model", f"a {family.name} model name, as family says", model)
