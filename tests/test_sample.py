"""The ODE sampler against exact answers."""

import pytest
import torch

from cbs_convert.families import FAMILIES
from cbs_convert.sample import sample_ode, split_velocity
from helpers import tiny_config, tiny_model


class PointMassOracle(torch.nn.Module):
    """The exact native prediction when all data is the single image ``target``."""

    def __init__(self, family, target):
        super().__init__()
        self.family, self.target = family, target

    def forward(self, x, native_t, y=None):
        t = self.family.canonical_time(native_t).to(x.dtype)
        alpha, sigma = (v[:, None, None, None] for v in self.family.schedule(t))
        eps = (x - alpha * self.target) / sigma
        if self.family.name == "sit":
            # SiT predicts d x / d tau = -(alpha' x0 + sigma' eps)
            from cbs_convert.families.base import schedule_and_derivative

            _, _, da, ds = (v[:, None, None, None] for v in schedule_and_derivative(self.family.schedule, t))
            return -(da * self.target + ds * eps)
        return eps


@pytest.mark.parametrize("name,overrides", [
    ("sit", {"path": "linear"}), ("sit", {"path": "gvp"}),
    ("dit", {"beta_schedule": "linear"}), ("dit", {"beta_schedule": "cosine"}),
])
def test_sampler_lands_on_a_point_mass_for_every_path(name, overrides):
    family = FAMILIES[name](tiny_config(name, **overrides))
    target = torch.randn(1, 4, 8, 8).clamp(-1, 1)
    oracle = PointMassOracle(family, target)
    out = sample_ode(family, oracle, (3, 4, 8, 8), steps=8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, target.expand(3, -1, -1, -1), atol=2e-3), (out - target).abs().max()


@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_agrees_with_a_fine_euler_solution(path):
    """16 steps land near a 1000-step Euler integration of dx/dt = v. (A random noise predictor
    is no denoiser and its ODE explodes near data, so the DDPM paths are checked with the oracle.)"""
    family, model = tiny_model("sit", learn_sigma=False, path=path)
    noise = torch.randn(2, 4, 8, 8)
    y = torch.tensor([1, 2])
    t_end = 0.05
    got = sample_ode(family, model, noise.shape, y, steps=16, noise=noise, t_end=t_end)
    _, sigma1 = family.schedule(torch.ones(2))
    x = sigma1[:, None, None, None] * noise
    times = torch.linspace(1, t_end, 1001)
    with torch.no_grad():
        for i in range(1000):
            x = x + float(times[i + 1] - times[i]) * family.velocity(model, x, times[i].expand(2), y)
    assert ((got - x).norm() / x.norm()).item() < 0.02


def test_split_velocity_inverts_the_path():
    family, _ = tiny_model("dit")
    x0, eps, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0.05, 0.5, 0.99])

    def path(t_):
        a, s = family.schedule(t_)
        return a[:, None, None, None] * x0 + s[:, None, None, None] * eps

    x, v = torch.func.jvp(path, (t,), (torch.ones_like(t),))
    got_x0, got_eps = split_velocity(family, x, v, t)
    assert torch.allclose(got_x0, x0, atol=1e-3) and torch.allclose(got_eps, eps, atol=1e-3)
