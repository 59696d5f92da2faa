"""Fine-tuning one pruned expert on its own time segment.

Times are drawn uniformly from the segment widened by a small margin, so the expert also sees the
neighbourhood of its boundaries. Losses: ``distill`` (match the teacher's native output, data-free),
``data`` (the family's own training loss on real latents) or ``both`` (``distill_weight`` x the first
plus ``data_weight`` x the second). Labels are dropped to the null class with the teacher's
probability, so classifier-free guidance keeps working.

The learning rate warms up linearly over ``warmup_steps`` and then follows a cosine down to
``lr_floor`` x ``lr`` at the last step (or stays constant with ``lr_schedule="constant"``). The EMA
starts at the student's initial weights; with ``ema_warmup`` its decay ramps up as (1 + s) / (10 + s),
so that a poor start (a freshly pruned student) is forgotten within tens of steps; without it the EMA
keeps its full decay from the first step, so a full-width expert's saved weights stay anchored to the
source and drift from it no faster than the EMA horizon allows.

Every random draw of step ``s`` comes from a generator seeded by (seed, s): a run resumed from a
checkpoint follows exactly the path of an uninterrupted one. Models stay in eval mode because label
dropout is done here, with that generator, rather than by the label embedder's own global RNG.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from cbs_convert.stages.batches import draw_batch, noised, segment_inputs
from cbs_convert.errors import TrainingDiverged
from cbs_convert.storage.files import atomic_write
from cbs_convert.families.base import Family

LOSSES = ("distill", "data", "both")
LR_SCHEDULES = ("cosine", "constant")

# The defaults the recipe leaves to the expert ("auto"), by case:
# * a pruned student distils at 3e-4, the lr every pruned row of the benchmarks was measured at, and
#   its EMA warms up, since its pruned start is far from where training takes it;
# * a full-width expert continues the source's own training: the source's final lr (the bundled
#   teachers ended their cosine at 1e-4), and an EMA anchored at the source, so that a short run
#   cannot carry the saved weights far from a model that was already good.
PRUNED_LR = 3e-4
FULL_WIDTH_LR = 1e-4
# shared-base experts: the zero-started deltas at ten times the source's final lr, the base at that
# lr itself (see the README's Fashion-MNIST rows)
DELTA_LR = 1e-3
BASE_LR_SCALE = 0.1
WARMUP_SHARE = 0.05


@dataclass
class FinetuneSettings:
    # These defaults are the CLI's too: the recipe (pipeline/recipe.py) takes its own from here.
    steps: int = 600
    batch_size: int = 16
    lr: float = PRUNED_LR
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    # the recipe's None ("auto") for these two is settled per expert by the pipeline
    # (``pipeline.experts.expert_defaults``); a library caller gets that rule's pruned-student values here
    ema_warmup: bool = True
    lr_schedule: str = "cosine"
    warmup_steps: Optional[int] = None  # None: WARMUP_SHARE of the steps
    lr_floor: float = 0.1
    grad_clip: float = 1.0
    # the CLI reads it from the checkpoint (its class_dropout_prob); 0.1 is the published models'
    label_dropout: float = 0.1
    loss: str = "distill"
    distill_weight: float = 0.9
    data_weight: float = 0.1
    feature_weight: float = 0.0
    feature_mask_sigma: float = 2.0
    margin: float = 0.02
    checkpoint_every: int = 50
    bf16: bool = True  # autocast on CUDA only
    seed: int = 0

    def __post_init__(self):
        if self.warmup_steps is None:
            self.warmup_steps = int(round(WARMUP_SHARE * self.steps))

    def to_dict(self):
        return asdict(self)


@dataclass
class FinetuneResult:
    model: nn.Module  # the EMA weights
    losses: List[float] = field(default_factory=list)
    seconds: float = 0.0
    steps_run: int = 0  # steps trained in all, a resumed run's earlier ones included (as are its losses)
    resumed_at: int = 0  # the step this call began at; ``seconds`` timed the steps from there
    peak_cuda_bytes: Optional[int] = None  # the most CUDA memory this expert's training held at once


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63 - 1))


def learning_rate(settings: FinetuneSettings, step: int) -> float:
    """The lr of 0-based ``step``: linear warm-up to ``lr``, then constant or a cosine that reaches
    ``lr_floor * lr`` at the last step."""
    peak = settings.lr
    if step < settings.warmup_steps:
        return peak * (step + 1) / settings.warmup_steps
    if settings.lr_schedule == "constant":
        return peak
    decay_steps = settings.steps - settings.warmup_steps
    progress = min(1.0, (step - settings.warmup_steps) / max(1, decay_steps - 1))
    floor = settings.lr_floor * peak
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def ema_decay_at(settings: FinetuneSettings, step: int) -> float:
    return min(settings.ema_decay, (1 + step) / (10 + step)) if settings.ema_warmup else settings.ema_decay


def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model."""
    # one fused call for every tensor (SiT-XL has about 300) instead of a kernel launch per tensor
    # on a GPU; the same values as lerp_ tensor by tensor (bit for bit on the CPU, tested)
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def finetune_expert(
    family: Family,
    teacher: nn.Module,
    student: nn.Module,
    segment: Tuple[float, float],
    x0_pool: torch.Tensor,
    labels_pool: Optional[torch.Tensor],
    settings: FinetuneSettings,
    state_path=None,
    progress: bool = True,
    description: str = "fine-tune",
    stop_after: Optional[int] = None,
    group=None,
    param_groups: Optional[Sequence[Tuple[Sequence[nn.Parameter], float]]] = None,
    feature_channels: Optional[torch.Tensor] = None,
    feature_blocks: Optional[Sequence[str]] = None,
) -> FinetuneResult:
    """Train ``student`` on ``segment``; returns its EMA copy.

    ``state_path`` enables periodic checkpoints and resume from them. ``stop_after`` ends the run
    early after that many steps of this call (to test interruption), leaving the checkpoint behind.
    ``group``: a torch.distributed process group whose ranks all train this expert, data-parallel.
    Every rank draws the same global batch of ``settings.batch_size`` and takes its own equal slice;
    gradients are averaged over the group, so the weights are those of one process. The group's
    first rank writes the checkpoints; every rank resumes from them.
    ``param_groups``: (parameters, lr multiple) pairs, each group following the schedule at its own
    multiple of ``settings.lr`` (a multiple of 0 freezes the group); default: every parameter at 1.
    ``feature_channels``: the teacher's block-output channels the student kept (``Family.feature_channels``),
    for ``settings.feature_weight`` > 0; ``feature_blocks``: the teacher's blocks the student's
    blocks match, in order (a depth-pruned student's kept blocks; default: the same blocks).
    """
    if settings.loss not in LOSSES:
        raise ValueError(f"unknown loss {settings.loss!r}; choose from {', '.join(LOSSES)}")
    if settings.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {settings.lr_schedule!r}; choose from {', '.join(LR_SCHEDULES)}")
    member, members = 0, 1
    if group is not None:
        import torch.distributed as dist

        member, members = dist.get_rank(group), dist.get_world_size(group)
        if settings.batch_size % members:
            raise ValueError(f"batch size {settings.batch_size} does not split over {members} processes")
    rows = slice(member * settings.batch_size // members, (member + 1) * settings.batch_size // members)
    device = x0_pool.device
    teacher = teacher.to(device).eval()
    student = student.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if param_groups is None:
        param_groups = [([p for p in student.parameters() if p.requires_grad], 1.0)]
    for parameters, scale in param_groups:
        for p in parameters:
            p.requires_grad_(scale > 0)
    groups = [{"params": list(parameters), "lr": settings.lr * scale, "lr_scale": scale}
              for parameters, scale in param_groups if scale > 0]
    trainable = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)
    ema = copy.deepcopy(student).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    losses: List[float] = []
    start = 0
    state_path = Path(state_path) if state_path else None
    if state_path is not None and state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=True)
        student.load_state_dict(state["student"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
        losses = list(state["losses"])
    use_bf16 = settings.bf16 and device.type == "cuda"
    features = (_FeatureTaps(family, teacher, student, feature_channels, feature_blocks)
                if settings.feature_weight > 0 else None)
    bar = None
    try:
        forward = student
        if group is not None:  # a group of one runs through DDP too, so that path is exercised on one device
            from torch.nn.parallel import DistributedDataParallel

            # gradients averaged over the group's equal slices: the full batch's mean gradient
            forward = DistributedDataParallel(student, process_group=group, broadcast_buffers=False,
                                              device_ids=[device.index] if device.type == "cuda" else None)
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=settings.steps, initial=start, desc=description, unit="step", dynamic_ncols=True, leave=False)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        began = time.time()
        ran = 0
        for step in range(start, settings.steps):
            generator = _step_generator(settings.seed, step)
            x0, y, t, noise = draw_batch(
                family, x0_pool, labels_pool, segment, settings.batch_size, generator, settings.margin, settings.label_dropout
            )
            x0, t, noise = x0[rows], t[rows], noise[rows]
            y = None if y is None else y[rows]
            x_t = noised(family, x0, t, noise)
            native_t = family.native_time(t)
            # The teacher's targets in float32, outside the autocast: bf16 targets would round every
            # target to 8 bits of mantissa, a floor under the error an expert can reach. The teacher
            # runs first, so that its activations are freed before the student's graph is built (on a
            # CPU that alone is worth 10% of a step: benchmarks/finetune_overhead.py).
            teacher_out = None
            if settings.loss != "data" or features is not None:
                with torch.no_grad():
                    teacher_out = teacher(x_t, native_t, y).float()
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_bf16):
                student_out = forward(x_t, native_t, y)
            # the data loss alone needs the teacher only for channels the data cannot supervise
            if teacher_out is None and student_out.shape[1] > x0.shape[1]:
                with torch.no_grad():
                    teacher_out = teacher(x_t, native_t, y).float()
            loss = 0.0
            if settings.loss in ("distill", "both"):
                weight = settings.distill_weight if settings.loss == "both" else 1.0
                loss = loss + weight * F.mse_loss(student_out.float(), teacher_out)
            if settings.loss in ("data", "both"):
                weight = settings.data_weight if settings.loss == "both" else 1.0
                loss = loss + weight * family.data_loss(student, x0, y, t, noise, teacher_out, prediction=student_out.float())
            if features is not None:
                loss = loss + settings.feature_weight * features.loss(settings.feature_mask_sigma)
            for param_group in optimizer.param_groups:
                param_group["lr"] = learning_rate(settings, step) * param_group["lr_scale"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if settings.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, settings.grad_clip)
            optimizer.step()
            ema_update(ema, student, ema_decay_at(settings, step))
            if members > 1:  # the log shows the full batch's loss, as one process would
                reduced = loss.detach().clone()
                dist.all_reduce(reduced, group=group)
                value = float(reduced) / members
            else:
                value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingDiverged(
                    f"{description}: the fine-tuning loss became {value} at step {step} with lr {learning_rate(settings, step):g}; "
                    "lower the learning rate (--lr, or lr: in the recipe) and start over with --force"
                )
            losses.append(value)
            ran += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4g}")
            done = step + 1
            # Not at the last step: the caller saves the final weights, and a full state there (student,
            # EMA, optimizer: 4x the expert) would only be written to be deleted.
            if state_path is not None and member == 0 and done % settings.checkpoint_every == 0 and done < settings.steps:
                state = {
                    "student": student.state_dict(),
                    "ema": ema.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "step": done,
                    "losses": losses,
                }
                atomic_write(state_path, lambda tmp: torch.save(state, tmp))
            if stop_after is not None and ran >= stop_after:
                break
    finally:  # the teacher outlives this run (a library caller may go on with it): whatever ended the run, no hook of it stays
        if bar is not None:
            bar.close()
        if features is not None:
            features.remove()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return FinetuneResult(model=ema, losses=losses, seconds=time.time() - began, steps_run=start + ran, resumed_at=start,
                          peak_cuda_bytes=peak)


def _network(model: nn.Module) -> nn.Module:
    """The family's network itself: a shared-base model holds it as its base."""
    return getattr(model, "base", model)


class _FeatureTaps:
    """Block outputs of the teacher and the student, caught by forward hooks at each step, and the
    masked feature loss between them (TinyFusion's: activations more than ``sigma`` standard
    deviations from the teacher's mean are left out, since matching the few huge outlier channels of
    a diffusion transformer made unmasked feature distillation diverge there)."""

    def __init__(self, family: Family, teacher: nn.Module, student: nn.Module, channels: Optional[torch.Tensor],
                 teacher_blocks: Optional[Sequence[str]] = None):
        student_blocks = family.feature_taps(_network(student).config)
        teacher_blocks = list(teacher_blocks) if teacher_blocks is not None else student_blocks
        if len(teacher_blocks) != len(student_blocks):
            raise ValueError(f"{len(student_blocks)} student blocks cannot match {len(teacher_blocks)} teacher blocks")
        self.dim, self.channels = family.feature_channel_dim, channels
        self.caught = {"teacher": {}, "student": {}}
        self.handles = []
        self.taps = [str(j) for j in range(len(student_blocks))]
        for role, model, names in (("teacher", teacher, teacher_blocks), ("student", _network(student), student_blocks)):
            modules = dict(model.named_modules())
            for tap, name in zip(self.taps, names):
                self.handles.append(modules[name].register_forward_hook(self._catch(role, tap)))

    def _catch(self, role: str, name: str):
        def hook(module, args, output):
            self.caught[role][name] = output
        return hook

    def loss(self, sigma: float) -> torch.Tensor:
        total = 0.0
        for name in self.taps:
            target = self.caught["teacher"][name].detach().float()
            if self.channels is not None:
                target = target.index_select(self.dim, self.channels.to(target.device))
            mean, std = target.mean(), target.std()
            keep = (target - mean).abs() <= sigma * std
            error = (self.caught["student"][name].float() - target)[keep]
            # each block counts alike, whatever the scale of its activations
            total = total + error.pow(2).mean() / target[keep].var().clamp_min(1e-12)
        self.caught = {"teacher": {}, "student": {}}
        return total / len(self.taps)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def relative_error(
    family: Family,
    model: nn.Module,
    teacher: nn.Module,
    segment: Tuple[float, float],
    x0_pool: torch.Tensor,
    labels_pool: Optional[torch.Tensor],
    samples: int = 64,
    seed: int = 12345,
) -> float:
    """||v_model - v_teacher|| / ||v_teacher|| of canonical velocities on x_t from ``segment``."""
    x_t, t, y = segment_inputs(family, x0_pool, labels_pool, segment, samples, torch.Generator().manual_seed(seed))
    v_model = family.velocity(model.eval(), x_t, t, y)
    v_teacher = family.velocity(teacher.eval(), x_t, t, y)
    return float((v_model - v_teacher).norm() / v_teacher.norm().clamp_min(1e-12))


@torch.no_grad()
def boundary_velocity(
    family: Family,
    model: nn.Module,
    boundary: float,
    x0_pool: torch.Tensor,
    labels_pool: Optional[torch.Tensor],
    samples: int = 64,
    seed: int = 54321,
) -> torch.Tensor:
    """``model``'s canonical velocity on a fixed set of x_t at time ``boundary`` (same inputs for
    every model), so that two neighbours can be compared without holding both in memory."""
    generator = torch.Generator().manual_seed(seed)
    x_t, t, y = segment_inputs(family, x0_pool, labels_pool, (boundary, boundary), samples, generator)
    return family.velocity(model.eval(), x_t, t, y)


def seam_gap_of(left_velocity: torch.Tensor, right_velocity: torch.Tensor) -> float:
    """Relative difference of two neighbours' velocities on the same inputs."""
    a, b = left_velocity, right_velocity
    return float(2 * (a - b).norm() / (a.norm() + b.norm()).clamp_min(1e-12))


def seam_gap(
    family: Family,
    left: nn.Module,
    right: nn.Module,
    boundary: float,
    x0_pool: torch.Tensor,
    labels_pool: Optional[torch.Tensor],
    samples: int = 64,
    seed: int = 54321,
) -> float:
    """Relative difference of two neighbouring experts at their shared boundary, same x_t."""
    args = (boundary, x0_pool, labels_pool, samples, seed)
    return seam_gap_of(boundary_velocity(family, left, *args), boundary_velocity(family, right, *args))
