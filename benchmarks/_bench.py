"""What the digits and Fashion-MNIST benchmarks share: rows as data, conversions and scores cached
one small file each, paired differences, the cost estimate and the Markdown table.

A row is a name and the settings of one ``cbs_convert.convert`` call, plus two keys read here:

* ``steps_factor``: the row's total fine-tuning steps as a multiple of the benchmark's ``--steps``
  (divided evenly over its K experts, or by segment length where the row sets ``step_shares``, so
  that every row of factor 1 trains equally long);
* ``best_of``: a list of rows; the row takes the settings of whichever of them has the lowest mean
  paired ΔFD so far, with its own other keys on top (``k``, ``budget``...). Such a row waits until
  every one of those rows is scored (or reported unavailable);
* ``trunk_share``: the share of the row's total steps that one trunk trains on all of time
  (``--trunk-steps``) before the experts branch from it; they split the rest evenly.

Every (row, training seed) conversion and every (model, sampling seed) score is written to the
cache as JSON the moment it is done, under a name that carries a hash of everything it depends on
(settings, teacher bytes, sample count...). A rerun loads what is there and computes only the
rest, so one benchmark can span several sessions; changing a setting changes the hash and reruns
exactly what it touches. The routed files themselves live in ``<cache>/models`` (not committed):
a model whose scores are all cached is never needed again.

What no key carries is held once per cache in ``manifest.json``: the pinned defaults and the
scoring classifier's digest. A run whose values differ refuses to mix its rows into that cache.
Code changes are not in the keys, so that a run can span commits; a change that alters what a
cached row would measure bumps ``CACHE_VERSION``. New conversion records keep their commit.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
#: keys of a row that the benchmark reads; everything else goes to ``convert``
ROW_KEYS = ("steps_factor", "best_of", "trunk_share")
#: bumped when what a cached conversion or score means changes (sampler, labels, pairing)
CACHE_VERSION = 1
REAL, TEACHER = "real training images", "teacher"
#: an FD difference this small is a tie: two identical models (snr's cut equals uniform's on the linear
#: path) score apart by float reduction order only
TIE = 1e-6
#: library defaults that changed after rows were cached under them: a row that does not set one runs
#: with the value it was cached with, and that value stays out of the cache key (it was never in it),
#: so no cached row reruns and a conversion in progress resumes under the same recipe
PINNED = {"derivatives": "jvp", "monitor": "dirichlet", "monitors": ["dirichlet", "acceleration"],
          # the fine-tuning recipe before warm-up, cosine decay and the anchored EMA (issue 18)
          "lr_schedule": "constant", "warmup_steps": 0, "lr_floor": 0.1, "ema_warmup": True,
          "distill_weight": 1.0, "data_weight": 1.0,
          # every row before shared-base experts (issue 18) was K separate networks
          "experts": "copies", "feature_weight": 0.0}


#: Issue 18's fine-tuning of full-width experts: the source's final lr, a 5% warm-up, a cosine to a
#: tenth of it, and an EMA anchored at the source (no decay ramp). Spelled out, so that a later change
#: of the tool's defaults cannot change what a cached row means.
GENTLE = dict(lr=1e-4, lr_schedule="cosine", warmup_steps=None, lr_floor=0.1, ema_warmup=False)
#: Shared-base experts (issue 18): the source as one base, trained at the gentle lr (1e-4 = 0.1 x the
#: deltas' 1e-3), plus a rank-R delta per segment, all trained together on mixed-time batches of data.
LORA = dict(experts="lora", loss="data", lr=1e-3, base_lr_scale=0.1, lr_schedule="cosine", warmup_steps=None,
            lr_floor=0.1, ema_warmup=False)


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:10]


def file_digest(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def write_json(path: Path, data) -> None:
    from cbs_convert.storage.files import atomic_write_json

    atomic_write_json(path, data)


def git_commit() -> str:
    """HEAD's short hash, with "+changes" when tracked code differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "cbs_convert", "benchmarks"],
                                 cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""
    return head + ("+changes" if head and changed else "")


def summarise(values) -> Tuple[float, float]:
    values = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if len(values) == 0:
        return float("nan"), float("nan")
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


# -- work done in worker processes ----------------------------------------------------------------


def worker_init(threads: int):
    import torch

    # One thread per process: the cores are shared, and OpenMP barriers stall badly when oversubscribed.
    torch.set_num_threads(threads)
    # Zero-initialised gates and pruned weights make subnormal floats, which CPUs compute very slowly.
    torch.set_flush_denormal(True)


def run_conversion(name: str, settings: Dict[str, Any], out: str) -> Dict[str, Any]:
    """One conversion; a setting this commit does not offer yet comes back as ``unavailable``, a
    training that blows up as ``diverged`` (a result: that row lost)."""
    import cbs_convert
    from cbs_convert.errors import RecipeError, TrainingDiverged

    began = time.time()
    try:
        # resume: a conversion killed mid-way (the session ended) continues from its work directory.
        result = cbs_convert.convert(out=out, workdir=out + ".work", progress=False, force=True, resume=True,
                                     **{k: v for k, v in settings.items() if k != "_pinned"})
    except TrainingDiverged as exc:
        return {"name": name, "train_seed": settings["seed"], "settings": settings,
                "diverged": str(exc).splitlines()[0], "seconds": time.time() - began}
    except RecipeError as exc:
        return {"name": name, "train_seed": settings["seed"], "unavailable": str(exc).splitlines()[0]}
    report = result.report
    experts = report["evaluation"]["experts"]
    return {
        "name": name,
        "train_seed": settings["seed"],
        "settings": settings,
        "path": out,
        "boundaries": report["split"]["boundaries"],
        "shares": report["split"]["shares"],
        "expert_params": [e["params"] for e in experts],
        "expert_flops": [e["flops"] for e in experts],
        "error_before": [e["error_before"] for e in experts],
        "error_after": [e["error_after"] for e in experts],
        "seams": report["evaluation"]["seams"],
        "split_notes": [str(n) for n in report["split"].get("notes", [])],
        "seconds": time.time() - began,
        "timings": report["timings_s"],
        "base_params": (report.get("shared_base") or {}).get("base_params", 0),
    }


def balanced_labels(n: int, seed: int, classes: int = 10):
    import torch

    labels = torch.arange(n) % classes
    return labels[torch.randperm(n, generator=torch.Generator().manual_seed(10_000 + seed))]


def evaluate(dataset: str, name: str, source: str, seed: int, samples: int, sample_steps: int,
             train_seed: Optional[int] = None, chunk: int = 1000) -> Dict[str, Any]:
    """Sample ``samples`` images from ``source`` (a checkpoint, a routed file, or "real") and score them.

    Pairing: for one sampling seed every model gets the same labels and the same starting noise,
    so the difference of two models' FD on one seed carries little of the sampling noise.
    """
    import torch

    from cbs_convert.evaluation.metrics import DATASETS

    spec = DATASETS[dataset]
    scorer = spec.scorer()
    labels = balanced_labels(samples, seed)
    began = time.time()
    if source == "real":
        data = spec.split()
        pick = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(seed))[:samples]
        images, labels = data.train_x[pick], data.train_y[pick]
    else:
        from cbs_convert.storage.loading import load_model
        from cbs_convert.sample import sample_ode

        family, model = load_model(source)
        shape = family.sample_shape(family.config)
        noise = torch.randn((samples, *shape), generator=torch.Generator().manual_seed(seed))
        # Chunks bound the memory; each sample's trajectory depends on its own noise and label only.
        images = torch.cat([
            sample_ode(family, model, (len(n), *shape), y, steps=sample_steps, noise=n)
            for n, y in zip(noise.split(chunk), labels.split(chunk))
        ])
        if not torch.isfinite(images).all():
            return {"name": name, "seed": seed, "train_seed": train_seed, "fd": float("nan"),
                    "class_match": float("nan"), "seconds": time.time() - began}
    return {"name": name, "seed": seed, "train_seed": train_seed, **scorer.score(images, labels),
            "seconds": time.time() - began}


# -- the benchmark ----------------------------------------------------------------------------------


@dataclass
class Bench:
    dataset: str
    checkpoint: str
    rows: Dict[str, Dict[str, Any]]
    common: Dict[str, Any]  # settings every conversion shares (pool, loss, lr, batch...)
    steps: int
    samples: int
    seeds: List[int]
    train_seeds: List[int]
    sample_steps: int
    cache: Path
    jobs: int = 2
    log: Any = print
    conversions: Dict[Tuple[str, int], Dict[str, Any]] = field(default_factory=dict)
    scores: List[Dict[str, Any]] = field(default_factory=list)
    unavailable: Dict[str, str] = field(default_factory=dict)
    diverged: Dict[str, str] = field(default_factory=dict)  # row -> why its training blew up, per seed
    resolved: Dict[str, str] = field(default_factory=dict)  # best_of row -> the row it copies
    work: Dict[str, int] = field(default_factory=lambda: {"conversions": 0, "scores": 0})
    compute: bool = True

    def __post_init__(self):
        self.cache = Path(self.cache)
        self.models = self.cache / "models"
        self.teacher_digest = file_digest(self.checkpoint)
        self.commit = git_commit()  # the code this run's workers import, stamped on what they compute

    def check_manifest(self) -> None:
        """Refuse to mix rows made under other pinned defaults or another scoring classifier."""
        from cbs_convert.evaluation.metrics import DATASETS

        # through JSON, so that a tuple and the list it is read back as compare equal
        wanted = json.loads(json.dumps({"pinned": PINNED, "classifier": file_digest(DATASETS[self.dataset].classifier)}))
        path = self.cache / "manifest.json"
        if not path.exists():
            # a cache from before manifests existed is adopted under the values of this run
            write_json(path, wanted)
            return
        try:
            held = json.loads(path.read_text())
        except ValueError:
            held = {}
        changed = [key for key in wanted if held.get(key) != wanted[key]]
        if changed:
            print(f"error: the cache {self.cache} was built with another {' and '.join(changed)} "
                  f"({'; '.join(f'{k}: {held.get(k)} there, {wanted[k]} here' for k in changed)}); give this run "
                  f"its own --cache folder, or restore what changed", file=sys.stderr)
            raise SystemExit(2)

    # -- settings and cache names -------------------------------------------------------------
    def settings_for(self, name: str, train_seed: int) -> Optional[Dict[str, Any]]:
        """The convert() settings of a row, or None while a row it depends on is not scored."""
        row = dict(self.rows[name])
        if "best_of" in row:
            candidates = row.pop("best_of")
            winner = self.best_of(candidates)
            if winner is None:
                here = [c for c in candidates if c in self.rows]
                if here and all(c in self.unavailable or c in self.diverged for c in here):
                    self.unavailable[name] = f"none of {', '.join(here)} can be copied (each diverged or is unavailable)"
                return None
            self.resolved[name] = winner
            row = {**{k: v for k, v in self.rows[winner].items() if k not in ROW_KEYS}, **row}
        factor = row.get("steps_factor", 1.0)
        settings = {**self.common, **{k: v for k, v in row.items() if k not in ROW_KEYS}}
        total = int(round(self.steps * factor))
        if row.get("trunk_share"):
            settings["trunk_steps"] = int(round(total * row["trunk_share"]))
            total -= settings["trunk_steps"]
        settings["steps"] = max(1, total // settings.get("k", 2))
        settings["seed"] = train_seed
        settings["checkpoint"] = self.checkpoint
        # the loss weights mix the two terms of --loss both: the tool refuses them with a one-term loss
        pinned = {k: v for k, v in PINNED.items() if k not in settings
                  and not (k in ("distill_weight", "data_weight") and settings.get("loss") != "both")}
        if settings.get("structure") == "depth" and "block_selector" not in settings:
            pinned["block_selector"] = "importance"  # the depth rows' selector before recovery became the default
        return {**settings, **pinned, "_pinned": sorted(pinned)}

    def stem(self, name: str, train_seed: int, settings: Dict[str, Any]) -> str:
        key = {"v": CACHE_VERSION, "teacher": self.teacher_digest,
               "settings": {k: v for k, v in settings.items()
                            if k not in ("checkpoint", "data", "_pinned") and k not in settings.get("_pinned", ())}}
        return f"{slug(name)}_t{train_seed}_{digest(key)}"

    def score_path(self, model_key: str, seed: int) -> Path:
        key = {"v": CACHE_VERSION, "samples": self.samples, "steps": self.sample_steps, "model": model_key}
        return self.cache / "scores" / f"{model_key}_s{seed}_{digest(key)}.json"

    def best_of(self, candidates: Sequence[str]) -> Optional[str]:
        """The candidate with the lowest mean paired ΔFD; None until all available ones are scored.

        Only candidates among this run's rows count, and none this commit cannot run.
        """
        gaps = {}
        for name in candidates:
            if name in self.unavailable or name not in self.rows:
                continue
            if name in self.diverged:
                gaps[name] = float("inf")
                continue
            runs = self.paired_gaps(name)
            if len(runs) < len(self.seeds) * len(self.train_seeds):
                return None
            # a run whose samples blew up loses; a NaN mean would never compare and could "win"
            gaps[name] = float(np.mean(runs)) if np.all(np.isfinite(runs)) else float("inf")
        contenders = {name: gap for name, gap in gaps.items() if np.isfinite(gap)}
        return min(contenders, key=contenders.get) if contenders else None

    def paired_gaps(self, name: str) -> List[float]:
        teacher = {s["seed"]: s["fd"] for s in self.scores if s["name"] == TEACHER}
        return [s["fd"] - teacher[s["seed"]] for s in self.scores if s["name"] == name and s["seed"] in teacher]

    # -- running ----------------------------------------------------------------------------------
    def run(self, names: Sequence[str], compute: bool = True) -> None:
        """Convert and score every wanted row for every seed, skipping whatever the cache holds.

        ``compute=False`` only collects what the cache holds (a report of a run still going on).
        """
        self.compute = compute
        self.models.mkdir(parents=True, exist_ok=True)
        self.check_manifest()
        context = get_context("spawn")
        with ProcessPoolExecutor(self.jobs, mp_context=context, initializer=worker_init, initargs=(1,)) as pool:
            pending: Dict[Any, Tuple[str, Any]] = {}

            def score(model_key, name, source, seed, train_seed):
                path = self.score_path(model_key, seed)
                if path.exists():
                    self.scores.append(json.loads(path.read_text()))
                    return
                if not self.compute:
                    return
                job = pool.submit(evaluate, self.dataset, name, source, seed, self.samples, self.sample_steps, train_seed)
                pending[job] = ("score", path)

            for seed in self.seeds:
                score("real", REAL, "real", seed, None)
                score(f"teacher_{self.teacher_digest}", TEACHER, self.checkpoint, seed, None)
            waiting = list(names)
            started = set()
            while True:
                for name in list(waiting):
                    for train_seed in self.train_seeds:
                        if (name, train_seed) in started:
                            continue
                        settings = self.settings_for(name, train_seed)
                        if settings is None:
                            continue
                        if self._start_row(pool, pending, score, name, train_seed, settings):
                            started.add((name, train_seed))
                    if all((name, t) in started for t in self.train_seeds):
                        waiting.remove(name)
                if not pending:
                    break
                job = next(as_completed(pending))
                kind, info = pending.pop(job)
                try:
                    result = job.result()
                except Exception as exc:
                    self.log(f"  FAILED {kind} {info}:\n{traceback.format_exc()}")
                    if kind == "convert":
                        # a row that crashes (say, a monitor half-landed in the tree) must not keep
                        # the best-of rows waiting for it forever
                        self.unavailable[info[1]] = f"failed: {str(exc).splitlines()[0][:200]}"
                    continue
                if kind == "convert":
                    self.work["conversions"] += 1
                    if "unavailable" in result:
                        self.unavailable[result["name"]] = result["unavailable"]
                        self.log(f"  {result['name']}: not available at this commit ({result['unavailable']})")
                        continue
                    result["commit"] = self.commit
                    write_json(info[0], result)
                    if "diverged" in result:
                        self._note_divergence(result)
                        continue
                    self._note_conversion(result)
                    model_key = info[0].stem
                    for seed in self.seeds:
                        score(model_key, result["name"], result["path"], seed, result["train_seed"])
                else:
                    self.work["scores"] += 1
                    result["commit"] = self.commit
                    write_json(info, result)
                    self.scores.append(result)
                    self.log(f"  scored {result['name']} (training seed {result['train_seed']}) sampling seed "
                             f"{result['seed']}: FD {result['fd']:.3f}, class match {result['class_match']:.3f} "
                             f"({result['seconds']:.0f}s)")
            for name in waiting:
                if self.compute:
                    self.log(f"  {name}: waits for {', '.join(self.rows[name].get('best_of', []))} to be scored")

    def _start_row(self, pool, pending, score, name, train_seed, settings) -> bool:
        """Serve a (row, training seed) from the cache, or submit its conversion; False: not now.

        A conversion is submitted only while fewer than ``jobs`` jobs are in flight, so that the
        scores of finished conversions run next instead of queueing behind every other conversion:
        an interrupted run then leaves whole rows behind, not many conversions and no scores.
        """
        stem = self.stem(name, train_seed, settings)
        record = self.cache / "conversions" / f"{stem}.json"
        model_key = stem
        if record.exists():
            result = json.loads(record.read_text())
            if "diverged" in result:
                self._note_divergence(result)
                return True
            missing = [s for s in self.seeds if not self.score_path(model_key, s).exists()]
            # with scores missing and the routed file gone (another machine), it is converted again
            if not missing or Path(result["path"]).exists():
                self._note_conversion(result, cached=True)
                for seed in self.seeds:
                    score(model_key, name, result["path"], seed, train_seed)
                return True
        if len(pending) >= self.jobs or not self.compute:
            return False
        out = str(self.models / f"{stem}.safetensors")
        job = pool.submit(run_conversion, name, settings, out)
        pending[job] = ("convert", (record, name))
        return True

    def _note_divergence(self, result):
        said = f"training seed {result['train_seed']}: {result['diverged']}"
        earlier = self.diverged.get(result["name"])
        self.diverged[result["name"]] = f"{earlier}; {said}" if earlier else said
        self.log(f"  {result['name']} (training seed {result['train_seed']}): training diverged ({result['diverged']})")

    def _note_conversion(self, result, cached=False):
        self.conversions[(result["name"], result["train_seed"])] = result
        cuts = [round(b, 3) for b in result["boundaries"]]
        self.log(f"  {'cached' if cached else 'converted'} {result['name']} (training seed {result['train_seed']}): "
                 f"boundaries {cuts}, {result['seconds']:.0f}s")

    # -- results ----------------------------------------------------------------------------------
    def table_rows(self, names: Sequence[str], teacher_flops: float, teacher_params: int) -> List[Dict[str, Any]]:
        teacher_fd = {s["seed"]: s["fd"] for s in self.scores if s["name"] == TEACHER}
        rows = []
        for name in [REAL, TEACHER, *names]:
            mine = sorted((s for s in self.scores if s["name"] == name), key=lambda s: (s["train_seed"] or 0, s["seed"]))
            if not mine and name not in (REAL, TEACHER):
                continue
            converted = sorted((c for (n, _), c in self.conversions.items() if n == name), key=lambda c: c["train_seed"])
            fd_mean, fd_std = summarise([s["fd"] for s in mine])
            cm_mean, cm_std = summarise([s["class_match"] for s in mine])
            gaps: Dict[Any, List[float]] = {}
            for s in mine:
                if s["seed"] in teacher_fd:
                    gaps.setdefault(s["train_seed"], []).append(s["fd"] - teacher_fd[s["seed"]])
            every_gap = [g for values in gaps.values() for g in values]
            gap_mean, gap_std = summarise(every_gap)
            first = converted[0] if converted else None
            rows.append({
                "name": name, "fd_mean": fd_mean, "fd_std": fd_std, "class_match_mean": cm_mean,
                "class_match_std": cm_std, "gap_mean": gap_mean, "gap_std": gap_std,
                "gap_n": int(np.isfinite(every_gap).sum()) if every_gap else 0,
                "gap_nonfinite": int((~np.isfinite(every_gap)).sum()) if every_gap else 0,
                "gap_by_train_seed": {str(k): float(np.mean(v)) for k, v in gaps.items() if k is not None},
                "runs": mine,
                # a shared-base row's experts are deltas over one base that every expert uses
                "params": None if name == REAL else (sum(first["expert_params"]) + first.get("base_params", 0) if first else teacher_params),
                "sampling_flops_vs_teacher": None if name == REAL else sampling_cost(first, teacher_flops, self.sample_steps),
                "resolved_from": self.resolved.get(name),
                "diverged": self.diverged.get(name),
                "conversions": converted,
            })
        return rows


def paired(rows: List[Dict[str, Any]], name: str, base: str) -> Optional[Dict[str, Any]]:
    """FD(name) − FD(base) over the (training seed, sampling seed) pairs both have.

    The teacher and the real images have no training seed: they pair with every training seed on
    the same sampling seed.
    """
    runs = {r["name"]: {(s["train_seed"], s["seed"]): s["fd"] for s in r["runs"]} for r in rows}
    if name not in runs or base not in runs:
        return None
    diffs = []
    blown = {"first": 0, "base": 0}  # runs left out of the mean because their samples blew up
    by_train_seed: Dict[Any, List[float]] = {}
    for (train_seed, seed), value in sorted(runs[name].items(), key=lambda kv: (kv[0][0] or 0, kv[0][1])):
        other = runs[base].get((train_seed, seed), runs[base].get((None, seed)))
        if other is None:
            continue
        if np.isfinite(value) and np.isfinite(other):
            diffs.append(value - other)
            by_train_seed.setdefault(train_seed, []).append(value - other)
        else:
            blown["first" if not np.isfinite(value) else "base"] += 1
    if not diffs and not any(blown.values()):
        return None
    if not diffs:
        return {"name": name, "base": base, "mean": float("nan"), "std": float("nan"), "n": 0, "worse": blown["first"],
                "by_train_seed": {}, "train_worse": 0, "blown": blown}
    mean, std = summarise(diffs)
    # The sampling seeds of one trained model share its weights, so the trained models are the
    # independent units: their means are what a reader should count.
    per_model = {str(k): float(np.mean(v)) for k, v in by_train_seed.items()}
    # a run that blew up where its partner did not is worse, whatever the finite runs say
    return {"name": name, "base": base, "mean": mean, "std": std, "n": len(diffs),
            "worse": int(sum(d > TIE for d in diffs)) + blown["first"],
            "by_train_seed": per_model, "train_worse": int(sum(m > TIE for m in per_model.values())), "blown": blown}


def sampler_times(steps: int) -> np.ndarray:
    """Canonical times at which the Heun sampler of ``sample_ode`` evaluates the model."""
    times = np.linspace(1.0, 0.0, steps + 1)
    calls = []
    for i in range(steps):
        calls.append(times[i])
        if i < steps - 1:
            calls.append(times[i + 1])
    return np.asarray(calls)


def sampling_cost(conversion, teacher_flops, sample_steps) -> float:
    """Forward FLOPs of one whole sample relative to the teacher, routing each call by its time."""
    if conversion is None:
        return 1.0
    calls = sampler_times(sample_steps)
    inner = np.asarray(conversion["boundaries"][1:-1])
    which = np.searchsorted(inner, calls, side="right")  # the routed model's routing: [lo, hi)
    flops = np.asarray(conversion["expert_flops"], dtype=np.float64)[which].sum()
    return float(flops / (teacher_flops * len(calls)))


# -- cost estimate ------------------------------------------------------------------------------------


def measured_gflops(family, threads: int = 1, batch: int = 256) -> float:
    """The teacher's forward throughput here, in GFLOP/s, on ``threads`` threads (a second or two)."""
    import torch

    model = family.build(family.config).eval()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randn(batch, *family.sample_shape(family.config))
        t = torch.rand(batch)
        y = torch.zeros(batch, dtype=torch.long) if family.num_classes(family.config) else None
        with torch.no_grad():
            model(x, t, y)
            began = time.time()
            model(x, t, y)
            seconds = time.time() - began
    finally:
        torch.set_num_threads(previous)
    return family.forward_flops(family.config) * batch / seconds / 1e9


def estimate_flops(settings: Dict[str, Any], teacher_flops: float, samples: int, sample_steps: int, n_seeds: int) -> Dict[str, float]:
    """FLOPs of one (row, training seed): fine-tuning, profiling and sampling, from the budget alone.

    An expert's FLOPs are taken as the teacher's times its parameter share (budget / K, capped at
    1): close for width pruning, where both scale alike. Training costs ~3 forwards per step (forward
    and backward), plus one teacher forward per sample for the distillation target.
    """
    k = settings.get("k", 2)
    budget = float(str(settings.get("budget", "1x")).rstrip("x"))
    expert = teacher_flops * min(1.0, budget / k)
    loss = settings.get("loss", "distill")
    per_sample = 3 * expert + (teacher_flops if loss in ("distill", "both") else 0.0)
    finetune = (settings["steps"] * k + settings.get("trunk_steps", 0)) * settings["batch_size"] * per_sample
    profile = 0.0
    if settings.get("split", "cbs") == "cbs" or settings.get("monitors"):
        # a Jacobian monitor: a few JVP probes, each about three forwards, per grid time and batch
        profile = settings.get("grid", 12) * settings.get("profile_batches", 2) * settings.get("profile_batch_size", 16) * 12 * teacher_flops
    calls = 2 * sample_steps - 1
    sampling = n_seeds * samples * calls * min(1.0, budget / k) * teacher_flops
    return {"finetune": finetune, "profile": profile, "sampling": sampling}


# -- the table ------------------------------------------------------------------------------------------


def fmt(value, spec="+.3f"):
    return "–" if value is None or not np.isfinite(value) else format(value, spec)


def markdown_table(rows: List[Dict[str, Any]]) -> List[str]:
    lines = [
        "| model | boundaries (t) | params | sampling FLOPs vs teacher | FD ↓ | ΔFD vs teacher ↓ (n) | ΔFD per training seed | class match ↑ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        converted = row["conversions"]
        baseline = row["name"] in (TEACHER, REAL)
        cuts = sorted({", ".join(f"{b:.3f}" for b in c["boundaries"][1:-1]) for c in converted})
        bounds = " / ".join(cuts) if cuts and any(cuts) else ("–" if baseline else "none")
        params = f"{row['params']:,}" if row["params"] else "–"
        if converted and converted[0].get("base_params"):
            deltas = converted[0]["expert_params"]
            params += f" ({converted[0]['base_params']:,} base + {len(deltas)} x {deltas[0]:,})"
        elif converted and len(converted[0]["expert_params"]) > 1:
            params += " (" + " + ".join(f"{p:,}" for p in converted[0]["expert_params"]) + ")"
        cost = fmt(row["sampling_flops_vs_teacher"], ".2f") if row["sampling_flops_vs_teacher"] is not None else "–"
        gap = "–" if baseline else f"{fmt(row['gap_mean'])} ± {fmt(row['gap_std'], '.3f')} ({row['gap_n']})"
        if row.get("gap_nonfinite"):
            gap += f", {row['gap_nonfinite']} run(s) blew up"
        per_seed = "–" if baseline else " / ".join(fmt(v) for v in row["gap_by_train_seed"].values())
        name = row["name"] + (f" (= {row['resolved_from']})" if row.get("resolved_from") else "")
        if row.get("diverged"):
            name += " (a training seed diverged: see below)"
        lines.append(
            f"| {name} | {bounds} | {params} | {cost} | {fmt(row['fd_mean'], '.3f')} ± {fmt(row['fd_std'], '.3f')} | "
            f"{gap} | {per_seed} | {fmt(row['class_match_mean'], '.3f')} ± {fmt(row['class_match_std'], '.3f')} |"
        )
    return lines


PAIRS_HEADER = "Paired differences (same training seed, same sampling seed; positive: the first is worse):"


def markdown_pairs(rows, pairs: Sequence[Tuple[str, str]], header: str = PAIRS_HEADER) -> List[str]:
    found = [p for p in (paired(rows, a, b) for a, b in pairs) if p is not None]
    if not found:
        return []
    lines = ["", header, ""]
    for p in found:
        blown = p.get("blown", {})
        runs = p["n"] + blown.get("first", 0) + blown.get("base", 0)
        line = (f"- {p['name']} − {p['base']}: FD {fmt(p['mean'])} ± {fmt(p['std'], '.3f')} (n = {p['n']}), "
                f"worse in {p['worse']} of {runs}")
        for side, label in (("first", p["name"]), ("base", p["base"])):
            if blown.get(side):
                line += f"; {blown[side]} run(s) of {label} blew up (left out of the mean)"
        per_model = p.get("by_train_seed", {})
        if len(per_model) > 1:
            line += (f"; per training seed {' / '.join(format(v, '+.3f') for v in per_model.values())}, "
                     f"worse for {p['train_worse']} of {len(per_model)}")
        lines.append(line)
    return lines


def markdown_errors(rows) -> List[str]:
    lines = ["", "Velocity error against the teacher on each expert's segment (before → after fine-tuning), and seams:", ""]
    for row in rows:
        for c in row["conversions"]:
            errors = ", ".join(f"{a:.3f} → {b:.3f}" for a, b in zip(c["error_before"], c["error_after"]))
            seams = "; ".join(f"t={s['boundary']:.3f}: {s['before']:.3f} → {s['after']:.3f}" for s in c["seams"])
            loss = c.get("settings", {}).get("loss", "?")
            pruning = (c.get("timings") or {}).get("prune")
            spent = f"{c['seconds']:.0f} s" + (f", pruning {pruning:.1f} s" if pruning is not None else "")
            lines.append(f"- {row['name']}, training seed {c['train_seed']} (loss {loss}): {errors}"
                         + (f"; seams {seams}" if seams else "") + f" ({spent})")
    return lines


def write_results(stem: Path, result: Dict[str, Any], render) -> str:
    """Print the Markdown of ``result`` and write it beside the JSON, as ``stem``.md and .json."""
    text = render(result)
    print()
    print(text)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    return text


def command_line(script: str, argv) -> str:
    return f"python3 benchmarks/{script}" + "".join(" " + a for a in (sys.argv[1:] if argv is None else argv))


def parse_seeds(text: Optional[str], default: str) -> List[int]:
    return [int(s) for s in (text or default).split(",") if s.strip()]
