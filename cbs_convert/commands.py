"""The small commands around a conversion: ``info`` and ``extract`` of a routed checkpoint.

    python -m cbs_convert info ROUTED
    python -m cbs_convert extract ROUTED --expert K --out FILE
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import torch

from .errors import CheckpointError, WorkdirError
from .families import family_from_config
from .routed import expert_state_dict, read_metadata, save_safetensors_atomic


def info(path) -> str:
    """What a routed checkpoint holds, as text: segments in both times, experts, source, recipe."""
    meta = read_metadata(path)
    family = family_from_config(meta["family"], meta["family_config"])
    source_config = meta["family_config"]
    source_params = family.param_count(source_config)
    source_flops = family.forward_flops(source_config)
    convention = meta.get("time_convention", {})
    native = convention.get("native_boundaries") or []
    boundaries = meta["boundaries"]
    lines = [
        f"{path}: routed {family.name} checkpoint, {len(meta['experts'])} experts (format {meta['format_version']})",
        f"source: {family.describe(source_config)}; {source_params:,} parameters, {source_flops / 1e9:.3f} GFLOPs per forward",
    ]
    source = meta.get("source") or {}
    if source.get("sha256"):
        lines.append(f"source file sha256 {source['sha256']} ({source.get('container', 'unknown container')})")
    lines.append(f"time: canonical t in [0, 1] (0 = data, 1 = noise); native argument '{convention.get('native_argument', '?')}'")
    shared = meta.get("shared_base")
    total = 0
    if shared:
        total = int(shared["base_params"])
        lines.append(f"shared base: {total:,} parameters, the source's architecture; each expert adds a rank-{shared['rank']} "
                     f"delta on {len(shared['layers'])} layers")
    for k, expert in enumerate(meta["experts"]):
        lo, hi = expert["segment"]
        params = int(expert["params"])
        total += params
        flops = family.forward_flops(expert["config"]) + (int(shared["delta_flops"]) if shared else 0)
        span = f"native [{native[k]:.6g}, {native[k + 1]:.6g}{']' if k == len(meta['experts']) - 1 else ')'}" if len(native) == len(boundaries) else ""
        lines.append(
            f"expert {k}: t in [{lo:.4f}, {hi:.4f}{']' if k == len(meta['experts']) - 1 else ')'}  {span}  "
            + (f"delta of {params:,} params ({params / source_params:.4f}x), FLOPs x{flops / source_flops:.4f} with the base"
               if shared else
               f"{params:,} params ({params / source_params:.3f}x), FLOPs x{flops / source_flops:.3f}; {family.describe(expert['config'])}")
        )
    lines.append(f"all experts: {total:,} parameters ({total / source_params:.3f}x the source); a sampler step runs one expert"
                 + (" (the base and its segment's delta)" if shared else ""))
    split = meta.get("split") or {}
    if split:
        lines.append(f"split: {split.get('method')} on {split.get('monitor') or 'no monitor'}, shares "
                     + ", ".join(f"{s:.3f}" for s in split.get("shares", [])))
    recipe = meta.get("recipe")
    if recipe:
        shown = {k: v for k, v in recipe.items() if v is not None and k not in ("checkpoint", "out", "workdir")}
        lines.append("recipe: " + json.dumps(shown, sort_keys=True))
    return "\n".join(lines)


def extract(path, expert: int, out, force: bool = False) -> List[str]:
    """Write one expert as a plain checkpoint of the source's layout; returns lines to print.

    ``.pt``/``.pth``: a flat state dict, what the official ``torch.load`` loaders take.
    ``.safetensors``: the tensors, with the settings their shapes do not show as ``args`` metadata,
    so ``python -m cbs_convert`` and ``cbs_convert.read_checkpoint`` read it back exactly.
    """
    path, out = Path(path), Path(out)
    if out.suffix not in (".pt", ".pth", ".safetensors"):
        raise WorkdirError(f"--out {out}: give a .pt, .pth or .safetensors file name")
    if out.exists() and out.resolve() == path.resolve():
        raise WorkdirError(f"--out {out} is the routed checkpoint itself; choose another path")
    if out.exists() and not force:
        raise WorkdirError(f"{out} exists; pass --force to overwrite it")
    meta = read_metadata(path)
    state = expert_state_dict(path, expert)
    family = family_from_config(meta["family"], meta["family_config"])
    config = meta["experts"][expert]["config"]
    lossy = family.nonofficial_numerics(config)
    if out.suffix != ".safetensors" and lossy:
        raise WorkdirError(f"--out {out}: this expert computes differently from the official {family.name} code "
                           f"({', '.join(f'{k} {v}' for k, v in lossy.items())}), which a bare .pt cannot say; the "
                           "official loader would build another function. Write .safetensors")
    if out.suffix == ".safetensors":
        # the whole config, so that widths the shapes cannot resolve (ADM's per-block groups) read back exactly
        args = {**family.saved_args(config), "family": family.name, "cbs_convert_config": config, "define_the_model": True}
        save_safetensors_atomic(state, out, {"args": json.dumps(args),
                                             "cbs_convert_expert": json.dumps({"source": str(path), "expert": expert,
                                                                               "segment": meta["experts"][expert]["segment"]})})
    else:
        from .files import atomic_write

        atomic_write(out, lambda tmp: torch.save({k: v.contiguous() for k, v in state.items()}, tmp))
    lo, hi = meta["experts"][expert]["segment"]
    lines = [f"wrote {out}: expert {expert} of {path} (t in [{lo:.4f}, {hi:.4f}]), {sum(v.numel() for v in state.values()):,} parameters",
             f"  architecture: {family.describe(config)}"]
    if config != meta["family_config"]:
        lines.append("  its widths differ from the source's: build the model with these widths to load it "
                     "(cbs_convert reads them from the file itself)")
    return lines

