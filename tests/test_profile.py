"""The monitors against exact computations on a small model."""

import numpy as np
import torch

from cbs_convert.stages.profile import per_sample_monitors, profile_model
from helpers import tiny_model


def exact_dirichlet(family, model, x, t, y):
    """||J||_F^2 / dims per sample from the full Jacobian, one sample at a time."""
    values = []
    with family.attention_context():
        for i in range(x.shape[0]):
            f = lambda xi: family.velocity(model, xi[None], t[i:i + 1], y[i:i + 1])[0]
            jac = torch.autograd.functional.jacobian(f, x[i])
            values.append(jac.pow(2).sum().item() / x[i].numel())
    return np.array(values)


def test_hutchinson_estimate_matches_the_exact_jacobian_norm():
    family, model = tiny_model("sit")
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([0.2, 0.5, 0.8])
    y = torch.tensor([1, 2, 3])
    exact = exact_dirichlet(family, model, x, t, y)
    generator = torch.Generator().manual_seed(0)
    probes = 200
    estimates = np.stack([
        per_sample_monitors(family, model, x, t, y, ["dirichlet"], generator)["dirichlet"].detach().numpy() for _ in range(probes)
    ])
    mean, stderr = estimates.mean(0), estimates.std(0, ddof=1) / np.sqrt(probes)
    # unbiased: within 4 standard errors of the exact value, and the error bar itself is small
    assert np.all(np.abs(mean - exact) < 4 * stderr), (mean, exact, stderr)
    assert np.all(stderr / exact < 0.05)


def test_acceleration_matches_a_central_difference():
    # float64: the random DiT's velocity is large, and a float32 difference quotient loses it
    family, model = tiny_model("dit")
    model.double()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.3, 0.6], dtype=torch.float64)
    y = torch.tensor([0, 5])
    generator = torch.Generator().manual_seed(0)
    got = per_sample_monitors(family, model, x, t, y, ["acceleration"], generator)["acceleration"]
    h = 1e-4
    with torch.no_grad():
        d = (family.velocity(model, x, t + h, y) - family.velocity(model, x, t - h, y)) / (2 * h)
    expected = d.flatten(1).pow(2).sum(1) / x[0].numel()
    assert torch.allclose(got.double(), expected, rtol=0.01)


def test_path_acceleration_is_the_material_derivative():
    family, model = tiny_model("sit")
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([0.4, 0.7])
    y = torch.tensor([3, 4])
    generator = torch.Generator().manual_seed(0)
    got = per_sample_monitors(family, model, x, t, y, ["path_acceleration"], generator)["path_acceleration"]
    h = 1e-3
    with torch.no_grad(), family.attention_context():
        v = family.velocity(model, x, t, y)
        ahead = family.velocity(model, x + h * v, t + h, y)
        behind = family.velocity(model, x - h * v, t - h, y)
    expected = ((ahead - behind) / (2 * h)).flatten(1).pow(2).sum(1) / x[0].numel()
    assert torch.allclose(got, expected, rtol=0.02)


def test_profile_reports_mean_and_standard_error_per_grid_point():
    family, model = tiny_model("sit")
    pool = torch.randn(32, 4, 8, 8)
    labels = torch.randint(0, 10, (32,))
    prof = profile_model(family, model, pool, labels, [0.1, 0.5, 0.9], ["dirichlet", "acceleration"], batches=2, batch_size=8)
    assert prof.samples_per_point == 16
    for m in ("dirichlet", "acceleration"):
        assert len(prof.mean[m]) == 3 and len(prof.stderr[m]) == 3
        assert all(s > 0 for s in prof.stderr[m]) and all(v > 0 for v in prof.mean[m])
    again = profile_model(family, model, pool, labels, [0.1, 0.5, 0.9], ["dirichlet", "acceleration"], batches=2, batch_size=8)
    assert again.mean == prof.mean  # seeded


def test_a_flat_curve_is_reported_not_an_error():
    family, model = tiny_model("sit")
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    prof = profile_model(family, model, torch.randn(8, 4, 8, 8), torch.zeros(8, dtype=torch.long), [0.2, 0.8],
                         ["dirichlet"], batches=1, batch_size=4)
    assert any("zero everywhere" in n for n in prof.notes)
