"""The small commands around a conversion: ``info`` and ``extract`` of a routed checkpoint.

    python -m cbs_convert info ROUTED
    python -m cbs_convert extract ROUTED --expert K --out FILE
    python -m cbs_convert extract ROUTED --expert K --out FOLDER --format diffusers
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List

import torch

from cbs_convert.cli.common import SOURCE_HINTS, Parser, guarded
from cbs_convert.errors import CheckpointError, WorkdirError
from cbs_convert.families import family_from_config
from cbs_convert.families.diffusers import scheduler_config
from cbs_convert.storage import diffusers as diffusers_files
from cbs_convert.storage.files import atomic_folder, atomic_write, atomic_write_json
from cbs_convert.storage.routed_file import expert_state_dict, read_metadata, save_safetensors_atomic
from cbs_convert.storage.routed_schema import SHARED_BASE_FORMATS


def build_parser(name: str) -> argparse.ArgumentParser:
    """``info``'s or ``extract``'s flags."""
    if name == "info":
        parser = Parser(prog="python -m cbs_convert info",
                        description="Show a routed checkpoint: segments in canonical and native time, each expert's "
                        "parameters and FLOPs against the source, the source's hash and architecture, the recipe.")
        parser.add_argument("routed", help="routed .safetensors checkpoint written by cbs_convert")
    else:
        parser = Parser(prog="python -m cbs_convert extract",
                        description="Write one expert alone as a plain checkpoint in the source's own key layout: "
                        ".pt/.pth is a flat state dict (the official loaders' format), .safetensors carries the "
                        "settings its shapes do not show as args metadata.")
        parser.add_argument("routed", help="routed .safetensors checkpoint written by cbs_convert")
        parser.add_argument("--expert", type=int, required=True, help="index of the expert, 0 = the one nearest the data")
        parser.add_argument("--out", required=True, help="file to write (.pt, .pth or .safetensors), or with "
                            "--format diffusers the folder to write")
        parser.add_argument("--format", choices=("checkpoint", "diffusers"), default="checkpoint",
                            help="checkpoint: a state dict file, by --out's suffix (default); diffusers: a model folder "
                            "(config.json, diffusion_pytorch_model.safetensors, scheduler_config.json) that "
                            "DiTTransformer2DModel or UNet2DModel.from_pretrained reads")
        parser.add_argument("--force", action="store_true", help="overwrite an existing --out (with --format "
                            "diffusers: only a folder it wrote)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(name: str, argv: List[str]) -> int:
    """The ``info`` or ``extract`` command on its arguments (those after its name); the exit code."""
    args = build_parser(name).parse_args(argv)

    def work():
        if name == "info":
            print(info(args.routed))
        else:
            print("\n".join(extract(args.routed, args.expert, args.out, force=args.force, format=args.format)))

    return guarded(work, args.debug)


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
    shared = meta["shared_base"] if meta["format_version"] in SHARED_BASE_FORMATS else None
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


def extract(path, expert: int, out, force: bool = False, format: str = "checkpoint") -> List[str]:
    """Write one expert as a plain checkpoint of the source's layout; returns lines to print.

    ``.pt``/``.pth``: a flat state dict, what the official ``torch.load`` loaders take.
    ``.safetensors``: the tensors, with the settings their shapes do not show as ``args`` metadata,
    so ``python -m cbs_convert`` and ``cbs_convert.read_checkpoint`` read it back exactly.
    ``format="diffusers"``: a model folder that diffusers' ``from_pretrained`` reads (DiT and ADM).
    """
    path, out = Path(path), Path(out)
    if format == "diffusers":
        return _extract_diffusers(path, expert, out, force)
    if format != "checkpoint":
        raise WorkdirError(f"--format {format}: use checkpoint or diffusers")
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
    if out.suffix != ".safetensors" and family.per_block_widths(config):
        raise WorkdirError(f"--out {out}: this expert has widths of its own in each block (--structure blockwise), which a "
                           "bare .pt cannot say and no loader reads from its shapes alone; write .safetensors")
    if out.suffix == ".safetensors":
        # the whole config, so that widths the shapes cannot resolve (ADM's per-block groups) read back exactly
        args = {**family.saved_args(config), "family": family.name, "cbs_convert_config": config, "define_the_model": True}
        save_safetensors_atomic(state, out, {"args": json.dumps(args),
                                             "cbs_convert_expert": json.dumps({"source": str(path), "expert": expert,
                                                                               "segment": meta["experts"][expert]["segment"]})})
    else:
        atomic_write(out, lambda tmp: torch.save({k: v.contiguous() for k, v in state.items()}, tmp))
    lo, hi = meta["experts"][expert]["segment"]
    lines = [f"wrote {out}: expert {expert} of {path} (t in [{lo:.4f}, {hi:.4f}]), {sum(v.numel() for v in state.values()):,} parameters",
             f"  architecture: {family.describe(config)}"]
    if config != meta["family_config"]:
        lines.append("  its architecture differs from the source's: build the model as above to load it "
                     + ("(cbs_convert reads it from the file itself)" if out.suffix == ".safetensors"
                        else _bare_read_back(family, config, state)))
    return lines


def _bare_read_back(family, config, state) -> str:
    """How cbs_convert reads this expert back from a bare .pt, which records no architecture: from its
    shapes alone, with the source flags the shapes leave open, or not exactly (then .safetensors)."""
    given = {"family": family.name}
    for hints in (given, {**given, **{name: config[name] for name in SOURCE_HINTS if name in config}}):
        try:
            read, _ = type(family).config_from_state_dict(state, hints)
        except CheckpointError:
            continue
        if read == config:
            flags = " ".join(f"--{name.replace('_', '-')} {value}" for name, value in hints.items())
            return f"(a bare .pt does not record it; cbs_convert reads it back from its shapes with {flags})"
    return "(a bare .pt does not record it, and its shapes do not say all of it; write .safetensors to read it back)"


def _extract_diffusers(path: Path, expert: int, out: Path, force: bool) -> List[str]:
    if out.suffix in (".pt", ".pth", ".safetensors", ".bin"):
        raise WorkdirError(f"--out {out}: --format diffusers writes a folder (config.json and weights); give a folder name")
    if out.exists() and not out.is_dir():
        raise WorkdirError(f"--out {out} is a file; --format diffusers writes a folder, choose another path")
    resolved = out.resolve()
    if resolved in path.resolve().parents:
        raise WorkdirError(f"--out {out} holds the routed checkpoint {path}; choose a new folder for the expert")
    if out.exists():
        if not force:
            raise WorkdirError(f"{out} exists; pass --force to replace it")
        _check_replaceable(out)
    meta = read_metadata(path)
    count = len(meta["experts"])
    if not 0 <= expert < count:
        raise CheckpointError(f"--expert {expert}: {path} holds experts 0 to {count - 1}")
    family = family_from_config(meta["family"], meta["family_config"])
    config = meta["experts"][expert]["config"]
    segment = meta["experts"][expert]["segment"]
    what = f"expert {expert} of {path}"
    model_config = diffusers_files.expert_model_config(family, config, what)
    state = expert_state_dict(path, expert)
    tensors = family.diffusers_counterpart.expert_tensors(config, model_config, state)
    scheduler = scheduler_config(family)
    model_config[diffusers_files.WRITTEN_MARK] = {"routed": str(path), "expert": expert, "segment": segment}
    checked = []

    def write(folder: Path) -> None:
        atomic_write_json(folder / "config.json", model_config)
        save_safetensors_atomic(tensors, folder / diffusers_files.WEIGHT_FILES[0], {"format": "pt"})
        if scheduler is not None:
            atomic_write_json(folder / diffusers_files.SCHEDULER_FILE, scheduler)
        checked.append(diffusers_files.check_expert_folder(folder, family, config, state, segment, what))

    atomic_folder(out, write, diffusers_files.WRITTEN_FILES)
    lo, hi = segment
    cls = model_config["_class_name"]
    lines = [f"wrote {out}: expert {expert} of {path} (t in [{lo:.4f}, {hi:.4f}]) as a diffusers {cls}, "
             f"{sum(v.numel() for v in tensors.values()):,} parameters",
             f"  load: diffusers.{cls}.from_pretrained({str(out)!r})", *checked]
    if scheduler is not None:
        lines.append(f"  scheduler: {diffusers_files.SCHEDULER_FILE} beside it ({scheduler['beta_schedule']} betas), "
                     f"diffusers.DDPMScheduler.from_pretrained({str(out)!r})")
    else:
        lines.append(f"  scheduler: none written; diffusers has no name for its {family.config.get('beta_schedule')} betas")
    return lines


def _check_replaceable(out: Path) -> None:
    """--force replaces only a folder this command wrote: its config carries the mark, and it holds
    nothing else. A user's own model folder (a download, a source) is never replaced."""
    stray = sorted(entry.name for entry in out.iterdir() if entry.name not in diffusers_files.WRITTEN_FILES)
    try:
        marked = diffusers_files.WRITTEN_MARK in json.loads((out / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        marked = False
    if stray or not marked:
        reason = f"holds {stray[0]}" if stray else "was not written by extract --format diffusers"
        raise WorkdirError(f"--out {out} {reason}; --force replaces only a folder this command wrote, choose another path")
