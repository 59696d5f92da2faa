"""The registry of model families: which one a state dict or a stored config belongs to, and which
of them have a counterpart among diffusers' model classes.

This package is the only place that knows architectures and time conventions by name.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Type

import torch

from cbs_convert.errors import CheckpointError
from cbs_convert.families.adm import ADMFamily
from cbs_convert.families.base import check_keys, Family
from cbs_convert.families.sit import DiTFamily, SiTFamily

FAMILIES: Dict[str, Type[Family]] = {"sit": SiTFamily, "dit": DiTFamily, "adm": ADMFamily}
#: the translators to and from diffusers' model classes, in the order a diffusers config is tried
DIFFUSERS_COUNTERPARTS = tuple(dict.fromkeys(cls.diffusers_counterpart for cls in FAMILIES.values()
                                             if cls.diffusers_counterpart is not None))


def family_from_config(name: str, config: Dict[str, Any]) -> Family:
    if name not in FAMILIES:
        raise CheckpointError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name](config)


def named_in(text: str) -> Optional[str]:
    """The one family ``text`` (a model or file name) names as a word, if exactly one."""
    found = {name for name in FAMILIES if re.search(rf"(^|[^a-z]){name}([^a-z]|$)", text.lower())}
    return found.pop() if len(found) == 1 else None


def config_family(config: Dict[str, Any]) -> Optional[str]:
    """Which family a stored config's own keys say it belongs to, when they say."""
    if "channel_mult" in config or "model_channels" in config:
        return "adm"
    if "hidden_size" in config or "depth" in config:
        if "path" in config and "beta_schedule" not in config:
            return "sit"
        if "beta_schedule" in config and "path" not in config:
            return "dit"
    return None


#: what in a config says which family it is, as ``config_family`` reads it
CONFIG_EVIDENCE = {"adm": "it has channel_mult", "sit": "it has a path and no beta_schedule",
                   "dit": "it has a beta_schedule and no path"}


def detect(state_dict: Dict[str, torch.Tensor], hints: Dict[str, Any]) -> Tuple[Family, List[str]]:
    """Pick the family and read its config from the shapes.

    SiT and DiT share one layout, so shapes cannot tell them apart. In order: the --family flag, the
    training args saved with the checkpoint, the file name, then a behavioural probe (a noise
    predictor echoes pure noise, a SiT velocity points away from it).
    """
    notes: List[str] = []
    stored = hints.get("args_cbs_convert_config")
    if isinstance(stored, dict) and hints.get("args_family") in FAMILIES:
        # an expert written by `cbs_convert extract`: its config is exact, where shapes can be ambiguous
        family = family_from_config(hints["args_family"], stored)
        check_keys(state_dict, family.expected_shapes(stored), f"this {family.name} expert does not match its own config")
        return family, [f"family {family.name} and widths from the file's own config (written by cbs_convert extract)"]
    candidates = [name for name, cls in FAMILIES.items() if cls.matches(state_dict)]
    chosen = hints.get("family")
    if chosen:
        chosen = chosen.lower()
        if chosen not in FAMILIES:
            raise CheckpointError(f"--family {chosen!r} is unknown; choose one of {', '.join(sorted(FAMILIES))}")
        if chosen not in candidates:
            raise CheckpointError(
                f"--family {chosen} does not fit this state dict (first keys: {', '.join(list(state_dict)[:3])})"
            )
        notes.append(f"family {chosen} (given)")
    elif not candidates:
        raise CheckpointError(
            "unknown architecture: no known family matches keys "
            f"{', '.join(list(state_dict)[:3])}; known families: {', '.join(sorted(FAMILIES))}"
        )
    elif len(candidates) == 1:
        chosen = candidates[0]
        notes.append(f"family {chosen} (from the key layout)")
    else:
        arg_name = named_in(str(hints.get("args_model", "")))
        if hints.get("args_path_type"):
            arg_name = arg_name or "sit"
        file_name = named_in(Path(str(hints.get("source_name", ""))).name)
        if arg_name in candidates:
            chosen = arg_name
            notes.append(f"family {chosen} (from the checkpoint's training args)")
        elif file_name in candidates:
            chosen = file_name
            notes.append(f"family {chosen} (from the file name; --family to override)")
        else:
            chosen, note = _probe_noise_echo(state_dict, hints, candidates)
            notes.append(note)
    config, more = FAMILIES[chosen].config_from_state_dict(state_dict, hints)
    return FAMILIES[chosen](config), notes + more


def _probe_noise_echo(state_dict, hints, candidates) -> Tuple[str, str]:
    scores = {}
    unreadable: List[CheckpointError] = []
    generator = torch.Generator().manual_seed(0)
    for name in candidates:
        cls = FAMILIES[name]
        try:
            config, _ = cls.config_from_state_dict(state_dict, hints)
        except CheckpointError as exc:
            unreadable.append(exc)
            continue
        family = cls(config)
        model = cls.build(config)
        model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
        model.eval()
        shape = family.sample_shape(config)
        noise = torch.randn(4, *shape, generator=generator)
        t = torch.ones(4)
        y = None
        if family.num_classes(config):
            y = torch.zeros(4, dtype=torch.long)
        with torch.no_grad():
            v = family.velocity(model, noise, t, y)
            # At pure noise the true velocity d x_t/dt is about d sigma/dt * eps: aligned with x.
            scores[name] = torch.nn.functional.cosine_similarity(v.flatten(1), noise.flatten(1)).mean().item()
    if scores:
        best = max(scores, key=scores.get)
        if scores[best] > 0.5:
            detail = ", ".join(f"{k} {v:+.2f}" for k, v in sorted(scores.items()))
            return best, f"family {best} (behavioural probe at pure noise: {detail}; --family to override)"
    if not scores and unreadable:
        raise unreadable[0]  # the weights fit no candidate: that, not the family, is the problem
    detail = ", ".join(f"{k} {v:+.2f}" for k, v in sorted(scores.items()))
    raise CheckpointError(
        f"cannot tell which of {', '.join(candidates)} this checkpoint is: they share one key layout, and neither "
        f"training args nor the file name say, and the behavioural probe was inconclusive ({detail}); "
        f"pass --family {' or --family '.join(candidates)}"
    )
