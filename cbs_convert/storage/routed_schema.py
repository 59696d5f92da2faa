"""The schema of a routed checkpoint's ``cbs_convert`` metadata (``routed_file.routed_metadata``): format
version, family, the source's config, boundaries in canonical and native time, each expert's
segment, config and parameter count, and the run's profile, split, source and recipe; the shared
base and its low-rank deltas (formats 2 and 4); per-block widths (formats 3 and 4). Checked against itself and against the tensors of the file's
header before anything is built, with the checker and the config checks of schema.py.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Tuple

import torch

from cbs_convert.errors import CheckpointError
from cbs_convert.families import FAMILIES
from cbs_convert.models.shared_base import describe_shared_base
from cbs_convert.storage.schema import (
    MISSING,
    Check,
    Raw,
    Shapes,
    build_family,
    check_config,
    check_counts,
    check_structure,
    guarded,
    numel,
    shown,
)

#: routed formats this reader knows: 1, every expert whole; 2, a shared base with low-rank deltas;
#: 3, experts whole with per-block widths (``block_heads``...); 4, a shared base whose source has
#: per-block widths. Per-block widths get versions of their own so that a reader without them says
#: the file is newer instead of naming a field it does not expect.
WHOLE_EXPERTS_FORMAT, SHARED_BASE_FORMAT, PER_BLOCK_FORMAT, PER_BLOCK_SHARED_BASE_FORMAT = 1, 2, 3, 4
SUPPORTED_FORMAT_VERSIONS = (WHOLE_EXPERTS_FORMAT, SHARED_BASE_FORMAT, PER_BLOCK_FORMAT, PER_BLOCK_SHARED_BASE_FORMAT)
SHARED_BASE_FORMATS = (SHARED_BASE_FORMAT, PER_BLOCK_SHARED_BASE_FORMAT)

ROUTED_FIX = "restore the metadata as cbs_convert wrote it, or convert the source again"



def validate_routed(meta: Any, header: Shapes, path) -> Dict[str, Any]:
    """Check a routed checkpoint's metadata against itself and the tensors of its header; returns it.

    Whole experts (formats 1 and 3) are checked here entirely. A shared base with low-rank deltas
    (formats 2 and 4) gets the entries all formats share here, and its own in ``validate_shared_base``."""
    check = Check(path, "routed metadata", ROUTED_FIX)
    meta = check.mapping(meta, "(top level)")
    version = check.get(meta, "format_version", "format_version", f"one of {SUPPORTED_FORMAT_VERSIONS}")
    if isinstance(version, bool) or version not in SUPPORTED_FORMAT_VERSIONS:
        raise CheckpointError(f"{path}: routed format version {shown(version)} is not supported (this cbs_convert reads "
                              f"{', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}); a newer cbs_convert wrote it: upgrade "
                              "cbs_convert, or restore the field if it was edited")
    shared = version in SHARED_BASE_FORMATS
    if "shared_base" in meta and not shared:
        raise check.fail("shared_base", f"no such entry in a file of whole experts (format {version}); a shared base "
                         f"is format {' or '.join(map(str, SHARED_BASE_FORMATS))}", meta["shared_base"])
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
    if shared:
        # the shared base is the source model itself: its tensors bound the source's config
        base = {key[len("base."):]: shape for key, shape in header.items() if key.startswith("base.")}
        check_structure(check, name, source_config, base, "family_config", "the shared base")
        family = build_family(check, name, source_config, "family_config")
        _per_block_version(check, version, PER_BLOCK_SHARED_BASE_FORMAT, SHARED_BASE_FORMAT,
                           bool(family.per_block_widths(source_config)))
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
    family = build_family(check, name, source_config, "family_config")
    _per_block_version(check, version, PER_BLOCK_FORMAT, WHOLE_EXPERTS_FORMAT,
                       any(family.per_block_widths(config) for config in [source_config, *configs]))
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


def _per_block_version(check: Check, version: int, per_block_format: int, plain_format: int, per_block: bool) -> None:
    # a per-block version promises per-block widths; the plain one over them is a file written
    # before those versions existed, and stays readable
    if version == per_block_format and not per_block:
        raise check.fail("format_version", f"{plain_format}: no config in the file has widths of its own per block, "
                         f"which format {per_block_format} is for", version)


def validate_shared_base(meta: Dict[str, Any], header: Shapes, path) -> None:
    """A shared-base file's own entries: the ``shared_base`` metadata, and the ``base.*`` and ``deltas.*``
    tensors against it, all from the header (the common fields are already checked)."""
    check = Check(path, "routed metadata", ROUTED_FIX)
    name, source_config = meta["family"], meta["family_config"]
    family = build_family(check, name, source_config, "family_config")
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
        fan_out, fan_in = weight[0], numel(weight[1:])
        per_segment += rank * (fan_in + fan_out)
        # down is stored shaped like the layer's weight with rank outputs (a kernel kept whole): a
        # tensor of the right size in another layout would be read in the wrong order
        expected = {"down": [rank, *weight[1:]], "up": [fan_out, rank]}
        for k in range(segments):
            for part, want in expected.items():
                key = f"deltas.{k}.{layer}.{part}"
                shape = header.get(key)
                if shape is None or list(shape) != want:
                    got = Raw("absent") if shape is None else Raw(f"a tensor of shape {list(shape)}")
                    raise check.fail(f"shared_base.layers ({layer})", f"tensor {key} of shape {want} (rank {rank})", got)
                listed.add(key)
    stray = [key for key in header if not key.startswith("base.") and key not in listed]
    if stray:
        raise CheckpointError(f"{path}: tensor {stray[0]} belongs neither to the shared base nor to a listed delta; {ROUTED_FIX}")
    counts = {"base_params": family.param_count(source_config), "delta_params": per_segment}
    for key, value in counts.items():
        if check.integer(check.get(shared, key, f"shared_base.{key}", f"{value:,}"), f"shared_base.{key}", high=2**63 - 1) != value:
            raise check.fail(f"shared_base.{key}", f"{value:,}, the count of the tensors", shared[key])
    flops = check.integer(check.get(shared, "delta_flops", "shared_base.delta_flops", "a FLOP count"),
                          "shared_base.delta_flops", high=2**63 - 1)
    # counted again by a probe forward on the meta device (no weights, no arithmetic): info and the
    # report print this number against the source's FLOPs
    counted = guarded(check, "shared_base", name, lambda: describe_shared_base(
        family, meta["boundaries"], rank, layers)["delta_flops"])
    if flops != counted:
        raise check.fail("shared_base.delta_flops", f"{counted:,}, what the deltas add to one forward", flops)
    for k, entry in enumerate(meta["experts"]):
        config = check.get(entry, "config", f"experts[{k}].config", "the source's config")
        if config != source_config:
            raise check.fail(f"experts[{k}].config", "family_config itself (every expert is the shared base plus its delta)",
                             Raw("another config"))
        params = check.integer(check.get(entry, "params", f"experts[{k}].params", "its delta's parameters"),
                               f"experts[{k}].params", high=2**63 - 1)
        if params != per_segment:
            raise check.fail(f"experts[{k}].params", f"{per_segment:,}, the parameters of its delta", params)


def _boundaries(check: Check, value) -> list:
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


def _time_convention(check: Check, meta, family, boundaries) -> None:
    if "time_convention" not in meta:
        return
    convention = check.mapping(meta["time_convention"], "time_convention")
    if "native_argument" in convention:
        check.text(convention["native_argument"], "time_convention.native_argument")
    if "native_boundaries" not in convention:
        return
    native = check.sequence(convention["native_boundaries"], "time_convention.native_boundaries",
                            len(boundaries), len(boundaries))
    expected = family.native_time(torch.tensor(boundaries, dtype=torch.float64)).tolist()
    for i, (value, want) in enumerate(zip(native, expected)):
        field = f"time_convention.native_boundaries[{i}]"
        check.number(value, field)
        if abs(value - want) > 1e-9 * max(1.0, abs(want)):
            raise check.fail(field, f"{want!r}, boundaries[{i}] in the {family.name} family's native time", value)


def _run_description(check: Check, meta, family, source_config) -> None:
    """The entries ``info`` shows beside the routing: types only, and the source's parameter count."""
    if "source" in meta:
        source = check.mapping(meta["source"], "source")
        for key in ("sha256", "container", "architecture"):
            if key in source:
                check.text(source[key], f"source.{key}")
        if "params" in source:
            params = check.integer(source["params"], "source.params", high=2**63 - 1)
            count = guarded(check, "family_config", family.name, lambda: family.param_count(source_config))
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
    # the cut profile is a record of the run: a monitor the report profiled may hold a non-finite
    # point without harm, so it is checked where a schedule reads it (model_schedules.stored_profile)
    for key in ("recipe", "profile"):
        if key in meta:
            check.mapping(meta[key], key)
    if "step_profile" in meta:
        _curves(check, meta["step_profile"], "step_profile")


def check_stored_curves(value, key: str, monitor: str, where: str = "the routed file") -> None:
    """Refuse, in one line, a stored profile (``profile`` or ``step_profile``) whose ``monitor``
    curve cannot place steps; its other curves are not read."""
    _curves(Check(where, "routed metadata", ROUTED_FIX), value, key, (monitor,))


def _curves(check: Check, value, key: str, monitors=None) -> None:
    """A stored profile the step schedule reads at sampling time without a model call, held to what
    placing steps needs: times rising within [0, 1], one finite value of at least 0 per time for each
    curve (every monitor is a mean of squares)."""
    profile = check.mapping(value, key)
    grid = check.sequence(check.get(profile, "grid", f"{key}.grid", "a list of times"), f"{key}.grid", low=2)
    times = [check.number(t, f"{key}.grid[{i}]", 0.0, 1.0) for i, t in enumerate(grid)]
    for i in range(1, len(times)):
        if times[i] <= times[i - 1]:
            raise check.fail(f"{key}.grid[{i}]", f"above the time before it ({times[i - 1]:g}): the grid rises", times[i])
    curves = check.mapping(check.get(profile, "mean", f"{key}.mean", "a JSON object of curves"), f"{key}.mean")
    for monitor, curve in curves.items():
        if monitors is not None and monitor not in monitors:
            continue
        field = f"{key}.mean.{monitor}"
        for i, v in enumerate(check.sequence(curve, field, low=len(times), high=len(times))):
            check.number(v, f"{field}[{i}]", 0.0)


def _against_source(check: Check, name: str, config, source, field: str) -> None:
    """An expert is its source pruned: everything but the sizes pruning shrinks is the source's."""
    widths = FAMILIES[name].pruned_keys
    for key in sorted(set(config) | set(source)):
        if key in FAMILIES[name].runtime_keys:
            continue
        mine, theirs = config.get(key, MISSING), source.get(key, MISSING)
        if key not in widths:
            if mine != theirs:
                expected = "absent" if theirs is MISSING else f"{shown(theirs)}"
                raise check.fail(f"{field}.{key}", f"{expected} as in family_config (pruning changes only "
                                 f"{', '.join(widths)})", Raw("absent") if mine is MISSING else mine)
        elif isinstance(mine, list) and isinstance(theirs, list):
            if len(mine) != len(theirs) or any(a > b for a, b in zip(mine, theirs)):
                raise check.fail(f"{field}.{key}", f"{len(theirs)} entries, none above family_config's {shown(theirs)}", mine)
        elif mine is not MISSING and theirs is not MISSING:
            if isinstance(mine, int) and isinstance(theirs, (int, float)) and mine > theirs:
                raise check.fail(f"{field}.{key}", f"at most family_config's {theirs} (pruning only removes units)", mine)
