"""The experts' stages shared out over the ranks of a torchrun launch (or done by one process):
which rank prunes, trains, measures and writes each expert, the barriers between the stages, and
each expert's files in the work directory, so that a resumed run skips what is already there.

Experts are independent: the ranks share them as ``ranks.plan_ranks`` lays out. An expert's
writer prunes it, writes its files and measures it; every rank of its group trains it; rank 0
collects the measurements. At most the teacher and one expert (with its training state) are in a
process's memory at a time: each stage reads an expert from the work directory, measures it, and
lets it go, keeping of it only numbers and small velocity tensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

from safetensors.torch import load_file

from cbs_convert.pipeline.experts import (Measurements, Trunk, finetune_one, finetune_shared, finetune_trunk, measure,
                                          merged_expert, prune_expert, prune_trunk, shared_student, training_log)
from cbs_convert.pipeline.ranks import RankLayout, barrier
from cbs_convert.pipeline.recipe import Recipe
from cbs_convert.pipeline.steps import Plan, Pool, Source, silent, trains, trunk_trains
from cbs_convert.pipeline.workfiles import (SHARED_LOG, SHARED_STATE, SHARED_WEIGHTS, TRUNK_BLOCKS, TRUNK_KEPT, TRUNK_LOG,
                                            TRUNK_PRUNED, TRUNK_STATE, TRUNK_WEIGHTS, load_measurement, pruned_file,
                                            save_measurement, trained_file)
from cbs_convert.storage.files import atomic_write_json
from cbs_convert.storage.routed_file import save_safetensors_atomic
from cbs_convert.storage.workdir import WorkDir

@dataclass
class Team:
    """This process's place in the run."""
    rank: int
    world: int
    layout: RankLayout
    groups: Dict[int, Any] = field(default_factory=dict)  # ranks.expert_groups
    trunk_group: Any = None  # every rank, when several train the trunk of --trunk-steps together


@dataclass
class ExpertRun:
    """What the experts' stages read: the stages before them, and the run's work directory."""
    source: Source
    recipe: Recipe
    pool: Pool
    plan: Plan
    work: WorkDir
    say: Callable[[str], None] = silent

    def trains(self, k: int) -> bool:
        return trains(self.source, self.recipe, self.plan, k)

    def shared_student(self, trained: bool):
        """The shared-base model, untrained or as fine-tuning saved it."""
        weights = load_file(str(self.work.path(SHARED_WEIGHTS))) if trained else None
        return shared_student(self.source, self.recipe, self.plan, weights)


def prepare_trunk(run: ExpertRun, team: Team, progress: bool = False) -> Optional[Trunk]:
    """--trunk-steps: rank 0 cuts the trunk from the source, every rank trains it (data-parallel
    when there are several), rank 0 writes it; returns it, as trained, on every rank (None without
    one). A trunk already pruned or trained in the work directory is not done again."""
    r, plan, rank = run.recipe, run.plan, team.rank
    if plan.trunk is None:
        return None
    pruned, kept_path = run.work.path(TRUNK_PRUNED), run.work.path(TRUNK_KEPT)
    if rank == 0 and not (pruned.exists() and kept_path.exists()):
        cut = prune_trunk(run.source, r, run.pool, plan, run.say)
        if cut.blocks is not None:
            atomic_write_json(run.work.path(TRUNK_BLOCKS), cut.blocks)
        atomic_write_json(kept_path, cut.kept)
        save_safetensors_atomic(cut.state_dict, pruned)
    barrier(team.world)
    kept = json.loads(kept_path.read_text())
    final = run.work.path(TRUNK_WEIGHTS)
    if trunk_trains(run.source, r, plan) and not final.exists():
        run.say(f"training the trunk on all of time, {r.trunk_steps} steps, before it branches into {r.k} experts")
        student = run.source.family.instantiate(plan.trunk, load_file(str(pruned)))
        result = finetune_trunk(run.source, r, run.pool, plan, student, kept, state_path=run.work.path(TRUNK_STATE),
                                progress=progress and rank == 0, group=team.trunk_group)
        if rank == 0:
            atomic_write_json(run.work.path(TRUNK_LOG), training_log(result))
            save_safetensors_atomic(result.model.state_dict(), final)
            run.work.remove([TRUNK_STATE])
        del student, result
    barrier(team.world)
    chosen = run.work.path(TRUNK_BLOCKS)
    blocks = json.loads(chosen.read_text()) if chosen.exists() else None
    return Trunk(plan.trunk, load_file(str(final if final.exists() else pruned)), kept, blocks)


def prune_experts(run: ExpertRun, team: Team, trunk: Optional[Trunk] = None) -> Measurements:
    """Each expert is pruned and measured by the rank that will write it, so under torchrun the
    experts are pruned side by side; returns, on rank 0, every expert's measurement before training.
    Ends at a barrier: every rank then reads its experts' pruned weights."""
    r, source, rank = run.recipe, run.source, team.rank
    if r.experts == "lora":  # nothing to prune: before training every expert is the teacher exactly
        if rank != 0:
            return {}
        run.say(f"measuring the teacher on each of the {r.k} segments ({r.eval_samples} samples each)")
        return {k: measure(source, r, run.pool, run.plan, k, source.teacher) for k in range(r.k)}
    mine = [k for k in range(r.k) if team.layout.writer_of(k) == rank]
    if team.world > 1 and rank == 0:
        run.say(f"pruning the {r.k} experts on {min(team.world, r.k)} processes side by side")
    for k in mine:
        path, kept_path = run.work.path(pruned_file(k, "safetensors")), run.work.path(pruned_file(k, "kept.json"))
        measured_path = run.work.path(pruned_file(k, "measured.safetensors"))
        if path.exists() and kept_path.exists():
            if measured_path.exists():
                continue
            sd = load_file(str(path))
        else:
            pruned = prune_expert(source, r, run.pool, run.plan, k, run.say, trunk)
            if pruned.blocks is not None:
                atomic_write_json(run.work.path(pruned_file(k, "blocks.json")), pruned.blocks)
            atomic_write_json(kept_path, pruned.kept)
            save_safetensors_atomic(pruned.state_dict, path)
            sd = pruned.state_dict
        run.say(f"measuring expert {k} against the teacher ({r.eval_samples} samples of its segment)")
        model = source.family.instantiate(run.plan.configs[k], sd).to(source.device)
        save_measurement(measured_path, measure(source, r, run.pool, run.plan, k, model))
        del sd, model
    barrier(team.world)
    if rank != 0:
        return {}
    return {k: load_measurement(run.work.path(pruned_file(k, "measured.safetensors"))) for k in range(r.k)}


def finetune_experts(run: ExpertRun, team: Team, progress: bool = False) -> None:
    """Every rank trains the experts the layout gives it, data-parallel within an expert's group;
    the expert's writer saves the weights and the log. A finished expert is not trained again, and
    an interrupted one resumes from its training state."""
    r, source, rank, layout = run.recipe, run.source, team.rank, team.layout
    if r.experts == "lora":
        _finetune_shared(run, team, progress)
        return
    for k in range(r.k):
        if k not in layout.experts_of(rank) or not run.trains(k):
            continue
        final = run.work.path(trained_file(k, "safetensors"))
        if final.exists():
            continue
        writer = layout.writer_of(k) == rank
        # fresh tensors from the work directory: the pruned file stays as it was
        weights = load_file(str(run.work.path(pruned_file(k, "safetensors"))))
        student = source.family.instantiate(run.plan.configs[k], weights)
        kept = _read_kept(run, k) if r.feature_weight > 0 else None
        result = finetune_one(source, r, run.pool, run.plan, k, student, kept,
                              state_path=run.work.path(trained_file(k, "state.pt")), progress=progress and writer,
                              group=team.groups.get(k))
        if writer:
            atomic_write_json(run.work.path(trained_file(k, "log.json")), training_log(result))
            save_safetensors_atomic(result.model.state_dict(), final)
            run.work.remove([trained_file(k, "state.pt")])  # the weights are saved: the state is spent
        del student, result, weights


def _read_kept(run: ExpertRun, k: int) -> Dict[str, Any]:
    return json.loads(run.work.path(pruned_file(k, "kept.json")).read_text())


def _finetune_shared(run: ExpertRun, team: Team, progress: bool) -> None:
    final = run.work.path(SHARED_WEIGHTS)
    if final.exists() or not run.trains(0):
        return
    student = run.shared_student(trained=False)
    writer = team.layout.writer_of(0) == team.rank
    result = finetune_shared(run.source, run.recipe, run.pool, run.plan, student, run.say,
                             state_path=run.work.path(SHARED_STATE), progress=progress and writer, group=team.groups.get(0))
    if writer:
        atomic_write_json(run.work.path(SHARED_LOG), training_log(result))
        save_safetensors_atomic(result.model.state_dict(), final)
        run.work.remove([SHARED_STATE])


def measure_experts(run: ExpertRun, team: Team, before: Measurements) -> Measurements:
    """Each trained expert is measured by the rank that wrote it; returns, on rank 0, every
    expert's measurement after training (an untrained one's is its measurement before)."""
    r, source, rank = run.recipe, run.source, team.rank
    if rank == 0 and any(run.trains(k) for k in range(r.k)):
        run.say(f"measuring the fine-tuned experts against the teacher ({r.eval_samples} samples each)")
    if r.experts == "lora":
        barrier(team.world)
        if rank != 0:
            return {}
        trained = run.trains(0)
        model = run.shared_student(trained) if trained else None
        return {k: measure(source, r, run.pool, run.plan, k, merged_expert(source, model, k)) if trained else before[k]
                for k in range(r.k)}
    for k, config in enumerate(run.plan.configs):
        if run.trains(k) and team.layout.writer_of(k) == rank:
            model = source.family.instantiate(config, load_file(str(run.work.path(trained_file(k, "safetensors"))))).to(source.device)
            save_measurement(run.work.path(trained_file(k, "measured.safetensors")),
                             measure(source, r, run.pool, run.plan, k, model))
            del model
    barrier(team.world)
    if rank != 0:
        return {}
    return {k: load_measurement(run.work.path(trained_file(k, "measured.safetensors"))) if run.trains(k) else before[k]
            for k in range(r.k)}
