"""Which step schedule gets the most out of few sampling steps? FD by steps, Euler and Heun. Offline, resumable.

    python3 benchmarks/schedule_benchmark.py                      # Fashion-MNIST teacher and one K=2 routed model
    python3 benchmarks/schedule_benchmark.py --dataset digits     # the same on the digits teacher
    python3 benchmarks/schedule_benchmark.py --cached-only        # tabulate what the cache holds
    python3 benchmarks/schedule_benchmark.py --quick              # smoke run, about a minute (digits: seconds)

Every schedule of ``cbs_convert.sample.schedules`` (uniform, edm with rho 7, logsnr, profile, ots) at 4,
6, 8, 12 and 16 steps, with the ODE sampler of ``python -m cbs_convert.sample`` (Euler, and Heun
with its last step Euler's), on the bundled teacher and on one routed model converted from it with
the tool's defaults at K=2 (``--routed auto``, the conversion timed here; or ``--routed FILE``). The
routed model's schedules are aligned to its cut (a step edge on it, each step pinned to one expert)
and also shown unaligned, so that alignment is measured against its absence. The ots schedule is fitted
per step count and method (it fits the sampler it will be used with), from edm; the profile schedule
equidistributes the tempered path acceleration (``schedules.PROFILE_MONITOR``), measured once per model
(the teacher has no stored profile; the routed file's holds the conversion's monitors only).

Pairing: for one sampling seed every row draws the same labels (balanced) from the same noise, as in
``_bench.evaluate``, so the difference of two rows on one seed carries little sampling noise;
differences are listed as mean ± std over the seeds. Scores: ``cbs_convert.evaluation.metrics`` (Fréchet
distance on the dataset's bundled classifier features, lower is better; the real-images row is the
floor finite samples set; "fine" is the ODE solved with 64 Heun steps on the edm schedule, what every
schedule converges to). The time each schedule takes to compute is set against a conversion's: the
routed model's own when this run converted it, else the median of the cached K=2 conversions of the
dataset's main benchmark.

Each computed schedule and each score is a small JSON file under ``benchmarks/results/schedules_<dataset>_cache``
(the routed file under its ``models/``, committed, since a reconversion equals it only up to rounding;
the fine solutions' images beside it are not), written when done; a rerun computes only what is missing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import _bench  # noqa: E402
from _bench import REAL, RESULTS  # noqa: E402
from cbs_convert.sample import model_schedules  # noqa: E402

SCHEDULES = ["uniform", "edm", "logsnr", "profile", "ots"]
STEPS = [4, 6, 8, 12, 16]
METHODS = ["euler", "heun"]
FINE_STEPS, FINE_STEPS_QUICK = 64, 16
#: bumped when what a cached schedule or score means changes
CACHE_VERSION = 1
#: the full run's ots search (the library's defaults) and the quick run's
OTS = {"batch": model_schedules.OTS_BATCH, "reference_steps": model_schedules.OTS_REFERENCE_STEPS,
       "sweeps": model_schedules.OTS_SWEEPS, "evaluations": model_schedules.OTS_EVALUATIONS}
OTS_QUICK = {"batch": 4, "reference_steps": 16, "sweeps": 1, "evaluations": 4}
#: the quick run's profile measurement (the full run's: the library's defaults)
PROFILE_QUICK = dict(pool_size=16, pool_steps=8, grid=(0.02, 0.98, 6), batches=1, batch_size=8)
#: the quick run's conversion: enough to exercise the aligned path, nothing like a real conversion
QUICK_CONVERSION = dict(steps=8, pool_size=32, grid=4, profile_batches=1, profile_batch_size=8, calib_batches=1,
                        eval_samples=8, ode_steps=8)


# -- work done in worker processes ----------------------------------------------------------------

_MODELS: Dict[str, Any] = {}
_SCORERS: Dict[str, Any] = {}


def _model(path: str):
    from cbs_convert.storage.loading import load_model

    if path not in _MODELS:
        _MODELS[path] = load_model(path)
    return _MODELS[path]


def measure_profile(path: str, seed: int, sizes: Dict[str, Any]) -> Dict[str, Any]:
    from cbs_convert.sample.model_schedules import measure_profile as measure
    from cbs_convert.sample.schedules import PROFILE_MONITOR

    family, model = _model(path)
    began = time.time()
    profile = measure(family, model, (PROFILE_MONITOR,), seed, **sizes)
    return {"profile": profile.to_dict(), "seconds": time.time() - began}


def compute_schedule(path: str, name: str, steps: int, method: str, align: bool, seed: int, ots: Dict[str, int],
                     profile: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    from cbs_convert.sample.model_schedules import build_schedule

    family, model = _model(path)
    extra = {f"ots_{k}": v for k, v in ots.items()} if name == "ots" else {}
    schedule = build_schedule(family, model, name, steps, method=method, align=align, seed=seed,
                              profile=profile if name == "profile" else None, **extra)
    return {"times": schedule.times, "counts": schedule.counts, "boundaries": schedule.boundaries,
            "notes": schedule.notes, "seconds": schedule.seconds, "details": schedule.details}


def score(dataset: str, path: str, times: Optional[List[float]], method: str, pin: bool, seed: int, samples: int,
          keep: Optional[str] = None, against: Optional[str] = None, chunk: int = 1000) -> Dict[str, Any]:
    """FD and class match of ``samples`` images drawn with ``times`` (or real images: ``path`` "real").

    ``keep``: a .npy file to store the images in (the fine solution); ``against``: such a file, from
    which the root mean square difference per pixel is measured (``rmse``): the error of the steps
    themselves, where FD also rewards some errors."""
    import torch

    from cbs_convert.evaluation.metrics import DATASETS
    from cbs_convert.sample.samplers import draw

    spec = DATASETS[dataset]
    began = time.time()
    labels = _bench.balanced_labels(samples, seed)
    if path == "real":
        data = spec.split()
        pick = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(seed))[:samples]
        images, labels = data.train_x[pick], data.train_y[pick]
    else:
        family, model = _model(path)
        shape = family.sample_shape(family.config)
        noise = torch.randn((samples, *shape), generator=torch.Generator().manual_seed(seed))
        images = torch.cat([draw(family, model, "ode", n, y, steps=len(times) - 1, method=method, times=times,
                                 pin_experts=pin) for n, y in zip(noise.split(chunk), labels.split(chunk))])
        if not torch.isfinite(images).all():
            return {"fd": float("nan"), "class_match": float("nan"), "rmse": float("nan"), "seconds": time.time() - began}
    extra = {}
    if keep is not None:
        np.save(keep, images.numpy())
    if against is not None:
        extra["rmse"] = float((images.double() - torch.from_numpy(np.load(against)).double()).pow(2).mean().sqrt())
    if dataset not in _SCORERS:  # the reference features are computed once per worker
        _SCORERS[dataset] = spec.scorer()
    return {**_SCORERS[dataset].score(images, labels), **extra, "seconds": time.time() - began}


# -- the run ------------------------------------------------------------------------------------------


def row_name(schedule: str, aligned: Optional[bool]) -> str:
    return schedule if aligned is None else f"{schedule}, {'aligned' if aligned else 'not aligned'}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("fmnist", "digits"), default="fmnist")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 and 8 steps, 100 samples, one seed, a "
                        "tiny conversion, a short ots search")
    parser.add_argument("--checkpoint", help="the teacher (default: the dataset's bundled one)")
    parser.add_argument("--routed", default=None, help="a routed file to measure beside the teacher; 'auto' (the "
                        "default) converts the teacher at K=2 with the tool's defaults (quick: tiny settings); "
                        "'none' skips it")
    parser.add_argument("--steps", default=None, help="comma-separated step counts (default 4,6,8,12,16; quick 4,8)")
    parser.add_argument("--methods", default="euler,heun")
    parser.add_argument("--schedules", default=",".join(SCHEDULES))
    parser.add_argument("--samples", type=int, default=None, help="samples per row and seed (default 5000; quick 100)")
    parser.add_argument("--seeds", default=None, help="comma-separated sampling seeds (default 0,1,2; quick 0)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (one thread each)")
    parser.add_argument("--cache", default=None, help="default benchmarks/results/schedules_<dataset>_cache; quick: a "
                        "temporary folder, removed")
    parser.add_argument("--out", default=None, help="results stem (default benchmarks/results/schedules_<dataset>; "
                        "quick: schedules_<dataset>_quick)")
    parser.add_argument("--cached-only", action="store_true", help="compute nothing: tabulate what the cache holds")
    parser.add_argument("--no-fine", action="store_true", help="skip the fine solution (64 Heun steps per model and "
                        "seed, the costliest rows): FD only, no RMS difference to it")
    args = parser.parse_args(argv)

    from cbs_convert.evaluation.metrics import DATASETS

    spec = DATASETS[args.dataset]
    checkpoint = str(args.checkpoint or spec.teacher)
    steps_list = [int(s) for s in (args.steps or ("4,8" if args.quick else ",".join(map(str, STEPS)))).split(",")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    schedules = [s.strip() for s in args.schedules.split(",") if s.strip()]
    samples = args.samples or (100 if args.quick else 5000)
    seeds = _bench.parse_seeds(args.seeds, "0" if args.quick else "0,1,2")
    ots = OTS_QUICK if args.quick else OTS
    profile_sizes = PROFILE_QUICK if args.quick else {}
    fine_steps = FINE_STEPS_QUICK if args.quick else FINE_STEPS
    fine_row = f"fine (edm, {fine_steps} Heun steps)"
    stem = Path(args.out) if args.out else RESULTS / f"schedules_{args.dataset}{'_quick' if args.quick else ''}"
    temporary = args.cache is None and args.quick
    cache = Path(tempfile.mkdtemp(prefix="schedule_bench_") if temporary
                 else (args.cache or RESULTS / f"schedules_{args.dataset}_cache"))
    for folder in ("schedules", "scores", "profiles", "models"):
        (cache / folder).mkdir(parents=True, exist_ok=True)
    began = time.time()
    log = lambda text: print(text, flush=True)  # noqa: E731

    models = {"teacher": checkpoint}
    conversion_seconds, conversion_source, conversion = None, None, None
    routed = args.routed or "auto"
    if routed == "auto":
        routed, conversion = _convert(checkpoint, cache, args.quick, args.cached_only, log)
        conversion_seconds = conversion and conversion["seconds"]
        conversion_source = ("this run's K=2 conversion of the teacher (quick settings: not a real conversion's time)"
                             if args.quick else "this run's K=2 conversion of the teacher with the tool's defaults")
    if routed and routed != "none":
        models["routed K=2"] = routed
    if conversion_seconds is None or args.quick:
        cached = _cached_conversion_seconds(args.dataset)
        if cached is not None:
            conversion_seconds, conversion_source = cached
    # a routed file the cache records but this checkout lacks (only the grids' routed files are committed): its recorded
    # digest still names its cached schedules and scores, so --cached-only tabulates it
    digests = {name: _bench.file_digest(path) if Path(path).exists() or conversion is None else conversion["digest"]
               for name, path in models.items()}
    log(f"{args.dataset}: models {', '.join(f'{k} ({v})' for k, v in models.items())}; schedules {schedules}; steps "
        f"{steps_list}; methods {methods}; {samples} samples x seeds {seeds}; cache {cache}")

    def key_path(folder, label, key):
        return cache / folder / f"{_bench.slug(label)}_{_bench.digest({'v': CACHE_VERSION, **key})}.json"

    records: Dict[str, Dict[str, Any]] = {}  # schedule key -> record
    scores: List[Dict[str, Any]] = []
    work = {"schedules": 0, "scores": 0, "profiles": 0}
    context = get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=context, initializer=_bench.worker_init, initargs=(1,)) as pool:
        # 1. profiles, one per model
        profiles: Dict[str, Dict[str, Any]] = {}
        if "profile" in schedules:
            pending = {}
            for model, path in models.items():
                target = key_path("profiles", model, {"model": digests[model], "seed": 0, "sizes": profile_sizes})
                if target.exists():
                    profiles[model] = json.loads(target.read_text())
                elif not args.cached_only:
                    pending[pool.submit(measure_profile, path, 0, profile_sizes)] = (model, target)
            for job in as_completed(pending):
                model, target = pending[job]
                profiles[model] = job.result()
                _bench.write_json(target, profiles[model])
                work["profiles"] += 1
                log(f"  profiled {model} ({profiles[model]['seconds']:.1f} s)")

        # 2. schedules: per model, schedule, steps; ots also per method; the routed model aligned and not
        wanted = []
        for model in models:
            variants = [None] if model == "teacher" else [True, False]
            for aligned in variants:
                for name in schedules:
                    if name == "profile" and model not in profiles:
                        continue
                    for steps in steps_list:
                        for method in methods:
                            key = {"model": digests[model], "schedule": name, "steps": steps, "align": bool(aligned),
                                   "method": method if name == "ots" else None, "ots": ots if name == "ots" else None,
                                   "profile": profile_sizes if name == "profile" else None}
                            wanted.append((model, name, aligned, steps, method, key))
        pending = {}
        for model, name, aligned, steps, method, key in wanted:
            target = key_path("schedules", f"{model}_{name}_{steps}", key)
            label = _bench.digest(key)
            if label in records:
                continue
            if target.exists():
                records[label] = json.loads(target.read_text())
            elif not args.cached_only:
                profile = profiles.get(model, {}).get("profile")
                job = pool.submit(compute_schedule, models[model], name, steps, method, bool(aligned), 0, ots, profile)
                pending[job] = (label, target)
                records[label] = None
        for job in as_completed(pending):
            label, target = pending[job]
            try:
                records[label] = job.result()
            except Exception:
                log(f"  FAILED schedule {target.name}:\n{traceback.format_exc()}")
                continue
            _bench.write_json(target, records[label])
            work["schedules"] += 1

        # 3. scores: the real images and the fine solutions (kept as images), then every (row, steps,
        # method, seed), each also measured against its model's fine solution on the same noise
        jobs = {}

        def want(entry, path, times, method, pin, seed, keep=None, against=None):
            target = key_path("scores", f"{entry['model']}_{entry['row']}_{entry['steps']}_{method}_s{seed}",
                              {"model": digests.get(entry["model"], "real"), "times": times, "method": method,
                               "pin": pin, "seed": seed, "samples": samples, "against": against and Path(against).name})
            entry = {**entry, "method": method, "seed": seed}
            # a fine row's images are kept only to measure others against; --cached-only tabulates
            # its score without them (they are not committed)
            if target.exists() and (keep is None or args.cached_only or Path(keep).exists()):
                scores.append({**entry, **json.loads(target.read_text())})
            elif not args.cached_only:
                against = against if against and Path(against).exists() else None  # its fine solution failed
                jobs[pool.submit(score, args.dataset, path, times, method, pin, seed, samples, keep, against)] = (entry, target)

        def collect():
            for job in as_completed(list(jobs)):
                entry, target = jobs.pop(job)
                try:
                    result = job.result()
                except Exception:
                    log(f"  FAILED score {target.name}:\n{traceback.format_exc()}")
                    continue
                result["commit"] = _bench.git_commit()
                _bench.write_json(target, result)
                scores.append({**entry, **result})
                work["scores"] += 1
                log(f"  {entry['model']} {entry['row']} {entry['steps']} {entry['method']} seed {entry['seed']}: FD "
                    f"{result['fd']:.3f}" + (f", rmse {result['rmse']:.4f}" if "rmse" in result else "")
                    + f" ({result['seconds']:.0f} s)")

        for seed in seeds:
            want({"model": REAL, "row": REAL, "steps": 0}, "real", None, "-", False, seed)
        fine_files = {}
        for model, path in models.items():
            if args.no_fine:
                fine_files.update({(model, seed): None for seed in seeds})
                continue
            # edm's times depend on the family alone, which a routed model shares with the teacher it
            # was converted from: --cached-only needs no routed file for them
            fine = _fine_times(path if Path(path).exists() else models["teacher"], fine_steps)
            for seed in seeds:
                fine_files[model, seed] = str(cache / "models" / f"fine_{digests[model]}_{fine_steps}_s{seed}_{samples}.npy")
                want({"model": model, "row": fine_row, "steps": fine_steps}, path, fine, "heun", False, seed,
                     keep=fine_files[model, seed])
        collect()
        for model, name, aligned, steps, method, key in wanted:
            record = records.get(_bench.digest(key))
            if record is None:
                continue
            for seed in seeds:
                want({"model": model, "row": row_name(name, aligned), "steps": steps}, models[model], record["times"],
                     method, bool(aligned) and bool(record["boundaries"]), seed, against=fine_files[model, seed])
        collect()

    timing = _timing(records, wanted, profiles, conversion_seconds, conversion_source,
                     (conversion or {}).get("step_profile_s"))
    result = {
        "command": _bench.command_line("schedule_benchmark.py", argv), "git_commit": _bench.git_commit(),
        "dataset": args.dataset, "models": models, "schedules": schedules, "steps": steps_list, "methods": methods,
        "samples": samples, "seeds": seeds, "ots": ots, "fine_row": fine_row, "fine_steps": fine_steps, "wall_seconds": time.time() - began, "work_done": work,
        "scores": scores, "timing": timing,
        "schedule_times": {f"{m}: {row_name(n, a)}, {s} steps" + (f", {meth}" if n == "ots" else ""):
                           (records.get(_bench.digest(k)) or {}).get("times") for m, n, a, s, meth, k in wanted},
    }
    _bench.write_results(stem, result, markdown)
    if temporary:
        shutil.rmtree(cache, ignore_errors=True)
    log(f"wrote {stem.with_suffix('.md')} and .json; wall time {result['wall_seconds'] / 60:.1f} min; this run computed "
        f"{work['profiles']} profiles, {work['schedules']} schedules and {work['scores']} scores")
    return result


def _fine_times(path: str, steps: int) -> List[float]:
    from cbs_convert.sample.model_schedules import build_schedule

    family, model = _model(path)
    return build_schedule(family, model, "edm", steps, align=False).times


def _convert(checkpoint: str, cache: Path, quick: bool, cached_only: bool, log):
    """The routed model of ``--routed auto`` (converted once, kept in the cache) and its record: the
    conversion's seconds, the file's digest and the seconds its stored sampling profile took."""
    import cbs_convert

    settings = {"k": 2, **(QUICK_CONVERSION if quick else {})}
    stem = f"routed_k2_{_bench.digest({'teacher': _bench.file_digest(checkpoint), **settings})}"
    out = cache / "models" / f"{stem}.safetensors"
    record_path = cache / f"{stem}.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else None
    if record is not None and (out.exists() or (cached_only and "digest" in record)):
        return str(out), record
    if cached_only:
        return None, None
    log(f"converting {checkpoint} at K=2 ({'quick settings' if quick else 'the tool defaults'}) for the routed rows")
    began = time.time()
    result = cbs_convert.convert(checkpoint, out=str(out), workdir=str(out) + ".work", progress=False, force=True,
                                 resume=True, **settings)
    previous = record
    record = {"seconds": time.time() - began, "settings": settings, "digest": _bench.file_digest(out),
              "step_profile_s": result.report["timings_s"].get("step_profile")}
    _bench.write_json(record_path, record)
    log(f"  converted in {record['seconds']:.0f} s")
    if previous is not None and previous.get("digest") != record["digest"]:
        # A conversion is reproducible only up to rounding (another thread count sums in another
        # order), so the cached routed rows belong to a file that no longer exists: they are not
        # paired with this one's and are computed again. The routed file is committed to avoid this.
        log(f"  NOTE: the cache's routed rows were measured on another file (digest {previous.get('digest')}, this "
            f"one {record['digest']}); they are left unused and this file's rows are computed afresh")
    return str(out), record


def _cached_conversion_seconds(dataset: str):
    """The median time of the dataset benchmark's cached K=2 conversions at steps factor 1, if any."""
    folder = RESULTS / f"{dataset}_cache" / "conversions"
    seconds = []
    for path in folder.glob("K_2_*.json"):
        record = json.loads(path.read_text())
        # the learning-curve rows train for other step counts than the main rows
        if record.get("settings", {}).get("k") == 2 and "timings" in record and "x_steps" not in path.stem:
            seconds.append(record["timings"]["total"])
    if not seconds:
        return None
    return statistics.median(seconds), (f"the median of {len(seconds)} cached K=2 conversions of the {dataset} "
                                        f"benchmark (benchmarks/results/{dataset}_cache)")


def _timing(records, wanted, profiles, conversion_seconds, conversion_source, stored_profile_s=None) -> Dict[str, Any]:
    """Seconds to compute each schedule (the median over its step counts and methods), and against a conversion."""
    by_name: Dict[str, List[float]] = {}
    evaluations: Dict[str, Dict[int, int]] = {}  # the most one fit took, per schedule and step count
    for model, name, aligned, steps, method, key in wanted:
        record = records.get(_bench.digest(key))
        if record:
            by_name.setdefault(name, []).append(record["seconds"])
            count = record.get("details", {}).get("sample_evaluations")
            if count is not None:
                per_steps = evaluations.setdefault(name, {})
                per_steps[steps] = max(count, per_steps.get(steps, 0))
    out = {"schedules": {name: {"median_s": statistics.median(v), "max_s": max(v)} for name, v in by_name.items()},
           "sample_evaluations": {name: [{"steps": steps, "max": v[steps]} for steps in sorted(v)]
                                  for name, v in evaluations.items()},
           "recipes": _recipe_training_samples(),
           "profile_measurement_s": {m: p["seconds"] for m, p in profiles.items()},
           "conversion_s": conversion_seconds, "conversion_source": conversion_source,
           "stored_profile_s": stored_profile_s}
    if conversion_seconds:
        for name, entry in out["schedules"].items():
            entry["max_vs_conversion"] = entry["max_s"] / conversion_seconds
        out["profile_vs_conversion"] = {m: s / conversion_seconds for m, s in out["profile_measurement_s"].items()}
        if stored_profile_s is not None:
            out["stored_profile_vs_conversion"] = stored_profile_s / conversion_seconds
    return out


# -- the tables -----------------------------------------------------------------------------------------


def _runs(scores, model, row, steps, method, value="fd"):
    return {s["seed"]: s.get(value, float("nan")) for s in scores if s["model"] == model and s["row"] == row
            and s["steps"] == steps and s["method"] == method}


def _pair(scores, model, a, b, method, steps_a, steps_b=None, metric="fd"):
    first = _runs(scores, model, a, steps_a, method, metric)
    second = _runs(scores, model, b, steps_b or steps_a, method, metric)
    diffs = [first[s] - second[s] for s in first if s in second and np.isfinite(first[s]) and np.isfinite(second[s])]
    if not diffs:
        return None
    mean, std = _bench.summarise(diffs)
    return {"mean": mean, "std": std, "n": len(diffs)}


def _cell(runs, spec=".3f"):
    mean, std = _bench.summarise(list(runs.values()))
    return "–" if not runs else f"{_bench.fmt(mean, spec)} ± {_bench.fmt(std, spec)}"


def markdown(result) -> str:
    scores, steps_list = result["scores"], result["steps"]
    lines = [
        f"# Step schedules on the {result['dataset']} teacher" + (" and a K=2 routed model" if len(result["models"]) > 1 else ""),
        "",
        f"Command: `{result['command']}` (code at commit {result.get('git_commit') or 'unknown'}; this run computed "
        f"{result['work_done']['schedules']} schedules and {result['work_done']['scores']} scores in "
        f"{result['wall_seconds'] / 60:.1f} min, the rest came from the cache).",
        "",
        f"Sampler: the ODE sampler of `python -m cbs_convert.sample` (Euler; Heun with its last step Euler's), no "
        f"guidance, {result['samples']:,} samples per row and seed (balanced labels), seeds "
        f"{', '.join(map(str, result['seeds']))}, the same noise and labels for every row. FD: Fréchet distance on the "
        f"bundled {result['dataset']} classifier's features, mean ± std over seeds; lower is better. ots: fitted from edm "
        f"on {result['ots']['batch']} samples against {result['ots']['reference_steps']} Heun steps, "
        f"{result['ots']['sweeps']} sweep(s) of {result['ots']['evaluations']} trials per time.",
        "",
    ]
    floor = _runs(scores, REAL, REAL, 0, "-")
    if floor:
        lines += [f"Real training images (the floor finite samples set): FD {_cell(floor)}.", ""]
    fine_row = result["fine_row"]
    for model in result["models"]:
        fine = _runs(scores, model, fine_row, result["fine_steps"], "heun")
        rows = [r for r in dict.fromkeys(s["row"] for s in scores if s["model"] == model) if r != fine_row]
        for method in result["methods"]:
            lines += [f"## {model}, {method}" + (f" (fine solution: FD {_cell(fine)})" if fine else ""), "",
                      "| schedule | " + " | ".join(f"{s} steps" for s in steps_list) + " |",
                      "|---|" + "---|" * len(steps_list)]
            for row in rows:
                cells = [_cell(_runs(scores, model, row, s, method)) for s in steps_list]
                lines.append(f"| {row} | " + " | ".join(cells) + " |")
            lines += [""] + _pairs(scores, model, rows, method, steps_list) + [""]
            if not any("rmse" in s for s in scores if s["model"] == model):
                continue  # run without the fine solution (--no-fine)
            lines += ["RMS difference per pixel to the fine solution from the same noise (the steps' own error; "
                      "lower is closer):", "", "| schedule | " + " | ".join(f"{s} steps" for s in steps_list) + " |",
                      "|---|" + "---|" * len(steps_list)]
            for row in rows:
                cells = [_cell(_runs(scores, model, row, s, method, "rmse"), ".4f") for s in steps_list]
                lines.append(f"| {row} | " + " | ".join(cells) + " |")
            lines.append("")
            # what alignment does to the accuracy of the steps, where FD cannot tell
            aligned = [(row, row.replace(", aligned", ", not aligned")) for row in rows if row.endswith(", aligned")]
            paired = [(row, [f"{s}: {p['mean']:+.4f} ± {p['std']:.4f} (n = {p['n']})" for s in steps_list
                             for p in [_pair(scores, model, row, other, method, s, metric="rmse")] if p])
                      for row, other in aligned]
            if any(cells for _, cells in paired):
                lines += ["Paired RMS differences, aligned − not aligned (negative: alignment is closer to the fine "
                          "solution):", ""] + [f"- {row}: " + "; ".join(cells) for row, cells in paired if cells] + [""]
    lines += _goals(result)
    lines += _timing_lines(result["timing"])
    lines.append("")
    return "\n".join(lines)


def _pairs(scores, model, rows, method, steps_list) -> List[str]:
    lines = ["Paired FD differences (same seeds; negative: the first is better):", ""]
    for row in rows:
        for base in ("uniform", "edm"):
            base_row = _sibling(row, base)
            # each pair once: uniform is the base of every other row, edm of the profile-driven ones
            if base_row not in rows or row.partition(",")[0] in ("uniform", "edm")[: ("uniform", "edm").index(base) + 1]:
                continue
            cells = []
            for steps in steps_list:
                p = _pair(scores, model, row, base_row, method, steps)
                if p:
                    cells.append(f"{steps}: {p['mean']:+.3f} ± {p['std']:.3f}")
            if cells:
                lines.append(f"- {row} − {base_row}: " + "; ".join(cells))
    for row in rows:
        if row.endswith(", aligned"):
            other = row.replace(", aligned", ", not aligned")
            cells = [f"{s}: {p['mean']:+.3f} ± {p['std']:.3f}" for s in steps_list
                     for p in [_pair(scores, model, row, other, method, s)] if p]
            if cells:
                lines.append(f"- {row} − not aligned: " + "; ".join(cells))
    return lines if len(lines) > 2 else []


def _sibling(row: str, schedule: str) -> str:
    """The row of ``schedule`` with the same alignment as ``row``."""
    _, comma, variant = row.partition(", ")
    return schedule + (comma + variant if comma else "")


def _goals(result) -> List[str]:
    """Issue 19's goals, each with the numbers that decide it."""
    scores = result["scores"]
    lines = ["## Goals", ""]
    for model in result["models"]:
        fine = np.mean(list(_runs(scores, model, result["fine_row"], result["fine_steps"], "heun").values()) or [np.nan])
        first = "uniform" if model == "teacher" else "uniform, not aligned"
        for method in result["methods"]:
            few = np.mean(list(_runs(scores, model, first, min(result["steps"]), method).values()) or [np.nan])
            if few < fine:
                lines.append(f"- reading {model}, {method}: {first} at {min(result['steps'])} steps has FD {few:.3f}, below "
                             f"the fine solution's {fine:.3f}: FD rewards some of the coarse steps' error here, so a lower "
                             "FD is not a more accurate solution (the RMS difference to the fine solution is)")
        rows = [r for r in dict.fromkeys(s["row"] for s in scores if s["model"] == model) if r != result["fine_row"]]
        uniform = "uniform" if "uniform" in rows else "uniform, aligned"
        for method in result["methods"]:
            if 8 in result["steps"] and 16 in result["steps"]:
                best = min((r for r in rows if _runs(scores, model, r, 8, method)),
                           key=lambda r: np.mean(list(_runs(scores, model, r, 8, method).values())), default=None)
                p = best and _pair(scores, model, best, uniform, method, 8, 16)
                if p:
                    verdict = "met" if p["mean"] <= p["std"] else "not met"
                    lines.append(f"- {model}, {method}: the best schedule at 8 steps ({best}) − {uniform} at 16 steps: FD "
                                 f"{p['mean']:+.3f} ± {p['std']:.3f} (n = {p['n']}): {verdict} (goal: no worse beyond the spread)")
            if 8 in result["steps"]:
                edm = "edm" if "edm" in rows else "edm, aligned"
                for row in rows:
                    if not (row.startswith("profile") or row.startswith("ots")) or row.endswith("not aligned"):
                        continue
                    p = _pair(scores, model, row, edm, method, 8)
                    if p:
                        verdict = "met" if -p["mean"] > 2 * p["std"] and p["n"] > 1 else "not met"
                        lines.append(f"- {model}, {method}: {row} − {edm} at 8 steps: FD {p['mean']:+.3f} ± "
                                     f"{p['std']:.3f} (n = {p['n']}): {verdict} (goal: better by more than twice the spread)")
            for row in rows:
                if row.endswith(", aligned"):
                    paired = {s: p for s in result["steps"]
                              for p in [_pair(scores, model, row, row.replace(", aligned", ", not aligned"), method, s)] if p}
                    if not paired:
                        lines.append(f"- {model}, {method}: {row} against not aligned: not measured yet (goal: never worse)")
                        continue
                    worse = [s for s, p in paired.items() if p["mean"] > max(p["std"], _bench.TIE)]
                    lines.append(f"- {model}, {method}: {row} against not aligned, at {', '.join(map(str, paired))} steps: "
                                 f"worse beyond the spread at {', '.join(map(str, worse)) if worse else 'none of them'} "
                                 "(goal: never)")
    return lines + [""]


def _recipe_training_samples() -> Dict[str, Dict[str, Any]]:
    """The training samples of each bundled recipe's fine-tuning (K x steps x batch) where it
    distils from the source: each costs at least one forward of the source, so a fit's model
    evaluations over it bound the fit's share of such a conversion from above, at any model size."""
    from cbs_convert.bundled import RECIPES
    from cbs_convert.pipeline.recipe import build_recipe, read_recipe_file

    out = {}
    for path in sorted(RECIPES.glob("*.yaml")):
        settings = read_recipe_file(path)
        if settings.get("loss", "distill") == "data":
            continue  # trained on data alone: its step costs no forward of the source to bound by
        recipe = build_recipe(settings, origin=str(path))
        if recipe.steps:
            out[path.stem] = {"k": recipe.k, "steps": recipe.steps, "batch_size": recipe.batch_size,
                              "samples": recipe.k * recipe.steps * recipe.batch_size}
    return out


def _timing_lines(timing) -> List[str]:
    lines = ["## Computing a schedule", ""]
    conversion = timing.get("conversion_s")
    if conversion:
        lines.append(f"Against a conversion of {conversion:.0f} s ({timing['conversion_source']}); goal: under 2%.")
    else:
        lines.append("No conversion time to compare with (none run, none cached).")
    lines += ["", "| schedule | median s | max s | max vs conversion |", "|---|---|---|---|"]
    for name, entry in timing["schedules"].items():
        ratio = entry.get("max_vs_conversion")
        lines.append(f"| {name} | {entry['median_s']:.3g} | {entry['max_s']:.3g} | "
                     f"{'–' if ratio is None else format(ratio, '.2%')} |")
    for model, seconds in timing.get("profile_measurement_s", {}).items():
        ratio = timing.get("profile_vs_conversion", {}).get(model)
        lines.append(f"| profile measurement, {model} (once per model; a conversion stores its own profile) | "
                     f"{seconds:.3g} | {seconds:.3g} | {'–' if ratio is None else format(ratio, '.2%')} |")
    stored = timing.get("stored_profile_s")
    if stored is not None:
        ratio = timing.get("stored_profile_vs_conversion")
        lines.append(f"| profile stored by the routed model's conversion (its step_profile stage) | {stored:.3g} | "
                     f"{stored:.3g} | {'–' if ratio is None else format(ratio, '.2%')} |")
    counted = timing.get("sample_evaluations") or {}
    recipes = timing.get("recipes") or {}
    if counted and recipes:
        lines += ["", "A conversion of these tiny teachers takes a minute or two, so a fit of a few seconds is a "
                  "large share of it. At scale both grow with the model's forward, so the share is better told in "
                  "model evaluations: the most one fit here took at each step count (counted; two per sample "
                  "under guidance, which these runs do not use), against the training samples of each bundled "
                  "recipe's fine-tuning (K x steps x batch), each of which costs at least one forward of the source "
                  "under distillation, so the share is at most:", "",
                  "| schedule | steps | model evaluations | " + " | ".join(recipes) + " |",
                  "|---|---|---|" + "---|" * len(recipes)]
        for name, entries in counted.items():
            for entry in entries:
                shares = " | ".join(format(entry["max"] / r["samples"], ".2%") for r in recipes.values())
                lines.append(f"| {name} | {entry['steps']} | {entry['max']:,} | {shares} |")
        lines += ["", "Training samples: " + "; ".join(f"{stem} {r['k']} x {r['steps']:,} x {r['batch_size']} = "
                                                        f"{r['samples']:,}" for stem, r in recipes.items()) + "."]
    return lines


if __name__ == "__main__":
    main()
