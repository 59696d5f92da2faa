"""The complexity curve phi(t): how hard the denoising task is along canonical time.

Monitors, all on the canonical probability-flow velocity v(x, t), per output dimension:

* ``dirichlet``: E ||d v / d x||_F^2, estimated without bias over all output dimensions by
  Hutchinson's identity ||J||_F^2 = E_u ||J u||^2 with one Rademacher probe per sample, one JVP each.
* ``acceleration``: E ||d v / d t||^2, by one forward-mode derivative in t.
* ``path_acceleration``: E ||dv/dt + (d v / d x) v||^2, the material derivative along the ODE path
  (its true curvature), one JVP with tangent (v, 1).

The spread across x_t dominates the probe noise, so one probe per sample over many samples is the
efficient estimator; every grid point reports its mean and standard error.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .batches import noised
from .families.base import Family, rademacher

MONITORS = ("dirichlet", "acceleration", "path_acceleration")


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


def per_sample_monitors(
    family: Family,
    model,
    x: torch.Tensor,
    t: torch.Tensor,
    y: Optional[torch.Tensor],
    monitors: Sequence[str],
    generator: torch.Generator,
) -> Dict[str, torch.Tensor]:
    """One value per sample for each monitor, normalised by the number of output dimensions."""
    dims = x[0].numel()
    out: Dict[str, torch.Tensor] = {}

    def v_of_x(x_):
        return family.velocity(model, x_, t, y)

    def v_of_t(t_):
        return family.velocity(model, x, t_, y)

    def v_of_xt(x_, t_):
        return family.velocity(model, x_, t_, y)

    def sq_norm(z):
        return z.float().flatten(1).pow(2).sum(1) / dims

    with family.attention_context():
        if "dirichlet" in monitors:
            probe = rademacher(x.shape, generator, x.device, x.dtype)
            _, jvp = torch.func.jvp(v_of_x, (x,), (probe,))
            out["dirichlet"] = sq_norm(jvp)
        if "acceleration" in monitors:
            _, dvdt = torch.func.jvp(v_of_t, (t,), (torch.ones_like(t),))
            out["acceleration"] = sq_norm(dvdt)
        if "path_acceleration" in monitors:
            with torch.no_grad():
                v = v_of_x(x)
            _, material = torch.func.jvp(v_of_xt, (x, t), (v, torch.ones_like(t)))
            out["path_acceleration"] = sq_norm(material)
    return out


@torch.no_grad()
def profile_model(
    family: Family,
    model,
    x0_pool: torch.Tensor,
    labels_pool: Optional[torch.Tensor],
    grid: Sequence[float],
    monitors: Sequence[str] = ("dirichlet", "acceleration"),
    batches: int = 2,
    batch_size: int = 16,
    seed: int = 0,
    source: str = "teacher ODE samples",
    progress=None,
) -> Profile:
    """Measure every monitor at every grid time over ``batches`` batches of x_t drawn from the pool."""
    unknown = [m for m in monitors if m not in MONITORS]
    if unknown:
        raise ValueError(f"unknown monitor {unknown[0]!r}; choose from {', '.join(MONITORS)}")
    device = x0_pool.device
    generator = torch.Generator().manual_seed(seed)
    values: Dict[str, List[List[float]]] = {m: [] for m in monitors}
    model.eval()
    for t_value in grid:
        collected: Dict[str, List[torch.Tensor]] = {m: [] for m in monitors}
        for _ in range(batches):
            index = torch.randint(0, x0_pool.shape[0], (batch_size,), generator=generator)
            x0 = x0_pool[index.to(device)]
            y = labels_pool[index.to(device)] if labels_pool is not None else None
            noise = torch.randn(x0.shape, generator=generator).to(device)
            t = torch.full((batch_size,), float(t_value), device=device)
            x_t = noised(family, x0, t, noise)
            result = per_sample_monitors(family, model, x_t, t, y, monitors, generator)
            for m in monitors:
                collected[m].append(result[m].detach().cpu())
            if progress is not None:
                progress.update(1)
        for m in monitors:
            values[m].append(torch.cat(collected[m]).tolist())
    mean = {m: [float(np.mean(v)) for v in values[m]] for m in monitors}
    stderr = {m: [float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0 for v in values[m]] for m in monitors}
    notes = []
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
