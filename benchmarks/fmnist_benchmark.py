"""Which split of a capacity-limited teacher wins on Fashion-MNIST? One command, offline, resumable.

    apt-get install dataset-fashion-mnist                  # the data, once
    python3 benchmarks/fmnist_benchmark.py                 # everything; resumable, spans sessions
    python3 benchmarks/fmnist_benchmark.py --estimate      # print the cost, run nothing
    python3 benchmarks/fmnist_benchmark.py --rows "K=2 uniform;K=1 0.5x"
    python3 benchmarks/fmnist_benchmark.py --quick         # smoke run, about a minute

Source: the bundled Fashion-MNIST SiT (``cbs_convert/assets/fmnist_sit.safetensors``, trained by
``train_fmnist_teacher.py``), small enough that halving its width visibly hurts. Rows (``ROWS``, data):

* the dense teacher, and the teacher fine-tuned on the data (K=1 at 1x);
* one model pruned to half width (K=1 at 0.5x): the per-step FLOPs of K=2 experts at 1x;
* K=2 at 1x: uniform, snr (equal log-SNR spacing), cbs on the published Dirichlet monitor, and cbs
  on each learning-burden monitor (denoiser, nonlinear, sensitivity);
* K=2 at 2x (full-width experts, the data loss: the teacher's per-step FLOPs): uniform and the best cbs;
* the "gentle" rows: dense fine-tuned (1x and 4x as long) and K=2 2x uniform under the full-width
  recipe of issue 18 (lr 1e-4, warm-up, cosine to a tenth, EMA anchored at the teacher);
* shared-base experts (``--experts lora``): the teacher as a base plus a rank 2 or 4 delta per
  segment, K=2 and K=4, uniform and cbs (denoiser) cuts, trained together at the gentle recipe's
  lr for the base; and one row with the base frozen;
* compression that recovers, at 0.5x per-step FLOPs: depth pruning (importance and recovery
  selectors), masked block-feature distillation, and both, for K=1 and the K=2 cbs denoiser cut;
* K=4 at 1x: uniform and the best cbs;
* a learning curve, fine-tuning 0.25x, 1x and 2x as long (8x apart), for the half-width single
  model, K=2 uniform and the best K=2 cbs.

"best cbs" is whichever K=2 1x cbs row has the lowest mean paired ΔFD once all are scored; a
monitor this commit does not offer is reported as unavailable and left out of that choice.

Every row trains for the same total number of steps (``--steps`` x its ``steps_factor``, divided
evenly over its experts), same lr, batch, pool (real training images). Pruned rows distil (the
tool's default); full-width ones train on the data loss, since distilling an unpruned copy has zero
gradient. Every conversion runs for each training seed; every model then samples the same labels
from the same noise per sampling seed (Heun, ``--sample-steps``, no guidance), scored by
``cbs_convert.evaluation.metrics.FashionScorer``: Fréchet distance to the 10,000 test images on the bundled
classifier's 128-d features, and the share classified as their label. ΔFD and the differences
between rows are paired over (training seed, sampling seed).

Each finished conversion and score is a small JSON file under ``benchmarks/results/fmnist_cache``
(committed), the routed files under ``fmnist_cache/models`` (ignored); a rerun does only what is
missing, and a conversion interrupted mid-way resumes from its work directory.
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

PLAIN = dict(split="uniform", monitors=[])
# Full-width copies of the teacher learn nothing from distillation (zero gradient at the start).
FULL = dict(loss="data")
HALF = "K=1 0.5x"
UNIFORM = "K=2 uniform"
K2_CBS = ["K=2 cbs dirichlet", "K=2 cbs denoiser", "K=2 cbs nonlinear", "K=2 cbs sensitivity"]
BEST = "K=2 best cbs"


def cbs(monitor, **more):
    return dict(split="cbs", monitor=monitor, monitors=[monitor], **more)


# In priority order: an interrupted run has done the rows that decide the most.
ROWS = {
    HALF: dict(k=1, budget="0.5x", **PLAIN),
    UNIFORM: dict(k=2, **PLAIN),
    "K=2 cbs dirichlet": cbs("dirichlet", k=2),  # the method as published
    "dense fine-tuned": dict(k=1, budget="1x", **PLAIN, **FULL),
    "K=2 snr": dict(k=2, split="snr", monitors=[]),
    "K=2 cbs denoiser": cbs("denoiser", k=2),
    "K=2 cbs nonlinear": cbs("nonlinear", k=2),
    "K=2 cbs sensitivity": cbs("sensitivity", k=2),
    "K=4 uniform": dict(k=4, **PLAIN),
    "K=4 best cbs": dict(best_of=K2_CBS, k=4),
    "K=2 2x uniform": dict(k=2, budget="2x", **PLAIN, **FULL),
    "K=2 2x best cbs": dict(best_of=K2_CBS, k=2, budget="2x", **FULL),
}
DENSE_GENTLE = "dense fine-tuned, gentle"
ROWS[DENSE_GENTLE] = dict(k=1, budget="1x", **PLAIN, **FULL, **GENTLE)
ROWS[f"{DENSE_GENTLE}, 4x steps"] = dict(ROWS[DENSE_GENTLE], steps_factor=4.0)
ROWS["K=2 2x uniform, gentle"] = dict(k=2, budget="2x", **PLAIN, **FULL, **GENTLE)
# Shared-base experts (_bench.LORA) for the row's total steps: ranks 2 and 4 on this width-96 teacher
# cost 1.03x and 1.05x its per-step FLOPs.
LORA_ROWS = []
for _k in (2, 4):
    for _rank in (4, 2):
        for _cut, _split in (("uniform", PLAIN), ("cbs", cbs("denoiser"))):
            LORA_ROWS.append(f"K={_k} lora r{_rank} {_cut}")
            ROWS[LORA_ROWS[-1]] = dict(k=_k, rank=_rank, **_split, **LORA)
ROWS["K=2 lora r4 uniform, frozen base"] = dict(ROWS["K=2 lora r4 uniform"], base_lr_scale=0.0)
# The same-cost learning curve to 8x the 1,200 steps (issue 18): does a split pull ahead of the
# dense model's own continued training once that training has had its easy gains? Rank 2 is the
# shared-base row that led at 1x (-0.08 +- 0.03 FD against dense gentle over four training seeds).
SAME_COST_CURVE = {DENSE_GENTLE: ROWS[DENSE_GENTLE], "K=2 2x uniform, gentle": ROWS["K=2 2x uniform, gentle"],
                   "K=2 lora r2 uniform": ROWS["K=2 lora r2 uniform"]}
for _model, _settings in SAME_COST_CURVE.items():
    for _factor in (4.0, 8.0):
        ROWS.setdefault(f"{_model}, {_factor:g}x steps", dict(_settings, steps_factor=_factor))
# Compression that recovers (issue 20), at 0.5x per-step FLOPs: whole blocks removed first (this
# teacher's 4 blocks leave 2, then width takes the rest), and TinyFusion's masked block-feature loss.
DEPTH = dict(structure="depth")
FEATURES = dict(feature_weight=1.0)
COMPRESSION_ROWS = {
    "K=1 0.5x depth": dict(ROWS[HALF], **DEPTH),
    "K=1 0.5x depth, recovery": dict(ROWS[HALF], **DEPTH, block_selector="recovery"),
    "K=1 0.5x, features": dict(ROWS[HALF], **FEATURES),
    "K=1 0.5x depth, features": dict(ROWS[HALF], **DEPTH, **FEATURES),
    "K=2 cbs denoiser, features": dict(ROWS["K=2 cbs denoiser"], **FEATURES),
    "K=2 cbs denoiser depth, features": dict(ROWS["K=2 cbs denoiser"], **DEPTH, **FEATURES),
    # per-block widths: the uniform widths' totals, given out over the blocks by importance
    "K=1 0.5x blockwise": dict(ROWS[HALF], structure="blockwise"),
    "K=2 cbs denoiser blockwise": dict(ROWS["K=2 cbs denoiser"], structure="blockwise"),
    "K=1 0.5x blockwise, features": dict(ROWS[HALF], structure="blockwise", **FEATURES),
    "K=2 cbs denoiser blockwise, features": dict(ROWS["K=2 cbs denoiser"], structure="blockwise", **FEATURES),
    # the best 0.5x structure so far (per-block widths with masked features) on the other K=2 cut,
    # and at K=4 (each expert at a quarter of the teacher's per-step FLOPs), where plain width collapses
    "K=2 uniform blockwise, features": dict(ROWS[UNIFORM], structure="blockwise", **FEATURES),
    "K=4 cbs denoiser blockwise, features": dict(cbs("denoiser", k=4), structure="blockwise", **FEATURES),
}
# a pruned student recovers from far away in 1,200 steps: does the teacher's own peak lr (1e-3, not
# the pruned default 3e-4) buy more of that recovery?
for _model in ("K=1 0.5x blockwise, features", "K=2 cbs denoiser blockwise, features"):
    COMPRESSION_ROWS[f"{_model}, lr 1e-3"] = dict(COMPRESSION_ROWS[_model], lr=1e-3)
# eDiff-I's branching (--trunk-steps): half the steps train one student on all of time, each expert
# starts from it and trains on its own segment for its share of the other half
TRUNK = dict(trunk_share=0.5)
COMPRESSION_ROWS["K=2 cbs denoiser blockwise, features, trunk"] = dict(COMPRESSION_ROWS["K=2 cbs denoiser blockwise, features"], **TRUNK)
COMPRESSION_ROWS["K=4 cbs denoiser blockwise, features, trunk"] = dict(COMPRESSION_ROWS["K=4 cbs denoiser blockwise, features"], **TRUNK)
COMPRESSION_ROWS["K=2 cbs denoiser, trunk"] = dict(ROWS["K=2 cbs denoiser"], **TRUNK)
# the best K=2 structure on the other cut: does the trunk's gain depend on where time is cut?
COMPRESSION_ROWS["K=2 uniform blockwise, features, trunk"] = dict(COMPRESSION_ROWS["K=2 uniform blockwise, features"], **TRUNK)
# three quarters on the trunk: each expert then sees 1,050 steps that cover its segment, not 900
COMPRESSION_ROWS["K=2 cbs denoiser blockwise, features, trunk 0.75"] = dict(
    COMPRESSION_ROWS["K=2 cbs denoiser blockwise, features"], trunk_share=0.75)
# steps shared by segment length (--step-shares length): the cbs cut at t = 0.32 gave its wide
# high-noise segment 600 of 1,200 steps, where one model trained on all of time gives it 820
for _model in ("K=2 cbs denoiser blockwise, features", "K=2 cbs denoiser blockwise, features, trunk"):
    COMPRESSION_ROWS[f"{_model}, by length"] = dict(COMPRESSION_ROWS[_model], step_shares="length")
# the best 0.5x split (trunk, steps by length) at the teacher's peak lr, against the single model at it
COMPRESSION_ROWS["K=2 cbs denoiser blockwise, features, trunk, by length, lr 1e-3"] = dict(
    COMPRESSION_ROWS["K=2 cbs denoiser blockwise, features, trunk, by length"], lr=1e-3)
ROWS.update(COMPRESSION_ROWS)
# whether each structure keeps its place with 4x the fine-tuning (4,800 steps)
for _model in ("K=1 0.5x blockwise, features", "K=2 cbs denoiser blockwise, features", "K=1 0.5x blockwise",
               "K=1 0.5x depth", "K=2 cbs denoiser blockwise, features, trunk", "K=2 uniform blockwise, features, trunk"):
    ROWS[f"{_model}, 4x steps"] = dict(ROWS[_model], steps_factor=4.0)
CURVE_FACTORS = (0.25, 1.0, 2.0, 4.0)
CURVE_MODELS = {HALF: ROWS[HALF], UNIFORM: ROWS[UNIFORM], BEST: dict(best_of=K2_CBS, k=2)}
for _factor in CURVE_FACTORS:
    for _model, _settings in CURVE_MODELS.items():
        if _factor == 1.0:
            continue  # the main rows (and the winning cbs row) are the curve's middle point
        ROWS[f"{_model}, {_factor:g}x steps"] = dict(_settings, steps_factor=_factor)

QUICK_ROWS = [HALF, UNIFORM, "K=2 cbs dirichlet", "K=4 best cbs"]
PAIRED = (
    [(UNIFORM, HALF)]
    + [(name, UNIFORM) for name in ["K=2 snr", *K2_CBS]]
    + [(name, HALF) for name in ["K=2 snr", *K2_CBS]]
    + [("K=2 2x best cbs", "K=2 2x uniform"), ("K=4 best cbs", "K=4 uniform"), ("K=4 uniform", UNIFORM),
       ("dense fine-tuned", "K=2 2x uniform"), (DENSE_GENTLE, "dense fine-tuned"),
       ("K=2 2x uniform, gentle", DENSE_GENTLE), ("K=2 2x uniform, gentle", "K=2 2x uniform")]
    + [(name, DENSE_GENTLE) for name in LORA_ROWS]
    + [(f"K={k} lora r{r} cbs", f"K={k} lora r{r} uniform") for k in (2, 4) for r in (4, 2)]
    + [("K=2 lora r4 uniform, frozen base", "K=2 lora r4 uniform")]
    + [(f"K=4 lora r4 {cut}", f"K=4 lora r2 {cut}") for cut in ("uniform", "cbs")]
    + [("K=4 lora r4 cbs", "K=2 lora r2 uniform"), ("K=4 lora r2 cbs", "K=2 lora r2 uniform")]
    + [(f"{name}, {f:g}x steps", f"{DENSE_GENTLE}, {f:g}x steps") for f in (4.0, 8.0) for name in SAME_COST_CURVE
       if name != DENSE_GENTLE]
    + [(f"K=2 2x uniform, gentle, {f:g}x steps", f"K=2 lora r2 uniform, {f:g}x steps") for f in (4.0, 8.0)]
    + [(name, HALF) for name in COMPRESSION_ROWS]
    + [("K=2 cbs denoiser, features", "K=2 cbs denoiser"), ("K=2 cbs denoiser, features", "K=1 0.5x, features"),
       ("K=2 cbs denoiser depth, features", "K=2 cbs denoiser, features"),
       ("K=2 cbs denoiser blockwise", "K=2 cbs denoiser"), ("K=2 cbs denoiser blockwise", "K=1 0.5x blockwise"),
       ("K=1 0.5x blockwise, features", "K=1 0.5x blockwise"), ("K=1 0.5x blockwise, features", "K=1 0.5x, features"),
       ("K=2 cbs denoiser blockwise, features", "K=1 0.5x blockwise, features"),
       ("K=2 cbs denoiser blockwise, features", "K=2 cbs denoiser, features"),
       ("K=2 uniform blockwise, features", "K=1 0.5x blockwise, features"),
       ("K=2 cbs denoiser blockwise, features", "K=2 uniform blockwise, features"),
       ("K=4 cbs denoiser blockwise, features", "K=4 best cbs"),
       ("K=4 cbs denoiser blockwise, features", "K=2 cbs denoiser blockwise, features"),
       ("K=2 cbs denoiser blockwise, features, 4x steps", "K=1 0.5x blockwise, features, 4x steps"),
       ("K=2 cbs denoiser blockwise, features, trunk, 4x steps", "K=1 0.5x blockwise, features, 4x steps"),
       ("K=2 uniform blockwise, features, trunk, 4x steps", "K=1 0.5x blockwise, features, 4x steps"),
       ("K=2 cbs denoiser blockwise, features, trunk, 4x steps", "K=2 uniform blockwise, features, trunk, 4x steps"),
       ("K=2 uniform blockwise, features, trunk", "K=1 0.5x blockwise, features"),
       ("K=2 cbs denoiser blockwise, features, trunk", "K=2 uniform blockwise, features, trunk"),
       ("K=1 0.5x blockwise, 4x steps", "K=1 0.5x, 4x steps"), ("K=1 0.5x depth, 4x steps", "K=1 0.5x, 4x steps"),
       ("K=1 0.5x depth, recovery", "K=1 0.5x depth"),
       ("K=1 0.5x blockwise, features, 4x steps", "K=1 0.5x, 4x steps"),
       ("K=1 0.5x blockwise, features, lr 1e-3", "K=1 0.5x blockwise, features"),
       ("K=2 cbs denoiser blockwise, features, lr 1e-3", "K=2 cbs denoiser blockwise, features"),
       ("K=2 cbs denoiser blockwise, features, lr 1e-3", "K=1 0.5x blockwise, features, lr 1e-3"),
       ("K=2 cbs denoiser blockwise, features, trunk", "K=1 0.5x blockwise, features"),
       ("K=2 cbs denoiser blockwise, features, trunk", "K=2 cbs denoiser blockwise, features"),
       ("K=2 cbs denoiser, trunk", "K=2 cbs denoiser"),
       ("K=2 cbs denoiser blockwise, features, trunk 0.75", "K=1 0.5x blockwise, features"),
       ("K=2 cbs denoiser blockwise, features, trunk 0.75", "K=2 cbs denoiser blockwise, features, trunk"),
       ("K=4 cbs denoiser blockwise, features, trunk", "K=4 cbs denoiser blockwise, features"),
       ("K=4 cbs denoiser blockwise, features, trunk", "K=2 cbs denoiser blockwise, features, trunk"),
       ("K=2 cbs denoiser blockwise, features, by length", "K=1 0.5x blockwise, features"),
       ("K=2 cbs denoiser blockwise, features, by length", "K=2 cbs denoiser blockwise, features"),
       ("K=2 cbs denoiser blockwise, features, trunk, by length", "K=1 0.5x blockwise, features"),
       ("K=2 cbs denoiser blockwise, features, trunk, by length", "K=2 cbs denoiser blockwise, features, trunk"),
       ("K=2 cbs denoiser blockwise, features, trunk, by length, lr 1e-3", "K=1 0.5x blockwise, features, lr 1e-3"),
       ("K=2 cbs denoiser blockwise, features, trunk, by length, lr 1e-3",
        "K=2 cbs denoiser blockwise, features, trunk, by length")]
)


def curve_name(model: str, factor: float, resolved=None) -> str:
    """The row holding one point of the learning curve; the best cbs row's 1x point is its winner."""
    if factor != 1.0:
        return f"{model}, {factor:g}x steps"
    if model == BEST:
        return next((v for k, v in (resolved or {}).items() if k.startswith(BEST)), BEST)
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few steps, few samples, one seed, four rows")
    parser.add_argument("--estimate", action="store_true", help="print the estimated cost and stop")
    parser.add_argument("--checkpoint", default=str(ROOT / "cbs_convert" / "assets" / "fmnist_sit.safetensors"))
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps per conversion at steps_factor 1, "
                        "all experts together (default 1200; quick 8)")
    parser.add_argument("--loss", default="distill", choices=("distill", "data", "both"), help="loss of the pruned rows")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--pool-size", type=int, default=20000, help="training images each conversion sees")
    parser.add_argument("--samples", type=int, default=None, help="samples per model and sampling seed (default 5000; quick 100)")
    parser.add_argument("--seeds", default=None, help="comma-separated sampling seeds (default 0,1,2; quick 0)")
    parser.add_argument("--train-seeds", default=None, help="comma-separated training seeds (default 0,1; quick 0)")
    parser.add_argument("--sample-steps", type=int, default=None, help="Heun steps (default 16; quick 4)")
    parser.add_argument("--rows", default=None, help="semicolon-separated subset of: " + "; ".join(ROWS))
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (one thread each)")
    parser.add_argument("--cache", default=None, help="finished conversions and scores (default "
                        "benchmarks/results/fmnist_cache; quick: a temporary folder, removed)")
    parser.add_argument("--out", default=None, help="results stem (default benchmarks/results/fmnist; quick: fmnist_quick)")
    parser.add_argument("--cached-only", action="store_true", help="compute nothing: tabulate what the cache "
                        "holds (the state of a run still going on)")
    parser.add_argument("--render", default=None, help="only re-render the Markdown of a results .json")
    args = parser.parse_args(argv)
    if args.render:
        path = Path(args.render)
        path.with_suffix(".md").write_text(markdown(json.loads(path.read_text())))
        print(path.with_suffix(".md").read_text())
        return
    steps = args.steps or (8 if args.quick else 1200)
    samples = args.samples or (100 if args.quick else 5000)
    sample_steps = args.sample_steps or (4 if args.quick else 16)
    seeds = _bench.parse_seeds(args.seeds, "0" if args.quick else "0,1,2")
    train_seeds = _bench.parse_seeds(args.train_seeds, "0" if args.quick else "0,1")
    names = QUICK_ROWS if args.quick else list(ROWS)
    if args.rows:
        names = [m.strip() for m in args.rows.split(";") if m.strip()]
        unknown = [m for m in names if m not in ROWS]
        if unknown:
            parser.error(f"unknown rows {unknown}; choose from: " + "; ".join(ROWS))
        # "best cbs" means best of all K=2 cbs rows, so a row that picks it brings them along
        for name in list(names):
            names[:0] = [c for c in ROWS[name].get("best_of", []) if c not in names]
    stem = Path(args.out) if args.out else RESULTS / ("fmnist_quick" if args.quick else "fmnist")
    temporary = args.cache is None and args.quick
    cache = Path(tempfile.mkdtemp(prefix="fmnist_bench_") if temporary else (args.cache or RESULTS / "fmnist_cache"))

    from cbs_convert.evaluation.datasets import load_fashion_mnist
    from cbs_convert.errors import UserError
    from cbs_convert.storage.loading import load_model

    for needed, how in ((args.checkpoint, "python3 benchmarks/train_fmnist_teacher.py"),
                        (str(ROOT / "cbs_convert" / "assets" / "fmnist_classifier.safetensors"),
                         "python3 benchmarks/train_fmnist_classifier.py")):
        if not Path(needed).exists():
            raise SystemExit(f"{needed} is missing; make it with `{how}`")
    try:
        data = load_fashion_mnist()
    except UserError as exc:
        raise SystemExit(str(exc)) from None
    began = time.time()
    family, _ = load_model(args.checkpoint)
    teacher_params = family.param_count(family.config)
    teacher_flops = family.forward_flops(family.config)
    (cache / "models").mkdir(parents=True, exist_ok=True)
    pool = cache / "models" / f"fmnist_train_{args.pool_size}.npz"
    if not pool.exists():
        pick = np.sort(np.random.default_rng(0).choice(len(data.train_x), size=min(args.pool_size, len(data.train_x)), replace=False))
        np.savez(pool, features=data.train_x.numpy()[pick], labels=data.train_y.numpy()[pick])
    common = dict(
        data=str(pool), pool_size=args.pool_size, loss=args.loss, lr=args.lr, batch_size=args.batch_size,
        budget="1x", device="cpu", checkpoint_every=200,
        grid=6 if args.quick else 16, profile_batches=1 if args.quick else 4,
        profile_batch_size=8 if args.quick else 32, calib_batches=1 if args.quick else 4,
        eval_samples=16 if args.quick else 64,
    )
    log = lambda text: print(text, flush=True)  # noqa: E731
    bench = _bench.Bench("fmnist", args.checkpoint, {n: ROWS[n] for n in names}, common, steps, samples, seeds,
                         train_seeds, sample_steps, cache, jobs=args.jobs, log=log)
    print(f"teacher {family.describe(family.config)}, {teacher_params:,} parameters, {teacher_flops / 1e6:.1f} MFLOP "
          f"per forward; {steps} fine-tuning steps per conversion at factor 1, pruned rows' loss {args.loss}, training "
          f"seeds {train_seeds}; {samples} samples x sampling seeds {seeds}, Heun {sample_steps} steps; cache {cache}",
          flush=True)
    print(estimate(bench, names, family, teacher_flops, args.jobs), flush=True)
    if args.estimate:
        return
    bench.run(names, compute=not args.cached_only)
    wall = time.time() - began
    rows = bench.table_rows(names, teacher_flops, teacher_params)
    result = {
        "command": _bench.command_line("fmnist_benchmark.py", argv), "git_commit": _bench.git_commit(),
        "wall_seconds": wall, "teacher_params": teacher_params, "teacher_flops": teacher_flops, "steps": steps,
        "loss": args.loss, "lr": args.lr, "batch_size": args.batch_size, "pool_size": args.pool_size,
        "samples": samples, "seeds": seeds, "train_seeds": train_seeds, "sample_steps": sample_steps,
        "jobs": args.jobs, "work_done": bench.work, "unavailable": bench.unavailable, "resolved": bench.resolved,
        "diverged": bench.diverged,
        "waiting": [n for n in names if n not in bench.diverged and not any(r["name"] == n for r in rows)],
        "classifier_test_accuracy": _classifier_accuracy(), "rows": rows,
    }
    _bench.write_results(stem, result, markdown)
    if temporary:
        shutil.rmtree(cache, ignore_errors=True)
    print(f"wrote {stem.with_suffix('.md')} and .json; wall time {wall / 60:.1f} min; this run did "
          f"{bench.work['conversions']} conversions and {bench.work['scores']} scorings")


def estimate(bench, names, family, teacher_flops, jobs) -> str:
    """The full benchmark's CPU cost from FLOPs and this machine's measured throughput, and what remains."""
    gflops = _bench.measured_gflops(family, threads=1)

    def seconds_of(parts):
        # Training steps and profiling's small batches run well below a plain forward's throughput
        # (measured: about half), so they count double.
        return (2 * parts.get("finetune", 0.0) + 2 * parts.get("profile", 0.0) + parts.get("sampling", 0.0)) / (gflops * 1e9)

    total = {"finetune": 0.0, "profile": 0.0, "sampling": 0.0}
    remaining = 0.0
    placeholder = {k: v for k, v in ROWS["K=2 cbs dirichlet"].items()}
    for name in names:
        row = dict(ROWS[name])
        if "best_of" in row:  # cost as if the published monitor wins
            row = {**placeholder, **{k: v for k, v in row.items() if k != "best_of"}}
        for train_seed in bench.train_seeds:
            settings = {**bench.common, **{k: v for k, v in row.items() if k not in _bench.ROW_KEYS}}
            settings["steps"] = max(1, int(round(bench.steps * row.get("steps_factor", 1.0))) // settings.get("k", 2))
            parts = _bench.estimate_flops(settings, teacher_flops, bench.samples, bench.sample_steps, len(bench.seeds))
            for key, value in parts.items():
                total[key] += value
            done = any(bench.cache.glob(f"conversions/{_bench.slug(name)}_t{train_seed}_*.json"))
            remaining += seconds_of(parts) if not done else seconds_of({"sampling": parts["sampling"]})
    total["sampling"] += len(bench.seeds) * bench.samples * (2 * bench.sample_steps - 1) * teacher_flops  # the teacher
    seconds = seconds_of(total)
    left = remaining
    return (f"estimated cost of these rows: {seconds / 3600:.1f} CPU-hours (fine-tuning {total['finetune'] / 1e12:.0f}, "
            f"profiling {total['profile'] / 1e12:.0f}, sampling {total['sampling'] / 1e12:.0f} TFLOP at a measured "
            f"{gflops:.0f} GFLOP/s per thread), about {seconds / 3600 / jobs:.1f} h of wall time with {jobs} jobs on "
            f"free cores; not yet cached: about {left / 3600:.1f} CPU-hours")


def _classifier_accuracy():
    from safetensors import safe_open

    from cbs_convert.bundled import FMNIST_CLASSIFIER

    with safe_open(str(FMNIST_CLASSIFIER), framework="pt") as handle:
        return (handle.metadata() or {}).get("test_accuracy")


def markdown(result) -> str:
    lines = [
        "# Fashion-MNIST benchmark: time-segment experts of a capacity-limited SiT",
        "",
        f"Command: `{result['command']}` (code at commit {result.get('git_commit') or 'unknown'} plus the working tree; cached "
        "rows may come from earlier commits of the same cache version; "
        f"{result['jobs']} worker processes of one thread; this run computed {result['work_done']['conversions']} "
        f"conversions and {result['work_done']['scores']} scorings in {result['wall_seconds'] / 60:.1f} min, the rest "
        "came from the cache).",
        "",
        f"Teacher: the bundled Fashion-MNIST SiT, {result['teacher_params']:,} parameters, "
        f"{result['teacher_flops'] / 1e6:.1f} MFLOP per forward. Every conversion: {result['steps']} fine-tuning steps "
        f"in total at steps factor 1 (the learning-curve rows say theirs), split evenly over its experts; pruned rows "
        f"loss `{result['loss']}`, full-width rows `data`; lr {result['lr']}, batch {result['batch_size']}, pool "
        f"{result['pool_size']:,} training images; training seeds {', '.join(map(str, result['train_seeds']))}. "
        f"Sampling: Heun, {result['sample_steps']} steps, no guidance, {result['samples']:,} samples (balanced labels) "
        f"per sampling seed, seeds {', '.join(map(str, result['seeds']))}, the same noise and labels for every model. "
        f"FD: Fréchet distance to the 10,000 test images on the bundled classifier's 128-d features (test accuracy "
        f"{result.get('classifier_test_accuracy') or '?'}); lower is better; the real-images row is the floor that "
        "finite samples set. ΔFD: FD minus the teacher's FD on the same sampling seed, mean ± std over the n runs "
        "(training seed x sampling seed).",
        "",
    ]
    lines += _bench.markdown_table(result["rows"])
    if result.get("resolved"):
        lines += ["", "Best cbs rows copy: " + "; ".join(f"{k} → {v}" for k, v in result["resolved"].items())]
    for name, reason in result.get("unavailable", {}).items():
        lines += ["", f"{name}: not available at this commit ({reason})"]
    for name, reason in result.get("diverged", {}).items():
        lines += ["", f"{name}: its training diverged ({reason}), so the row lost"]
    if result.get("waiting"):
        lines += ["", "Not run yet: " + "; ".join(result["waiting"])]
    lines += _bench.markdown_pairs(result["rows"], PAIRED)
    lines += learning_curve(result)
    lines += _bench.markdown_errors(result["rows"])
    lines.append("")
    return "\n".join(lines)


def learning_curve(result):
    rows = {r["name"]: r for r in result["rows"]}
    if not any(curve_name(m, f) in rows for m in CURVE_MODELS for f in CURVE_FACTORS if f != 1.0):
        return []
    steps = result["steps"]
    lines = ["", "Learning curve: ΔFD vs teacher (mean ± std, n) by total fine-tuning steps; the best cbs row is "
             "the K=2 1x cbs row that won at 1x.", "",
             "| model | " + " | ".join(f"{int(steps * f)} steps" for f in CURVE_FACTORS) + " |",
             "|---|" + "---|" * len(CURVE_FACTORS)]
    for model in CURVE_MODELS:
        cells = []
        for factor in CURVE_FACTORS:
            row = rows.get(curve_name(model, factor, result.get("resolved")))
            cells.append("–" if row is None else f"{_bench.fmt(row['gap_mean'])} ± {_bench.fmt(row['gap_std'], '.3f')} ({row['gap_n']})")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    pairs = []
    for factor in CURVE_FACTORS:
        best = curve_name(BEST, factor, result.get("resolved"))
        pairs += [(curve_name(UNIFORM, factor), curve_name(HALF, factor)), (best, curve_name(UNIFORM, factor)),
                  (best, curve_name(HALF, factor))]
    lines += _bench.markdown_pairs(result["rows"], pairs)
    # With one device per expert the K=2 experts train side by side, so the wall-clock match for a
    # single model is the K=2 row with twice the total steps: the same steps per model.
    per_model = [(curve_name(BEST, 2 * factor, result.get("resolved")), curve_name(HALF, factor))
                 for factor in CURVE_FACTORS if 2 * factor in CURVE_FACTORS]
    lines += _bench.markdown_pairs(result["rows"], per_model, header=(
        "The same steps per model, paired (K=2 at twice the total steps, so twice the training FLOPs, against the "
        "single model; the wall-clock match when each expert trains on its own device):"))
    return lines


if __name__ == "__main__":
    main()
