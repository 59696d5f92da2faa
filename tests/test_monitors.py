"""The monitors of learning burden against closed forms.

For Gaussian data x0 ~ N(0, diag(s^2)) the velocity, the denoiser and the Gaussian fit's velocity
are exact linear maps, diagonal in the pixel basis: per dimension d,
v_d = h_d x_d with h_d = (sigma sigma' + alpha alpha' s_d^2) / (alpha^2 s_d^2 + sigma^2) and
x0_hat_d = g_d x_d with g_d = alpha s_d^2 / (alpha^2 s_d^2 + sigma^2). A Rademacher probe makes the
Hutchinson estimate of a diagonal Jacobian exact, so the profiled values must match to rounding.
"""

import numpy as np
import pytest
import torch
from torch import nn

from cbs_convert.families import FAMILIES
from cbs_convert.families.base import broadcast_to, schedule_and_derivative
from cbs_convert.stages.gaussian import GaussianFit
from cbs_convert.stages.profile import per_sample_monitors, profile_model, pruned_student
from helpers import tiny_config, tiny_model

SHAPE = (2, 4, 4)  # D = 32
# per-dimension standard deviations below and above 1
STDS = torch.tensor(np.geomspace(0.1, 3.0, int(np.prod(SHAPE))), dtype=torch.float32).reshape(SHAPE)
GRID = [0.05, 0.2, 0.5, 0.8, 0.95]

CASES = {
    "sit linear": ("sit", dict(path="linear"), "velocity"),
    "sit gvp": ("sit", dict(path="gvp"), "velocity"),
    "dit linear VP": ("dit", dict(beta_schedule="linear", diffusion_steps=1000), "noise"),
}


def family_of(case):
    name, overrides, _ = CASES[case]
    return FAMILIES[name](tiny_config(name, **overrides))


class ExactModel(nn.Module):
    """A model with the family's native signature (x, native t, y) whose prediction is exact.

    ``denoiser(x, alpha, sigma)`` is E[x0 | x_t]; the module turns it into the family's native
    output: SiT's velocity in its own time tau = 1 - t (the negative of the canonical one), or DiT's
    noise prediction.
    """

    def __init__(self, family, predicts, denoiser):
        super().__init__()
        self.family, self.predicts, self.denoiser = family, predicts, denoiser

    def forward(self, x, native_t, y=None):
        t = self.family.canonical_time(native_t)
        alpha, sigma, d_alpha, d_sigma = schedule_and_derivative(self.family.schedule, t)
        a, s = broadcast_to(alpha, x), broadcast_to(sigma, x)
        x0_hat = self.denoiser(x, a, s)
        eps_hat = (x - a * x0_hat) / s
        if self.predicts == "noise":
            return eps_hat
        return -(broadcast_to(d_alpha, x) * x0_hat + broadcast_to(d_sigma, x) * eps_hat)


def gaussian_model(case, stds=STDS):
    variances = stds.pow(2)
    family = family_of(case)
    return family, ExactModel(family, CASES[case][2], lambda x, a, s: a * variances / (a * a * variances + s * s) * x)


def closed_forms(family, t_value):
    """Per-dimension h, g and dh/dt at one canonical time, float64."""
    variances = STDS.double().pow(2).flatten()
    t = torch.tensor([t_value], dtype=torch.float64)

    def gain(t_):
        alpha, sigma, d_alpha, d_sigma = schedule_and_derivative(family.schedule, t_)
        return (sigma * d_sigma + alpha * d_alpha * variances) / (alpha ** 2 * variances + sigma ** 2)

    h, dh = torch.func.jvp(gain, (t,), (torch.ones_like(t),))
    alpha, sigma = family.schedule(t)
    g = alpha * variances / (alpha ** 2 * variances + sigma ** 2)
    return h, g, dh, alpha, sigma


def test_the_linear_path_closed_form_is_the_one_in_the_design_notes():
    # c(t) = (t - (1-t) s^2) / ((1-t)^2 s^2 + t^2), differentiated by hand
    family = family_of("sit linear")
    s2 = STDS.double().pow(2).flatten()
    for t in GRID:
        numerator, denominator = t - (1 - t) * s2, (1 - t) ** 2 * s2 + t ** 2
        c = numerator / denominator
        dc = ((1 + s2) * denominator - numerator * (2 * t - 2 * (1 - t) * s2)) / denominator ** 2
        h, _, dh, _, _ = closed_forms(family, t)
        assert torch.allclose(h, c, rtol=1e-9) and torch.allclose(dh, dc, rtol=1e-9)


def gaussian_pool(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((n, *SHAPE), generator=generator) * STDS


@pytest.mark.parametrize("case", sorted(CASES))
def test_jacobian_monitors_match_the_gaussian_closed_forms(case):
    family, model = gaussian_model(case)
    exact = GaussianFit.from_moments(torch.zeros(STDS.numel()), torch.diag(STDS.double().pow(2).flatten()))
    monitors = ["dirichlet", "denoiser", "nonlinear", "nonlinear_acceleration"]
    prof = profile_model(family, model, gaussian_pool(64), None, GRID, monitors, batches=1, batch_size=8, gaussian=exact,
                         derivatives="jvp")  # the exact maths; fd is checked on its own below
    for i, t in enumerate(GRID):
        h, g, _, _, _ = closed_forms(family, t)
        assert prof.mean["dirichlet"][i] == pytest.approx(h.pow(2).mean().item(), rel=2e-4), (case, t)
        assert prof.mean["denoiser"][i] == pytest.approx(g.pow(2).mean().item(), rel=2e-3, abs=1e-7), (case, t)
        # v is exactly the velocity of the Gaussian: nothing is left beyond rounding
        assert prof.mean["nonlinear"][i] < 1e-6 * prof.mean["dirichlet"][i], (case, t)
        assert prof.mean["nonlinear_acceleration"][i] < 1e-5 * max(1.0, dh_scale(family, t)), (case, t)


def dh_scale(family, t):
    h, _, dh, alpha, sigma = closed_forms(family, t)
    return float((dh.pow(2) * (alpha ** 2 * STDS.double().pow(2).flatten() + sigma ** 2)).mean())


@pytest.mark.parametrize("case", sorted(CASES))
def test_acceleration_matches_the_closed_form_per_sample_and_in_expectation(case):
    family, model = gaussian_model(case)
    generator = torch.Generator().manual_seed(1)
    for t_value in GRID:
        h, _, dh, alpha, sigma = closed_forms(family, t_value)
        x = torch.randn((4, *SHAPE), generator=generator) * STDS
        t = torch.full((4,), t_value)
        got = per_sample_monitors(family, model, x, t, None, ["acceleration"], generator)["acceleration"]
        # at fixed x, dv/dt = h'(t) x per dimension
        expected = (dh.float() * x.flatten(1)).pow(2).mean(1)
        assert torch.allclose(got, expected, rtol=2e-3), (case, t_value)
    prof = profile_model(family, model, gaussian_pool(256), None, GRID, ["acceleration"], batches=4, batch_size=16,
                         derivatives="jvp")
    for i, t_value in enumerate(GRID):
        # E x_d^2 = alpha^2 s_d^2 + sigma^2
        expected = dh_scale(family, t_value)
        assert abs(prof.mean["acceleration"][i] - expected) < 5 * prof.stderr["acceleration"][i], (case, t_value)


def test_denoiser_peaks_at_intermediate_noise_for_unit_variance():
    family, model = gaussian_model("sit linear", stds=torch.ones(SHAPE))
    grid = np.linspace(0.02, 0.98, 25).tolist()
    prof = profile_model(family, model, torch.randn((16, *SHAPE)), None, grid, ["denoiser"], batches=1, batch_size=4,
                         derivatives="jvp")
    curve = np.asarray(prof.mean["denoiser"])
    peak = int(curve.argmax())
    # bounded, unlike the Dirichlet energy: g = alpha / (alpha^2 + sigma^2) <= 1.21 on the linear path
    assert 0 < peak < len(grid) - 1 and curve.max() < 1.5 and curve[0] < curve[peak] / 1.3


def test_a_fitted_pool_gives_nearly_zero_nonlinear_energy_for_gaussian_data():
    family, model = gaussian_model("sit linear")
    pool = gaussian_pool(20000)
    fitted = GaussianFit.from_pool(pool)
    assert "exact sample covariance" in fitted.description
    prof = profile_model(family, model, pool, None, GRID, ["dirichlet", "nonlinear"], batches=1, batch_size=8, gaussian=fitted,
                         derivatives="jvp")
    ratio = np.asarray(prof.mean["nonlinear"]) / np.asarray(prof.mean["dirichlet"])
    assert ratio.max() < 2e-3, ratio


def test_the_low_rank_fit_is_exact_for_a_spiked_diagonal_covariance():
    # four large variances on top of a diagonal rest: rank 4 plus the diagonal remainder is the model
    variances = torch.full((int(np.prod(SHAPE)),), 0.2, dtype=torch.float64)
    variances[:4] = torch.tensor([9.0, 6.0, 4.0, 3.0])
    variances[10:14] = 0.0  # constant pixels
    pool = torch.randn(40000, variances.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64) * variances.sqrt()
    fitted = GaussianFit.from_pool(pool.reshape(-1, *SHAPE), max_rank=4, exact_dims=0)
    assert fitted.basis.shape == (variances.numel(), 4)
    family = family_of("sit linear")
    u = torch.randn(3, *SHAPE, dtype=torch.float64)
    for t_value in (0.05, 0.5, 0.9):
        t = torch.full((3,), t_value, dtype=torch.float64)
        got = fitted.jacobian_product(u, *schedule_and_derivative(family.schedule, t))
        alpha, sigma = 1 - t_value, t_value
        expected = ((sigma - alpha * variances) / (alpha ** 2 * variances + sigma ** 2)).reshape(SHAPE) * u
        assert torch.allclose(got, expected, rtol=0.05, atol=0.05 * expected.abs().max().item()), t_value
        # a constant pixel gets the exact sigma'/sigma
        assert torch.allclose(got.flatten(1)[:, 10:14], u.flatten(1)[:, 10:14] / sigma, rtol=1e-6)


def gaussian_jacobians_agree(fitted, exact, t_values=(0.05, 0.5, 0.9), rtol=1e-8):
    family = family_of("sit linear")
    u = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for t_value in t_values:
        schedule = schedule_and_derivative(family.schedule, torch.full((3,), t_value, dtype=torch.float64))
        got, expected = fitted.jacobian_product(u, *schedule), exact.jacobian_product(u, *schedule)
        assert torch.allclose(got, expected, rtol=rtol, atol=rtol * expected.abs().max().item()), t_value


def test_the_low_rank_fit_is_exact_for_a_rotated_spike_on_an_isotropic_rest():
    dims = int(np.prod(SHAPE))
    basis, _ = torch.linalg.qr(torch.randn(dims, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    spike = torch.tensor([9.0, 6.0, 4.0, 3.0], dtype=torch.float64)
    covariance = basis @ torch.diag(spike) @ basis.T + 0.2 * (torch.eye(dims, dtype=torch.float64) - basis @ basis.T)
    mean = torch.zeros(dims, dtype=torch.float64)
    fitted = GaussianFit.low_rank(mean, basis, spike, torch.diagonal(covariance))
    gaussian_jacobians_agree(fitted, GaussianFit.from_moments(mean, covariance), rtol=1e-10)


def test_a_small_pool_gives_the_exact_fit_of_its_samples_when_they_span_few_directions():
    # 13 samples on a 4-dimensional affine subspace of 32 dimensions: the Gram branch (fewer samples
    # than dimensions) must find exactly those four directions, largest first
    generator = torch.Generator().manual_seed(2)
    directions, _ = torch.linalg.qr(torch.randn(32, 4, generator=generator, dtype=torch.float64))
    coefficients = torch.randn(13, 4, generator=generator, dtype=torch.float64) * torch.tensor([3.0, 2.0, 1.0, 0.5])
    pool = (0.3 + coefficients @ directions.T).reshape(13, *SHAPE)
    fitted = GaussianFit.from_pool(pool)
    assert fitted.basis.shape[1] == 4 and "rank 4" in fitted.description  # at most (13 - 1) / 2 = 6
    flat = pool.flatten(1)
    exact = GaussianFit.from_moments(flat.mean(0), torch.cov(flat.T))
    assert torch.allclose(fitted.variances, exact.variances.flip(0)[:4], rtol=1e-9)
    gaussian_jacobians_agree(fitted, exact)


def two_point_model(family, point):
    """x0 = +point or -point with equal probability: E[x0 | x_t] = point tanh(alpha <point, x> / sigma^2)."""
    def denoiser(x, a, s):
        return point * torch.tanh(a[:, 0, 0, 0] * (x * point).flatten(1).sum(1) / s[:, 0, 0, 0] ** 2).reshape(-1, 1, 1, 1)

    return ExactModel(family, "velocity", denoiser)


def test_nonlinear_energy_is_clearly_nonzero_for_a_two_point_mixture():
    family = family_of("sit linear")
    point = torch.full(SHAPE, 0.25)
    model = two_point_model(family, point)
    signs = torch.tensor([1.0, -1.0]).repeat(64)
    pool = signs.reshape(-1, 1, 1, 1) * point
    grid = [0.1, 0.3, 0.5, 0.7, 0.9]
    prof = profile_model(family, model, pool, None, grid, ["dirichlet", "nonlinear", "nonlinear_acceleration"],
                         batches=2, batch_size=16, derivatives="jvp")
    ratio = np.asarray(prof.mean["nonlinear"]) / np.asarray(prof.mean["dirichlet"])
    assert ratio.max() > 0.05, ratio
    assert max(prof.mean["nonlinear_acceleration"]) > 1e-3
    # the fit sees one direction, along the two points, with their variance
    gaussian = GaussianFit.from_pool(pool)
    variance = float(gaussian.variances.max())
    assert variance == pytest.approx(point.pow(2).sum().item() * 128 / 127, rel=1e-6)


# -- sensitivity ----------------------------------------------------------------------------------


def test_sensitivity_is_zero_without_pruning_and_positive_with_it():
    family, model = tiny_model("sit")
    pool = torch.randn(16, 4, 8, 8)
    labels = torch.randint(0, 10, (16,))
    full = family.param_count(family.config)
    grid = [0.2, 0.8]

    def profile(target, criterion):
        student = pruned_student(family, model, target, criterion, pool, labels, calib_batches=1, batch_size=4)
        return profile_model(family, model, pool, labels, grid, ["sensitivity"], batches=1, batch_size=8, student=student)

    assert max(profile(full, "segment").mean["sensitivity"]) < 1e-10
    pruned = profile(full // 2, "segment")
    assert min(pruned.mean["sensitivity"]) > 1e-3
    assert any("pruned, not fine-tuned student" in note for note in pruned.notes)
    # a callable is built only when the monitor is asked for
    built = []
    profile_model(family, model, pool, labels, grid, ["dirichlet"], batches=1, batch_size=4,
                  student=lambda: built.append(1))
    assert not built
    with pytest.raises(ValueError, match="student"):
        profile_model(family, model, pool, labels, grid, ["sensitivity"], batches=1, batch_size=4)


class ScaledVelocity(nn.Module):
    """A student whose native output is the teacher's times ``scale`` plus ``offset``."""

    def __init__(self, teacher, scale=1.0, offset=0.0):
        super().__init__()
        self.teacher, self.scale, self.offset = teacher, scale, offset

    def forward(self, x, native_t, y=None):
        return self.scale * self.teacher(x, native_t, y) + self.offset


def test_sensitivity_is_the_relative_velocity_error_in_closed_form():
    family, teacher = gaussian_model("sit linear")
    x = torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0.1, 0.3, 0.5, 0.5, 0.7, 0.9])

    def sensitivity(student):
        return per_sample_monitors(family, teacher, x, t, None, ["sensitivity"], torch.Generator().manual_seed(0),
                                   student=student)["sensitivity"]

    # a student that gets every velocity 0.7 times right is off by 0.3 of it, squared
    assert torch.allclose(sensitivity(ScaledVelocity(teacher, scale=0.7)), torch.full((6,), 0.09), rtol=1e-5)
    # a constant offset delta costs delta^2 D over the sample's own squared velocity
    velocity = family.velocity(teacher, x, t, None).flatten(1)
    expected = 0.05 ** 2 * velocity.shape[1] / velocity.pow(2).sum(1)
    assert torch.allclose(sensitivity(ScaledVelocity(teacher, offset=0.05)), expected, rtol=1e-4)


def test_the_pipeline_profiles_every_new_monitor_and_reports_every_rule(tmp_path, capsys, monkeypatch):
    import json

    from helpers import save_training_dict
    from test_safety import QUICK, cli

    monkeypatch.chdir(tmp_path)
    _, model = tiny_model("sit")
    source = tmp_path / "tiny.pt"
    save_training_dict(source, model, num_heads=4)
    monitors = ["dirichlet", "denoiser", "nonlinear", "nonlinear_acceleration", "sensitivity"]
    code, out, err = cli(["profile", source, "--k", "2", "--split", "snr", "--monitors", ",".join(monitors),
                          "--allocation", "mass:sensitivity", *QUICK], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "tiny-cbs-k2.preview.report.json").read_text())
    assert list(report["profile"]["mean"]) == monitors
    split = report["split"]
    assert split["method"] == "snr" and split["allocation"] == "mass:sensitivity"
    assert set(split["alternatives"]) == {"uniform", "snr", *(f"cbs:{m}" for m in monitors)}
    assert split["alternatives"]["snr"] == split["boundaries"]
    assert min(report["profile"]["mean"]["sensitivity"]) > 0 and abs(split["shares"][0] - 0.5) > 1e-3
    text = (tmp_path / "tiny-cbs-k2.preview.report.md").read_text()
    assert "| snr **(used)** |" in text and "| cbs:sensitivity |" in text
    assert all(f"{m} (± s.e.)" in text for m in monitors)


@pytest.mark.parametrize("case", list(CASES))
def test_finite_differences_match_the_closed_forms_too(case):
    # v is linear in x for Gaussian data, so central differences in x are exact up to rounding;
    # in t they carry an O(h^2) error: 2.4e-3 relative at most, for the VP schedule's derivative
    # along the path, far below the Hutchinson estimate's own spread on real data
    family, model = gaussian_model(case)
    x = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(3))
    t = torch.full((8,), 0.5)
    monitors = ["dirichlet", "denoiser", "acceleration", "path_acceleration"]
    exact = per_sample_monitors(family, model, x, t, None, monitors, torch.Generator().manual_seed(0))
    fd = per_sample_monitors(family, model, x, t, None, monitors, torch.Generator().manual_seed(0), derivatives="fd")
    for m in monitors:
        torch.testing.assert_close(fd[m], exact[m], rtol=5e-3, atol=1e-6, msg=m)


def test_finite_differences_follow_a_trained_network_closely():
    # a real (nonlinear) network: the O(h^2) truncation and float32 rounding stay small against the
    # monitor's own size
    family, model = tiny_model("sit")
    x = torch.randn(6, *family.sample_shape(family.config), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.05, 0.2, 0.4, 0.6, 0.8, 0.95])
    y = torch.zeros(6, dtype=torch.long)
    exact = per_sample_monitors(family, model, x, t, y, ["dirichlet", "acceleration"], torch.Generator().manual_seed(0))
    fd = per_sample_monitors(family, model, x, t, y, ["dirichlet", "acceleration"], torch.Generator().manual_seed(0),
                             derivatives="fd")
    for m in ("dirichlet", "acceleration"):
        assert (fd[m] - exact[m]).abs().max() <= 1e-2 * exact[m].abs().max(), m


def test_finite_differences_refuse_half_precision_inputs():
    family, model = tiny_model("sit")
    x = torch.randn(2, *family.sample_shape(family.config)).half()
    with pytest.raises(ValueError, match="float32"):
        per_sample_monitors(family, model.half(), x, torch.full((2,), 0.5).half(), torch.zeros(2, dtype=torch.long),
                            ["dirichlet"], torch.Generator().manual_seed(0), derivatives="fd")
