"""Does a complexity-balanced split beat the baselines on real data? One command, offline.

    python3 benchmarks/digits_benchmark.py            # full run, writes benchmarks/results/digits.{md,json}
    python3 benchmarks/digits_benchmark.py --quick    # smoke run, a few minutes

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
Heun, ``--sample-steps`` uniform steps, no guidance) for each sampling seed, and ``cbs_convert.metrics``
scores the samples against the held-out digits: Fréchet distance on the digits classifier's features
(lower is better; the row "real training digits" is the floor set by finite samples) and the share
classified as their label. Differences between rows are listed paired (same seeds), which cancels most
of the sampling noise.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"

# name -> conversion settings; steps are filled in per K so that every row trains equally long.
# The uniform rows profile nothing, so their experts get equal shares (the plain baseline) whatever
# the pipeline's allocation default, and no profiling time is spent on them.
PLAIN = dict(split="uniform", monitors=[])
DENSE = "dense teacher fine-tuned (K=1)"
METHODS = {
    DENSE: dict(k=1, **PLAIN),
    "K=2 uniform": dict(k=2, **PLAIN),
    "K=2 CBS dirichlet": dict(k=2, split="cbs", monitor="dirichlet"),
    "K=2 CBS acceleration": dict(k=2, split="cbs", monitor="acceleration"),
    "K=4 uniform": dict(k=4, **PLAIN),
    "K=4 CBS dirichlet": dict(k=4, split="cbs", monitor="dirichlet"),
    "K=2 CBS dirichlet, magnitude pruning": dict(k=2, split="cbs", monitor="dirichlet", prune="magnitude"),
    "K=2 CBS dirichlet, random pruning": dict(k=2, split="cbs", monitor="dirichlet", prune="random"),
    # the guards against a curve dominated by the data end (run with --methods, see the README)
    "K=2 CBS dirichlet, gamma 0.25": dict(k=2, split="cbs", monitor="dirichlet", gamma=0.25),
    "K=2 CBS dirichlet, floor 0.5": dict(k=2, split="cbs", monitor="dirichlet", floor=0.5),
}
DEFAULT_METHODS = [name for name in METHODS if "gamma 0.25" not in name and "floor 0.5" not in name]
PROFILE_FOR_DOCS = "K=2 CBS dirichlet"
# (row, baseline) pairs whose per-run FD differences the report lists.
PAIRED = [
    ("K=2 CBS dirichlet", "K=2 uniform"),
    ("K=2 CBS acceleration", "K=2 uniform"),
    ("K=4 CBS dirichlet", "K=4 uniform"),
    ("K=2 uniform", DENSE),
    ("K=2 CBS dirichlet, magnitude pruning", "K=2 CBS dirichlet"),
    ("K=2 CBS dirichlet, random pruning", "K=2 CBS dirichlet"),
]


def _worker_init(threads: int):
    # One thread per process: the cores are shared, and OpenMP barriers stall badly when oversubscribed.
    import torch

    torch.set_num_threads(threads)


def run_conversion(name, settings, workdir):
    import cbs_convert

    slug = "".join(c if c.isalnum() else "_" for c in name).strip("_") + f"_seed{settings['seed']}"
    out = Path(workdir) / f"{slug}.safetensors"
    began = time.time()
    result = cbs_convert.convert(out=str(out), workdir=str(out) + ".work", progress=False, force=True, **settings)
    report = result.report
    experts = report["evaluation"]["experts"]
    return {
        "name": name,
        "train_seed": settings["seed"],
        "path": str(out),
        "profile_png": str(out.with_name(out.stem + ".profile.png")),
        "boundaries": report["split"]["boundaries"],
        "shares": report["split"]["shares"],
        "expert_params": [e["params"] for e in experts],
        "expert_flops": [e["flops"] for e in experts],
        "error_before": [e["error_before"] for e in experts],
        "error_after": [e["error_after"] for e in experts],
        "seams": report["evaluation"]["seams"],
        "split_notes": report["split"].get("notes", []),
        "loss": settings["loss"],
        "seconds": time.time() - began,
        "timings": report["timings_s"],
    }


def _sampler_times(steps: int):
    """Canonical times at which the Heun sampler of ``sample_ode`` evaluates the model."""
    times = np.linspace(1.0, 0.0, steps + 1)
    calls = []
    for i in range(steps):
        calls.append(times[i])
        if i < steps - 1:
            calls.append(times[i + 1])
    return np.asarray(calls)


def _balanced_labels(n, seed):
    import torch

    labels = torch.arange(n) % 10
    return labels[torch.randperm(n, generator=torch.Generator().manual_seed(10_000 + seed))]


def evaluate(name, source, seed, samples, sample_steps, train_seed=None):
    """Sample ``samples`` digits from ``source`` (a checkpoint, a routed file, or "real") and score them."""
    import torch

    from cbs_convert.metrics import DigitsScorer, load_digits_split

    scorer = DigitsScorer()
    labels = _balanced_labels(samples, seed)
    if source == "real":
        data = load_digits_split()
        pick = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(seed))[:samples]
        images, labels = data.train_x[pick], data.train_y[pick]
    else:
        family, model = _load_model(source)
        noise = torch.randn((samples, *family.sample_shape(family.config)), generator=torch.Generator().manual_seed(seed))
        from cbs_convert.sample import sample_ode

        images = sample_ode(family, model, tuple(noise.shape), labels, steps=sample_steps, noise=noise)
        if not torch.isfinite(images).all():
            return {"name": name, "seed": seed, "train_seed": train_seed, "fd": float("nan"), "class_match": float("nan")}
    return {"name": name, "seed": seed, "train_seed": train_seed, **scorer.score(images, labels)}


def _load_model(source):
    if source.endswith(".safetensors"):
        import cbs_convert

        model = cbs_convert.load(source)
        return model.family, model
    from cbs_convert.checkpoint import hints_from_args, read_checkpoint
    from cbs_convert.families import detect

    checkpoint = read_checkpoint(source)
    family, _ = detect(checkpoint.state_dict, hints_from_args(checkpoint.args))
    model = family.build(family.config)
    model.load_state_dict(checkpoint.state_dict, strict=True)
    return family, model.eval().requires_grad_(False)


def sampling_cost(conversion, teacher_flops, sample_steps):
    """Forward FLOPs of one whole sample relative to the teacher, routing each call by its time."""
    if conversion is None:
        return 1.0
    calls = _sampler_times(sample_steps)
    inner = np.asarray(conversion["boundaries"][1:-1])
    which = np.searchsorted(inner, calls, side="right")  # the routed model's bucketize(right=True)
    flops = np.asarray(conversion["expert_flops"], dtype=np.float64)[which].sum()
    return float(flops / (teacher_flops * len(calls)))


def summarise(rows):
    values = np.asarray([r for r in rows if np.isfinite(r)], dtype=np.float64)
    if len(values) == 0:
        return float("nan"), float("nan")
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few steps, few samples, one seed")
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
    parser.add_argument("--methods", default=None, help="semicolon-separated subset of: " + "; ".join(METHODS))
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (one thread each)")
    parser.add_argument("--workdir", default=None, help="where conversions go (default: a temporary folder, removed)")
    parser.add_argument("--out", default=None, help="results stem (default benchmarks/results/digits, quick: digits_quick)")
    parser.add_argument("--render", default=None, help="only re-render the Markdown table of a results .json")
    args = parser.parse_args(argv)
    if args.render:
        path = Path(args.render)
        path.with_suffix(".md").write_text(markdown(json.loads(path.read_text())))
        print(path.with_suffix(".md").read_text())
        return
    steps = args.steps or (40 if args.quick else 1200)
    samples = args.samples or (200 if args.quick else 1000)
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    train_seeds = [int(s) for s in (args.train_seeds or ("0" if args.quick else "0,1")).split(",")]
    methods = {m: METHODS[m] for m in DEFAULT_METHODS}
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(";") if m.strip()]
        methods = {m: METHODS[m] for m in wanted}
    stem = Path(args.out) if args.out else RESULTS / ("digits_quick" if args.quick else "digits")

    began = time.time()
    temporary = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="digits_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)

    from cbs_convert.checkpoint import hints_from_args, read_checkpoint
    from cbs_convert.families import detect
    from cbs_convert.metrics import load_digits_split

    data = load_digits_split()
    npz = workdir / "digits_train.npz"
    np.savez(npz, features=data.train_x.numpy(), labels=data.train_y.numpy())
    source = read_checkpoint(args.checkpoint)
    family, _ = detect(source.state_dict, hints_from_args(source.args))
    teacher_params = family.param_count(family.config)
    teacher_flops = family.forward_flops(family.config)

    common = dict(
        checkpoint=args.checkpoint, data=str(npz), pool_size=len(data.train_x), loss=args.loss, lr=args.lr,
        batch_size=args.batch_size, budget="1x", seed=0, device="cpu", checkpoint_every=10**6,
        grid=8 if args.quick else 16, profile_batches=2 if args.quick else 4, profile_batch_size=32,
    )
    print(f"teacher {family.describe(family.config)}, {teacher_params:,} parameters; {steps} fine-tuning steps per "
          f"conversion, loss {args.loss}, training seeds {train_seeds}; {samples} samples x sampling seeds {seeds}, "
          f"Heun {args.sample_steps} steps; "
          f"work dir {workdir}", flush=True)

    conversions, scores = [], []
    context = get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=context, initializer=_worker_init, initargs=(1,)) as pool:
        pending = {}
        for seed in seeds:
            pending[pool.submit(evaluate, "real training digits", "real", seed, samples, args.sample_steps)] = "eval"
            pending[pool.submit(evaluate, "teacher", args.checkpoint, seed, samples, args.sample_steps)] = "eval"
        for train_seed in train_seeds:
            for name, settings in methods.items():
                settings = {**common, **settings, "steps": max(1, steps // settings["k"]), "seed": train_seed}
                if name == DENSE and args.loss == "distill":
                    # Distilling an unpruned copy has exactly zero gradient: it would return the teacher
                    # bit for bit. The data loss is the extra training this control is there to measure.
                    settings["loss"] = "data"
                pending[pool.submit(run_conversion, name, settings, str(workdir))] = "convert"
        while pending:
            job = next(as_completed(pending))
            kind = pending.pop(job)
            result = job.result()
            if kind == "convert":
                conversions.append(result)
                print(f"  converted {result['name']} (training seed {result['train_seed']}): boundaries "
                      f"{[round(b, 3) for b in result['boundaries']]}, {result['seconds']:.0f}s", flush=True)
                for seed in seeds:
                    job = pool.submit(evaluate, result["name"], result["path"], seed, samples, args.sample_steps, result["train_seed"])
                    pending[job] = "eval"
            else:
                scores.append(result)
                print(f"  scored {result['name']} (training seed {result['train_seed']}) sampling seed {result['seed']}: "
                      f"FD {result['fd']:.2f}, class match {result['class_match']:.3f}", flush=True)

    wall = time.time() - began
    teacher_fd = {s["seed"]: s["fd"] for s in scores if s["name"] == "teacher"}
    rows = []
    for name in ["real training digits", "teacher", *methods]:
        mine = sorted((s for s in scores if s["name"] == name), key=lambda s: (s["train_seed"] or 0, s["seed"]))
        converted = sorted((c for c in conversions if c["name"] == name), key=lambda c: c["train_seed"])
        fd_mean, fd_std = summarise([s["fd"] for s in mine])
        cm_mean, cm_std = summarise([s["class_match"] for s in mine])
        # Same noise and labels per sampling seed for every model: the difference to the teacher's
        # FD on the same seed cancels most of the sampling noise that the plain spread carries.
        gaps = {s["train_seed"]: [] for s in mine}
        for s in mine:
            gaps[s["train_seed"]].append(s["fd"] - teacher_fd[s["seed"]])
        gap_mean, gap_std = summarise([g for values in gaps.values() for g in values])
        first = converted[0] if converted else None
        rows.append({
            "name": name,
            "fd_mean": fd_mean, "fd_std": fd_std, "class_match_mean": cm_mean, "class_match_std": cm_std,
            "gap_mean": gap_mean, "gap_std": gap_std,
            "gap_by_train_seed": {str(k): float(np.mean(v)) for k, v in gaps.items() if k is not None},
            "runs": mine,
            "params": None if name == "real training digits" else (sum(first["expert_params"]) if first else teacher_params),
            "sampling_flops_vs_teacher": None if name == "real training digits" else sampling_cost(first, teacher_flops, args.sample_steps),
            "conversions": converted,
        })
    command = "python3 benchmarks/digits_benchmark.py" + "".join(" " + a for a in (sys.argv[1:] if argv is None else argv))
    result = {
        "command": command, "git_commit": _git_commit(), "wall_seconds": wall, "teacher_params": teacher_params,
        "steps": steps, "loss": args.loss, "lr": args.lr, "batch_size": args.batch_size, "samples": samples,
        "seeds": seeds, "train_seeds": train_seeds, "sample_steps": args.sample_steps, "jobs": args.jobs, "rows": rows,
    }
    text = markdown(result)
    print()
    print(text)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    doc_source = next((c["profile_png"] for c in conversions if c["name"] == PROFILE_FOR_DOCS and c["train_seed"] == train_seeds[0]), None)
    if doc_source and Path(doc_source).exists() and not args.quick and args.out is None:
        DOCS.mkdir(exist_ok=True)
        shutil.copyfile(doc_source, DOCS / "digits_profile.png")
    if temporary:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"wrote {stem.with_suffix('.md')} and .json; wall time {wall / 60:.1f} min")


def _git_commit():
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def markdown(result) -> str:
    train_seeds = result.get("train_seeds", [0])
    lines = [
        "# Digits benchmark: K time-segment experts at 1x the teacher's parameters",
        "",
        f"Command: `{result['command']}` (wall time {result['wall_seconds'] / 60:.1f} min, {result['jobs']} worker processes "
        f"of one thread, code at commit {result.get('git_commit') or 'unknown'} plus the working tree).",
        "",
        f"Teacher: the bundled digits SiT, {result['teacher_params']:,} parameters. Every conversion: budget 1x "
        f"(all experts together), {result['steps']} fine-tuning steps in total split evenly over its experts, "
        f"loss `{result['loss']}` (the dense control: `data` when that is `distill`, see below), lr {result['lr']}, "
        f"batch {result['batch_size']}, pool = the training digits; each conversion run with training seeds "
        f"{', '.join(map(str, train_seeds))}. Sampling: Heun, {result['sample_steps']} uniform steps, no guidance, "
        f"{result['samples']} samples (balanced labels) per sampling seed, seeds {', '.join(map(str, result['seeds']))}, "
        "the same noise for every model. FD: Fréchet distance to the 360 held-out digits on the digits classifier's "
        "features (lower is better; the real-digits row is the floor that finite samples set). ΔFD: FD minus the "
        "teacher's FD on the same sampling seed (paired), mean ± std over all runs, and its mean per training seed. "
        "Class match: share classified as the conditioning label. Mean ± std over all runs.",
        "",
        "| model | boundaries (t) | params | sampling FLOPs vs teacher | FD ↓ | ΔFD vs teacher ↓ | ΔFD per training seed | class match ↑ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        converted = row["conversions"]
        baseline = row["name"] in ("teacher", "real training digits")
        cuts = sorted({", ".join(f"{b:.3f}" for b in c["boundaries"][1:-1]) for c in converted})
        bounds = " / ".join(cuts) if cuts and any(cuts) else ("–" if baseline else "none")
        params = f"{row['params']:,}" if row["params"] else "–"
        if converted and len(converted[0]["expert_params"]) > 1:
            params += " (" + " + ".join(f"{p:,}" for p in converted[0]["expert_params"]) + ")"
        cost = f"{row['sampling_flops_vs_teacher']:.2f}" if row["sampling_flops_vs_teacher"] is not None else "–"
        gap = "–" if baseline else f"{row['gap_mean']:+.2f} ± {row['gap_std']:.2f}"
        per_seed = "–" if baseline else " / ".join(f"{v:+.2f}" for v in row["gap_by_train_seed"].values())
        lines.append(
            f"| {row['name']} | {bounds} | {params} | {cost} | {row['fd_mean']:.2f} ± {row['fd_std']:.2f} | {gap} | "
            f"{per_seed} | {row['class_match_mean']:.3f} ± {row['class_match_std']:.3f} |"
        )
    comparisons = [(name, base) for name, base in PAIRED if name in {r["name"] for r in result["rows"]}
                   and base in {r["name"] for r in result["rows"]}]
    if comparisons:
        lines += ["", "Paired differences (same training seed, same sampling seed; positive: the first is worse):", ""]
        runs = {r["name"]: {(s["train_seed"], s["seed"]): s["fd"] for s in r["runs"]} for r in result["rows"]}
        for name, base in comparisons:
            keys = sorted(set(runs[name]) & set(runs[base]))
            diffs = [runs[name][k] - runs[base][k] for k in keys]
            mean, std = summarise(diffs)
            worse = sum(d > 0 for d in diffs)
            lines.append(f"- {name} − {base}: FD {mean:+.2f} ± {std:.2f}, worse in {worse} of {len(diffs)} runs")
    lines += ["", "Velocity error against the teacher on each expert's segment (before → after fine-tuning), and seams:", ""]
    for row in result["rows"]:
        for c in row["conversions"]:
            errors = ", ".join(f"{a:.3f} → {b:.3f}" for a, b in zip(c["error_before"], c["error_after"]))
            seams = "; ".join(f"t={s['boundary']:.3f}: {s['before']:.3f} → {s['after']:.3f}" for s in c["seams"])
            lines.append(f"- {row['name']}, training seed {c['train_seed']} (loss {c['loss']}): {errors}"
                         + (f"; seams {seams}" if seams else "") + f" ({c['seconds']:.0f} s)")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
