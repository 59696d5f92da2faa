"""What the conversion report says, gathered from the stages' results and the work directory's
records (``report`` writes it out): the source, the profile and split, each expert as planned and
as measured, the seams, and the fine-tuning runs."""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

import numpy as np

from cbs_convert.models.shared_base import describe_shared_base
from cbs_convert.pipeline.experts import Measurements, base_lr_scale, finetune_settings, trunk_settings
from cbs_convert.pipeline.quality import late_improvement
from cbs_convert.pipeline.recipe import Recipe
from cbs_convert.pipeline.steps import Plan, Source, expert_steps, trains, trunk_trains
from cbs_convert.pipeline.workfiles import SHARED_LOG, TRUNK_BLOCKS, TRUNK_LOG, pruned_file, trained_file
from cbs_convert.stages.finetune import seam_gap_of
from cbs_convert.stages.profile import Profile
from cbs_convert.stages.budget import parse_budget
from cbs_convert.storage.workdir import WorkDir


def shared_base_description(source: Source, recipe: Recipe, plan: Plan) -> Optional[Dict[str, Any]]:
    """The shared base and its deltas (``--experts lora``); None for copies."""
    if recipe.experts != "lora":
        return None
    return describe_shared_base(source.family, plan.split.boundaries, recipe.rank)


def planned_experts(source: Source, recipe: Recipe, plan: Plan) -> List[Dict[str, Any]]:
    """What the split and the budget give each expert, before any pruning or training."""
    family = source.family
    shared = shared_base_description(source, recipe, plan)
    source_flops = family.forward_flops(source.config)
    experts = []
    for k, segment in enumerate(plan.split.segments):
        config = plan.configs[k]
        widths = {knob.name: config[knob.name] for knob in family.width_knobs(config)}
        widths.update(family.per_block_widths(config))  # a list, block by block, where the blocks differ
        if shared is not None:
            flops = family.forward_flops(config) + shared["delta_flops"]
            experts.append({"segment": list(segment), "share": plan.split.shares[k], "delta_params": shared["delta_params"],
                            "target_params": shared["delta_params"], "params": shared["delta_params"], "params_vs_target": 0.0,
                            "flops": flops, "flops_vs_source": flops / source_flops, "widths": widths})
            continue
        params = family.param_count(config)
        experts.append({
            "segment": list(segment),
            "share": plan.split.shares[k],
            "target_params": plan.targets[k],
            "params": params,
            "params_vs_target": params / plan.targets[k] - 1,
            "flops": family.forward_flops(config),
            "flops_vs_source": family.forward_flops(config) / source_flops,
            "widths": widths,
        })
    return experts


def evaluation(source: Source, recipe: Recipe, plan: Plan, work: WorkDir, before: Measurements,
               after: Measurements) -> Dict[str, Any]:
    """Each expert as planned, with its error before and after fine-tuning (and its kept blocks
    under depth pruning), and the gap between neighbours at each cut."""
    experts = planned_experts(source, recipe, plan)
    for k, expert in enumerate(experts):
        expert.update(error_before=before[k]["error"], error_after=after[k]["error"])
        chosen = work.path(pruned_file(k, "blocks.json"))
        if chosen.exists():
            record = json.loads(chosen.read_text())
            expert.update(kept_blocks=record["kept"], block_selector=record["selector"])
    seams = []
    for j, boundary in enumerate(plan.split.boundaries[1:-1]):
        seams.append({
            "boundary": boundary,
            "before": seam_gap_of(before[j]["edges"][j], before[j + 1]["edges"][j]),
            "after": seam_gap_of(after[j]["edges"][j], after[j + 1]["edges"][j]),
        })
    return {"experts": experts, "seams": seams}


def finetune_summary(source: Source, recipe: Recipe, plan: Plan, work: WorkDir) -> Dict[str, Any]:
    """The fine-tuning settings and each expert's loss curve, from the logs in the work directory."""
    r = recipe
    shared = r.experts == "lora"
    # the recipe as given ("auto" left as None), and below each expert's settings as they ran
    settings = {"steps": r.steps, "lr": r.lr, "lr_schedule": r.lr_schedule, "warmup_steps": r.warmup_steps,
                "lr_floor": r.lr_floor, "loss": r.loss, "distill_weight": r.distill_weight,
                "data_weight": r.data_weight, "feature_weight": r.feature_weight,
                "feature_mask_sigma": r.feature_mask_sigma, "batch_size": r.batch_size, "ema_decay": r.ema_decay,
                "ema_warmup": r.ema_warmup, "weight_decay": r.weight_decay, "grad_clip": r.grad_clip,
                "margin": r.margin, "label_dropout": r.label_dropout, "bf16": r.bf16, "experts": r.experts}
    if shared:
        settings.update(rank=r.rank, base_lr_scale=base_lr_scale(r), joint_steps=r.steps * r.k)
    elif r.step_shares != "equal" and r.steps > 0:
        settings.update(step_shares=r.step_shares, expert_steps=expert_steps(r, plan))
    experts = []
    for k in range(r.k):
        entry = training_entry(trains(source, r, plan, k), lambda: finetune_settings(source, r, plan, k),
                               work.path(SHARED_LOG if shared else trained_file(k, "log.json")))
        experts.append(entry)
        if shared:
            # one run trained them all: its log is reported once, under the first expert
            entry["joint"] = True
            experts += [{"trained": entry["trained"], "settings": entry.get("settings"), "joint": True}
                        for _ in range(1, r.k)]
            break
    summary = {"settings": settings, "experts": experts}
    if plan.trunk is not None:
        settings["trunk_steps"] = r.trunk_steps
        trunk = training_entry(trunk_trains(source, r, plan), lambda: trunk_settings(source, r, plan), work.path(TRUNK_LOG))
        trunk.update(params=source.family.param_count(plan.trunk), architecture=source.family.describe(plan.trunk))
        chosen = work.path(TRUNK_BLOCKS)
        if chosen.exists():
            record = json.loads(chosen.read_text())
            trunk.update(kept_blocks=record["kept"], block_selector=record["selector"])
        summary["trunk"] = trunk
    return summary


def training_entry(trained: bool, settings, log_path) -> Dict[str, Any]:
    """One training run as the report gives it: its settings as they ran (``settings``, called only
    when it trained) and its loss curve from its log."""
    entry: Dict[str, Any] = {"trained": trained}
    if trained:
        entry["settings"] = settings().to_dict()
    if trained and log_path.exists():
        log = json.loads(log_path.read_text())
        losses = log["losses"]
        # at most 50 points of the curve, each the mean of its stretch of steps
        stretch = max(1, len(losses) // 50)
        curve = [(start + stretch, float(np.mean(losses[start:start + stretch])))
                 for start in range(0, len(losses), stretch)]
        # the losses hold every step, a resumed run's earlier ones too (older logs counted the last call only)
        entry.update(steps_run=len(losses), resumed_at=log.get("resumed_at", 0), seconds=log.get("seconds"),
                     peak_cuda_bytes=log.get("peak_cuda_bytes"),
                     loss_first=losses[0] if losses else None, loss_last=losses[-1] if losses else None,
                     loss_curve=curve, late_improvement=late_improvement(losses))
    return entry


def build_report(source: Source, recipe: Recipe, plan: Plan, profile: Optional[Profile], evaluated: Dict[str, Any],
                 pool_description: str, warnings: List[str], timings: Dict[str, float]) -> Dict[str, Any]:
    """The report of a run (or of a preview, whose ``evaluated`` holds the planned experts only)."""
    r, family = recipe, source.family
    shared = shared_base_description(source, recipe, plan)
    achieved = sum(e["params"] for e in evaluated["experts"])
    if shared is not None:
        achieved += shared["base_params"]
    checkpoint = source.checkpoint
    return {
        "source": {
            "path": str(checkpoint.path),
            "sha256": checkpoint.sha256,
            "container": checkpoint.container,
            "dtype": checkpoint.dtype,
            "family": family.name,
            "architecture": family.describe(source.config),
            "params": source.params,
            "flops": family.forward_flops(source.config),
            "assumptions": source.notes + checkpoint.notes,
        },
        "profile": profile.to_dict() if profile else None,
        "split": plan.split.to_dict(),
        "budget": {"setting": r.budget, "total": parse_budget(r.budget, source.params), "achieved": achieved},
        "shared_base": shared,
        "evaluation": evaluated,
        "measured_on": {
            "error": f"||v_expert - v_teacher|| / ||v_teacher|| of canonical velocities on {r.eval_samples} x_t "
                     f"per expert, t uniform on its segment, x0 from the pool ({pool_description})",
            "seam": f"2 ||v_left - v_right|| / (||v_left|| + ||v_right||) of the two neighbours on the same "
                    f"{r.eval_samples} x_t at the boundary time",
        },
        "warnings": warnings,
        "timings_s": timings,
        "recipe": r.to_dict(),
        "device": str(source.device),
    }
