"""The conversion, stage by stage, with every stage's result kept in a work directory.

    load -> pool (teacher samples or data) -> profile -> split + allocate -> prune -> fine-tune -> write

A stage whose artifact is already in the work directory is not run again, so an interrupted run
continues with ``resume=True``; the recipe is stored there and a resumed run must match it.
Experts are independent: under ``torchrun`` the ranks share them as ``ranks.plan_ranks`` lays out
(turns when there are fewer ranks than experts, a data-parallel group per expert when there are
more) and rank 0 writes the routed checkpoint.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from cbs_convert.storage.checkpoint import (ARCHITECTURE_FLAGS, bundled_or_given, is_inside, model_name, read_checkpoint, source_files, source_folder,
                         with_user_hints)
from cbs_convert.errors import CheckpointError, RecipeError, WorkdirError, WriteError, is_warning
from cbs_convert.families import detect
from cbs_convert.storage.files import atomic_write_json, check_writable
from cbs_convert.stages.finetune import (FinetuneSettings, base_lr_scale, boundary_velocity, expert_defaults, finetune_expert, relative_error,
                       seam_gap_of)
from cbs_convert.stages.profile import Profile, profile_model
from cbs_convert.stages.depth import RecoverySettings, allocate_depth, choose_blocks, target_depth
from cbs_convert.stages.prune import calibration_batches, prune_state_dict
from cbs_convert.pipeline.ranks import barrier as _barrier, distributed as _distributed, plan_ranks, resolve_device as _resolve_device
from cbs_convert.pipeline.recipe import (FIRST_DEFAULTS, NOT_IDENTITY, Recipe, build_recipe, bundled_recipe, profiled_monitors,
                     read_recipe_file)
from cbs_convert.storage.routed_file import run_description, save_routed_from_files, save_safetensors_atomic, save_shared_base
from cbs_convert.sample import sample_ode
from cbs_convert.models.shared_base import SharedBaseModel, describe_shared_base
from cbs_convert.stages.split import Split, allocate_widths, budget_targets, check_budget_feasible, parse_budget, plan_split
from cbs_convert.storage.workdir import MARKER, WorkDir


@dataclass
class ConversionResult:
    output: Optional[Path]  # None for a profile-only preview
    report: Dict[str, Any]
    report_files: List[Path] = field(default_factory=list)


#: what a finished run keeps of its work directory: small, and what the report and a later
#: --resume of the profile and split need. The weights and optimizer states go (GBs at XL size).
KEPT_AFTER_SUCCESS = ("pool.safetensors", "profile.json", "split.json", "pruned/*.kept.json", "pruned/*.blocks.json",
                      "finetune/*.log.json")
#: the one training run of shared-base experts (--experts lora): the base and every delta together
SHARED_FILES = ("finetune/shared.safetensors", "finetune/shared.state.pt", "finetune/shared.log.json")


def work_files(k: int) -> List[str]:
    """Every file a run of ``k`` experts may write into its work directory (the marker's list)."""
    names = [MARKER, "pool.safetensors", "profile.json", "split.json"]
    for e in range(k):
        names += [f"pruned/expert_{e}.safetensors", f"pruned/expert_{e}.kept.json", f"pruned/expert_{e}.blocks.json",
                  f"pruned/expert_{e}.measured.safetensors",
                  f"finetune/expert_{e}.safetensors", f"finetune/expert_{e}.state.pt", f"finetune/expert_{e}.log.json",
                  f"finetune/expert_{e}.measured.safetensors"]
    return names + list(SHARED_FILES)


#: a loss still falling this much (relative) over the last 40% of training: the expert is clearly short of
#: training (a distillation loss keeps creeping down for long; the default 600 steps leave ~10% on the
#: bundled digits teacher, within 20% of its FD)
STILL_IMPROVING = 0.15
#: a routed model whose FD is this much above its teacher's (relative) is clearly under-trained
CLEARLY_WORSE_FD = 0.25


def late_improvement(losses: List[float]) -> Optional[float]:
    """How much the loss fell from the 20% of steps before the last 20% to the last 20% (relative);
    None for a run too short to tell. Minibatch noise averages out over each fifth."""
    fifth = len(losses) // 5
    if fifth < 4:
        return None
    earlier, last = float(np.mean(losses[-2 * fifth:-fifth])), float(np.mean(losses[-fifth:]))
    return 1 - last / earlier if earlier > 0 else None


def undertraining_verdicts(report: Dict[str, Any]) -> List[str]:
    """Warnings where the experts are measurably short of training, each with its measurement."""
    verdicts = []
    steps = report["finetune"]["settings"]["steps"]
    for k, expert in enumerate(report["finetune"]["experts"]):
        drop = expert.get("late_improvement")
        if drop is not None and drop > STILL_IMPROVING:
            verdicts.append(f"expert {k} was still improving when fine-tuning stopped: its loss fell {drop:.0%} over the "
                            f"last 40% of its {steps} steps; more --steps would help")
    quality = report.get("sample_quality") or {}
    if "delta_fd" in quality and quality["delta_fd"] > CLEARLY_WORSE_FD * quality["teacher"]["fd"]:
        verdicts.append(f"the routed model samples clearly worse than its teacher: FD {quality['converted']['fd']:.2f} "
                        f"against {quality['teacher']['fd']:.2f} on the same {quality['samples']} noises (ΔFD "
                        f"{quality['delta_fd']:+.2f}); the experts are under-trained at --steps {steps}, more steps would help")
    return verdicts


def _read_json(path: Path):
    return json.loads(path.read_text())


def _expert_groups(layout) -> Dict[int, Any]:
    """A process group per expert trained by several ranks (created on every rank, in one order)."""
    if layout.group_size <= 1:
        return {}
    import torch.distributed as dist

    return {k: dist.new_group(ranks) for k, ranks in enumerate(layout.experts)}


def default_output(checkpoint: str, k: int) -> Path:
    return Path.cwd() / f"{model_name(bundled_or_given(checkpoint))}-cbs-k{k}.safetensors"


def resolve_recipe(user_layers: List[Dict[str, Any]], source_config_stem=None) -> Recipe:
    merged_user: Dict[str, Any] = {}
    for layer in user_layers:
        merged_user.update({k: v for k, v in layer.items() if v is not None})
    layers: List[Dict[str, Any]] = []
    bundled = bundled_recipe(source_config_stem, merged_user.get("k", Recipe.k))
    if bundled is not None:
        layers.append(read_recipe_file(bundled))
    return build_recipe(*layers, merged_user)


#: samples per model for the sample-quality check of a bundled teacher's conversion
QUALITY_SAMPLES = 500


class Conversion:
    """One conversion run. ``run()`` executes the stages; each is also a method of its own."""

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

    @property
    def shared_base(self) -> bool:
        """Whether the experts are one shared base with a delta per segment (--experts lora)."""
        return self.recipe.experts == "lora"

    # -- stages ---------------------------------------------------------------------------------
    def load(self):
        began = time.time()
        self.source = read_checkpoint(self.user_settings["checkpoint"])
        hints = with_user_hints(self.source.hints, self.user_settings)
        self.family, self.notes = detect(self.source.state_dict, hints)
        for note in self.notes + self.source.notes:
            if is_warning(note):
                self.warn(note)
        self.config = self.family.config
        self.recipe = resolve_recipe([self.user_settings], self.family.recipe_name(self.config))
        self.device = _resolve_device(self.recipe.device)
        # The teacher shares storage with the source tensors; neither is ever written to.
        self.teacher = self.family.instantiate(self.config, self.source.state_dict)
        self.teacher.to(self.device).eval().requires_grad_(False)
        self.source_params = self.family.param_count(self.config)
        total = parse_budget(self.recipe.budget, self.source_params)
        check_budget_feasible(self.family, self.config, total, self.recipe.k)
        if self.recipe.structure == "depth" and not self.family.removable_blocks(self.config):
            raise RecipeError(f"--structure depth: the {self.family.name} family has no blocks that can be removed whole "
                              "(a UNet's skip connections tie its blocks together); use --structure width")
        if self.shared_base and self.config.get("use_checkpoint"):
            # SharedBaseModel turns it off (a recomputed block would lose its delta): say so, since
            # the memory it was asked to save is not saved
            self.warn("--use-checkpoint does not apply to --experts lora: the shared base trains without activation "
                      "checkpointing (its recomputation would run without the deltas); lower --batch-size if memory is short")
        if total > self.recipe.k * self.source_params:
            self.warn(
                f"budget {self.recipe.budget} ({total:,} parameters) is more than {self.recipe.k} full-width experts can use "
                f"({self.recipe.k} x {self.source_params:,}); an expert never grows past the source, so the total is "
                f"{self.recipe.k * self.source_params:,}"
            )
        if self.recipe.label_dropout is None:
            self.recipe.label_dropout = float(self.config.get("class_dropout_prob", 0.0))
        self.timings["load"] = time.time() - began

    def prepare_workdir(self):
        # the architecture flags count through the model they resolve to, not as typed
        skip = (*NOT_IDENTITY, *ARCHITECTURE_FLAGS)
        current = {k: v for k, v in self.recipe.to_dict().items() if k not in skip}
        defaults = {**{k: v for k, v in Recipe().to_dict().items() if k not in skip}, **FIRST_DEFAULTS}
        architecture = json.loads(json.dumps(self.config, default=str))  # as the marker stores it
        identity = {"source_sha256": self.source.sha256, "recipe": current, "architecture": architecture}
        self.work.start(identity, work_files(self.recipe.k),
                        resume=self.resume, force=self.force, defaults=defaults)

    def say(self, message: str) -> None:
        """A stage's one line of what it is doing, on stderr beside the progress bars."""
        if self.progress and int(os.environ.get("RANK", "0")) == 0:
            from tqdm.auto import tqdm

            tqdm.write(f"cbs_convert: {message}", file=sys.stderr)

    def warn(self, message: str) -> None:
        """Something the user should know now, not only in the report: printed at once, reported."""
        self.warnings.append(str(message))
        if self.on_warning is not None:
            self.on_warning(str(message))

    def pool(self, rank: int = 0, world: int = 1):
        """The x0 pool: the user's data, or the teacher's own samples, drawn by all ranks in turns."""
        began = time.time()
        path = self.work.path("pool.safetensors")
        r = self.recipe
        if r.data:
            from cbs_convert.stages.data import load_latents

            x0, labels = load_latents(r.data, self.family.sample_shape(self.config), r.pool_size, r.seed)
            if self.family.num_classes(self.config) and labels is None:
                raise RecipeError(f"--data {r.data} has no labels but the model is class-conditional")
            self.pool_source = f"data ({r.data}, {x0.shape[0]} latents)"
        elif path.exists():
            from safetensors.torch import load_file

            stored = load_file(str(path))
            x0, labels = stored["x0"], stored.get("labels")
            self.pool_source = f"teacher ODE samples ({x0.shape[0]}, {r.ode_steps} Heun steps)"
        else:
            x0, labels = self._teacher_samples(rank, world)
            tensors = {"x0": x0}
            if labels is not None:
                tensors["labels"] = labels
            if rank == 0:
                save_safetensors_atomic(tensors, path)
            self.pool_source = f"teacher ODE samples ({x0.shape[0]}, {r.ode_steps} Heun steps)"
        self.x0_pool = x0.to(self.device)
        self.labels_pool = None if labels is None else labels.to(self.device)
        self.timings["pool"] = time.time() - began

    def _teacher_samples(self, rank: int = 0, world: int = 1):
        r = self.recipe
        generator = torch.Generator().manual_seed(r.seed)
        classes = self.family.num_classes(self.config)
        labels = torch.randint(0, classes, (r.pool_size,), generator=generator) if classes else None
        shape = self.family.sample_shape(self.config)
        chunk = 64
        starts = list(range(0, r.pool_size, chunk))
        bar = _bar(self.progress and rank == 0, len(starts[rank::world]),
                   "teacher samples" if world == 1 else f"teacher samples (1/{world} per process)")
        chunks: Dict[int, torch.Tensor] = {}
        for i, start in enumerate(starts):
            n = min(chunk, r.pool_size - start)
            # every rank draws every chunk's noise, so the pool is one process's whatever the launch
            noise = torch.randn((n, *shape), generator=generator)
            if i % world != rank:
                continue
            y = None if labels is None else labels[start:start + n].to(self.device)
            x = sample_ode(self.family, self.teacher, (n, *shape), y, steps=r.ode_steps, device=self.device, noise=noise.to(self.device))
            chunks[i] = x.cpu()
            bar.update(1)
        bar.close()
        if world > 1:
            import torch.distributed as dist

            shares: List[Dict[int, torch.Tensor]] = [None] * world  # type: ignore[list-item]
            dist.all_gather_object(shares, chunks)
            chunks = {i: x for share in shares for i, x in share.items()}
        x0 = torch.cat([chunks[i] for i in range(len(starts))])
        if not torch.isfinite(x0).all():
            raise CheckpointError("the teacher's ODE samples diverged (NaN/Inf); check --family/--path or pass --data")
        return x0, labels

    def profile(self, rank: int = 0, world: int = 1):
        """Every rank measures its share of the grid points; rank 0 writes the whole profile."""
        began = time.time()
        path = self.work.path("profile.json")
        r = self.recipe
        if path.exists():
            self.profile_result = Profile.from_dict(_read_json(path))
        elif not profiled_monitors(r):
            self.profile_result = None
        else:
            monitors = profiled_monitors(r)
            grid = np.linspace(r.t_min, r.t_max, r.grid).tolist()
            bar = _bar(self.progress and rank == 0, len(range(rank, r.grid, world)) * r.profile_batches,
                       "profile" if world == 1 else f"profile (1/{world} of the grid per process)")
            self.profile_result = profile_model(
                self.family, self.teacher, self.x0_pool, self.labels_pool, grid, monitors,
                r.profile_batches, r.profile_batch_size, r.seed, self.pool_source, bar,
                student=self._sensitivity_student, derivatives=r.derivatives, rank=rank, world=world,
            )
            bar.close()
            added = [m for m in monitors if m not in r.monitors]
            if added:
                # the recipe keeps --monitors as given, so the profile says why it holds more curves
                self.profile_result.notes.append(
                    f"profiled {', '.join(added)} as well as --monitors [{', '.join(r.monitors)}]: "
                    f"the cuts or the budget shares are read from {'it' if len(added) == 1 else 'them'}")
            if rank == 0:
                atomic_write_json(path, self.profile_result.to_dict())
        self.timings["profile"] = time.time() - began

    def _sensitivity_student(self):
        """The student of the sensitivity monitor: one expert of the mean size this run's budget gives
        (budget / K, capped at the source), pruned as the experts are, with importance measured over
        all of [0, 1], and not fine-tuned."""
        from cbs_convert.stages.profile import pruned_student

        r = self.recipe
        target = budget_targets(parse_budget(r.budget, self.source_params), [1.0 / r.k] * r.k, self.source_params)[0]
        student = pruned_student(
            self.family, self.teacher, target, r.prune, self.x0_pool, self.labels_pool,
            state_dict=self.source.state_dict, calib_batches=r.calib_batches, batch_size=r.batch_size, seed=r.seed,
        )
        return student.to(self.device)

    def split(self):
        path = self.work.path("split.json")
        r = self.recipe
        if path.exists():
            stored = _read_json(path)
            self.split_result = Split.from_dict(stored["split"])
            self.expert_configs = stored["configs"]
            self.targets = stored["targets"]
            return
        prof = self.profile_result
        # --split uniform/snr may profile other monitors than --monitor: then there is no cut curve
        profiled = prof is not None and r.monitor in prof.mean
        self.split_result = plan_split(
            r.k, r.split,
            grid=prof.grid if prof else None,
            phi=prof.curve(r.monitor) if profiled else None,
            monitor=r.monitor, boundaries=r.boundaries, min_width=r.min_width, gamma=r.gamma, floor=r.floor,
            allocation=r.allocation, curves=prof.mean if prof else None,
            log_snr=self.family.log_snr, t_range=(r.t_min, r.t_max),
        )
        if self.shared_base:
            # every expert is the whole source plus its delta: nothing to allocate
            self.targets = [self.source_params] * r.k
            self.expert_configs = [self.config] * r.k
            atomic_write_json(path, {"split": self.split_result.to_dict(), "targets": self.targets, "configs": self.expert_configs})
            return
        total = parse_budget(r.budget, self.source_params)
        self.targets = budget_targets(total, self.split_result.shares, self.source_params)
        self.say(f"allocating widths: {total:,} parameters over {r.k} experts, shares "
                 + ", ".join(f"{share:.3f}" for share in self.split_result.shares))
        shapes = ([allocate_depth(self.family, self.config, t) for t in self.targets] if r.structure == "depth"
                  else [self.config] * r.k)
        self.expert_configs = [allocate_widths(self.family, shape, t) for shape, t in zip(shapes, self.targets)]
        atomic_write_json(path, {"split": self.split_result.to_dict(), "targets": self.targets, "configs": self.expert_configs})

    # At most the teacher and one expert (with its training state) are in memory at a time: each
    # stage reads an expert from the work directory, measures it, and lets it go. What the report
    # needs of an expert is kept as numbers and small velocity tensors (``self.measured``).

    def prune(self, rank: int = 0, world: int = 1):
        """Each expert is pruned and measured by the rank that will write it, so under torchrun the
        experts are pruned side by side; rank 0 then collects the measurements."""
        began = time.time()
        r = self.recipe
        if self.shared_base:  # nothing to prune: before training every expert is the teacher exactly
            self.measured = {"before": {}, "after": {}}
            if rank == 0:
                self.say(f"measuring the teacher on each of the {r.k} segments ({r.eval_samples} samples each)")
                self.measured["before"] = {k: self._measure(k, self.teacher) for k in range(r.k)}
            self.timings["prune"] = time.time() - began
            return
        mine = [k for k in range(r.k) if self.layout.writer_of(k) == rank]
        if world > 1 and rank == 0:
            self.say(f"pruning the {r.k} experts on {min(world, r.k)} processes side by side")
        for k in mine:
            segment, config = self.split_result.segments[k], self.expert_configs[k]
            path = self.work.path(f"pruned/expert_{k}.safetensors")
            kept_path = self.work.path(f"pruned/expert_{k}.kept.json")
            measured_path = self.work.path(f"pruned/expert_{k}.measured.safetensors")
            if path.exists() and kept_path.exists():
                if measured_path.exists():
                    continue
                from safetensors.torch import load_file

                sd = load_file(str(path))
            else:
                self.say(f"pruning expert {k} [{segment[0]:.3f}, {segment[1]:.3f}] to "
                         f"{self.family.param_count(config):,} parameters ({r.prune} importance)")
                calibration = None
                if r.prune == "segment" or r.structure == "depth":
                    calibration = calibration_batches(
                        self.family, self.x0_pool, self.labels_pool, segment, r.calib_batches, r.batch_size, r.seed + 17 * k
                    )
                teacher, state, shape = self.teacher, self.source.state_dict, self.config
                blocks = None
                if r.structure == "depth":
                    blocks, record = choose_blocks(
                        self.family, self.teacher, self.source.state_dict, self.config, target_depth(self.family, config),
                        calibration, r.block_selector, segment=segment, x0_pool=self.x0_pool, labels_pool=self.labels_pool,
                        recovery=RecoverySettings(batch_size=r.batch_size, seed=r.seed + k))
                    self.say(f"expert {k} keeps blocks {', '.join(map(str, blocks))} of {target_depth(self.family, self.config)} "
                             f"({r.block_selector} selector)")
                    atomic_write_json(self.work.path(f"pruned/expert_{k}.blocks.json"), record)
                    state, shape = self.family.keep_blocks(self.source.state_dict, self.config, blocks)
                    teacher = self.family.instantiate(shape, dict(state)).to(self.device)
                sd, kept_tensors = prune_state_dict(
                    self.family, teacher, state, shape, config, r.prune, calibration, seed=r.seed + k
                )
                kept_json = {name: index.tolist() for name, index in kept_tensors.items()}
                if blocks is not None:
                    kept_json["blocks"] = blocks
                atomic_write_json(kept_path, kept_json)
                save_safetensors_atomic(sd, path)
            self.say(f"measuring expert {k} against the teacher ({r.eval_samples} samples of its segment)")
            self._save_measurement(measured_path, self._measure(k, self.family.instantiate(config, sd).to(self.device)))
            del sd
        _barrier(world)
        self.measured = {"before": {}, "after": {}}
        if rank == 0:
            self.measured["before"] = {k: self._load_measurement(self.work.path(f"pruned/expert_{k}.measured.safetensors"))
                                       for k in range(r.k)}
        self.timings["prune"] = time.time() - began

    @staticmethod
    def _save_measurement(path: Path, measured: Dict[str, Any]) -> None:
        tensors = {"error": torch.tensor([measured["error"]], dtype=torch.float64)}
        tensors.update({f"edge_{j}": v.detach().float().cpu().contiguous() for j, v in measured["edges"].items()})
        save_safetensors_atomic(tensors, path)

    @staticmethod
    def _load_measurement(path: Path) -> Dict[str, Any]:
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        return {"error": float(tensors.pop("error")[0]),
                "edges": {int(name.split("_")[1]): value for name, value in tensors.items()}}

    def trains(self, k: int) -> bool:
        """Whether expert k is fine-tuned: not with --steps 0, and not a full-width copy of the teacher
        under the distillation loss alone, whose gradient is exactly zero."""
        r = self.recipe
        return r.steps > 0 and not (r.loss == "distill" and self.expert_configs[k] == self.config)

    def shared_student(self, trained: bool) -> SharedBaseModel:
        """The shared-base model: the source's weights (cloned: the teacher keeps its own) with zero
        deltas, or what fine-tuning saved."""
        from safetensors.torch import load_file

        base = self.family.instantiate(self.config, {key: value.clone() for key, value in self.source.state_dict.items()})
        model = SharedBaseModel(self.family, base, self.split_result.boundaries, self.recipe.rank, seed=self.recipe.seed)
        if trained:
            model.load_state_dict(load_file(str(self.work.path(SHARED_FILES[0]))), strict=True)
        return model.to(self.device)

    def check_trainable(self) -> None:
        """Say before any pruning or training which experts cannot learn anything from the teacher."""
        r = self.recipe
        idle = [k for k in range(r.k) if r.steps > 0 and not self.trains(k)]
        if idle:
            which = "every expert is" if len(idle) == r.k else f"expert{'s' if len(idle) > 1 else ''} {', '.join(map(str, idle))} {'are' if len(idle) > 1 else 'is'}"
            self.warn(
                f"{which} a full-width copy of the teacher: distilling it has exactly zero gradient, so its "
                f"{r.steps} fine-tuning steps are skipped; --loss data (or both) with --data LATENTS trains it on data"
            )

    def expert_file(self, k: int) -> Path:
        """Where expert k's final weights are: fine-tuned, or as pruned when it is not trained."""
        return self.work.path(f"finetune/expert_{k}.safetensors" if self.trains(k) else f"pruned/expert_{k}.safetensors")

    def finetune(self, rank: int = 0, world: int = 1):
        began = time.time()
        r = self.recipe
        if r.steps == 0:
            return
        layout = getattr(self, "layout", None) or plan_ranks(world, r.k, r.batch_size)
        if self.shared_base:
            self._finetune_shared(rank, layout)
            self.timings["finetune"] = time.time() - began
            return
        from safetensors.torch import load_file

        for k, segment in enumerate(self.split_result.segments):
            if k not in layout.experts_of(rank) or not self.trains(k):
                continue
            settings = self.finetune_settings(k)
            final = self.work.path(f"finetune/expert_{k}.safetensors")
            if final.exists():
                continue
            writer = layout.writer_of(k) == rank
            # fresh tensors from the work directory: the pruned file stays as it was
            weights = load_file(str(self.work.path(f"pruned/expert_{k}.safetensors")))
            student = self.family.instantiate(self.expert_configs[k], weights)
            result = finetune_expert(
                self.family, self.teacher, student, segment, self.x0_pool, self.labels_pool,
                settings, state_path=self.work.path(f"finetune/expert_{k}.state.pt"), progress=self.progress and writer,
                description=f"expert {k} [{segment[0]:.3f}, {segment[1]:.3f}]", group=getattr(self, "groups", {}).get(k),
                feature_channels=self.feature_channels(k) if r.feature_weight > 0 else None,
                feature_blocks=self.feature_blocks(k) if r.feature_weight > 0 else None,
            )
            if not writer:
                del student, result, weights
                continue
            atomic_write_json(self.work.path(f"finetune/expert_{k}.log.json"), {"losses": result.losses, "seconds": result.seconds, "steps_run": result.steps_run,
                                                                                 "peak_cuda_bytes": result.peak_cuda_bytes})
            save_safetensors_atomic(result.model.state_dict(), final)
            self.work.remove([f"finetune/expert_{k}.state.pt"])  # the weights are saved: the state is spent
            del student, result, weights
        self.timings["finetune"] = time.time() - began

    def _finetune_shared(self, rank: int, layout) -> None:
        """One run trains the base and every delta on mixed-time batches over all of [0, 1]: each
        sample updates the base and its own segment's delta. It runs K x --steps, the steps the K
        copies would take together."""
        r = self.recipe
        final = self.work.path(SHARED_FILES[0])
        if final.exists() or not self.trains(0):
            return
        settings = self.finetune_settings(0)
        student = self.shared_student(trained=False)
        writer = layout.writer_of(0) == rank
        scale = base_lr_scale(r)
        self.say(f"fine-tuning the shared base (lr x{scale:g}) and {r.k} rank-{r.rank} deltas together, {settings.steps} steps")
        result = finetune_expert(
            self.family, self.teacher, student, (0.0, 1.0), self.x0_pool, self.labels_pool, settings,
            state_path=self.work.path(SHARED_FILES[1]), progress=self.progress and writer, description="shared base + deltas",
            group=getattr(self, "groups", {}).get(0),
            param_groups=[(student.delta_parameters(), 1.0), (student.base_parameters(), scale)],
        )
        if writer:
            atomic_write_json(self.work.path(SHARED_FILES[2]), {"losses": result.losses, "seconds": result.seconds,
                                                               "steps_run": result.steps_run, "peak_cuda_bytes": result.peak_cuda_bytes})
            save_safetensors_atomic(result.model.state_dict(), final)
            self.work.remove([SHARED_FILES[1]])

    def feature_channels(self, k: int):
        """The teacher's block-output channels expert k kept, from its pruning record."""
        kept = _read_json(self.work.path(f"pruned/expert_{k}.kept.json"))
        kept.pop("blocks", None)
        return self.family.feature_channels({name: torch.tensor(index) for name, index in kept.items()})

    def feature_blocks(self, k: int) -> Optional[List[str]]:
        """The teacher's blocks that expert k's blocks match: the ones it kept, under depth pruning."""
        blocks = _read_json(self.work.path(f"pruned/expert_{k}.kept.json")).get("blocks")
        return None if blocks is None else [self.family.removable_blocks(self.config)[i] for i in blocks]

    def finetune_settings(self, k: int) -> FinetuneSettings:
        """Expert k's fine-tuning settings: the recipe's, with its "auto" values settled by whether
        the expert is a full-width copy of the source or a pruned student."""
        r = self.recipe
        return FinetuneSettings(
            steps=r.steps * (r.k if self.shared_base else 1), batch_size=r.batch_size, weight_decay=r.weight_decay, ema_decay=r.ema_decay,
            lr_schedule=r.lr_schedule, warmup_steps=r.warmup_steps, lr_floor=r.lr_floor, grad_clip=r.grad_clip, label_dropout=r.label_dropout,
            loss=r.loss, distill_weight=r.distill_weight, data_weight=r.data_weight, feature_weight=r.feature_weight,
            feature_mask_sigma=r.feature_mask_sigma, margin=r.margin,
            checkpoint_every=r.checkpoint_every, bf16=r.bf16, seed=r.seed,
            **expert_defaults(r, full_width=self.expert_configs[k] == self.config),
        )

    def _merged_expert(self, model: SharedBaseModel, k: int):
        """Expert k of a shared-base model as a plain network: measured at its cuts as a copy would be."""
        return self.family.instantiate(self.config, model.merged_state_dict(k)).to(self.device)

    def _measure(self, k: int, model) -> Dict[str, Any]:
        """Expert k's error against the teacher on its segment, and its velocities at its cuts."""
        r = self.recipe
        args = (self.x0_pool, self.labels_pool, r.eval_samples)
        inner = self.split_result.boundaries[1:-1]
        edges = {j: boundary_velocity(self.family, model, inner[j], *args) for j in (k - 1, k) if 0 <= j < len(inner)}
        return {"error": relative_error(self.family, model, self.teacher, self.split_result.segments[k], *args), "edges": edges}

    def measure_final(self, rank: int = 0, world: int = 1):
        """Each trained expert is measured by the rank that wrote it; rank 0 collects them."""
        from safetensors.torch import load_file

        r = self.recipe
        if rank == 0 and any(self.trains(k) for k in range(r.k)):
            self.say(f"measuring the fine-tuned experts against the teacher ({r.eval_samples} samples each)")
        if self.shared_base:
            _barrier(world)
            if rank == 0:
                trained = self.trains(0)
                model = self.shared_student(trained) if trained else None
                for k in range(r.k):
                    self.measured["after"][k] = (self._measure(k, self._merged_expert(model, k)) if trained
                                                 else self.measured["before"][k])
            return
        for k, config in enumerate(self.expert_configs):
            if self.trains(k) and self.layout.writer_of(k) == rank:
                model = self.family.instantiate(config, load_file(str(self.expert_file(k)))).to(self.device)
                self._save_measurement(self.work.path(f"finetune/expert_{k}.measured.safetensors"), self._measure(k, model))
                del model
        _barrier(world)
        if rank != 0:
            return
        for k in range(r.k):
            self.measured["after"][k] = (self._load_measurement(self.work.path(f"finetune/expert_{k}.measured.safetensors"))
                                         if self.trains(k) else self.measured["before"][k])

    def finetune_summary(self) -> Dict[str, Any]:
        """The fine-tuning settings and each expert's loss curve, from the logs in the work directory."""
        r = self.recipe
        # the recipe as given ("auto" left as None), and below each expert's settings as they ran
        settings = {"steps": r.steps, "lr": r.lr, "lr_schedule": r.lr_schedule, "warmup_steps": r.warmup_steps,
                    "lr_floor": r.lr_floor, "loss": r.loss, "distill_weight": r.distill_weight,
                    "data_weight": r.data_weight, "feature_weight": r.feature_weight,
                    "feature_mask_sigma": r.feature_mask_sigma, "batch_size": r.batch_size, "ema_decay": r.ema_decay,
                    "ema_warmup": r.ema_warmup, "weight_decay": r.weight_decay, "grad_clip": r.grad_clip,
                    "margin": r.margin, "label_dropout": r.label_dropout, "bf16": r.bf16, "experts": r.experts}
        if self.shared_base:
            settings.update(rank=r.rank, base_lr_scale=base_lr_scale(r), joint_steps=r.steps * r.k)
        experts = []
        for k in range(r.k):
            entry: Dict[str, Any] = {"trained": self.trains(k)}
            if entry["trained"]:
                entry["settings"] = self.finetune_settings(k).to_dict()
            log_path = self.work.path(SHARED_FILES[2] if self.shared_base else f"finetune/expert_{k}.log.json")
            if entry["trained"] and log_path.exists():
                log = _read_json(log_path)
                losses = log["losses"]
                # at most 50 points of the curve, each the mean of its stretch of steps
                stretch = max(1, len(losses) // 50)
                curve = [(start + stretch, float(np.mean(losses[start:start + stretch])))
                         for start in range(0, len(losses), stretch)]
                entry.update(steps_run=log.get("steps_run", len(losses)), seconds=log.get("seconds"),
                             peak_cuda_bytes=log.get("peak_cuda_bytes"),
                             loss_first=losses[0] if losses else None, loss_last=losses[-1] if losses else None,
                             loss_curve=curve, late_improvement=late_improvement(losses))
            experts.append(entry)
            if self.shared_base:
                # one run trained them all: its log is reported once, under the first expert
                entry["joint"] = True
                experts += [{"trained": entry["trained"], "settings": entry.get("settings"), "joint": True}
                            for _ in range(1, r.k)]
                break
        return {"settings": settings, "experts": experts}

    def evaluate(self) -> Dict[str, Any]:
        before, after = self.measured["before"], self.measured["after"]
        experts = self.planned_experts()
        for k, expert in enumerate(experts):
            expert.update(error_before=before[k]["error"], error_after=after[k]["error"])
            chosen = self.work.path(f"pruned/expert_{k}.blocks.json")
            if chosen.exists():
                record = _read_json(chosen)
                expert.update(kept_blocks=record["kept"], block_selector=record["selector"])
        seams = []
        for j, boundary in enumerate(self.split_result.boundaries[1:-1]):
            seams.append({
                "boundary": boundary,
                "before": seam_gap_of(before[j]["edges"][j], before[j + 1]["edges"][j]),
                "after": seam_gap_of(after[j]["edges"][j], after[j + 1]["edges"][j]),
            })
        return {"experts": experts, "seams": seams}

    def planned_experts(self) -> List[Dict[str, Any]]:
        """What the split and the budget give each expert, before any pruning or training."""
        experts = []
        shared = self.shared_base_description() if self.shared_base else None
        for k, segment in enumerate(self.split_result.segments):
            config = self.expert_configs[k]
            params = self.family.param_count(config)
            if shared is not None:
                flops = self.family.forward_flops(config) + shared["delta_flops"]
                experts.append({"segment": list(segment), "share": self.split_result.shares[k], "delta_params": shared["delta_params"],
                                "target_params": shared["delta_params"], "params": shared["delta_params"], "params_vs_target": 0.0,
                                "flops": flops,
                                "flops_vs_source": flops / self.family.forward_flops(self.config),
                                "widths": {knob.name: config[knob.name] for knob in self.family.width_knobs(config)}})
                continue
            experts.append({
                "segment": list(segment),
                "share": self.split_result.shares[k],
                "target_params": self.targets[k],
                "params": params,
                "params_vs_target": params / self.targets[k] - 1,
                "flops": self.family.forward_flops(config),
                "flops_vs_source": self.family.forward_flops(config) / self.family.forward_flops(self.config),
                "widths": {knob.name: config[knob.name] for knob in self.family.width_knobs(config)},
            })
        return experts

    def shared_base_description(self) -> Dict[str, Any]:
        if getattr(self, "_shared_description", None) is None:
            self._shared_description = describe_shared_base(self.family, self.split_result.boundaries, self.recipe.rank)
        return self._shared_description

    def report(self, evaluation: Dict[str, Any]) -> Dict[str, Any]:
        r = self.recipe
        achieved = sum(e["params"] for e in evaluation["experts"])
        if self.shared_base:
            achieved += self.shared_base_description()["base_params"]
        return {
            "source": {
                "path": str(self.source.path),
                "sha256": self.source.sha256,
                "container": self.source.container,
                "dtype": self.source.dtype,
                "family": self.family.name,
                "architecture": self.family.describe(self.config),
                "params": self.source_params,
                "flops": self.family.forward_flops(self.config),
                "assumptions": self.notes + self.source.notes,
            },
            "profile": self.profile_result.to_dict() if self.profile_result else None,
            "split": self.split_result.to_dict(),
            "budget": {"setting": r.budget, "total": parse_budget(r.budget, self.source_params),
                       "achieved": achieved},
            "shared_base": self.shared_base_description() if self.shared_base else None,
            "evaluation": evaluation,
            "measured_on": {
                "error": f"||v_expert - v_teacher|| / ||v_teacher|| of canonical velocities on {r.eval_samples} x_t "
                         f"per expert, t uniform on its segment, x0 from the pool ({getattr(self, 'pool_source', 'none')})",
                "seam": f"2 ||v_left - v_right|| / (||v_left|| + ||v_right||) of the two neighbours on the same "
                        f"{r.eval_samples} x_t at the boundary time",
            },
            "warnings": self.warnings,
            "timings_s": self.timings,
            "recipe": r.to_dict(),
            "device": str(self.device),
        }

    def write_preview(self) -> ConversionResult:
        """The report of a profile-only run: the curves, every rule's cuts, the planned experts."""
        from cbs_convert.pipeline.report import write_reports

        report = self.report({"experts": self.planned_experts(), "seams": []})
        report["preview"] = True
        stem = Path(str(self.output).removesuffix(".safetensors") + ".preview")
        return ConversionResult(None, report, write_reports(report, stem))

    def write(self, evaluation: Dict[str, Any]) -> ConversionResult:
        from cbs_convert.pipeline.report import write_reports

        r = self.recipe
        report = self.report(evaluation)
        report["finetune"] = self.finetune_summary()
        layout = getattr(self, "layout", None)
        report["ranks"] = (layout or plan_ranks(1, r.k, r.batch_size)).to_dict()
        self.say(f"writing {self.output}")
        extra = run_description(self.family, self.source, report["profile"], report["split"], report["recipe"])
        if self.shared_base:
            save_shared_base(self.output, self.shared_student(trained=self.trains(0)), extra)
        else:
            save_routed_from_files(
                self.output, self.family, [self.expert_file(k) for k in range(r.k)], self.expert_configs,
                self.split_result.boundaries, extra=extra,
            )
        quality = self.sample_quality()
        if quality is not None:
            report["sample_quality"] = quality
        for verdict in undertraining_verdicts(report):
            self.warn(verdict)  # said now, and listed with the report's other warnings
        report["warnings"] = self.warnings
        report["workdir"] = self.tidy_workdir()
        files = write_reports(report, self.output)
        return ConversionResult(self.output, report, files)

    def sample_quality(self) -> Optional[Dict[str, Any]]:
        """For a bundled teacher (whose data and classifier ship with the package): FD and class
        match of the routed model against the teacher, on the same noise and labels."""
        from cbs_convert.errors import UserError
        from cbs_convert.evaluation.metrics import bundled_dataset, paired_sample_quality
        from cbs_convert.storage.routed_file import load as load_routed

        dataset = bundled_dataset(self.source.sha256)
        if dataset is None:
            return None
        self.say(f"scoring {QUALITY_SAMPLES} samples of the routed model and of the teacher ({dataset.name} classifier)")
        try:
            routed = load_routed(self.output, device=self.device)
            return paired_sample_quality(self.family, self.teacher, routed, dataset, QUALITY_SAMPLES, device=self.device)
        except UserError as exc:  # e.g. the dataset's reference images are not installed
            return {"dataset": dataset.name, "skipped": str(exc)}

    def tidy_workdir(self) -> Dict[str, Any]:
        """Once the routed file is written, drop the weights and optimizer states from the work dir."""
        from fnmatch import fnmatch

        listed = work_files(self.recipe.k)
        present = [n for n in listed if (self.workdir / n).is_file()]
        heavy = [n for n in present if n != MARKER and not any(fnmatch(n, pattern) for pattern in KEPT_AFTER_SUCCESS)]
        kept = [n for n in present if n not in heavy]
        summary = {"path": str(self.workdir), "kept": kept, "kept_bytes": self.work.size_of(kept),
                   "removable": heavy, "removable_bytes": self.work.size_of(heavy), "removed": not self.keep_workdir}
        if not self.keep_workdir:
            self.work.remove(heavy)
        return summary

    def run(self) -> ConversionResult:
        try:
            return self._run()
        except WriteError as exc:
            raise WriteError(f"{exc}; the work directory {self.workdir} is kept: fix that, then rerun with --resume") from None

    def _run(self) -> ConversionResult:
        began = time.time()
        rank, world = _distributed()
        self.load()
        # the launch is checked before anything is computed (the recipe needs the architecture)
        # shared-base experts train as one model: its ranks form one data-parallel group
        self.layout = plan_ranks(world, 1 if self.shared_base else self.recipe.k, self.recipe.batch_size)
        self.groups = _expert_groups(self.layout)
        if rank == 0:
            self.prepare_workdir()
        _barrier(world)
        torch.manual_seed(self.recipe.seed)
        # Pool and profile: every rank has checked for the stored file before any can finish the gather
        # that precedes rank 0's writing it, so all of them either read it or compute their share.
        self.pool(rank, world)
        self.profile(rank, world)
        if rank == 0:
            self.split()
            self.check_trainable()
        _barrier(world)
        if rank != 0:
            self.split()
        if self.preview:
            return self.write_preview() if rank == 0 else ConversionResult(None, {})
        self.prune(rank, world)  # ends at a barrier: every rank then reads its experts' pruned weights
        self.finetune(rank, world)
        self.measure_final(rank, world)
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
        if rank != 0:
            return ConversionResult(self.output, {})
        evaluation = self.evaluate()
        self.timings["total"] = time.time() - began
        return self.write(evaluation)


class _NullBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def _bar(enabled: bool, total: int, description: str):
    if not enabled:
        return _NullBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, leave=False, dynamic_ncols=True)


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
    import warnings

    warnings.warn(message, UserWarning, stacklevel=3)
