"""One loader for every model the tool reads: a routed checkpoint it wrote, or a source checkpoint.

Both come as .safetensors, so the suffix cannot tell them apart; the routed file's own metadata key
can. Anything without it is read as a source checkpoint, with its saved args as hints, exactly as
a conversion reads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

from torch import nn

from cbs_convert.errors import is_warning
from cbs_convert.families import detect
from cbs_convert.families.base import Family
from cbs_convert.storage.checkpoint import read_checkpoint, with_user_hints
from cbs_convert.storage.routed_file import METADATA_KEY, load

__all__ = ["is_routed", "load_model"]


def is_routed(path) -> bool:
    """Whether ``path`` is a routed checkpoint written by cbs_convert (read from its header only)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return METADATA_KEY in (handle.metadata() or {})
    except Exception:
        return False  # not readable as safetensors: let the checkpoint reader say why


def load_model(path, device="cpu", hints: Optional[Dict[str, Any]] = None,
               on_warning: Optional[Callable[[str], None]] = None) -> Tuple[Family, nn.Module]:
    """(family, model in eval mode) for a routed file or a source checkpoint.

    ``hints`` are what flags would add for a source checkpoint (``num_heads``, ``path``...); a
    routed file describes itself and ignores them. ``on_warning`` hears what was assumed about a
    source checkpoint (an image size its weights cannot show, ...).
    """
    if is_routed(path):
        model = load(path, device=device)
        return model.family, model
    checkpoint = read_checkpoint(path)
    merged = with_user_hints(checkpoint.hints, hints or {})
    family, notes = detect(checkpoint.state_dict, merged)
    if on_warning is not None:
        for note in notes + checkpoint.notes:
            if is_warning(note):
                on_warning(note)
    model = family.instantiate(family.config, checkpoint.state_dict)
    return family, model.to(device).eval().requires_grad_(False)
