"""Does a complexity-balanced split beat the baselines on real data? One command, offline.

    python3 benchmarks/digits_benchmark.py            # full run, writes benchmarks/results/digits.{md,json}
    python3 benchmarks/digits_benchmark.py --quick    # smoke run, about a minute

Source: the bundled digits SiT (``cbs_convert/assets/digits_sit.safetensors``). Every conversion gets the same
total parameter budget (1x the teacher, summed over its experts), the same total number of
fine-tuning steps (``--steps``, divided evenly over the K experts; K=1 is the dense teacher
fine-tuned, so that extra training is not mistaken for the method), the same loss, learning rate and
batch, and the real training digits as its pool (profiling, pruning calibration, training). Every
conversion is repeated for each of ``--train-seeds``, so that training noise shows next to sampling noise.

Loss: ``distill`` by default. On this teacher it beat ``data`` for the pruned experts (FD gap to the
teacher about 0.5 against 1.2 after 600 steps, one seed), and it is the tool's data-free default. The
dense control then trains with the data loss instead, because distilling an unpruned copy has zero
gradient.

Every model then samples the same labels from the same noise with one fixed sampler (``sample_ode``,
Heun, ``--sample-steps`` uniform steps, no guidance) for each sampling seed, and ``cbs_convert.evaluation.metrics``
scores the samples against the held-out digits: Fréchet distance on the digits classifier's features
(lower is better; the row "real training digits" is the floor set by finite samples) and the share
classified as their label. Differences between rows are listed paired (same seeds), which cancels most
of the sampling noise.

Rows are data (``METHODS``); the machinery (caching each conversion and score, pairing, the table)
is ``benchmarks/_bench.py``, shared with the Fashion-MNIST benchmark. A rerun skips whatever the cache
(``benchmarks/results/digits_cache``) already holds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import _bench  # noqa: E402
from _bench import GENTLE, LORA, RESULTS  # noqa: E402

DOCS = ROOT / "docs"

# name -> conversion settings; steps are filled in per K so that every row trains equally long.
# The uniform rows profile nothing, so their experts get equal shares (the plain baseline) whatever
# the pipeline's allocation default, and no profiling time is spent on them.
PLAIN = dict(split="uniform", monitors=[])
DENSE = "dense teacher fine-tuned (K=1)"
DENSE_GENTLE = "dense fine-tuned, gentle"
HALF_BEST = "K=1 at 0.5x blockwise, features"
LORA_R2 = "K=2 lora r2 uniform"
METHODS = {
    # Distilling an unpruned copy has exactly zero gradient: it would return the teacher bit for
    # bit. The data loss is the extra training this control is there to measure.
    DENSE: dict(k=1, loss="data", **PLAIN),
    "K=2 uniform": dict(k=2, **PLAIN),
    "K=2 CBS dirichlet": dict(k=2, split="cbs", monitor="dirichlet"),
    "K=2 CBS acceleration": dict(k=2, split="cbs", monitor="acceleration"),
    "K=4 uniform": dict(k=4, **PLAIN),
    "K=4 CBS dirichlet": dict(k=4, split="cbs", monitor="dirichlet"),
    "K=2 CBS dirichlet, magnitude pruning": dict(k=2, split="cbs", monitor="dirichlet", prune="magnitude"),
    "K=2 CBS dirichlet, random pruning": dict(k=2, split="cbs", monitor="dirichlet", prune="random"),
    # one model pruned to half width: the per-step FLOPs of the K=2 experts at 1x
    "K=1 at 0.5x (one half-width model)": dict(k=1, budget="0.5x", **PLAIN),
    # the other split rule and the learning-burden monitors, as in the Fashion-MNIST benchmark
    "K=2 snr": dict(k=2, split="snr", monitors=[]),
    "K=2 CBS denoiser": dict(k=2, split="cbs", monitor="denoiser", monitors=["denoiser"]),
    "K=2 CBS nonlinear": dict(k=2, split="cbs", monitor="nonlinear", monitors=["nonlinear"]),
    "K=2 CBS sensitivity": dict(k=2, split="cbs", monitor="sensitivity", monitors=["sensitivity"]),
    # the guards against a curve dominated by the data end (run with --methods, see the README)
    "K=2 CBS dirichlet, gamma 0.25": dict(k=2, split="cbs", monitor="dirichlet", gamma=0.25),
    "K=2 CBS dirichlet, floor 0.5": dict(k=2, split="cbs", monitor="dirichlet", floor=0.5),
    # issue 18's same-cost rows, as on Fashion-MNIST: the gentle dense control and the shared-base
    # split that led there (the teacher plus a rank-2 delta per half of time)
    DENSE_GENTLE: dict(k=1, loss="data", **PLAIN, **GENTLE),
    LORA_R2: dict(k=2, rank=2, **PLAIN, **LORA),
    # issue 20's best 0.5x rows on Fashion-MNIST: per-block widths with masked feature distillation,
    # one model, the split, and the split branched from one trunk trained on half the steps
    HALF_BEST: dict(k=1, budget="0.5x", **PLAIN, structure="blockwise", feature_weight=1.0),
    "K=2 CBS denoiser blockwise, features": dict(k=2, split="cbs", monitor="denoiser", monitors=["denoiser"],
                                                 structure="blockwise", feature_weight=1.0),
    "K=2 CBS denoiser blockwise, features, trunk": dict(k=2, split="cbs", monitor="denoiser", monitors=["denoiser"],
                                                        structure="blockwise", feature_weight=1.0, trunk_share=0.5),
}
# Fashion-MNIST's pruned students recovered more at the teacher's own peak lr (1e-3, not 3e-4): the
# best single model, and the best split (trunk, expert steps shared by segment length), at that lr
METHODS[f"{HALF_BEST}, lr 1e-3"] = dict(METHODS[HALF_BEST], lr=1e-3)
METHODS["K=2 CBS denoiser blockwise, features, trunk, by length, lr 1e-3"] = dict(
    METHODS["K=2 CBS denoiser blockwise, features, trunk"], step_shares="length", lr=1e-3)
DEFAULT_METHODS = [name for name in METHODS if "gamma 0.25" not in name and "floor 0.5" not in name]
QUICK_METHODS = [DENSE, "K=2 uniform", "K=2 CBS dirichlet"]
PROFILE_FOR_DOCS = "K=2 CBS dirichlet"
# (row, baseline) pairs whose per-run FD differences the report lists.
PAIRED = [
    ("K=2 CBS dirichlet", "K=2 uniform"),
    ("K=2 CBS acceleration", "K=2 uniform"),
    ("K=4 CBS dirichlet", "K=4 uniform"),
    ("K=2 uniform", DENSE),
    ("K=2 uniform", "K=1 at 0.5x (one half-width model)"),
    ("K=2 CBS dirichlet", "K=1 at 0.5x (one half-width model)"),
    ("K=2 snr", "K=2 uniform"),
    ("K=2 CBS denoiser", "K=2 uniform"),
    ("K=2 CBS nonlinear", "K=2 uniform"),
    ("K=2 CBS sensitivity", "K=2 uniform"),
    ("K=2 CBS dirichlet, magnitude pruning", "K=2 CBS dirichlet"),
    ("K=2 CBS dirichlet, random pruning", "K=2 CBS dirichlet"),
    (DENSE_GENTLE, DENSE),
    (LORA_R2, DENSE_GENTLE),
    (HALF_BEST, "K=1 at 0.5x (one half-width model)"),
    ("K=2 CBS denoiser blockwise, features", HALF_BEST),
    ("K=2 CBS denoiser blockwise, features, trunk", HALF_BEST),
    ("K=2 CBS denoiser blockwise, features, trunk", "K=2 CBS denoiser blockwise, features"),
    (f"{HALF_BEST}, lr 1e-3", HALF_BEST),
    ("K=2 CBS denoiser blockwise, features, trunk, by length, lr 1e-3", f"{HALF_BEST}, lr 1e-3"),
    ("K=2 CBS denoiser blockwise, features, trunk, by length, lr 1e-3", "K=2 CBS denoiser blockwise, features, trunk"),
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few steps, few samples, one seed, three rows")
    parser.add_argument("--checkpoint", default=str(ROOT / "cbs_convert" / "assets" / "digits_sit.safetensors"))
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps per conversion, all experts together (default 1200; quick 40)")
    parser.add_argument("--loss", default="distill", choices=("distill", "data", "both"))
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=None, help="samples per model and seed (default 1000; quick 200)")
    parser.add_argument("--seeds", default=None, help="comma-separated sampling seeds (default 0,1,2; quick 0)")
    parser.add_argument("--train-seeds", default=None, help="comma-separated seeds of whole conversions (profile, pruning, "
                        "fine-tuning batches), so that training noise is measured too (default 0,1; quick 0)")
    parser.add_argument("--sample-steps", type=int, default=16)
    parser.add_argument("--methods", "--rows", dest="methods", default=None,
                        help="semicolon-separated subset of: " + "; ".join(METHODS))
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (one thread each)")
    parser.add_argument("--cache", default=None, help="where finished conversions and scores are kept (default "
                        "benchmarks/results/digits_cache; quick: a temporary folder, removed)")
    parser.add_argument("--out", default=None, help="results stem (default benchmarks/results/digits, quick: digits_quick)")
    parser.add_argument("--cached-only", action="store_true", help="compute nothing: tabulate what the cache "
                        "holds (the state of a run still going on)")
    parser.add_argument("--render", default=None, help="only re-render the Markdown table of a results .json")
    args = parser.parse_args(argv)
    if args.render:
        path = Path(args.render)
        path.with_suffix(".md").write_text(markdown(json.loads(path.read_text())))
        print(path.with_suffix(".md").read_text())
        return
    steps = args.steps or (40 if args.quick else 1200)
    samples = args.samples or (200 if args.quick else 1000)
    seeds = _bench.parse_seeds(args.seeds, "0" if args.quick else "0,1,2")
    train_seeds = _bench.parse_seeds(args.train_seeds, "0" if args.quick else "0,1")
    names = QUICK_METHODS if args.quick else DEFAULT_METHODS
    if args.methods:
        names = [m.strip() for m in args.methods.split(";") if m.strip()]
        unknown = [m for m in names if m not in METHODS]
        if unknown:
            parser.error(f"unknown rows {unknown}; choose from: " + "; ".join(METHODS))
    stem = Path(args.out) if args.out else RESULTS / ("digits_quick" if args.quick else "digits")
    temporary = args.cache is None and args.quick
    cache = Path(tempfile.mkdtemp(prefix="digits_bench_") if temporary else (args.cache or RESULTS / "digits_cache"))

    from cbs_convert.storage.loading import load_model
    from cbs_convert.evaluation.metrics import load_digits_split

    began = time.time()
    data = load_digits_split()
    cache.mkdir(parents=True, exist_ok=True)
    npz = cache / "digits_train.npz"
    np.savez(npz, features=data.train_x.numpy(), labels=data.train_y.numpy())
    family, _ = load_model(args.checkpoint)
    teacher_params = family.param_count(family.config)
    teacher_flops = family.forward_flops(family.config)
    common = dict(
        data=str(npz), pool_size=len(data.train_x), loss=args.loss, lr=args.lr, batch_size=args.batch_size,
        budget="1x", device="cpu", checkpoint_every=200,
        grid=8 if args.quick else 16, profile_batches=2 if args.quick else 4, profile_batch_size=32,
    )
    print(f"teacher {family.describe(family.config)}, {teacher_params:,} parameters; {steps} fine-tuning steps per "
          f"conversion, loss {args.loss}, training seeds {train_seeds}; {samples} samples x sampling seeds {seeds}, "
          f"Heun {args.sample_steps} steps; cache {cache}", flush=True)
    bench = _bench.Bench("digits", args.checkpoint, {n: METHODS[n] for n in names}, common, steps, samples, seeds,
                         train_seeds, args.sample_steps, cache, jobs=args.jobs,
                         log=lambda text: print(text, flush=True))
    bench.run(names, compute=not args.cached_only)
    wall = time.time() - began
    rows = bench.table_rows(names, teacher_flops, teacher_params)
    result = {
        "command": _bench.command_line("digits_benchmark.py", argv), "git_commit": _bench.git_commit(),
        "wall_seconds": wall, "teacher_params": teacher_params, "steps": steps, "loss": args.loss, "lr": args.lr,
        "batch_size": args.batch_size, "samples": samples, "seeds": seeds, "train_seeds": train_seeds,
        "sample_steps": args.sample_steps, "jobs": args.jobs, "work_done": bench.work,
        "unavailable": bench.unavailable, "diverged": bench.diverged, "rows": rows,
    }
    _bench.write_results(stem, result, markdown)
    doc_source = next((c["path"] for (n, t), c in bench.conversions.items() if n == PROFILE_FOR_DOCS and t == train_seeds[0]), None)
    png = Path(doc_source).with_name(Path(doc_source).stem + ".profile.png") if doc_source else None
    if png and png.exists() and not args.quick and args.out is None:
        DOCS.mkdir(exist_ok=True)
        shutil.copyfile(png, DOCS / "digits_profile.png")
    if temporary:
        shutil.rmtree(cache, ignore_errors=True)
    print(f"wrote {stem.with_suffix('.md')} and .json; wall time {wall / 60:.1f} min")


def markdown(result) -> str:
    train_seeds = result.get("train_seeds", [0])
    lines = [
        "# Digits benchmark: K time-segment experts at 1x the teacher's parameters",
        "",
        f"Command: `{result['command']}` (wall time {result['wall_seconds'] / 60:.1f} min, {result['jobs']} worker processes "
        f"of one thread, code at commit {result.get('git_commit') or 'unknown'} plus the working tree; cached "
        "conversions and scores, possibly from earlier commits of the same cache version, are reused, so the wall time covers only what this run computed).",
        "",
        f"Teacher: the bundled digits SiT, {result['teacher_params']:,} parameters. Every conversion: budget 1x "
        f"(all experts together) unless the row says otherwise, {result['steps']} fine-tuning steps in total split evenly "
        f"over its experts, loss `{result['loss']}` (the dense control: `data`, since distilling an unpruned copy has zero "
        f"gradient), lr {result['lr']}, batch {result['batch_size']}, pool = the training digits; each conversion run with "
        f"training seeds {', '.join(map(str, train_seeds))}. Sampling: Heun, {result['sample_steps']} uniform steps, no "
        f"guidance, {result['samples']} samples (balanced labels) per sampling seed, seeds "
        f"{', '.join(map(str, result['seeds']))}, the same noise for every model. FD: Fréchet distance to the 360 held-out "
        "digits on the digits classifier's features (lower is better; the real-digits row is the floor that finite "
        "samples set). ΔFD: FD minus the teacher's FD on the same sampling seed (paired), mean ± std over all n runs, and "
        "its mean per training seed. Class match: share classified as the conditioning label. Mean ± std over all runs.",
        "",
    ]
    lines += _bench.markdown_table(result["rows"])
    for name, reason in result.get("unavailable", {}).items():
        lines.append(f"\n{name}: not available at this commit ({reason})")
    for name, reason in result.get("diverged", {}).items():
        lines.append(f"\n{name}: its training diverged ({reason}), so the row lost")
    lines += _bench.markdown_pairs(result["rows"], PAIRED)
    lines += _bench.markdown_errors(result["rows"])
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
