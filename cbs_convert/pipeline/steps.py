"""The stages before the experts, as plain functions over plain objects: load the source, draw the
x0 pool, profile the teacher, split time and allocate the budget.

Each takes what the stages before it returned and returns its own result; none reads or writes a
work directory (``conversion.Conversion`` stores their results there, for resume). A library user
can call them one by one:

    source, recipe = load_source({"checkpoint": "model.pt", "k": 2})
    pool = teacher_pool(source, recipe)
    plan = plan_experts(source, recipe, profile_source(source, recipe, pool), pool=pool)

and go on with ``experts.prune_expert`` and ``experts.finetune_one`` for each expert.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from cbs_convert.errors import BudgetError, CheckpointError, RecipeError, is_warning
from cbs_convert.families import detect
from cbs_convert.families.base import Family
from cbs_convert.pipeline.ranks import gather, resolve_device
from cbs_convert.pipeline.recipe import Recipe, profiled_monitors, resolve_recipe
from cbs_convert.sample import sample_ode
from cbs_convert.sample.schedules import PROFILE_MONITOR, allocate
from cbs_convert.stages.data import load_latents
from cbs_convert.stages.depth import allocate_depth
from cbs_convert.stages.profile import Profile, profile_model, pruned_student
from cbs_convert.stages.prune import calibration_batches, unit_scores
from cbs_convert.stages.budget import (allocate_widths, budget_targets, check_budget_feasible, parse_budget,
                                       spread_over_blocks)
from cbs_convert.stages.split import Split, check_curve, plan_split
from cbs_convert.storage.checkpoint import SourceCheckpoint, read_checkpoint, with_user_hints


def silent(message: str) -> None:
    """The default listener of a stage's messages and warnings: a library call prints nothing."""


@dataclass
class Source:
    """The source model as the stages use it: its file, its family and architecture, and the
    teacher network built from it on the run's device."""
    checkpoint: SourceCheckpoint
    family: Family
    config: Dict[str, Any]
    notes: List[str]  # what detection assumed
    teacher: nn.Module  # shares storage with the checkpoint's tensors; neither is ever written to
    params: int
    device: torch.device

    @property
    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self.checkpoint.state_dict


@dataclass
class Pool:
    """The x0 that every later stage draws its x_t from: the user's data or the teacher's samples."""
    x0: torch.Tensor
    labels: Optional[torch.Tensor]
    description: str  # where the x0 came from, as the report says it

    def to(self, device) -> "Pool":
        return Pool(self.x0.to(device), None if self.labels is None else self.labels.to(device), self.description)

    def digest(self) -> str:
        """SHA-256 of the pool's values, shapes and dtypes: what a resumed run must read again."""
        digest = hashlib.sha256()
        for tensor in (self.x0, self.labels):
            if tensor is None:
                digest.update(b"none")
                continue
            tensor = tensor.detach().cpu()
            digest.update(f"{tuple(tensor.shape)} {tensor.dtype}".encode())
            flat = tensor.reshape(-1)
            if flat.numel():  # hashed through the buffer protocol: no second copy of a large pool
                if flat.stride(0) != 1:  # a strided view, or one element kept from a slice
                    flat = flat.clone(memory_format=torch.contiguous_format)
                digest.update(flat.view(torch.uint8).numpy())
        return digest.hexdigest()


@dataclass
class Plan:
    """The split of time into segments, and what the budget gives each segment's expert."""
    split: Split
    targets: List[int]  # parameters
    configs: List[Dict[str, Any]]  # architectures
    trunk: Optional[Dict[str, Any]] = None  # --trunk-steps: the shared student's architecture, which every expert's contains

    def to_dict(self) -> Dict[str, Any]:
        return {"split": self.split.to_dict(), "targets": self.targets, "configs": self.configs, "trunk": self.trunk}

    @classmethod
    def from_dict(cls, stored: Dict[str, Any]) -> "Plan":
        return cls(Split.from_dict(stored["split"]), stored["targets"], stored["configs"], stored.get("trunk"))


class _NullBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def _bar(enabled: bool, total: int, description: str):
    if not enabled:
        return _NullBar()
    return tqdm(total=total, desc=description, leave=False, dynamic_ncols=True)


def load_source(settings: Dict[str, Any], warn: Callable[[str], None] = silent) -> Tuple[Source, Recipe]:
    """Read the checkpoint, recognise its family, settle the recipe (a published architecture's
    bundled recipe under ``settings``) and build the teacher; refuse a recipe this model cannot run.
    ``warn`` hears what the user should know at once."""
    checkpoint = read_checkpoint(settings["checkpoint"])
    family, notes = detect(checkpoint.state_dict, with_user_hints(checkpoint.hints, settings))
    for note in notes + checkpoint.notes:
        if is_warning(note):
            warn(note)
    config = family.config
    recipe = resolve_recipe([settings], family.recipe_name(config))
    device = resolve_device(recipe.device)
    teacher = family.instantiate(config, checkpoint.state_dict)
    teacher.to(device).eval().requires_grad_(False)
    source = Source(checkpoint, family, config, notes, teacher, family.param_count(config), device)
    _check_recipe(source, recipe, warn)
    return source, recipe


def _check_recipe(source: Source, recipe: Recipe, warn: Callable[[str], None]) -> None:
    """What the recipe asks of this model: refused when impossible, said when it differs from what
    was asked; the label dropout left unset becomes the teacher's own."""
    family, config, r = source.family, source.config, recipe
    total = parse_budget(r.budget, source.params)
    if r.structure == "depth" and not family.removable_blocks(config):
        raise RecipeError(f"--structure depth: the {family.name} family has no blocks that can be removed whole "
                          "(a UNet's skip connections tie its blocks together); use --structure width")
    if r.structure == "depth" and family.per_block_widths(config):
        raise RecipeError(f"--structure depth: {source.checkpoint.path} has widths of its own in each block (an expert of "
                          "--structure blockwise), which removing whole blocks does not keep track of; prune it with "
                          "--structure width or blockwise")
    if r.structure == "blockwise" and not family.block_unit_groups(config):
        raise RecipeError(f"--structure blockwise: the {family.name} family shares one width over its blocks "
                          "(a UNet's skip connections tie their channels together); use --structure width")
    # depth pruning can go down to one block before it narrows: its floor is that block's narrowest
    check_budget_feasible(family, family.with_depth(config, 1) if r.structure == "depth" else config, total, r.k)
    if r.structure == "depth" and "sensitivity" in profiled_monitors(r):
        check_budget_feasible(family, config, total, r.k, floor_of=f"the narrowest width-pruned {family.name}, the "
                              "sensitivity monitor's student", or_else=", or profile another monitor")
    if r.trunk_steps > 0 and r.warmup_steps is not None and r.warmup_steps >= r.trunk_steps:
        warn(f"the trunk's {r.trunk_steps} steps end inside the {r.warmup_steps}-step warm-up (--warmup-steps applies "
             "to the trunk as to each expert): it never trains at the peak lr; give a smaller --warmup-steps")
    if r.experts == "lora" and config.get("use_checkpoint"):
        # SharedBaseModel turns it off (a recomputed block would lose its delta): say so, since
        # the memory it was asked to save is not saved
        warn("--use-checkpoint does not apply to --experts lora: the shared base trains without activation "
             "checkpointing (its recomputation would run without the deltas); lower --batch-size if memory is short")
    if total > r.k * source.params:
        warn(
            f"budget {r.budget} ({total:,} parameters) is more than {r.k} full-width experts can use "
            f"({r.k} x {source.params:,}); an expert never grows past the source, so the total is "
            f"{r.k * source.params:,}"
        )
    if r.label_dropout is None:
        r.label_dropout = float(config.get("class_dropout_prob", 0.0))


def data_pool(source: Source, recipe: Recipe) -> Pool:
    """The pool from the user's latents (``--data``), on the CPU."""
    x0, labels = load_latents(recipe.data, source.family.sample_shape(source.config), recipe.pool_size, recipe.seed)
    if source.family.num_classes(source.config) and labels is None:
        raise RecipeError(f"--data {recipe.data} has no labels but the model is class-conditional")
    return Pool(x0, labels, f"data ({recipe.data}, {x0.shape[0]} latents)")


def teacher_pool_description(recipe: Recipe, samples: int) -> str:
    return f"teacher ODE samples ({samples}, {recipe.ode_steps} Heun steps)"


def teacher_pool(source: Source, recipe: Recipe, rank: int = 0, world: int = 1, progress: bool = False) -> Pool:
    """The teacher's own ODE samples, on the CPU. Under torchrun the ranks draw the chunks in turns
    and gather them, so every rank holds the pool one process would draw."""
    r, family = recipe, source.family
    generator = torch.Generator().manual_seed(r.seed)
    classes = family.num_classes(source.config)
    labels = torch.randint(0, classes, (r.pool_size,), generator=generator) if classes else None
    shape = family.sample_shape(source.config)
    chunk = 64
    starts = list(range(0, r.pool_size, chunk))
    bar = _bar(progress and rank == 0, len(starts[rank::world]),
               "teacher samples" if world == 1 else f"teacher samples (1/{world} per process)")
    chunks: Dict[int, torch.Tensor] = {}
    for i, start in enumerate(starts):
        n = min(chunk, r.pool_size - start)
        # every rank draws every chunk's noise, so the pool is one process's whatever the launch
        noise = torch.randn((n, *shape), generator=generator)
        if i % world != rank:
            continue
        y = None if labels is None else labels[start:start + n].to(source.device)
        x = sample_ode(family, source.teacher, (n, *shape), y, steps=r.ode_steps, device=source.device,
                       noise=noise.to(source.device))
        chunks[i] = x.cpu()
        bar.update(1)
    bar.close()
    chunks = gather(chunks, world)
    x0 = torch.cat([chunks[i] for i in range(len(starts))])
    if not torch.isfinite(x0).all():
        raise CheckpointError("the teacher's ODE samples diverged (NaN/Inf); check --family/--path or pass --data")
    return Pool(x0, labels, teacher_pool_description(r, x0.shape[0]))


def profile_grid(recipe: Recipe) -> List[float]:
    """The times the recipe's curves are measured at: the cuts' profile and the sampling steps' alike."""
    return np.linspace(recipe.t_min, recipe.t_max, recipe.grid).tolist()


def profile_source(source: Source, recipe: Recipe, pool: Pool, rank: int = 0, world: int = 1,
                   progress: bool = False) -> Optional[Profile]:
    """The monitors' curves on the recipe's grid; None when the split reads none. Under torchrun
    each rank measures its share of the grid times and every rank gets the whole profile."""
    r = recipe
    monitors = profiled_monitors(r)
    if not monitors:
        return None
    grid = profile_grid(r)
    bar = _bar(progress and rank == 0, len(range(rank, r.grid, world)) * r.profile_batches,
               "profile" if world == 1 else f"profile (1/{world} of the grid per process)")
    profile = profile_model(
        source.family, source.teacher, pool.x0, pool.labels, grid, monitors,
        r.profile_batches, r.profile_batch_size, r.seed, pool.description, bar,
        student=partial(sensitivity_student, source, recipe, pool), derivatives=r.derivatives, rank=rank, world=world,
    )
    bar.close()
    added = [m for m in monitors if m not in r.monitors]
    if added:
        # the recipe keeps --monitors as given, so the profile says why it holds more curves
        profile.notes.append(
            f"profiled {', '.join(added)} as well as --monitors [{', '.join(r.monitors)}]: "
            f"the cuts or the budget shares are read from {'it' if len(added) == 1 else 'them'}")
    return profile


#: grid-point batches of the step profile: the steps follow a curve tempered to the power 1/4, which asks
#: less precision of it than the cuts ask of theirs
STEP_PROFILE_BATCHES = 2


def step_profile(source: Source, recipe: Recipe, pool: Pool) -> Profile:
    """The curve the ``profile`` sampling schedule places steps by (``PROFILE_MONITOR``), measured on the
    teacher and the run's pool at the recipe's grid, for the routed file to carry: ``--schedule profile``
    then needs no model calls of its own. The experts are trained to match the teacher on their
    segments, so its curve stands for theirs."""
    r = recipe
    grid = profile_grid(r)
    began = time.time()
    profile = profile_model(source.family, source.teacher, pool.x0, pool.labels, grid, [PROFILE_MONITOR],
                            min(STEP_PROFILE_BATCHES, r.profile_batches), r.profile_batch_size, r.seed,
                            pool.description, derivatives=r.derivatives)
    profile.notes.append(f"measured at conversion for the profile sampling schedule in {time.time() - began:.3g} s")
    # a curve that could not place steps is not stored: a loader would refuse the whole file for it
    check_curve(profile.grid, profile.mean[PROFILE_MONITOR], PROFILE_MONITOR, "place sampling steps",
                "the routed file is written without it, and --schedule profile measures one when asked")
    return profile


def sensitivity_student(source: Source, recipe: Recipe, pool: Pool) -> nn.Module:
    """The student of the sensitivity monitor: one expert of the mean size this run's budget gives
    (budget / K, capped at the source), width-pruned as ``--prune`` scores units, with importance
    measured over all of [0, 1], and not fine-tuned. Uniform width whatever ``--structure``: the
    curve places the cuts, and per-block widths and kept blocks are chosen on each expert's segment,
    after the cuts."""
    r = recipe
    target = budget_targets(parse_budget(r.budget, source.params), [1.0 / r.k] * r.k, source.params)[0]
    student = pruned_student(
        source.family, source.teacher, target, r.prune, pool.x0, pool.labels,
        state_dict=source.state_dict, calib_batches=r.calib_batches, batch_size=r.batch_size, seed=r.seed,
    )
    return student.to(source.device)


def expert_calibration(source: Source, recipe: Recipe, pool: Pool, segment: Tuple[float, float], k: int):
    """Expert k's calibration batches on its segment: the inputs its units are scored on, the same
    wherever they are scored (the blockwise plan, the pruning)."""
    r = recipe
    return calibration_batches(source.family, pool.x0, pool.labels, segment, r.calib_batches, r.batch_size, r.seed + 17 * k)


def expert_unit_scores(source: Source, recipe: Recipe, pool: Pool, segment, k: int, config: Dict[str, Any]):
    """The importance of every unit of the source for expert k (of architecture ``config``)."""
    r = recipe
    calibration = expert_calibration(source, r, pool, segment, k) if r.prune == "segment" else None
    groups = source.family.unit_groups(source.config, config)
    return unit_scores(source.teacher, groups, r.prune, calibration, seed=r.seed + k)


def plan_experts(source: Source, recipe: Recipe, profile: Optional[Profile],
                 say: Callable[[str], None] = silent, pool: Optional[Pool] = None) -> Plan:
    """Cut time into the recipe's K segments and give each expert its share of the budget as an
    architecture (``--experts lora``: every expert is the whole source; ``--structure blockwise``:
    its heads and MLP channels given out over its blocks by their importance on its segment, which
    is measured on ``pool``)."""
    r, family = recipe, source.family
    # --split uniform/snr may profile other monitors than --monitor: then there is no cut curve
    profiled = profile is not None and r.monitor in profile.mean
    split = plan_split(
        r.k, r.split,
        grid=profile.grid if profile else None,
        phi=profile.curve(r.monitor) if profiled else None,
        monitor=r.monitor, boundaries=r.boundaries, min_width=r.min_width, gamma=r.gamma, floor=r.floor,
        allocation=r.allocation, curves=profile.mean if profile else None,
        log_snr=family.log_snr, t_range=(r.t_min, r.t_max),
    )
    if r.experts == "lora":
        # every expert is the whole source plus its delta: nothing to allocate
        return Plan(split, [source.params] * r.k, [source.config] * r.k)
    total = parse_budget(r.budget, source.params)
    targets = budget_targets(total, split.shares, source.params)
    say(f"allocating widths: {total:,} parameters over {r.k} experts, shares "
        + ", ".join(f"{share:.3f}" for share in split.shares))
    if r.trunk_steps > 0:
        # one student for all of time at the widest expert's size, its structure chosen over all of
        # time; each expert is then that student narrowed to its own size, so it can start from it
        widest = max(targets)
        trunk = structured_config(source, r, pool, widest, ALL_TIME, r.k, say, "the trunk")
        try:
            # the widest experts are the trunk itself: it already meets their target
            configs = [trunk if t == widest else allocate_widths(family, trunk, t) for t in targets]
        except BudgetError as exc:
            raise BudgetError(f"{exc} (that expert is cut from the trunk of --trunk-steps, {family.describe(trunk)}); "
                              "or convert without --trunk-steps") from None
        return Plan(split, targets, configs, trunk)
    configs = [structured_config(source, r, pool, t, segment, k, say, f"expert {k}")
               for k, (segment, t) in enumerate(zip(split.segments, targets))]
    return Plan(split, targets, configs)


#: the segment of a student that learns all of time (the trunk of --trunk-steps)
ALL_TIME = (0.0, 1.0)


def structured_config(source: Source, recipe: Recipe, pool: Optional[Pool], target: int, segment, index: int,
                      say=silent, name: str = "expert") -> Dict[str, Any]:
    """The architecture of ``target`` parameters that the recipe's structure gives a student of
    ``segment``: uniform widths, whole blocks first (depth), or widths spread over the blocks by
    their units' importance on the segment (blockwise; ``index`` seeds its calibration)."""
    r, family = recipe, source.family
    shape = allocate_depth(family, source.config, target) if r.structure == "depth" else source.config
    config = allocate_widths(family, shape, target)
    if r.structure != "blockwise":
        return config
    if pool is None:
        raise ValueError("--structure blockwise scores units on the pool: pass plan_experts(..., pool=)")
    scores = expert_unit_scores(source, r, pool, segment, index, config)
    spread = spread_over_blocks(family, source.config, config, scores)
    if family.param_count(spread) != family.param_count(config):
        raise AssertionError(f"blockwise widths of {name} changed its parameter count")  # a family's bug
    say(f"{name}: {family.describe(spread)}")
    return spread


def expert_steps(recipe: Recipe, plan: Plan) -> List[int]:
    """Each expert's fine-tuning steps: ``--steps`` each, or with ``--step-shares length`` the same
    total given out by segment length (at least one step each, largest remainders first)."""
    r = recipe
    if r.step_shares == "equal" or r.steps == 0:
        return [r.steps] * r.k
    return allocate(r.steps * r.k, [hi - lo for lo, hi in plan.split.segments])


def trains(source: Source, recipe: Recipe, plan: Plan, k: int) -> bool:
    """Whether expert k is fine-tuned: not with --steps 0, and not when it cannot learn. (A trunk is
    as wide as the widest expert, so a full-width expert's trunk is the teacher too.)"""
    return recipe.steps > 0 and can_learn(source, recipe, plan.configs[k])


def trunk_trains(source: Source, recipe: Recipe, plan: Plan) -> bool:
    """Whether the run has a trunk (--trunk-steps) that learns anything."""
    return plan.trunk is not None and can_learn(source, recipe, plan.trunk)


def can_learn(source: Source, recipe: Recipe, config: Dict[str, Any]) -> bool:
    """Whether a student of ``config`` can learn from the recipe's loss: a full-width copy of the
    teacher under distillation alone has exactly zero gradient."""
    return not (recipe.loss == "distill" and config == source.config)


def idle_experts(source: Source, recipe: Recipe, plan: Plan) -> Optional[str]:
    """The warning, before any pruning or training, about experts (or a trunk) that cannot learn
    anything from the teacher."""
    r = recipe
    idle = [k for k in range(r.k) if r.steps > 0 and not trains(source, r, plan, k)]
    if plan.trunk is not None and not trunk_trains(source, r, plan):
        return (f"the trunk is a full-width copy of the teacher (its widest expert is): distilling it has exactly "
                f"zero gradient, so its {r.trunk_steps} steps are skipped and the narrower experts are cut from the "
                "source; --loss data (or both) with --data LATENTS trains it on data"
                + (f" (and the same holds for expert{'s' if len(idle) > 1 else ''} {', '.join(map(str, idle))})" if idle else ""))
    if not idle:
        return None
    which = "every expert is" if len(idle) == r.k else f"expert{'s' if len(idle) > 1 else ''} {', '.join(map(str, idle))} {'are' if len(idle) > 1 else 'is'}"
    skipped = sorted({expert_steps(r, plan)[k] for k in idle})
    return (f"{which} a full-width copy of the teacher: distilling it has exactly zero gradient, so its "
            f"{' and '.join(map(str, skipped))} fine-tuning steps are skipped; --loss data (or both) with --data "
            "LATENTS trains it on data")
