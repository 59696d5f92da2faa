"""The complexity curve phi(t): how hard the denoising task is along canonical time.

Monitors, all on the canonical probability-flow velocity v(x, t), per output dimension (except
``sensitivity``, a ratio). The two of the method as published, and the material derivative:

* ``dirichlet``: E ||d v / d x||_F^2, estimated without bias over all output dimensions by
  Hutchinson's identity ||J||_F^2 = E_u ||J u||^2 with one Rademacher probe per sample, one JVP each.
* ``acceleration``: E ||d v / d t||^2, by one forward-mode derivative in t.
* ``path_acceleration``: E ||dv/dt + (d v / d x) v||^2, the material derivative along the ODE path
  (its true curvature), one JVP with tangent (v, 1).

Monitors of learning burden. The raw ones grow like (directions where the data barely varies)/t^2
near the data, a part that a linear map already gets right (DESIGN.md section 3); these leave it out:

* ``denoiser``: E ||d x0_hat / d x||_F^2 / D, the Jacobian of the denoiser x0_hat = E[x0 | x_t],
  read from the same JVP as ``dirichlet``: v = alpha' x0_hat + sigma' eps_hat with
  eps_hat = (x - alpha x0_hat) / sigma is linear in x0_hat, so
  x0_hat = (sigma v - sigma' x) / (sigma alpha' - sigma' alpha). Bounded; for Gaussian data of
  variance s^2 it is (alpha s^2 / (alpha^2 s^2 + sigma^2))^2.
* ``nonlinear``: E ||d (v - v_G) / d x||_F^2 / D, where v_G is the exact velocity of the Gaussian
  with the pool's mean and covariance (:class:`GaussianFit`): what a linear model cannot do. Zero
  for Gaussian data.
* ``nonlinear_acceleration``: E ||d (v - v_G) / d t||^2 / D at fixed x, the same split of the
  acceleration monitor.
* ``sensitivity``: E ||v_student - v||^2 / ||v||^2 per sample, the relative error of a
  width-pruned, not fine-tuned student (:func:`pruned_student`): where losing width costs most.
  Zero when the student keeps every unit (a budget of K full-width experts).

The spread across x_t dominates the probe noise, so one probe per sample over many samples is the
efficient estimator; the Jacobian monitors share that one probe (each stays unbiased). Every grid
point reports its mean and standard error.
"""

from __future__ import annotations

import contextlib

from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from cbs_convert.families.base import Family, broadcast_to, rademacher, schedule_and_derivative
from cbs_convert.stages.batches import noised
from cbs_convert.stages.prune import calibration_batches, prune_state_dict
from cbs_convert.stages.budget import allocate_widths
from cbs_convert.stages.gaussian import GaussianFit

MONITORS = (
    "dirichlet", "acceleration", "path_acceleration", "denoiser", "nonlinear", "nonlinear_acceleration", "sensitivity",
)
#: monitors read from one JVP in x with a shared Rademacher probe
X_JACOBIAN_MONITORS = ("dirichlet", "denoiser", "nonlinear")
#: monitors that subtract the velocity of the pool's Gaussian fit
GAUSSIAN_MONITORS = ("nonlinear", "nonlinear_acceleration")


@dataclass
class Profile:
    grid: List[float]
    mean: Dict[str, List[float]]
    stderr: Dict[str, List[float]]
    samples_per_point: int
    source: str  # "teacher ODE samples" or "data"
    notes: List[str] = field(default_factory=list)

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, data):
        return cls(**data)

    def curve(self, monitor: str) -> np.ndarray:
        if monitor not in self.mean:
            raise KeyError(f"monitor {monitor!r} was not profiled; profiled: {', '.join(self.mean)}")
        return np.asarray(self.mean[monitor], dtype=np.float64)


#: ways to differentiate the model: exact forward-mode autodiff, or central differences
DERIVATIVES = ("jvp", "fd")
#: the central difference's step, relative to the point's own scale (RMS of each sample, or 1 in
#: time): truncation error ~ step^2, float32 rounding ~ 1e-7 / step, both near 1e-6 at 1e-3
FD_STEP = 1e-3


def directional_derivative(function, point, direction, derivatives: str = "jvp"):
    """(f(point), the derivative of f at ``point`` along ``direction``); tuples for several inputs.

    ``"fd"`` evaluates f at point ± h·direction: two plain forward passes with the model's own
    attention kernel, where forward-mode autodiff costs about four on a SiT (benchmarks/probe_cost.py)
    and needs the MATH attention kernel. The value it returns is the mean of the two evaluations,
    f(point) + O(h^2). h is FD_STEP per sample, scaled up by the first input's RMS when that is
    above 1, and shared by all inputs so that the quotient is one derivative along one line.
    """
    several = isinstance(point, tuple)
    points, directions = (point, direction) if several else ((point,), (direction,))
    if derivatives == "jvp":
        return torch.func.jvp(function, points, directions)
    if any(p.dtype not in (torch.float32, torch.float64) for p in points):
        raise ValueError("finite-difference derivatives need float32 or float64 inputs; use derivatives='jvp'")
    first = points[0].detach()
    scale = first.float().flatten(1).pow(2).mean(1).sqrt().clamp_min(1.0) if first.dim() > 1 else torch.ones_like(first)
    h = FD_STEP * scale
    with torch.no_grad():
        plus = function(*[p + broadcast_to(h.to(p.dtype), p) * d for p, d in zip(points, directions)])
        minus = function(*[p - broadcast_to(h.to(p.dtype), p) * d for p, d in zip(points, directions)])
    return (plus + minus) / 2, (plus - minus) / (2 * broadcast_to(h.to(plus.dtype), plus))


def per_sample_monitors(
    family: Family,
    model,
    x: torch.Tensor,
    t: torch.Tensor,
    y: Optional[torch.Tensor],
    monitors: Sequence[str],
    generator: torch.Generator,
    gaussian: Optional[GaussianFit] = None,
    student: Optional[nn.Module] = None,
    derivatives: str = "jvp",
    probe: Optional[torch.Tensor] = None,
) -> Dict[str, torch.Tensor]:
    """One value per sample for each monitor, normalised by the number of output dimensions.

    ``gaussian`` is needed by ``nonlinear`` and ``nonlinear_acceleration``, ``student`` by
    ``sensitivity``. ``derivatives``: ``"jvp"`` (forward-mode autodiff) or ``"fd"`` (central
    differences, see :func:`directional_derivative`). ``probe``: the Rademacher directions of the
    Jacobian monitors, drawn from ``generator`` when not given.
    """
    if derivatives not in DERIVATIVES:
        raise ValueError(f"unknown derivatives {derivatives!r}; choose from {', '.join(DERIVATIVES)}")
    if gaussian is None and any(m in monitors for m in GAUSSIAN_MONITORS):
        raise ValueError("the nonlinear monitors need gaussian=GaussianFit.from_pool(x0_pool)")
    if student is None and "sensitivity" in monitors:
        raise ValueError("the sensitivity monitor needs a student model (pruned_student)")
    dims = x[0].numel()
    out: Dict[str, torch.Tensor] = {}

    def v_of_x(x_):
        return family.velocity(model, x_, t, y)

    def v_of_t(t_):
        return family.velocity(model, x, t_, y)

    def v_of_xt(x_, t_):
        return family.velocity(model, x_, t_, y)

    def gaussian_v_of_t(t_):
        return gaussian.velocity(x, *schedule_and_derivative(family.schedule, t_))

    def sq_norm(z):
        return z.float().flatten(1).pow(2).sum(1) / dims

    # Every jvp also returns v(x, t) itself: the monitors that need v take it from there rather
    # than from a forward pass of their own.
    v_here = None
    # forward-mode autodiff needs the MATH attention kernel; finite differences run the model's own
    with family.attention_context() if derivatives == "jvp" else contextlib.nullcontext():
        if any(m in monitors for m in X_JACOBIAN_MONITORS):
            if probe is None:
                probe = rademacher(x.shape, generator, x.device, x.dtype)
            v_here, jvp = directional_derivative(v_of_x, x, probe, derivatives)
            if "dirichlet" in monitors:
                out["dirichlet"] = sq_norm(jvp)
            if "denoiser" in monitors or "nonlinear" in monitors:
                alpha, sigma, d_alpha, d_sigma = schedule_and_derivative(family.schedule, t)
            if "denoiser" in monitors:
                # sigma alpha' - sigma' alpha = (alpha sigma / 2) d log-SNR / dt: nonzero wherever
                # alpha, sigma > 0, and finite at the ends of the linear path (-1 there everywhere).
                # Near pure noise of a VP schedule it is small, so float32 noise in v is amplified.
                denominator = broadcast_to(sigma * d_alpha - d_sigma * alpha, x)
                out["denoiser"] = sq_norm((broadcast_to(sigma, x) * jvp - broadcast_to(d_sigma, x) * probe) / denominator)
            if "nonlinear" in monitors:
                out["nonlinear"] = sq_norm(jvp - gaussian.jacobian_product(probe, alpha, sigma, d_alpha, d_sigma))
        if "acceleration" in monitors or "nonlinear_acceleration" in monitors:
            v_here, dvdt = directional_derivative(v_of_t, t, torch.ones_like(t), derivatives)
            if "acceleration" in monitors:
                out["acceleration"] = sq_norm(dvdt)
            if "nonlinear_acceleration" in monitors:
                _, gaussian_dvdt = torch.func.jvp(gaussian_v_of_t, (t,), (torch.ones_like(t),))
                out["nonlinear_acceleration"] = sq_norm(dvdt - gaussian_dvdt)
        if v_here is None and ("path_acceleration" in monitors or "sensitivity" in monitors):
            with torch.no_grad():
                v_here = v_of_x(x)
        if "path_acceleration" in monitors:
            _, material = directional_derivative(
                v_of_xt, (x, t), (v_here.detach(), torch.ones_like(t)), derivatives
            )
            out["path_acceleration"] = sq_norm(material)
        if "sensitivity" in monitors:
            with torch.no_grad():
                teacher_v = v_here.detach().float().flatten(1)
                student_v = family.velocity(student, x, t, y).float().flatten(1)
            scale = teacher_v.pow(2).sum(1).clamp_min(torch.finfo(torch.float32).tiny)
            out["sensitivity"] = (student_v - teacher_v).pow(2).sum(1) / scale
    return out


def pruned_student(
    family: Family,
    teacher: nn.Module,
    target_params: int,
    criterion: str = "segment",
    x0_pool: Optional[torch.Tensor] = None,
    labels_pool: Optional[torch.Tensor] = None,
    state_dict: Optional[Dict[str, torch.Tensor]] = None,
    calib_batches: int = 4,
    batch_size: int = 16,
    seed: int = 0,
) -> nn.Module:
    """The student of the ``sensitivity`` monitor: width-pruned as the pipeline prunes an expert
    under ``--structure width``, not trained.

    Widths from :func:`allocate_widths` for ``target_params`` (the pipeline uses the mean expert
    size of the run, budget / K capped at the source's count); units chosen by ``criterion``, with
    the ``segment`` importance measured on the whole time range [0, 1] since the student serves
    every t. ``state_dict`` defaults to the teacher's own.
    """
    source = family.config
    config = allocate_widths(family, source, target_params)
    calibration = None
    if criterion == "segment":
        if x0_pool is None:
            raise ValueError("segment-aware pruning of the sensitivity student needs x0_pool")
        calibration = calibration_batches(family, x0_pool, labels_pool, (0.0, 1.0), calib_batches, batch_size, seed)
    weights = state_dict if state_dict is not None else teacher.state_dict()
    sliced, _ = prune_state_dict(family, teacher, weights, source, config, criterion, calibration, seed=seed)
    device = next(teacher.parameters()).device
    return family.instantiate(config, sliced).to(device).eval().requires_grad_(False)


@torch.no_grad()
def profile_model(
    family: Family,
    model,
    x0_pool: torch.Tensor,
    labels_pool: Optional[torch.Tensor],
    grid: Sequence[float],
    monitors: Sequence[str] = ("denoiser", "dirichlet"),
    batches: int = 2,
    batch_size: int = 16,
    seed: int = 0,
    source: str = "teacher ODE samples",
    progress=None,
    gaussian: Optional[GaussianFit] = None,
    student: Union[nn.Module, Callable[[], nn.Module], None] = None,
    derivatives: str = "fd",
    rank: int = 0,
    world: int = 1,
) -> Profile:
    """Measure every monitor at every grid time over ``batches`` batches of x_t drawn from the pool.

    The defaults are the CLI's: the ``denoiser`` monitor that drives its cuts and the published
    ``dirichlet`` beside it (one shared derivative), by central differences (``derivatives="jvp"``
    for exact forward-mode derivatives at about twice the cost).

    ``gaussian`` (for the nonlinear monitors) defaults to :meth:`GaussianFit.from_pool` of
    ``x0_pool``; pass the exact moments when they are known. ``student`` (for ``sensitivity``) is a
    model or a callable that builds one (:func:`pruned_student`), called only when needed.

    Under ``torch.distributed`` with ``world`` > 1, rank r measures grid points r, r + world, ... and
    every rank returns the whole profile. Each rank still draws every point's samples, noise and
    probes from the one seeded stream (cheap next to the model's derivatives), so the profile is the
    same, point for point, as one process's.
    """
    unknown = [m for m in monitors if m not in MONITORS]
    if unknown:
        raise ValueError(f"unknown monitor {unknown[0]!r}; choose from {', '.join(MONITORS)}")
    notes = []
    if any(m in monitors for m in GAUSSIAN_MONITORS):
        if gaussian is None:
            gaussian = GaussianFit.from_pool(x0_pool)
        notes.append(f"nonlinear monitors: v_G from a Gaussian fit of the pool, {gaussian.description}")
    if "sensitivity" in monitors:
        if student is None:
            raise ValueError("the sensitivity monitor needs a student model, or a callable that builds one (pruned_student)")
        if not isinstance(student, nn.Module):
            student = student()
        student.eval()
        teacher_params = sum(p.numel() for p in model.parameters())
        student_params = sum(p.numel() for p in student.parameters())
        notes.append(f"sensitivity: a pruned, not fine-tuned student of {student_params:,} parameters "
                     f"({student_params / teacher_params:.0%} of the teacher)")
    else:
        student = None
    device = x0_pool.device
    generator = torch.Generator().manual_seed(seed)
    values: Dict[str, List[List[float]]] = {m: [] for m in monitors}
    model.eval()
    probed = any(m in monitors for m in X_JACOBIAN_MONITORS)
    for point, t_value in enumerate(grid):
        mine = point % world == rank
        collected: Dict[str, List[torch.Tensor]] = {m: [] for m in monitors}
        for _ in range(batches):
            index = torch.randint(0, x0_pool.shape[0], (batch_size,), generator=generator)
            noise = torch.randn((batch_size, *x0_pool.shape[1:]), generator=generator)
            probe = rademacher(noise.shape, generator, device, x0_pool.dtype) if probed else None
            if not mine:
                continue
            x0 = x0_pool[index.to(device)]
            y = labels_pool[index.to(device)] if labels_pool is not None else None
            t = torch.full((batch_size,), float(t_value), device=device)
            x_t = noised(family, x0, t, noise.to(device))
            result = per_sample_monitors(family, model, x_t, t, y, monitors, generator, gaussian, student, derivatives,
                                         probe=probe)
            for m in monitors:
                collected[m].append(result[m].detach().cpu())
            if progress is not None:
                progress.update(1)
        for m in monitors:
            values[m].append(torch.cat(collected[m]).tolist() if mine else [])
    if world > 1:
        import torch.distributed as dist

        shares: List[Dict[str, List[List[float]]]] = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(shares, values)
        values = {m: [shares[point % world][m][point] for point in range(len(grid))] for m in monitors}
    mean = {m: [float(np.mean(v)) for v in values[m]] for m in monitors}
    stderr = {m: [float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0 for v in values[m]] for m in monitors}
    for m in monitors:
        curve = np.asarray(mean[m])
        if not np.all(np.isfinite(curve)):
            notes.append(f"{m}: non-finite values in the curve")
        elif curve.max() <= 0:
            notes.append(f"{m}: the curve is zero everywhere; equidistribution falls back to uniform cuts")
        elif curve.max() - curve.min() <= 0.05 * curve.mean():
            notes.append(f"{m}: the curve is flat within 5%; its cuts are close to uniform")
    return Profile(
        grid=[float(g) for g in grid],
        mean=mean,
        stderr=stderr,
        samples_per_point=batches * batch_size,
        source=source,
        notes=notes,
    )
