"""The conversion, stage by stage, with every stage's result kept in a work directory.

    load -> pool (teacher samples or data) -> profile -> split + allocate -> prune -> fine-tune -> write

The stages themselves are plain functions (``steps`` before the experts, ``experts`` for each
expert); ``distributed`` shares the experts out over the ranks of a torchrun launch. This runner
calls them in order. A stage whose artifact is already in the work directory is not run again, so
an interrupted run continues with ``resume=True``; the recipe is stored there and a resumed run
must match it. Rank 0 owns the work directory and writes the routed checkpoint.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from cbs_convert.errors import RecipeError, WorkdirError, WriteError
from cbs_convert.pipeline.distributed import ExpertRun, Team, finetune_experts, measure_experts, prepare_trunk, prune_experts
from cbs_convert.pipeline.quality import sample_quality, undertraining_verdicts
from cbs_convert.pipeline.ranks import barrier, distributed, expert_groups, leave, plan_ranks
from cbs_convert.pipeline.recipe import FIRST_DEFAULTS, NOT_IDENTITY, Recipe, build_recipe, inert_settings, read_recipe_file
from cbs_convert.pipeline.report import write_reports
from cbs_convert.pipeline.steps import (Plan, Pool, data_pool, idle_experts, load_source, plan_experts, profile_source,
                                        step_profile, teacher_pool, teacher_pool_description)
from cbs_convert.pipeline.summary import build_report, evaluation, finetune_summary, planned_experts
from cbs_convert.pipeline.workfiles import POOL, PROFILE, SPLIT, STEP_PROFILE, final_file, tidy, work_files
from cbs_convert.stages.profile import Profile
from cbs_convert.storage.checkpoint import (ARCHITECTURE_FLAGS, bundled_or_given, is_inside, model_name, source_files,
                                            source_folder)
from cbs_convert.storage.files import atomic_write_json, check_writable
from cbs_convert.storage.routed_file import run_description, save_routed_from_files, save_safetensors_atomic, save_shared_base
from cbs_convert.storage.workdir import WorkDir


@dataclass
class ConversionResult:
    output: Optional[Path]  # None for a profile-only preview
    report: Dict[str, Any]
    report_files: List[Path] = field(default_factory=list)


def default_output(checkpoint: str, k: int) -> Path:
    return Path.cwd() / f"{model_name(bundled_or_given(checkpoint))}-cbs-k{k}.safetensors"


class Conversion:
    """One conversion run. ``run()`` executes the stages; each is also a method of its own, which
    leaves its result on the object: ``load()`` the ``source`` (family, config, teacher, device),
    ``draw_pool()`` the ``pool`` (x0 and labels), ``profile()`` the ``profile_result``, ``split()`` the
    ``plan`` (segments, budget targets, expert configs). The same stages without a work directory
    are the plain functions of ``pipeline.steps`` and ``pipeline.experts``."""

    def __init__(self, settings: Dict[str, Any], progress: bool = True, resume: bool = False, force: bool = False,
                 keep_workdir: bool = False, on_warning=None, preview: bool = False):
        self.preview = preview
        self.progress = progress
        self.resume = resume
        self.force = force
        self.keep_workdir = keep_workdir
        self.on_warning = on_warning
        self.warnings: List[str] = []
        self.timings: Dict[str, float] = {}
        # Validate the user's settings alone first, so a bad flag fails before the checkpoint loads.
        build_recipe(settings)
        self.user_settings = settings
        if not settings.get("checkpoint"):
            raise RecipeError("no checkpoint given: python -m cbs_convert CHECKPOINT --k K")
        k = settings.get("k", Recipe.k)
        self.output = Path(settings.get("out") or default_output(settings["checkpoint"], k))
        settings = self.user_settings = {**settings, "checkpoint": str(bundled_or_given(settings["checkpoint"]))}
        self.workdir = Path(settings.get("workdir") or str(self.output) + ".work")
        self.work = WorkDir(self.workdir)
        source_path = Path(settings["checkpoint"])
        if int(os.environ.get("RANK", "0")) != 0:
            return  # rank 0 owns the output and the work directory; the others only read them
        model_folder = source_folder(source_path)
        for flag, target in (("--out", self.output), ("--workdir", self.workdir)):
            if model_folder is not None and is_inside(target, model_folder):
                raise WorkdirError(f"{flag} {target} is inside the source model's folder {model_folder}, where diffusers "
                                   f"would take it for part of the model; give {flag} a path outside it")
        if self.output.exists() and any(self.output.resolve() == f.resolve() for f in source_files(source_path) if f.exists()):
            raise WorkdirError(f"--out {self.output} is {'the source checkpoint' if self.output.resolve() == source_path.resolve() else 'a file of the source model'}; "
                               "choose another output path")
        if self.output.is_dir():
            raise WorkdirError(f"--out {self.output} is a directory; give a file name such as {self.output / 'model.safetensors'}")
        if self.output.exists() and not force and not preview:
            raise WorkdirError(f"{self.output} exists; pass --force to overwrite it or --out to choose another path")
        self.work.check_usable(resume, force)
        # Found now, not after hours of work: every file of the run goes into these two folders.
        check_writable(self.output.parent, "--out")
        check_writable(self.workdir, "--workdir")
        # A run killed while writing leaves only a hidden temporary beside the output; clear it.
        for stale in self.output.parent.glob(f".{self.output.name}.*.partial"):
            stale.unlink()

    def say(self, message: str) -> None:
        """A stage's one line of what it is doing, on stderr beside the progress bars."""
        if self.progress and int(os.environ.get("RANK", "0")) == 0:
            tqdm.write(f"cbs_convert: {message}", file=sys.stderr)

    def warn(self, message: str) -> None:
        """Something the user should know now, not only in the report: printed at once, reported."""
        self.warnings.append(str(message))
        if self.on_warning is not None:
            self.on_warning(str(message))

    # -- stages ---------------------------------------------------------------------------------
    def load(self):
        began = time.time()
        self.source, self.recipe = load_source(self.user_settings, self.warn)
        self.timings["load"] = time.time() - began

    def prepare_workdir(self):
        # the architecture flags count through the model they resolve to, not as typed
        skip = (*NOT_IDENTITY, *ARCHITECTURE_FLAGS)
        # settings that act on nothing here: a run begun when they were accepted (and recorded), or
        # when their defaults were others, computes the same without them
        skip += tuple(inert_settings(self.recipe))
        current = {k: v for k, v in self.recipe.to_dict().items() if k not in skip}
        defaults = {**{k: v for k, v in Recipe().to_dict().items() if k not in skip}, **FIRST_DEFAULTS}
        architecture = json.loads(json.dumps(self.source.config, default=str))  # as the marker stores it
        identity = {"source_sha256": self.source.checkpoint.sha256, "recipe": current, "architecture": architecture}
        self.work.start(identity, work_files(self.recipe.k), resume=self.resume, force=self.force, defaults=defaults)

    def draw_pool(self, rank: int = 0, world: int = 1):
        """The x0 pool: the user's data, or the teacher's own samples, drawn by all ranks in turns."""
        began = time.time()
        path = self.work.path(POOL)
        if self.recipe.data:
            pool = data_pool(self.source, self.recipe)
        elif path.exists():
            stored = load_file(str(path))
            pool = Pool(stored["x0"], stored.get("labels"), teacher_pool_description(self.recipe, stored["x0"].shape[0]))
        else:
            pool = teacher_pool(self.source, self.recipe, rank, world, self.progress)
            if rank == 0:
                tensors = {"x0": pool.x0} if pool.labels is None else {"x0": pool.x0, "labels": pool.labels}
                save_safetensors_atomic(tensors, path)
        # a resumed run must train on the pool its stored stages were made from, known by content:
        # the --data path may hold other data by now, or the same data may have moved
        what = f"--data {self.recipe.data}" if self.recipe.data else "the teacher's own samples (no --data)"
        self.work.pin_input("pool", pool.digest(), what, record=rank == 0, legacy=("data", self.recipe.data))
        self.pool = pool.to(self.source.device)
        self.timings["pool"] = time.time() - began

    def profile(self, rank: int = 0, world: int = 1):
        """Every rank measures its share of the grid points; rank 0 writes the whole profile."""
        began = time.time()
        path = self.work.path(PROFILE)
        if path.exists():
            self.profile_result: Optional[Profile] = Profile.from_dict(json.loads(path.read_text()))
        else:
            self.profile_result = profile_source(self.source, self.recipe, self.pool, rank, world, self.progress)
            if rank == 0 and self.profile_result is not None:
                atomic_write_json(path, self.profile_result.to_dict())
        self.timings["profile"] = time.time() - began

    def split(self):
        """The split and the experts' architectures; rank 0 plans them, the others read its plan."""
        path = self.work.path(SPLIT)
        if path.exists():
            self.plan = Plan.from_dict(json.loads(path.read_text()))
            return
        self.plan = plan_experts(self.source, self.recipe, self.profile_result, self.say, self.pool)
        atomic_write_json(path, self.plan.to_dict())

    def measure_step_profile(self):
        """Rank 0: the curve of the ``profile`` sampling schedule, for the routed file to carry."""
        began = time.time()
        path = self.work.path(STEP_PROFILE)
        self.step_profile: Optional[Profile] = None
        if path.exists():
            self.step_profile = Profile.from_dict(json.loads(path.read_text()))
        else:
            try:
                self.step_profile = step_profile(self.source, self.recipe, self.pool)
            except RecipeError as exc:  # a teacher whose curve has NaN or Inf: the conversion goes on without it
                self.warn(str(exc))
                return
            atomic_write_json(path, self.step_profile.to_dict())
        self.timings["step_profile"] = time.time() - began

    def check_trainable(self) -> None:
        """Say before any pruning or training which experts cannot learn anything from the teacher."""
        idle = idle_experts(self.source, self.recipe, self.plan)
        if idle:
            self.warn(idle)

    def expert_run(self) -> ExpertRun:
        return ExpertRun(self.source, self.recipe, self.pool, self.plan, self.work, self.say)

    def prune(self, team: Team):
        began = time.time()
        trunk = prepare_trunk(self.expert_run(), team, self.progress)
        if trunk is not None:
            self.timings["trunk"] = time.time() - began
            began = time.time()
        self.measured = {"before": prune_experts(self.expert_run(), team, trunk), "after": {}}
        self.timings["prune"] = time.time() - began

    def finetune(self, team: Team):
        began = time.time()
        if self.recipe.steps == 0:
            return
        finetune_experts(self.expert_run(), team, self.progress)
        self.timings["finetune"] = time.time() - began

    def measure_final(self, team: Team):
        self.measured["after"] = measure_experts(self.expert_run(), team, self.measured["before"])

    # -- the report and the routed file ---------------------------------------------------------
    def report(self, evaluated: Dict[str, Any]) -> Dict[str, Any]:
        return build_report(self.source, self.recipe, self.plan, self.profile_result, evaluated, self.pool.description,
                            self.warnings, self.timings)

    def write_preview(self) -> ConversionResult:
        """The report of a profile-only run: the curves, every rule's cuts, the planned experts."""
        report = self.report({"experts": planned_experts(self.source, self.recipe, self.plan), "seams": []})
        report["preview"] = True
        stem = Path(str(self.output).removesuffix(".safetensors") + ".preview")
        return ConversionResult(None, report, write_reports(report, stem))

    def evaluate(self) -> Dict[str, Any]:
        return evaluation(self.source, self.recipe, self.plan, self.work, self.measured["before"], self.measured["after"])

    def write(self, evaluated: Dict[str, Any], team: Team) -> ConversionResult:
        r, source = self.recipe, self.source
        experts = self.expert_run()
        report = self.report(evaluated)
        report["finetune"] = finetune_summary(source, r, self.plan, self.work)
        report["ranks"] = team.layout.to_dict()
        self.say(f"writing {self.output}")
        extra = run_description(source.family, source.checkpoint, report["profile"], report["split"], report["recipe"])
        if self.step_profile is not None:
            extra["step_profile"] = self.step_profile.to_dict()
            report["step_profile"] = {"monitor": next(iter(self.step_profile.mean)), "times": len(self.step_profile.grid),
                                      "samples_per_point": self.step_profile.samples_per_point,
                                      "notes": self.step_profile.notes}
        if r.experts == "lora":
            save_shared_base(self.output, experts.shared_student(trained=experts.trains(0)), extra)
        else:
            save_routed_from_files(
                self.output, source.family, [self.work.path(final_file(k, experts.trains(k))) for k in range(r.k)],
                self.plan.configs, self.plan.split.boundaries, extra=extra,
            )
        quality = sample_quality(source, self.output, self.say)
        if quality is not None:
            report["sample_quality"] = quality
        for verdict in undertraining_verdicts(report):
            self.warn(verdict)  # said now, and listed with the report's other warnings
        report["warnings"] = self.warnings
        report["workdir"] = tidy(self.work, r.k, keep_all=self.keep_workdir)
        files = write_reports(report, self.output)
        return ConversionResult(self.output, report, files)

    def run(self) -> ConversionResult:
        try:
            return self._run()
        except WriteError as exc:
            raise WriteError(f"{exc}; the work directory {self.workdir} is kept: fix that, then rerun with --resume") from None

    def _run(self) -> ConversionResult:
        began = time.time()
        rank, world = distributed()
        self.load()
        # the launch is checked before anything is computed (the recipe needs the architecture)
        # shared-base experts train as one model: its ranks form one data-parallel group
        layout = plan_ranks(world, 1 if self.recipe.experts == "lora" else self.recipe.k, self.recipe.batch_size)
        # a trunk (--trunk-steps) trains on every rank at once: the same check, for one expert
        trunk_layout = plan_ranks(world, 1, self.recipe.batch_size, "the trunk") if self.recipe.trunk_steps > 0 else None
        team = Team(rank, world, layout, expert_groups(layout),
                    expert_groups(trunk_layout).get(0) if trunk_layout is not None else None)
        if rank == 0:
            self.prepare_workdir()
        barrier(world)
        torch.manual_seed(self.recipe.seed)
        # Pool and profile: every rank has checked for the stored file before any can finish the gather
        # that precedes rank 0's writing it, so all of them either read it or compute their share.
        self.draw_pool(rank, world)
        self.profile(rank, world)
        if rank == 0:
            self.split()
            self.check_trainable()
            if not self.preview:
                self.measure_step_profile()
        barrier(world)
        if rank != 0:
            self.split()
        if self.preview:
            return self.write_preview() if rank == 0 else ConversionResult(None, {})
        self.prune(team)  # ends at a barrier: every rank then reads its experts' pruned weights
        self.finetune(team)
        self.measure_final(team)
        leave(world)
        if rank != 0:
            return ConversionResult(self.output, {})
        evaluated = self.evaluate()
        self.timings["total"] = time.time() - began
        return self.write(evaluated, team)


def convert(checkpoint=None, recipe=None, progress: bool = False, resume: bool = False, force: bool = False,
            keep_workdir: bool = False, **settings) -> ConversionResult:
    """Run every stage. ``recipe`` is a YAML path, a dict or a Recipe; keyword settings override it."""
    layers: Dict[str, Any] = {}
    if isinstance(recipe, (str, Path)):
        layers.update(read_recipe_file(recipe))
    elif isinstance(recipe, Recipe):
        layers.update(recipe.to_dict())
    elif isinstance(recipe, dict):
        layers.update(recipe)
    if checkpoint is not None:
        settings["checkpoint"] = str(checkpoint)
    layers.update({k: v for k, v in settings.items() if v is not None})
    return Conversion(layers, progress=progress, resume=resume, force=force, keep_workdir=keep_workdir,
                      on_warning=_warn_python).run()


def _warn_python(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)
