"""``python -m cbs_convert.sample MODEL``: FID-ready samples of a routed file or any source checkpoint.

Samples are drawn in batches of ``--batch-size``, each reproducible on its own
(:mod:`.sample_shards`). Under torchrun rank r draws batches r, r + W, ... and writes each as a
shard; a rerun of the same command skips the shards already there. Rank 0 then writes one ``.npz``
whose ``arr_0`` is uint8 NHWC, the layout the ADM evaluator reads (``labels`` beside it).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from cbs_convert.cli.common import Parser, add_source_arguments, check_seed, guarded, launch_rank, model_source
from cbs_convert.cli.sample_shards import (
    SHARD_MARKER, Decoder, architecture, check_guidance, check_guidance_flags, draw_batch, guided, open_shards, read_shard, shard_path, stored_form, write_npz,
)
from cbs_convert.cli.schedule import add_arguments as add_schedule_arguments
from cbs_convert.cli.schedule import aligns, check_align
from cbs_convert.cli.schedule import check_arguments as check_schedule_arguments
from cbs_convert.cli.schedule import check_schedule_model, check_schedule_read_as, check_schedule_sampled_as
from cbs_convert.errors import RecipeError, UserError
from cbs_convert.pipeline.ranks import barrier, distributed, from_rank0, resolve_device
from cbs_convert.sample.model_schedules import build_schedule
from cbs_convert.sample.samplers import DEFAULT_STEPS, ODE_METHODS, SAMPLERS, respaced_steps
from cbs_convert.sample.schedules import parse_counts, parse_scales, parse_schedule
from cbs_convert.storage.checkpoint import content_sha256, model_name, source_files
from cbs_convert.storage.files import check_writable
from cbs_convert.storage.loading import load_model


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m cbs_convert.sample",
        description="Sample a routed checkpoint or a source checkpoint for FID: shards per rank under torchrun, "
        "resumable, one .npz (arr_0: uint8 NHWC) at the end.",
    )
    p.add_argument("model", help="a routed .safetensors file written by cbs_convert, or a source checkpoint "
                   "(file, or a diffusers DiT / UNet2DModel folder)")
    p.add_argument("--num-samples", type=int, default=50_000)
    p.add_argument("--batch-size", type=int, default=32, help="samples per batch (per rank and step of the loop)")
    p.add_argument("--out", help="the .npz to write (default: named after the model and the settings)")
    p.add_argument("--sampler", choices=SAMPLERS, help="default: the family's reference (ode for SiT, ddpm for DiT/ADM)")
    p.add_argument("--steps", type=int, default=None, help=f"sampling steps (default {DEFAULT_STEPS}; ddpm/ddim: respaced steps)")
    p.add_argument("--respacing", help="ddpm/ddim only: a respacing such as 250, ddim50 or 10,20,30 (default: --steps)")
    p.add_argument("--method", choices=ODE_METHODS, default="heun", help="ode only (dopri5 needs torchdiffeq)")
    p.add_argument("--atol", type=float, default=1e-6, help="ode dopri5 only")
    p.add_argument("--rtol", type=float, default=1e-3, help="ode dopri5 only")
    p.add_argument("--eta", type=float, default=0.0, help="ddim only")
    p.add_argument("--diffusion-norm", type=float, default=1.0, help="sde only: w(t) = norm * sigma(t)")
    p.add_argument("--last-step", type=float, default=0.04, help="sde only: the final noise-free step")
    p.add_argument("--clip", choices=("auto", "on", "off"), default="auto",
                   help="ddpm/ddim: clip the predicted image to [-1, 1] (auto: for pixel models, not latents)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance (1: none)")
    p.add_argument("--cfg-scale-per-expert", help="routed models: one guidance scale per expert, expert 0 (nearest "
                   "the data) first, e.g. 3.0,4.0 (instead of --cfg-scale)")
    add_schedule_arguments(p)
    p.add_argument("--class", dest="class_label", type=int, help="sample only this class (default: uniform over classes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae", help="a local diffusers AutoencoderKL folder to decode a latent model's samples")
    p.add_argument("--device", default="auto")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out (never the model itself)")
    p.add_argument("--keep-shards", action="store_true", help="keep the per-batch shards after the .npz is written")
    add_source_arguments(p)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _settings(args, family, model_sha256: str) -> Dict:
    """Everything that decides the samples: a shard folder is continued only under the same ones. The
    model is named by its content, so a copy, a move or a touch keeps the shards and new weights do not."""
    read_as = architecture(family)
    return {
        # the flags that describe a source count through the model they build, not as typed
        "model_sha256": model_sha256, "model": read_as["family"], "model_config": read_as["config"],
        "num_samples": args.num_samples, "batch_size": args.batch_size, "seed": args.seed,
        "sampler": args.sampler or family.default_sampler, "steps": args.steps or DEFAULT_STEPS,
        "respacing": args.respacing, "method": args.method, "atol": args.atol, "rtol": args.rtol, "eta": args.eta,
        "diffusion_norm": args.diffusion_norm, "last_step": args.last_step, "clip": args.clip,
        "cfg_scale": args.cfg_scale, "class_label": args.class_label, "vae": str(Path(args.vae).resolve()) if args.vae else None,
        **_schedule_settings(args),
    }


def _schedule_settings(args) -> Dict:
    """The schedule flags a run uses, and only those: a run without them keeps the settings (and the
    shard folders) of the runs before schedules existed."""
    out: Dict = {}
    if args.cfg_scale_per_expert:
        out["cfg_scale_per_expert"] = parse_scales(args.cfg_scale_per_expert)
    counts = parse_counts(args.steps_per_expert)
    parsed = parse_schedule(args.schedule)
    if parsed is None and counts is None:
        return out
    out["schedule"] = parsed if parsed is not None else "uniform"
    out.update(rho=args.rho, align=aligns(args), steps_per_expert=counts)
    if counts is not None:
        out["steps"] = sum(counts)
    if isinstance(parsed, list):
        out["steps"] = len(parsed) - 1
    return out


def default_out(model: Path, settings: Dict) -> Path:
    guidance = f"-cfg{settings['cfg_scale']:g}" if settings["cfg_scale"] != 1.0 else ""
    if settings.get("cfg_scale_per_expert"):
        guidance = "-cfg" + "_".join(format(s, "g") for s in settings["cfg_scale_per_expert"])
    schedule = settings.get("schedule")
    schedule = "" if schedule is None else "-" + ("custom" if isinstance(schedule, list) else schedule.replace(":", "_"))
    return Path.cwd() / (f"{model_name(model)}-{settings['sampler']}{settings['steps']}{schedule}{guidance}-seed{settings['seed']}"
                         f"-{settings['num_samples']}.npz")


def _check_flags(args) -> None:
    """What the flags alone can show, before the model loads and before any folder is made."""
    for flag in ("cfg_scale", "eta", "diffusion_norm", "last_step", "atol", "rtol"):
        if not math.isfinite(getattr(args, flag)):
            raise RecipeError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: give a finite number")
    if args.num_samples < 1 or args.batch_size < 1:
        raise RecipeError("--num-samples and --batch-size must be at least 1")
    check_seed(args.seed)
    for flag in ("num_heads", "image_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise RecipeError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: give a positive whole number")
    if args.steps is not None and args.steps < 1:
        raise RecipeError(f"--steps {args.steps}: a sampler takes at least 1 step")
    if not 0 < args.last_step < 1:
        raise RecipeError(f"--last-step {args.last_step:g} must lie between 0 and 1 (SiT's default is 0.04)")
    if args.eta < 0 or args.diffusion_norm < 0:
        raise RecipeError("--eta and --diffusion-norm must not be negative")
    if args.atol <= 0 or args.rtol <= 0:
        raise RecipeError("--atol and --rtol must be positive")
    check_schedule_arguments(args)
    check_guidance_flags(args.cfg_scale, args.cfg_scale_per_expert)
    if args.steps is not None and args.steps_per_expert is not None and args.steps != sum(parse_counts(args.steps_per_expert)):
        raise RecipeError(f"--steps {args.steps} and --steps-per-expert {args.steps_per_expert} disagree; give one of them")
    parsed = parse_schedule(args.schedule)
    if args.steps is not None and isinstance(parsed, list) and args.steps != len(parsed) - 1:
        raise RecipeError(f"--steps {args.steps}: the --schedule given has {len(parsed) - 1} steps; drop --steps")
    if args.out:
        _check_out(Path(args.out), args.force)


def _check_out(out: Path, force: bool) -> None:
    if out.is_dir():
        raise RecipeError(f"--out {out} is a folder; give the .npz file to write, such as {out / 'samples.npz'}")
    if out.suffix != ".npz":
        raise RecipeError(f"--out {out}: the evaluator reads .npz files; name it *.npz")
    if out.exists() and not force:
        raise RecipeError(f"--out {out} exists; pass --force to overwrite it, or choose another --out")
    check_writable(out.parent, "--out")


def _check(args, family, settings, model=None) -> None:
    if settings["sampler"] in ("ddpm", "ddim") and getattr(family, "alphas_cumprod", None) is None:
        raise RecipeError(f"--sampler {settings['sampler']} needs a model trained as a discrete DDPM (DiT, ADM); "
                          f"a {family.name} model samples with --sampler ode or sde")
    if args.respacing and settings["sampler"] not in ("ddpm", "ddim"):
        raise RecipeError("--respacing applies to --sampler ddpm or ddim only; use --steps")
    check_guidance(family, model, settings)
    if "schedule" in settings and (settings["sampler"] != "ode" or settings["method"] == "dopri5"):
        flag = "--schedule" if args.schedule else "--steps-per-expert"
        raise RecipeError(f"{flag} places the steps of --sampler ode with --method heun or euler; "
                          f"{settings['sampler'] if settings['sampler'] != 'ode' else 'dopri5'} takes its own steps")
    if not args.align:
        if "schedule" not in settings:
            raise RecipeError("--no-align turns off the alignment of a --schedule's steps to the expert cuts, and sampling "
                              "without --schedule is not aligned: drop --no-align")
        check_align(args, model)
    if settings["sampler"] in ("ddpm", "ddim"):
        try:
            respaced_steps(len(family.alphas_cumprod), str(settings["respacing"] or settings["steps"]))
        except ValueError as exc:
            raise RecipeError(f"--respacing/--steps: {exc}") from None
    if settings["method"] == "dopri5" and settings["sampler"] == "ode":
        if importlib.util.find_spec("torchdiffeq") is None:
            raise RecipeError("--method dopri5 needs torchdiffeq: pip install torchdiffeq, or use --method heun")


def main(argv: Optional[List[str]] = None) -> int:
    """The command on ``argv`` (default: the process's arguments); the exit code."""
    args = build_parser().parse_args(argv)
    messages: List[str] = []
    rerun = ("rerun the same command to continue from the batches already written",
             "then rerun the same command (it continues from the batches already written)")
    code = guarded(lambda: messages.extend(_run(args)), args.debug, rerun)
    if code == 0 and launch_rank() == 0:
        for line in messages:
            print(line)
    return code


def _run(args) -> List[str]:
    _check_flags(args)
    model_path, hints, routed = model_source(args)
    model_files = [model_path] if routed else source_files(model_path)
    rank, world = distributed()
    device = resolve_device(args.device)
    warnings: List[str] = []
    model_sha256 = content_sha256(model_files)
    check_schedule_model(args, model_sha256, str(args.model))  # before the model loads: nothing to wait for
    family, model = load_model(model_path, device=device, hints=hints, on_warning=warnings.append)
    if rank == 0:
        for line in warnings:
            print(f"warning: {line}", file=sys.stderr)
    check_schedule_read_as(args, family, str(args.model))
    settings = _settings(args, family, model_sha256)
    _check(args, family, settings, model)
    check_schedule_sampled_as(args, settings)
    schedule = None
    if "schedule" in settings:
        class_label = settings["class_label"]
        # placed once, on rank 0: an ots fit or a profile measured on each GPU could differ in the last bits
        schedule = from_rank0(lambda: build_schedule(
            family, model, settings["schedule"], settings["steps"], method=settings["method"], rho=settings["rho"],
            align=settings["align"], steps_per_expert=settings["steps_per_expert"], forward=guided(family, model, settings),
            labels_for=None if class_label is None else (lambda n, _: torch.full((n,), class_label, dtype=torch.long)),
            seed=settings["seed"], device=device), rank, world)
        # the steps themselves, not the flags that placed them: a later version that places them
        # otherwise must not continue a folder drawn with the old ones, and --rho or --align, whose
        # effect the times and the pinning hold, must not keep a folder from resuming
        for placed_by in ("rho", "align"):
            settings.pop(placed_by, None)
        settings.update(schedule_times=schedule.times, pinned=schedule.aligned)
    decoder = Decoder(family, args.vae, device)
    out = Path(args.out) if args.out else default_out(model_path, settings)
    if out.exists() and any(out.resolve() == f.resolve() for f in model_files):
        raise RecipeError(f"--out {out} is the model being sampled; choose another output path")
    _check_out(out, args.force)
    shards = out.with_name(out.name + ".shards")
    # rank 0 makes or checks the folder first; torchrun stops the others if it refuses
    if rank == 0:
        open_shards(shards, settings, rank)
    barrier(world)
    if rank != 0:
        open_shards(shards, settings, rank)

    batches = math.ceil(args.num_samples / args.batch_size)
    classes = family.num_classes(family.config)
    conditional = bool(classes)
    form = stored_form(decoder, family, device)
    # every batch is drawn whole, the last one too, so the first n samples are the same for any n
    mine = [b for b in range(rank, batches, world) if read_shard(shard_path(shards, b), args.batch_size, conditional, form, classes) is None]
    bar = None
    if not args.quiet and rank == 0:
        bar = tqdm(total=len(mine), desc=f"sampling ({world} process{'es' if world > 1 else ''})", file=sys.stderr)
    for b in mine:
        samples, labels = draw_batch(family, model, settings, b, args.batch_size, device, schedule)
        if not torch.isfinite(samples).all():
            raise UserError(f"batch {b} came out with NaN/Inf values: the sampler diverged; try more --steps"
                            f"{' or a smaller --cfg-scale' if args.cfg_scale != 1.0 else ''}")
        stored = {"samples": decoder(samples)}
        if labels is not None:
            stored["labels"] = labels.numpy()
        write_npz(shard_path(shards, b), **stored)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    barrier(world)
    if rank != 0:
        return []

    parts, labels = [], []
    for b in range(batches):
        shard = read_shard(shard_path(shards, b), args.batch_size, conditional, form, classes)
        if shard is None:
            raise UserError(f"batch {b}'s shard in {shards} is missing or damaged; rerun the same command to draw it again")
        parts.append(shard["samples"])
        if "labels" in shard:
            labels.append(shard["labels"])
    samples = np.concatenate(parts)[: args.num_samples]
    arrays = {("arr_0" if decoder.kind == "images" else "latents"): samples}
    if labels:
        arrays["labels"] = np.concatenate(labels)[: args.num_samples]
    write_npz(out, **arrays)
    lines = [f"wrote {out}: {len(samples)} {'images' if decoder.kind == 'images' else 'latents'} "
             f"{'x'.join(map(str, samples.shape[1:]))} ({samples.dtype}, {'NHWC' if decoder.kind == 'images' else 'NCHW'})"]
    if schedule is not None:
        split = f" ({' + '.join(map(str, schedule.counts))} by expert, expert 0 first)" if schedule.aligned else ""
        lines.append(f"  steps: {schedule.name}, {schedule.steps}{split}: t = {', '.join(format(t, '.4g') for t in schedule.times)}")
    if decoder.kind == "latents":
        lines.append("  these are the model's latents, not images (no --vae given): decode them with a diffusers "
                     "AutoencoderKL (--vae DIR, the SD VAE the model was trained with) to get arr_0 for the evaluator")
    if not args.keep_shards:
        for b in range(batches):
            shard_path(shards, b).unlink(missing_ok=True)
        for stale in shards.glob(".batch_*.npz.*.partial"):
            stale.unlink(missing_ok=True)
        (shards / SHARD_MARKER).unlink(missing_ok=True)
        try:
            shards.rmdir()
        except OSError:
            lines.append(f"  {shards} kept: it holds files this command did not write")
    return lines


__all__ = ["build_parser", "default_out", "main"]
