"""Equidistribution on analytic curves, guards, budget shares and width allocation."""

import numpy as np
import pytest

from cbs_convert.errors import BudgetError, RecipeError
from cbs_convert.families import FAMILIES
from cbs_convert.split import (
    allocate_widths, budget_targets, enforce_min_width, equidistribute, parse_budget, plan_split, segment_masses,
)
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


def test_budget_below_the_smallest_model_is_refused():
    family, _ = tiny_model("sit")
    with pytest.raises(BudgetError, match="--budget"):
        allocate_widths(family, family.config, 100)


def test_uniform_baseline_has_equal_shares_unless_asked_otherwise():
    phi = np.where(GRID < 0.5, 3.0, 1.0)
    assert plan_split(2, "uniform", GRID, phi, "dirichlet", gamma=1.0).shares == [0.5, 0.5]
    weighted = plan_split(2, "uniform", GRID, phi, "dirichlet", gamma=1.0, allocation="mass")
    assert np.allclose(weighted.shares, [0.75, 0.25], atol=1e-3)
