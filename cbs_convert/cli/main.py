"""python -m cbs_convert CHECKPOINT --k K: flags and recipe into a conversion, and the door to the
other commands (``info``, ``extract``, ``profile``, ``schedule``).

Every problem the user can fix ends as one line on stderr and exit code 2; ``--debug`` shows the
traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from dataclasses import MISSING, fields
from typing import Dict, List, Optional

from cbs_convert.cli import commands, schedule
from cbs_convert.cli.common import Parser, guarded, launch_rank
from cbs_convert.errors import UserError
from cbs_convert.pipeline.conversion import Conversion
from cbs_convert.pipeline.recipe import FIELDS, Recipe, base_type, coerce, read_recipe_file


def _default_text(f) -> str:
    if f.default is not MISSING:
        return "" if f.default is None else f" (default: {f.default})"
    return f" (default: {f.default_factory()})"


def build_parser(preview: bool = False) -> argparse.ArgumentParser:
    description = (
        "Profile a checkpoint and plan its split, with no pruning and no fine-tuning: the complexity curves, the "
        "cuts of every split rule, the planned experts, a report and a plot. The work directory keeps the profile, "
        "so the conversion with the same settings and --resume starts from it." if preview else
        "Convert a SiT, DiT or ADM (guided-diffusion UNet) checkpoint into K complexity-balanced time-segment experts, "
        "written as one routed .safetensors checkpoint that loads back with cbs_convert.load()."
    )
    parser = Parser(
        prog="python -m cbs_convert" + (" profile" if preview else ""),
        description=description,
        epilog="Settings come from, lowest first: built-in defaults sized for tiny models, the bundled recipe "
        "of a recognised published architecture, --recipe FILE, then these flags. "
        "Other commands: 'python -m cbs_convert info ROUTED' shows a routed checkpoint; "
        "'python -m cbs_convert extract ROUTED --expert K --out FILE' writes one expert as a plain checkpoint "
        "(with --format diffusers, as a diffusers model folder); "
        "'python -m cbs_convert profile CHECKPOINT [settings]' profiles and plans the split only; "
        "'python -m cbs_convert schedule MODEL --steps N --schedule NAME' computes a sampling step schedule.",
    )
    parser.add_argument("checkpoint", nargs="?", help=FIELDS["checkpoint"].metadata["help"])
    parser.add_argument("--recipe", help="YAML recipe with any of the settings below (snake_case keys)")
    for f in fields(Recipe):
        if f.name == "checkpoint":
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"] + _default_text(f)
        if base_type(f.name) is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=help_text)
    parser.add_argument("--resume", action="store_true", help="continue the run kept in the work directory")
    parser.add_argument("--force", action="store_true",
                        help="overwrite an existing output and start the work directory over (only files a run listed there are removed)")
    parser.add_argument("--keep-workdir", action="store_true",
                        help="keep the experts' pruned and fine-tuned weights in the work directory after success")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _flag_values(namespace) -> Dict[str, object]:
    values = {}
    for name in FIELDS:
        raw = getattr(namespace, name, None)
        if raw is None:
            continue
        kind = base_type(name)
        if isinstance(raw, str) and kind in (int, float):
            try:
                raw = float(raw) if kind is float else int(raw)
            except ValueError:
                flag = "--" + name.replace("_", "-")
                raise UserError(f"{flag} must be {'an integer' if kind is int else 'a number'}, got {raw!r}") from None
        values[name] = coerce(name, raw, "--" + name.replace("_", "-"))
    return values


#: ``python -m cbs_convert NAME ...``: a first argument with one of these names is a command, not a checkpoint
COMMANDS = ("info", "extract", "profile", "schedule")


def _run_command(argv: List[str]) -> int:
    if argv[0] == "profile":
        return _convert(argv[1:], preview=True)
    if argv[0] == "schedule":
        return schedule.main(argv[1:])
    return commands.main(argv[0], argv[1:])


def _return_large_frees_to_the_os() -> None:
    """glibc keeps freed blocks up to a threshold that grows with every large free (to 32 MB) in
    its heap, and the heap rarely shrinks: each expert's freed tensors would stay resident, and the
    process's peak would be the sum of its stages. A fixed 1 MB threshold maps every tensor of
    that size or more on its own, so freeing it gives the memory back. Only the CLI does this: it
    owns the process; a library must not change its host's allocator."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3
        libc.mallopt(m_mmap_threshold, 1 << 20)
    except (OSError, AttributeError):
        pass  # not glibc (musl, ...): its own policy stands


def entry() -> None:
    """The process entry point (``python -m cbs_convert``, ``cbs-convert``)."""
    _return_large_frees_to_the_os()
    sys.exit(main())


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        return _run_command(argv)
    return _convert(argv, preview=False)


def _convert(argv: List[str], preview: bool) -> int:
    """The conversion, or with ``preview`` only its profile and split (the ``profile`` command)."""
    parser = build_parser(preview)
    args = parser.parse_args(argv)
    results = []

    def work():
        settings = read_recipe_file(args.recipe) if args.recipe else {}
        settings.update(_flag_values(args))
        results.append(Conversion(settings, progress=not args.quiet, resume=args.resume, force=args.force,
                                  keep_workdir=args.keep_workdir, on_warning=_print_warning, preview=preview).run())

    code = guarded(work, args.debug)
    if code != 0:
        return code
    result = results[0]
    if not result.report:
        return 0
    _summary(result)
    return 0


def _print_warning(message: str) -> None:
    if launch_rank() != 0:  # the same warning on every rank: rank 0 says it
        return
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _summary(result) -> None:
    report = result.report
    split = report["split"]
    print(f"wrote {result.output}" if result.output else "profile and split only (nothing pruned or trained)")
    print(f"  {report['source']['architecture']}")
    print(f"  split {split['method']}: boundaries {', '.join(f'{b:.3f}' for b in split['boundaries'])}")
    for k, e in enumerate(report["evaluation"]["experts"]):
        print(
            f"  expert {k} [{e['segment'][0]:.3f}, {e['segment'][1]:.3f}]: {e['params']:,} params "
            f"({e['params_vs_target']:+.2%} of target), FLOPs x{e['flops_vs_source']:.2f}"
            + (f", rel. error {e['error_before']:.4f} -> {e['error_after']:.4f}" if "error_after" in e else "")
        )
    quality = report.get("sample_quality")
    if quality and "skipped" not in quality:
        print(f"  samples ({quality['samples']}, same noise, {quality['dataset']} classifier): FD {quality['teacher']['fd']:.3f} "
              f"teacher, {quality['converted']['fd']:.3f} routed (ΔFD {quality['delta_fd']:+.3f}); class match "
              f"{quality['teacher'].get('class_match', float('nan')):.3f} / {quality['converted'].get('class_match', float('nan')):.3f}")
    elif quality:
        print(f"  samples: not scored: {quality['skipped']}")
    for path in result.report_files:
        print(f"  report: {path}")
    if report.get("profile") and not any(str(p).endswith(".png") for p in result.report_files):
        if importlib.util.find_spec("matplotlib") is None:
            print("  plot: none written, matplotlib is not installed (pip install 'cbs_convert[plot]' adds it)")
    work = report.get("workdir")
    if work:
        kept = f"{work['path']} keeps the profile, split, pool and logs ({work['kept_bytes'] / 1e6:.1f} MB)"
        if work["removed"]:
            print(f"  work: {kept}; the experts' weights ({work['removable_bytes'] / 1e6:.1f} MB) "
                  "were removed (--keep-workdir keeps them)")
        else:
            print(f"  work: {kept}, and the experts' weights ({work['removable_bytes'] / 1e6:.1f} MB)")
    for warning in report.get("warnings", []):
        print(f"  warning: {warning}")
