"""Equidistribution on analytic curves, guards, budget shares and width allocation."""

import numpy as np
import pytest

from cbs_convert.errors import BudgetError, RecipeError
from cbs_convert.families import FAMILIES
from cbs_convert.stages.budget import allocate_widths, budget_targets, parse_budget
from cbs_convert.stages.split import enforce_min_width, equidistribute, plan_split, segment_masses
from helpers import tiny_model

GRID = np.linspace(0.0, 1.0, 401)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_constant_curve_gives_uniform_cuts(k):
    cuts = equidistribute(GRID, np.ones_like(GRID), k)
    assert np.allclose(cuts, np.linspace(0, 1, k + 1), atol=1e-9)


def test_mass_concentrated_in_a_window_puts_the_cuts_there():
    phi = np.where((GRID >= 0.3) & (GRID <= 0.6), 1.0, 1e-6)
    cuts = equidistribute(GRID, phi, 3)
    assert 0.3 < cuts[1] < cuts[2] < 0.6
    assert np.allclose(cuts[1:3], [0.4, 0.5], atol=0.01)


def test_linear_curve_matches_the_closed_form():
    # phi = t: Phi(t) = t^2 / 2, so the cut of K=2 is at 1/sqrt(2)
    cuts = equidistribute(GRID, GRID, 2)
    assert abs(cuts[1] - 2 ** -0.5) < 1e-4


def test_curve_on_a_partial_grid_is_held_constant_outside():
    grid = np.linspace(0.2, 0.8, 61)
    cuts = equidistribute(grid, np.ones_like(grid), 2)
    assert abs(cuts[1] - 0.5) < 1e-9


def test_zero_curve_falls_back_to_uniform():
    assert equidistribute(GRID, np.zeros_like(GRID), 4) == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_minimum_width_is_enforced_at_both_ends():
    cuts = enforce_min_width([0.0, 0.001, 0.002, 0.999, 1.0], 0.05)
    widths = np.diff(cuts)
    assert widths.min() >= 0.05 - 1e-12
    assert cuts[0] == 0.0 and cuts[-1] == 1.0
    with pytest.raises(RecipeError):
        enforce_min_width([0, 0.5, 1], 0.6)


def test_guards_are_reported_and_tempering_moves_cuts_towards_uniform():
    phi = np.exp(-GRID / 0.05)  # the Dirichlet energy's blow-up near data
    split = plan_split(4, "cbs", GRID, phi, "dirichlet", gamma=1.0, min_width=0.0 + 1e-9)
    tempered = plan_split(4, "cbs", GRID, phi, "dirichlet", gamma=0.5, min_width=1e-9)
    assert tempered.boundaries[1] > split.boundaries[1]
    floored = plan_split(4, "cbs", GRID, phi, "dirichlet", gamma=1.0, floor=0.5, min_width=1e-9)
    assert floored.boundaries[1] > split.boundaries[1]
    guarded = plan_split(4, "cbs", GRID, phi, "dirichlet", gamma=1.0, min_width=0.1)
    assert set(guarded.guards) == {"raw", "tempered", "floored", "final"}
    assert any("minimum width" in n for n in guarded.notes)
    assert np.diff(guarded.boundaries).min() >= 0.1 - 1e-12


def test_shares_are_the_mass_of_the_final_segments():
    phi = np.where(GRID < 0.5, 3.0, 1.0)
    split = plan_split(2, "explicit", GRID, phi, "dirichlet", boundaries=[0.5], gamma=1.0)
    assert np.allclose(split.shares, [0.75, 0.25], atol=1e-3)
    exact = plan_split(2, "cbs", GRID, phi, "dirichlet", gamma=1.0, min_width=0.01)
    assert np.allclose(exact.shares, [0.5, 0.5], atol=1e-6)
    assert any("equal" in n for n in exact.notes)
    assert np.isclose(sum(segment_masses(GRID, phi, [0, 0.2, 0.7, 1])), 1.0)


@pytest.mark.parametrize("bad", [[0.5, 0.4], [0.0], [1.2], [0.3, 0.3]])
def test_explicit_boundaries_are_validated(bad):
    with pytest.raises(RecipeError):
        plan_split(len(bad) + 1, "explicit", boundaries=bad)


def test_budget_parsing_and_water_filling():
    assert parse_budget("1x", 1000) == 1000
    assert parse_budget("2x", 1000) == 2000
    assert parse_budget("300M", 1) == 300_000_000
    assert parse_budget(5e5, 1) == 500_000
    with pytest.raises(RecipeError):
        parse_budget("lots", 10)
    # an expert cannot exceed the source: its excess goes to the others
    assert budget_targets(2000, [0.7, 0.2, 0.1], 1000) == [1000, 667, 333]


@pytest.mark.parametrize("fraction", [0.2, 0.37, 0.5, 0.81, 1.0])
@pytest.mark.parametrize("name", ["sit", "dit"])
def test_every_expert_within_one_percent_of_its_target(name, fraction):
    family, _ = tiny_model(name)
    target = int(fraction * family.param_count(family.config))
    config = allocate_widths(family, family.config, target)
    assert abs(family.param_count(config) - target) <= 0.01 * target


@pytest.mark.parametrize("fraction", [0.12, 0.25, 0.5, 0.75])
def test_xl_allocation_within_one_percent(fraction):
    config = dict(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16, head_dim=72,
                  mlp_hidden=4608, num_classes=1000, label_rows=1001, class_dropout_prob=0.1, learn_sigma=True, path="linear")
    family = FAMILIES["sit"](config)
    target = int(fraction * family.param_count(config))
    pruned = allocate_widths(family, config, target)
    assert abs(family.param_count(pruned) - target) <= 0.01 * target
    assert pruned["hidden_size"] % 8 == 0 and pruned["mlp_hidden"] % 8 == 0


def test_a_small_narrowed_source_gets_every_budget_some_widths_can_meet():
    import itertools

    family, _ = tiny_model("sit", depth=3)
    # an expert pruned once already: widths this small leave the finest knob little room
    config = family.with_widths(family.config, {"num_heads": 3, "hidden_size": 13, "mlp_hidden": 32})
    knobs = family.width_knobs(config)
    counts = sorted(family.param_count(family.with_widths(config, dict(zip([k.name for k in knobs], values))))
                    for values in itertools.product(*[range(k.minimum, k.full + 1, k.multiple) for k in knobs]))
    full, met = family.param_count(config), 0
    for fraction in np.arange(0.45, 1.0, 0.02):
        target = int(fraction * full)
        if not any(abs(count - target) <= 0.01 * target for count in counts):
            continue
        met += 1
        assert abs(family.param_count(allocate_widths(family, config, target)) - target) <= 0.01 * target, fraction
    assert met >= 20  # the sweep tests something


def test_budget_below_the_smallest_model_is_refused():
    family, _ = tiny_model("sit")
    with pytest.raises(BudgetError, match="--budget"):
        allocate_widths(family, family.config, 100)


def test_uniform_baseline_has_equal_shares_unless_asked_otherwise():
    phi = np.where(GRID < 0.5, 3.0, 1.0)
    assert plan_split(2, "uniform", GRID, phi, "dirichlet", gamma=1.0).shares == [0.5, 0.5]
    weighted = plan_split(2, "uniform", GRID, phi, "dirichlet", gamma=1.0, allocation="mass")
    assert np.allclose(weighted.shares, [0.75, 0.25], atol=1e-3)


# -- the snr rule, allocation by another curve, broken curves ---------------------------------------


def linear_log_snr(t):
    # the linear path: alpha = 1 - t, sigma = t
    t = np.asarray(t, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return 2 * np.log((1 - t) / t)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_snr_cuts_on_the_linear_path_match_the_closed_form(k):
    family, _ = tiny_model("sit")
    t_min, t_max = 0.02, 0.98
    split = plan_split(k, "snr", log_snr=family.log_snr, t_range=(t_min, t_max), min_width=1e-6)
    # equal steps from log-SNR(t_min) to log-SNR(t_max); log-SNR = 2 log((1-t)/t) inverts to t = 1/(1 + e^(L/2))
    levels = linear_log_snr(t_min) + (linear_log_snr(t_max) - linear_log_snr(t_min)) * np.arange(1, k) / k
    assert np.allclose(split.boundaries[1:-1], 1 / (1 + np.exp(levels / 2)), atol=1e-9)
    assert split.boundaries[0] == 0.0 and split.boundaries[-1] == 1.0
    assert split.shares == [1.0 / k] * k  # auto: the baseline shares equally


def test_snr_cuts_of_a_narrow_range_and_of_a_vp_schedule_are_equally_spaced_in_log_snr():
    split = plan_split(3, "snr", log_snr=linear_log_snr, t_range=(0.3, 0.9), min_width=1e-6)
    assert np.allclose(split.boundaries[1:-1], [1 / (1 + np.exp(v / 2)) for v in
                       linear_log_snr(0.3) + (linear_log_snr(0.9) - linear_log_snr(0.3)) * np.array([1, 2]) / 3])
    family, _ = tiny_model("dit")
    split = plan_split(4, "snr", log_snr=family.log_snr, t_range=(0.02, 0.98), min_width=1e-6)
    levels = family.log_snr([0.02, *split.boundaries[1:-1], 0.98])
    assert np.allclose(np.diff(levels), np.diff(levels)[0], rtol=1e-4)
    # a VP schedule's cuts are not the linear path's: the rule follows the family
    assert not np.allclose(split.boundaries, plan_split(4, "snr", log_snr=linear_log_snr, t_range=(0.02, 0.98)).boundaries, atol=0.01)


def test_snr_range_ends_with_infinite_log_snr_move_inside_and_say_so():
    split = plan_split(2, "snr", log_snr=linear_log_snr, t_range=(0.0, 1.0), min_width=1e-6)
    assert abs(split.boundaries[1] - 0.5) < 1e-9  # symmetric clamps at 1e-3 and 1 - 1e-3
    assert sum("log-SNR is infinite" in n for n in split.notes) == 2
    with pytest.raises(RecipeError, match="snr"):
        plan_split(2, "snr", t_range=(0.02, 0.98))  # no schedule given


def test_snr_cuts_respect_the_minimum_width():
    split = plan_split(4, "snr", log_snr=linear_log_snr, t_range=(0.001, 0.999), min_width=0.2)
    assert np.diff(split.boundaries).min() >= 0.2 - 1e-12
    assert any("minimum width" in n for n in split.notes)


def test_allocation_by_another_monitor_gives_its_segment_masses():
    quarters = np.minimum((GRID * 4).astype(int), 3)
    sensitivity = np.array([0.15, 0.45, 0.30, 0.10])[quarters] * 4
    curves = {"dirichlet": np.exp(-GRID / 0.2), "sensitivity": sensitivity}
    split = plan_split(4, "uniform", GRID, curves["dirichlet"], "dirichlet", gamma=1.0, allocation="mass:sensitivity",
                       curves=curves)
    assert np.allclose(split.shares, [0.15, 0.45, 0.30, 0.10], atol=5e-3)
    assert split.allocation == "mass:sensitivity" and any("sensitivity" in n for n in split.notes)
    # the cuts stay the rule's own; the shares are the allocation curve's masses on them, after tempering
    cbs = plan_split(4, "cbs", GRID, curves["dirichlet"], "dirichlet", gamma=0.5, min_width=0.01,
                     allocation="mass:sensitivity", curves=curves)
    assert cbs.boundaries == plan_split(4, "cbs", GRID, curves["dirichlet"], "dirichlet", gamma=0.5, min_width=0.01).boundaries
    assert np.allclose(cbs.shares, segment_masses(GRID, np.sqrt(sensitivity), cbs.boundaries))
    assert max(cbs.shares) - min(cbs.shares) > 0.1


@pytest.mark.parametrize("allocation", ["bogus", "mass:", "mass-sensitivity", "equal:dirichlet"])
def test_bad_allocation_strings_are_refused_naming_the_flag(allocation):
    with pytest.raises(RecipeError, match="--allocation"):
        plan_split(2, "uniform", GRID, np.ones_like(GRID), "dirichlet", allocation=allocation)
    with pytest.raises(RecipeError, match="--allocation"):
        from cbs_convert.pipeline.recipe import build_recipe

        build_recipe({"allocation": allocation})


def test_allocation_by_an_unknown_or_unprofiled_monitor_is_refused():
    from cbs_convert.pipeline.recipe import build_recipe

    with pytest.raises(RecipeError, match="--allocation mass:nope"):
        build_recipe({"allocation": "mass:nope"})
    assert build_recipe({"allocation": "mass:sensitivity", "monitors": ["dirichlet", "sensitivity"], "split": "uniform"})
    with pytest.raises(RecipeError, match="--allocation mass:sensitivity"):
        plan_split(2, "uniform", GRID, np.ones_like(GRID), "dirichlet", allocation="mass:sensitivity",
                   curves={"dirichlet": np.ones_like(GRID)})


def test_a_curve_with_nan_or_inf_is_refused_in_one_line_naming_the_monitor():
    for bad in (np.nan, np.inf):
        phi = np.ones_like(GRID)
        phi[3] = bad
        with pytest.raises(RecipeError, match=r"denoiser curve has NaN or Inf .*--split uniform") as info:
            plan_split(2, "cbs", GRID, phi, "denoiser")
        assert "\n" not in str(info.value)
        with pytest.raises(RecipeError, match=r"sensitivity curve has NaN or Inf .*--allocation equal"):
            plan_split(2, "uniform", GRID, np.ones_like(GRID), "dirichlet", allocation="mass:sensitivity",
                       curves={"sensitivity": phi})
        # a curve that decides nothing is no obstacle: the equal uniform split does not read it
        uniform = plan_split(2, "uniform", GRID, phi, "denoiser", curves={"denoiser": phi})
        assert uniform.shares == [0.5, 0.5] and "cbs:denoiser" not in uniform.alternatives


def test_a_zero_curve_says_so_instead_of_claiming_exact_equidistribution():
    split = plan_split(4, "cbs", GRID, np.zeros_like(GRID), "sensitivity")
    assert split.boundaries == [0.0, 0.25, 0.5, 0.75, 1.0] and split.shares == [0.25] * 4
    assert any("zero everywhere" in n and "uniform" in n for n in split.notes)
    assert any("zero everywhere" in n and "equal" in n for n in split.notes)
    assert not any("exact equidistribution" in n for n in split.notes)


def test_every_rule_is_shown_on_the_same_profile():
    curves = {"dirichlet": np.exp(-GRID / 0.1), "acceleration": 1 + GRID ** 2}
    split = plan_split(3, "uniform", GRID, curves["dirichlet"], "dirichlet", curves=curves,
                       log_snr=linear_log_snr, t_range=(0.02, 0.98), min_width=0.05)
    assert set(split.alternatives) == {"uniform", "snr", "cbs:dirichlet", "cbs:acceleration"}
    assert split.alternatives["uniform"] == split.boundaries
    assert split.alternatives["snr"] == plan_split(3, "snr", log_snr=linear_log_snr, t_range=(0.02, 0.98)).boundaries
    cbs = plan_split(3, "cbs", GRID, curves["acceleration"], "acceleration", curves=curves)
    assert split.alternatives["cbs:acceleration"] == cbs.boundaries
    assert split.alternatives["cbs:dirichlet"][1] < 0.2 < split.alternatives["cbs:acceleration"][1]


def test_a_large_tempering_exponent_keeps_the_cuts_and_shares_finite():
    from cbs_convert.stages.split import temper

    grid = np.linspace(0.02, 0.98, 5)
    phi = np.array([1.5, 3.0, 2.0, 1.2, 1.1])  # 3.0 ** 1545 overflows a float64
    tempered = temper(phi, 1545.0, 0.0)
    assert np.isfinite(tempered).all() and tempered.max() == 1.0
    cuts = equidistribute(grid, tempered, 2)
    shares = segment_masses(grid, tempered, cuts)
    assert np.isfinite(cuts).all() and np.isfinite(shares).all()
    # the shape alone sets the cuts: scaling the curve changes nothing
    assert equidistribute(grid, temper(phi * 7.0, 0.5, 0.0), 2) == pytest.approx(equidistribute(grid, temper(phi, 0.5, 0.0), 2))
