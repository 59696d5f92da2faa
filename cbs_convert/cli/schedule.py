"""``python -m cbs_convert schedule MODEL``: a sampling step schedule computed for a routed file or a
source checkpoint, printed in canonical time, in the family's native time, and as the lists
diffusers' schedulers take; and the schedule flags it shares with ``python -m cbs_convert.sample``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List

import torch

from cbs_convert.cli.common import Parser, add_source_arguments, check_seed, guarded, model_source
from cbs_convert.cli.sample_shards import architecture, check_guidance, check_guidance_flags, differing, guided
from cbs_convert.errors import RecipeError
from cbs_convert.pipeline.ranks import resolve_device
from cbs_convert.sample.model_schedules import build_schedule
from cbs_convert.sample.schedules import (
    DEFAULT_RHO, Schedule, check_rho, model_boundaries, native_lists, parse_counts, parse_scales, parse_schedule,
)
from cbs_convert.storage.checkpoint import content_sha256, is_inside, source_files, source_folder
from cbs_convert.storage.files import atomic_write_json, check_writable
from cbs_convert.storage.loading import load_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that choose a schedule, shared by ``python -m cbs_convert.sample`` and the
    ``schedule`` command."""
    parser.add_argument("--schedule", help="where the ode sampler's steps go: uniform (the default), edm (rho), "
                        "logsnr, profile (equal shares of the profiled path acceleration; profile:MONITOR for "
                        "another), ots (edm fitted to a fine reference; ots:START), a comma-separated list of "
                        "canonical times from 1 (noise) down to 0 (data), or a FILE.json that "
                        "python -m cbs_convert schedule --json wrote for this model")
    parser.add_argument("--rho", type=float, default=DEFAULT_RHO, help="edm only: the exponent (default 7)")
    parser.add_argument("--align", action=argparse.BooleanOptionalAction, default=True,
                        help="routed models: put a step edge on every expert cut, so that no step spans two experts "
                        "(default on)")
    parser.add_argument("--steps-per-expert", help="routed models: steps of each expert, expert 0 (nearest the data) "
                        "first, e.g. 4,8 (their sum is the step count)")


def read_schedule_file(path: Path) -> dict:
    """``--schedule FILE.json``, as ``schedule --json`` wrote it, checked as far as the file alone
    allows: its times, the SHA-256 of the model they were computed for, the architecture that model
    was read as, and what an ots fit sampled with."""
    try:
        stored = json.loads(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"--schedule {path}: no such file; write one with python -m cbs_convert schedule MODEL "
                          f"--steps N --json {path}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RecipeError(f"--schedule {path}: not a readable JSON file ({type(exc).__name__}); write it again with "
                          "python -m cbs_convert schedule MODEL --json FILE") from None
    if not isinstance(stored, dict) or not isinstance(stored.get("times"), list):
        raise RecipeError(f"--schedule {path}: holds no list of times; it is not a file written by python -m "
                          "cbs_convert schedule --json")
    if not isinstance(stored.get("model_sha256"), str):
        raise RecipeError(f"--schedule {path}: does not say which model it was computed for; write it again with "
                          "python -m cbs_convert schedule MODEL --json FILE, or pass its times as --schedule t0,t1,...")
    if ("model_family" in stored and not isinstance(stored["model_family"], str)) or (
            "model_config" in stored and not isinstance(stored["model_config"], dict)):
        raise RecipeError(f"--schedule {path}: its model_family or model_config is damaged; write it again with "
                          "python -m cbs_convert schedule MODEL --json FILE, or pass its times as --schedule t0,t1,...")
    return stored


def resolve_schedule_file(args) -> None:
    """A ``--schedule`` that names a JSON file: its times take the file name's place, and
    ``args.schedule_record`` keeps the rest of the file (None otherwise)."""
    args.schedule_file = args.schedule_record = None
    if args.schedule and str(args.schedule).strip().endswith(".json"):
        record = read_schedule_file(Path(str(args.schedule).strip()))
        times = record["times"]
        args.schedule_record = record
        args.schedule_file = args.schedule
        if len(times) < 2 or not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in times):
            raise RecipeError(f"--schedule {args.schedule_file}: its times must be numbers, at least two (from 1 down "
                              "to the end)")
        try:
            args.schedule = ",".join(repr(float(t)) for t in times)
        except OverflowError:
            raise RecipeError(f"--schedule {args.schedule_file}: a time is too large a number; times run from 1 "
                              "down to 0") from None


def aligns(args) -> bool:
    """Whether the steps are aligned to the expert cuts: ``--align``, unless the schedule file was
    written unaligned (``--no-align``, or for a model with one expert: its times may still hold a
    cut, and they step as computed, unpinned)."""
    record = args.schedule_record
    return args.align and not (record is not None and record.get("boundaries") == [])


def uses_edm(parsed) -> bool:
    """Whether a parsed ``--schedule`` places its steps by the edm rule, and so reads ``--rho``."""
    if not isinstance(parsed, str):
        return False
    name, _, option = parsed.partition(":")
    return name == "edm" or (name == "ots" and option.partition(":")[0] in ("", "edm"))


def check_align(args, model) -> None:
    """``--no-align`` acts on a routed model's cuts only."""
    if not args.align and not model_boundaries(model):
        raise RecipeError("--no-align: this model has one expert, so there are no cuts to align steps to; drop --no-align")


def check_schedule_model(args, model_sha256: str, model: str) -> None:
    """Refuse a schedule file computed for another model: its steps (an ots fit, a stored profile, the
    cuts it was aligned to) belong to that one."""
    record = args.schedule_record
    if record is not None and record["model_sha256"] != model_sha256:
        raise RecipeError(f"--schedule {args.schedule_file} was computed for another model (sha256 "
                          f"{record['model_sha256'][:12]}..., {model} is {model_sha256[:12]}...); compute one for it with "
                          f"python -m cbs_convert schedule {model} --steps N --json FILE, or pass the times as "
                          "--schedule t0,t1,... to use them anyway")


def check_schedule_read_as(args, family, model: str) -> None:
    """Refuse a schedule file whose model, the same bytes, was read as another architecture (another
    --family, --path or --num-heads): its times were placed in that one's time convention."""
    record = args.schedule_record
    if record is None:
        return
    if "model_family" not in record or "model_config" not in record:
        raise RecipeError(f"--schedule {args.schedule_file} does not say which architecture its model was read as "
                          f"(written by an older version); write it again with python -m cbs_convert schedule {model} "
                          "--json FILE, or pass its times as --schedule t0,t1,...")
    now = architecture(family)
    differs = differing(now["config"], record["model_config"])
    if record["model_family"] != now["family"] or differs:
        what = (f"a {record['model_family']} model, not {now['family']}" if record["model_family"] != now["family"]
                else f"other settings ({', '.join(differs)} {'differs' if len(differs) == 1 else 'differ'})")
        raise RecipeError(f"--schedule {args.schedule_file} was computed for {model} read as {what}: give the flags it "
                          "was computed with (--family, --path, --num-heads, ...), compute one for these with python -m "
                          "cbs_convert schedule, or pass the times as --schedule t0,t1,... to use them anyway")


def check_schedule_sampled_as(args, settings: dict) -> None:
    """An ots fit's times suit the sampler and guidance it was fitted under: refuse others."""
    record = args.schedule_record
    if record is None or not str(record.get("schedule", "")).startswith("ots"):
        return
    fitted = {key: record.get(key, default) for key, default in FIT_FIELDS.items()}
    differs = differing(fitted, {key: settings.get(key) for key in FIT_FIELDS})
    if differs:
        made_for = ", ".join(_as_flag(key, fitted[key]) for key in differs)
        now = ", ".join(_as_flag(key, settings.get(key)) for key in differs)
        raise RecipeError(f"--schedule {args.schedule_file} is an ots fit made for {made_for}, and this run samples with "
                          f"{now}: sample as it was fitted, fit again with python -m cbs_convert schedule under this "
                          "run's flags, or pass the times as --schedule t0,t1,... to use them anyway")


# what an ots fit sampled with, as the file and a sample run's settings name it, and its default
FIT_FIELDS = {"method": "heun", "cfg_scale": 1.0, "cfg_scale_per_expert": None, "class_label": None}
_FLAGS = {"method": "--method", "cfg_scale": "--cfg-scale", "cfg_scale_per_expert": "--cfg-scale-per-expert",
          "class_label": "--class"}


def _as_flag(key: str, value) -> str:
    """``key``'s value as the flag that gives it would be typed."""
    if value is None:
        return f"no {_FLAGS[key]}"
    if isinstance(value, list):
        value = ",".join(format(v, "g") for v in value)
    elif isinstance(value, float):
        value = format(value, "g")
    return f"{_FLAGS[key]} {value}"


def check_arguments(args) -> None:
    """What the shared flags alone can show."""
    resolve_schedule_file(args)
    check_rho(args.rho)
    parsed = parse_schedule(args.schedule)
    if args.rho != DEFAULT_RHO and not uses_edm(parsed):
        named = f"--schedule {args.schedule_file or args.schedule}" if args.schedule else "the default (uniform) schedule"
        raise RecipeError(f"--rho {args.rho:g} shapes the edm schedule (and ots's edm start) only, and {named} does not "
                          "use it: drop --rho")
    parse_counts(args.steps_per_expert)
    if args.steps_per_expert and not args.align:
        raise RecipeError("--steps-per-expert places steps within each expert's segment; drop --no-align")


def build_parser() -> argparse.ArgumentParser:
    """``python -m cbs_convert schedule CHECKPOINT``'s flags."""
    parser = Parser(prog="python -m cbs_convert schedule",
                    description="Compute a sampling step schedule for a routed file or a source checkpoint and print it in "
                    "canonical time, in the family's native time, and as the lists diffusers' schedulers take.")
    parser.add_argument("model", help="a routed .safetensors file or a source checkpoint (file or diffusers folder)")
    parser.add_argument("--steps", type=int, help="the number of steps (or --steps-per-expert)")
    add_arguments(parser)
    parser.add_argument("--method", choices=("heun", "euler"), default="heun",
                        help="the ode sampler's method the ots schedule is fitted to (default heun)")
    parser.add_argument("--seed", type=int, default=0, help="the noise of the profile's pool and of the ots batch")
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="ots: the classifier-free guidance the fit samples "
                        "with, as sample --cfg-scale (1: none); fit at the guidance you will sample with")
    parser.add_argument("--cfg-scale-per-expert", help="ots: one guidance scale per expert, as sample's")
    parser.add_argument("--class", dest="class_label", type=int, default=None, help="ots: fit on this class alone, as "
                        "sample --class")
    add_source_arguments(parser)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="also write the schedule and its native lists to this JSON file")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def run(args) -> List[str]:
    """The ``schedule`` command: the lines it prints."""
    check_arguments(args)
    if args.steps is not None and args.steps < 1:
        raise RecipeError(f"--steps {args.steps}: a sampler takes at least 1 step")
    check_seed(args.seed)
    if args.force and args.json is None:
        raise RecipeError("--force lets --json overwrite an existing file, and no --json is given: drop --force")
    parsed = parse_schedule(args.schedule)
    if (args.cfg_scale != 1.0 or args.cfg_scale_per_expert or args.class_label is not None) and not (
            isinstance(parsed, str) and parsed.startswith("ots")):
        raise RecipeError("--cfg-scale, --cfg-scale-per-expert and --class set what the ots fit samples with, and "
                          "--schedule is not ots: drop them, or pass --schedule ots")
    check_guidance_flags(args.cfg_scale, args.cfg_scale_per_expert)
    if args.steps is None and args.steps_per_expert is None and not isinstance(parsed, list):
        raise RecipeError("give --steps N (or --steps-per-expert, or the times themselves as --schedule)")
    path, hints, routed = model_source(args)
    model_files = [path] if routed else source_files(path)
    if args.json is not None:  # before the schedule is computed: an ots fit is not lost to a bad path
        check_json_out(Path(args.json), model_files, args.force, source_folder(path) if not routed else None)
    model_sha256 = None
    if args.json is not None or args.schedule_record is not None:  # hashed only when a file names the model (GBs at XL size)
        model_sha256 = content_sha256(model_files)
        check_schedule_model(args, model_sha256, str(args.model))
    device = resolve_device(args.device)
    family, model = load_model(path, device=device, hints=hints)
    check_schedule_read_as(args, family, str(args.model))
    check_align(args, model)
    fit = fitted_under(args)
    check_guidance(family, model, fit)
    label = args.class_label
    schedule = build_schedule(family, model, args.schedule or "uniform", args.steps, method=args.method, rho=args.rho,
                              align=aligns(args),
                              steps_per_expert=parse_counts(args.steps_per_expert), seed=args.seed,
                              device=device, forward=guided(family, model, fit),
                              labels_for=None if label is None else (lambda n, _: torch.full((n,), label, dtype=torch.long)))
    lines = describe(family, schedule, str(path))
    if args.json is not None:
        made_for = architecture(family)
        atomic_write_json(Path(args.json), {"schedule": schedule.name, "model": str(args.model), "model_sha256": model_sha256,
                                            "model_family": made_for["family"], "model_config": made_for["config"],
                                            "times": schedule.times, "counts": schedule.counts,
                                            "boundaries": schedule.boundaries, "notes": schedule.notes,
                                            "seconds": schedule.seconds, **fit, **carried_fit(args),
                                            **native_lists(family, schedule.times)})
        lines.append(f"wrote {args.json}")
    return lines


def fitted_under(args) -> dict:
    """What an ots fit sampled with (``FIT_FIELDS``), for the file: its times suit sampling under the same."""
    return {"method": args.method, "cfg_scale": args.cfg_scale,
            "cfg_scale_per_expert": parse_scales(args.cfg_scale_per_expert), "class_label": args.class_label}


def carried_fit(args) -> dict:
    """A schedule file written again from a schedule file keeps what its fit was made under: the times
    are the same fit, and sample must check them against the same sampler and guidance."""
    record = args.schedule_record
    if record is None:
        return {}
    return {key: record[key] for key in ("schedule", *FIT_FIELDS) if key in record}


def check_json_out(out: Path, model_files, force: bool, model_folder=None) -> None:
    if out.suffix != ".json":
        raise RecipeError(f"--json {out}: name the file *.json (sample --schedule reads a schedule file by that suffix)")
    if out.is_dir():
        raise RecipeError(f"--json {out} is a folder; give the file to write, such as {out / 'schedule.json'}")
    if out.exists() and any(out.resolve() == Path(f).resolve() for f in model_files):
        raise RecipeError(f"--json {out} is the model's own file; choose another path")
    if model_folder is not None and is_inside(out, model_folder):
        raise RecipeError(f"--json {out} is inside the model's folder {model_folder}, where diffusers would read a .json "
                          "as part of the model; choose a path outside it")
    if out.exists() and not force:
        raise RecipeError(f"--json {out} exists; pass --force to overwrite it, or choose another path")
    check_writable(out.parent, "--json")


def describe(family, schedule: Schedule, model_name: str = "the model") -> List[str]:
    """Lines that show a schedule: canonical and native times, what diffusers takes, where it came from."""
    lists = native_lists(family, schedule.times)

    def show(values, spec=".6g"):
        return ",".join(format(v, spec) for v in values)

    split = ""
    if schedule.aligned:
        split = (f", aligned to the expert cuts {', '.join(f'{b:.4g}' for b in schedule.boundaries)}: "
                 + " + ".join(str(c) for c in schedule.counts) + " steps (expert 0, nearest the data, first)")
    lines = [f"{schedule.name} schedule for {model_name}: {schedule.steps} steps{split}; computed in {schedule.seconds:.3g} s"]
    lines += [f"  {note}" for note in schedule.notes]
    lines.append("canonical t (1 = noise, 0 = data; python -m cbs_convert.sample --schedule takes this list):")
    lines.append(f"  {','.join(repr(float(t)) for t in schedule.times)}")  # in full: a cut must read back as the cut
    direction = "0 = noise" if lists["native"][0] < lists["native"][-1] else f"{lists['native'][0]:g} = noise"
    lines.append(f"native {lists['native_name']} ({family.name}, {direction}):")
    lines.append(f"  {show(lists['native'])}")
    if "diffusers_timesteps" in lists:
        lines.append("diffusers: scheduler.set_timesteps(timesteps=[...]) (DPMSolverMultistepScheduler, DDPMScheduler; "
                     "EulerDiscreteScheduler only where the starting noise is scaled by its init_noise_sigma, which "
                     "DiTPipeline does not do), one per model call:")
        lines.append(f"  [{', '.join(str(t) for t in lists['diffusers_timesteps'])}]")
    if "diffusers_sigmas" in lists:
        lines.append("diffusers: EulerDiscreteScheduler.set_timesteps(sigmas=[...]) (sigma/alpha, the final 0 the data; "
                     "start from noise scaled by its init_noise_sigma):")
        lines.append(f"  [{', '.join(format(s, '.6g') for s in lists['diffusers_sigmas'])}]")
    if "diffusers_flow_sigmas" in lists:
        lines.append("diffusers: FlowMatchEulerDiscreteScheduler(shift=1.0).set_timesteps(sigmas=[...]), one per model "
                     "call (it appends the final 0):")
        lines.append(f"  [{', '.join(format(s, '.6g') for s in lists['diffusers_flow_sigmas'])}]")
    if "diffusers_note" in lists:
        lines.append(f"  note: {lists['diffusers_note']}")
    return lines


def main(argv: List[str]) -> int:
    """The command on its arguments (those after ``schedule``); the exit code."""
    args = build_parser().parse_args(argv)
    return guarded(lambda: print("\n".join(run(args))), args.debug)


__all__ = ["add_arguments", "aligns", "build_parser", "check_align", "check_arguments", "check_json_out", "check_schedule_model",
           "check_schedule_read_as", "check_schedule_sampled_as",
           "describe", "main", "read_schedule_file", "resolve_schedule_file", "run", "uses_edm"]
