"""The stages of one expert, as plain functions over the objects of ``steps``: prune it, turn the
recipe into its fine-tuning settings, fine-tune it (or the shared base with every delta), measure it
against the teacher. None reads or writes a work directory; ``distributed`` does, for the ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from cbs_convert.models.shared_base import SharedBaseModel
from cbs_convert.pipeline.recipe import Recipe
from cbs_convert.pipeline.steps import ALL_TIME, Plan, Pool, Source, expert_calibration, expert_steps, silent
from cbs_convert.stages.depth import RecoverySettings, choose_blocks, target_depth
from cbs_convert.stages.finetune import (BASE_LR_SCALE, DELTA_LR, FULL_WIDTH_LR, PRUNED_LR, FinetuneResult, FinetuneSettings,
                                         boundary_velocity, finetune_expert, relative_error)
from cbs_convert.stages.prune import prune_state_dict

Measurements = Dict[int, Dict[str, Any]]  # expert -> its ``measure`` record


@dataclass
class PrunedExpert:
    state_dict: Dict[str, torch.Tensor]
    kept: Dict[str, Any]  # each pruned tensor's kept indices (and "blocks" under depth pruning), as JSON
    blocks: Optional[Dict[str, Any]] = None  # the record of the block choice under --structure depth


@dataclass
class Trunk:
    """The shared student of --trunk-steps, trained on all of time: what the experts are cut from.
    ``kept`` is its pruning record against the source."""
    config: Dict[str, Any]
    state_dict: Dict[str, torch.Tensor]
    kept: Dict[str, Any]
    blocks: Optional[Dict[str, Any]] = None  # its block choice under --structure depth, which every expert keeps


def prune_expert(source: Source, recipe: Recipe, pool: Pool, plan: Plan, k: int, say=silent,
                 trunk: Optional[Trunk] = None) -> PrunedExpert:
    """Expert k cut from the source to its planned architecture, units chosen on its own segment
    (``--structure depth``: whole blocks first, chosen on the segment, then width). With a
    ``trunk``, it is cut from the trunk instead, in width only (the trunk has chosen the blocks), and
    its record names the source's units it holds, through the trunk's."""
    segment, config = plan.split.segments[k], plan.configs[k]
    if trunk is None:
        return cut_student(source, recipe, pool, segment, config, k, say, f"expert {k}")
    r, family = recipe, source.family
    say(f"cutting expert {k} [{segment[0]:.3f}, {segment[1]:.3f}] from the trunk to "
        f"{family.param_count(config):,} parameters ({r.prune} importance)")
    model = family.instantiate(trunk.config, dict(trunk.state_dict)).to(source.device)
    calibration = expert_calibration(source, r, pool, segment, k) if r.prune == "segment" else None
    sd, kept_tensors = prune_state_dict(family, model, trunk.state_dict, trunk.config, config, r.prune, calibration,
                                        seed=r.seed + k)
    return PrunedExpert(sd, compose_kept(trunk.kept, {group: index.tolist() for group, index in kept_tensors.items()}),
                        trunk.blocks)


def compose_kept(outer: Dict[str, Any], inner: Dict[str, Any]) -> Dict[str, Any]:
    """The record of a student cut from a student: ``inner``'s indices into ``outer``'s units, as
    indices into the source's (a unit group ``outer`` kept whole is the source's as it is)."""
    composed = {name: index for name, index in outer.items() if name not in inner}
    for name, index in inner.items():
        composed[name] = [outer[name][i] for i in index] if name in outer else index
    return composed


def prune_trunk(source: Source, recipe: Recipe, pool: Pool, plan: Plan, say=silent) -> PrunedExpert:
    """The trunk of --trunk-steps cut from the source to its planned architecture, its units chosen
    over all of time."""
    return cut_student(source, recipe, pool, ALL_TIME, plan.trunk, recipe.k, say, "the trunk")


def cut_student(source: Source, recipe: Recipe, pool: Pool, segment, config: Dict[str, Any], k: int,
                say=silent, name: str = "expert") -> PrunedExpert:
    """A student cut from the source to ``config`` for ``segment``; ``k`` (the expert's index, K
    for the trunk) seeds its draws."""
    r, family = recipe, source.family
    say(f"pruning {name} [{segment[0]:.3f}, {segment[1]:.3f}] to "
        f"{family.param_count(config):,} parameters ({r.prune} importance)")
    calibration = None
    if r.prune == "segment" or r.structure == "depth":
        calibration = expert_calibration(source, r, pool, segment, k)
    teacher, state, shape = source.teacher, source.state_dict, source.config
    blocks, record = None, None
    if r.structure == "depth":
        blocks, record = choose_blocks(
            family, source.teacher, source.state_dict, source.config, target_depth(family, config),
            calibration, r.block_selector, segment=segment, x0_pool=pool.x0, labels_pool=pool.labels,
            recovery=RecoverySettings(batch_size=r.batch_size, seed=r.seed + k))
        say(f"{name} keeps blocks {', '.join(map(str, blocks))} of {target_depth(family, source.config)} "
            f"({r.block_selector} selector)")
        state, shape = family.keep_blocks(source.state_dict, source.config, blocks)
        teacher = family.instantiate(shape, dict(state)).to(source.device)
    sd, kept_tensors = prune_state_dict(family, teacher, state, shape, config, r.prune, calibration, seed=r.seed + k)
    kept: Dict[str, Any] = {group: index.tolist() for group, index in kept_tensors.items()}
    if blocks is not None:
        kept["blocks"] = blocks
    return PrunedExpert(sd, kept, record)


def expert_defaults(recipe: Recipe, full_width: bool) -> dict:
    """The fine-tuning settings of one expert that the recipe leaves to its case (None there)."""
    auto_lr = DELTA_LR if recipe.experts == "lora" else FULL_WIDTH_LR if full_width else PRUNED_LR
    return {
        "lr": recipe.lr if recipe.lr is not None else auto_lr,
        "ema_warmup": recipe.ema_warmup if recipe.ema_warmup is not None else not full_width,
    }


def base_lr_scale(recipe: Recipe) -> float:
    """The shared base's lr as a multiple of the deltas' (``--experts lora``)."""
    return recipe.base_lr_scale if recipe.base_lr_scale is not None else BASE_LR_SCALE


def finetune_settings(source: Source, recipe: Recipe, plan: Plan, k: int) -> FinetuneSettings:
    """Expert k's fine-tuning settings: the recipe's, with its "auto" values settled by whether
    the expert is a full-width copy of the source or a pruned student."""
    r = recipe
    steps = r.steps * r.k if r.experts == "lora" else expert_steps(r, plan)[k]
    settings = student_settings(source, r, plan.configs[k], steps)
    if r.step_shares == "length" and r.warmup_steps is not None and r.steps > 0:
        # a warm-up given for an expert of --steps, scaled to this one's share: a short segment's
        # expert would otherwise spend its whole run warming up
        settings = replace(settings, warmup_steps=int(round(r.warmup_steps * steps / r.steps)))
    return settings


#: the trunk draws its batches from a seed of its own: the experts' first steps draw from the run's seed
TRUNK_SEED_OFFSET = 7919


def trunk_settings(source: Source, recipe: Recipe, plan: Plan) -> FinetuneSettings:
    """The trunk's fine-tuning settings (--trunk-steps): an expert's, for its own steps and seed."""
    return replace(student_settings(source, recipe, plan.trunk, recipe.trunk_steps), seed=recipe.seed + TRUNK_SEED_OFFSET)


def student_settings(source: Source, recipe: Recipe, config: Dict[str, Any], steps: int) -> FinetuneSettings:
    r = recipe
    return FinetuneSettings(
        steps=steps, batch_size=r.batch_size, weight_decay=r.weight_decay, ema_decay=r.ema_decay,
        lr_schedule=r.lr_schedule, warmup_steps=r.warmup_steps, lr_floor=r.lr_floor, grad_clip=r.grad_clip, label_dropout=r.label_dropout,
        loss=r.loss, distill_weight=r.distill_weight, data_weight=r.data_weight, feature_weight=r.feature_weight,
        feature_mask_sigma=r.feature_mask_sigma, margin=r.margin,
        checkpoint_every=r.checkpoint_every, bf16=r.bf16, seed=r.seed,
        **expert_defaults(r, full_width=config == source.config),
    )


def finetune_one(source: Source, recipe: Recipe, pool: Pool, plan: Plan, k: int, student: nn.Module,
                 kept: Optional[Dict[str, Any]] = None, **training) -> FinetuneResult:
    """Fine-tune expert k (``student``, as pruned) on its segment. ``kept`` is its pruning record,
    needed for feature distillation; ``training`` goes to ``finetune_expert`` (state_path, progress, group...)."""
    return train_student(source, recipe, pool, student, plan.split.segments[k], finetune_settings(source, recipe, plan, k),
                         f"expert {k}", kept, **training)


def finetune_trunk(source: Source, recipe: Recipe, pool: Pool, plan: Plan, student: nn.Module,
                   kept: Optional[Dict[str, Any]] = None, **training) -> FinetuneResult:
    """Train the trunk of --trunk-steps (``student``, as pruned) on all of time."""
    return train_student(source, recipe, pool, student, ALL_TIME, trunk_settings(source, recipe, plan), "trunk", kept,
                         **training)


def train_student(source: Source, recipe: Recipe, pool: Pool, student: nn.Module, segment, settings: FinetuneSettings,
                  name: str, kept: Optional[Dict[str, Any]], **training) -> FinetuneResult:
    features = recipe.feature_weight > 0
    return finetune_expert(
        source.family, source.teacher, student, segment, pool.x0, pool.labels, settings,
        description=f"{name} [{segment[0]:.3f}, {segment[1]:.3f}]",
        feature_channels=feature_channels(source, kept) if features else None,
        feature_blocks=feature_blocks(source, kept) if features else None, **training,
    )


def feature_channels(source: Source, kept: Dict[str, Any]):
    """The teacher's block-output channels an expert kept, from its pruning record."""
    units = {name: torch.tensor(index) for name, index in kept.items() if name != "blocks"}
    return source.family.feature_channels(units)


def feature_blocks(source: Source, kept: Dict[str, Any]) -> Optional[List[str]]:
    """The teacher's blocks that an expert's blocks match: the ones it kept, under depth pruning."""
    blocks = kept.get("blocks")
    return None if blocks is None else [source.family.removable_blocks(source.config)[i] for i in blocks]


def shared_student(source: Source, recipe: Recipe, plan: Plan,
                   trained: Optional[Dict[str, torch.Tensor]] = None) -> SharedBaseModel:
    """The shared-base model: the source's weights (cloned: the teacher keeps its own) with zero
    deltas, or the ``trained`` weights fine-tuning saved."""
    base = source.family.instantiate(source.config, {key: value.clone() for key, value in source.state_dict.items()})
    model = SharedBaseModel(source.family, base, plan.split.boundaries, recipe.rank, seed=recipe.seed)
    if trained is not None:
        model.load_state_dict(trained, strict=True)
    return model.to(source.device)


def finetune_shared(source: Source, recipe: Recipe, pool: Pool, plan: Plan, student: SharedBaseModel,
                    say=silent, **training) -> FinetuneResult:
    """One run trains the base and every delta on mixed-time batches over all of [0, 1]: each
    sample updates the base and its own segment's delta. It runs K x --steps, the steps the K
    copies would take together."""
    r = recipe
    settings = finetune_settings(source, r, plan, 0)
    scale = base_lr_scale(r)
    say(f"fine-tuning the shared base (lr x{scale:g}) and {r.k} rank-{r.rank} deltas together, {settings.steps} steps")
    return finetune_expert(
        source.family, source.teacher, student, (0.0, 1.0), pool.x0, pool.labels, settings,
        description="shared base + deltas",
        param_groups=[(student.delta_parameters(), 1.0), (student.base_parameters(), scale)], **training,
    )


def training_log(result: FinetuneResult) -> Dict[str, Any]:
    """What the report reads of a training run."""
    # no step count: the report counts the losses, which a log written before a resume also holds
    return {"losses": result.losses, "seconds": result.seconds,
            "resumed_at": result.resumed_at, "peak_cuda_bytes": result.peak_cuda_bytes}


def merged_expert(source: Source, model: SharedBaseModel, k: int) -> nn.Module:
    """Expert k of a shared-base model as a plain network: measured at its cuts as a copy would be."""
    return source.family.instantiate(source.config, model.merged_state_dict(k)).to(source.device)


def measure(source: Source, recipe: Recipe, pool: Pool, plan: Plan, k: int, model: nn.Module) -> Dict[str, Any]:
    """Expert k's error against the teacher on its segment, and its velocities at its cuts (kept
    small, so that neighbours can be compared without holding both in memory)."""
    args = (pool.x0, pool.labels, recipe.eval_samples)
    inner = plan.split.boundaries[1:-1]
    edges = {j: boundary_velocity(source.family, model, inner[j], *args) for j in (k - 1, k) if 0 <= j < len(inner)}
    return {"error": relative_error(source.family, model, source.teacher, plan.split.segments[k], *args), "edges": edges}
