"""Recipe schema: bundled recipes are valid, mistakes are named."""

from pathlib import Path

import pytest

from cbs_convert.errors import RecipeError
from cbs_convert.bundled import RECIPES
from cbs_convert.pipeline.recipe import Recipe, build_recipe, bundled_recipe, read_recipe_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["sit_xl_2_k2", "sit_xl_2_k4", "dit_xl_2_k2"])
def test_bundled_recipes_are_valid_and_reachable(name):
    path = ROOT / "recipes" / f"{name}.yaml"
    values = read_recipe_file(path)
    recipe = build_recipe(values)
    assert recipe.k == int(name[-1])
    stem = name.rsplit("_k", 1)[0]
    assert bundled_recipe(stem, recipe.k) == RECIPES / f"{name}.yaml"
    # sized for a real run, unlike the tiny defaults
    assert recipe.steps >= 1000 and recipe.pool_size >= 512


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_unknown_key_suggests_the_closest(tmp_path):
    with pytest.raises(RecipeError, match="unknown key 'setps'; did you mean 'steps'"):
        read_recipe_file(write(tmp_path, "k: 2\nsetps: 10\n"))


@pytest.mark.parametrize("text,needle", [
    ("k: two\n", "'k' must be an integer"),
    ("lr: fast\n", "'lr' must be a number"),
    ("bf16: 3\n", "'bf16' must be true or false"),
    ("monitors: 5\n", "'monitors' must be a list"),
    ("split: random\n", "'split' must be one of"),
])
def test_wrong_types_are_named(tmp_path, text, needle):
    with pytest.raises(RecipeError, match=needle):
        read_recipe_file(write(tmp_path, text))


def test_yaml_syntax_error_has_a_line_number(tmp_path):
    with pytest.raises(RecipeError, match="line 3"):
        read_recipe_file(write(tmp_path, "k: 2\nsteps: 10\n  lr: [1\n"))


@pytest.mark.parametrize("settings,needle", [
    ({"k": 0}, "at least one expert"),
    ({"k": 30}, "do not fit"),
    ({"steps": -1}, "steps=-1 must be 0"),
    ({"batch_size": 0}, "must be positive"),
    ({"k": 3, "boundaries": [0.6, 0.4]}, "strictly increasing"),
    ({"k": 2, "boundaries": [1.5]}, "inside"),
    ({"k": 3, "boundaries": [0.5]}, "need exactly 2"),
    ({"loss": "data"}, "--data"),
    ({"budget": "-1x"}, "positive"),
    ({"t_min": 0.9, "t_max": 0.1}, "t_min < t_max"),
    ({"monitor": "nope"}, "'monitor' must be one of"),
    # weights the loss never reads, and a shared base whose only loss term cannot move its deltas
    ({"loss": "data", "data": "d.npz", "data_weight": 0.01}, "--loss data has one term"),
    ({"distill_weight": 0.5}, "--loss distill has one term"),
    ({"experts": "lora", "loss": "both", "data": "d.npz", "data_weight": 0.0}, "a data weight above 0"),
    # settings of a stage the run does not have
    ({"block_selector": "importance"}, "--structure width removes none"),
    ({"structure": "blockwise", "block_selector": "importance"}, "--structure blockwise removes none"),
    ({"feature_mask_sigma": 5.0}, "it is 0 \\(off\\)"),
])
def test_impossible_requests_are_refused(settings, needle):
    with pytest.raises(RecipeError, match=needle):
        build_recipe(settings)


def test_the_settings_of_depth_pruning_and_feature_distillation_are_taken_where_they_act():
    assert build_recipe({"structure": "depth", "block_selector": "importance"}).block_selector == "importance"
    assert build_recipe({"feature_weight": 1.0, "feature_mask_sigma": 5.0}).feature_mask_sigma == 5.0


def test_boundaries_imply_an_explicit_split():
    assert build_recipe({"k": 3, "boundaries": "0.2,0.6"}).split == "explicit"


def test_later_layers_win():
    assert build_recipe({"steps": 5, "lr": 0.1}, {"steps": 7}).steps == 7
    assert build_recipe({"steps": 5}, {"steps": None}).steps == 5
    assert Recipe().k == 2


def test_a_recognised_architecture_gets_its_bundled_recipe_under_the_users_settings():
    from cbs_convert.pipeline.recipe import resolve_recipe

    recipe = resolve_recipe([{"checkpoint": "x.pt", "k": 2, "lr": 0.001}], "sit_xl_2")
    assert recipe.steps == 10000 and recipe.pool_size == 1024  # from recipes/sit_xl_2_k2.yaml
    assert recipe.lr == 0.001  # the user's flag wins
    assert resolve_recipe([{"checkpoint": "x.pt", "k": 3}], "sit_xl_2").steps == Recipe().steps  # no k3 recipe
    assert resolve_recipe([{"checkpoint": "x.pt"}], None).steps == Recipe().steps


def test_shared_base_deltas_keep_their_own_lr_under_a_bundled_recipe_unless_the_user_sets_one():
    from cbs_convert.pipeline.experts import DELTA_LR, expert_defaults
    from cbs_convert.pipeline.recipe import resolve_recipe

    lora = {"checkpoint": "x.pt", "experts": "lora", "loss": "data", "data": "d.npz"}
    for stem in ("sit_xl_2", None):  # with and without a bundled recipe (sit_xl_2_k2.yaml sets lr: 0.0001)
        recipe = resolve_recipe([lora], stem)
        assert expert_defaults(recipe, full_width=True)["lr"] == DELTA_LR, stem
    assert resolve_recipe([lora], "sit_xl_2").steps == 10000  # the rest of the bundled recipe still applies
    assert resolve_recipe([{**lora, "lr": 2e-4}], "sit_xl_2").lr == 2e-4
    assert resolve_recipe([{"checkpoint": "x.pt"}], "sit_xl_2").lr == 1e-4  # whole experts keep the recipe's


def test_help_documents_every_setting(capsys):
    from dataclasses import fields

    from cbs_convert.cli.main import main

    try:
        main(["--help"])
    except SystemExit as exc:
        assert exc.code == 0
    text = capsys.readouterr().out
    for f in fields(Recipe):
        if f.name != "checkpoint":
            assert "--" + f.name.replace("_", "-") in text, f.name
    for flag in ("--recipe", "--resume", "--force", "--debug", "--quiet"):
        assert flag in text


# -- the monitors a run reads are profiled whether or not --monitors lists them (issue 17.4) ---------


@pytest.mark.parametrize("settings, profiled", [
    ({"monitor": "acceleration"}, ["denoiser", "dirichlet", "acceleration"]),  # --monitor X alone
    ({"monitor": "acceleration", "monitors": []}, ["acceleration"]),
    ({"monitor": "dirichlet", "monitors": ["dirichlet", "acceleration"]}, ["dirichlet", "acceleration"]),
    ({"allocation": "mass:sensitivity", "monitors": ["dirichlet"], "monitor": "dirichlet"}, ["dirichlet", "sensitivity"]),
    ({"split": "uniform", "allocation": "mass", "monitors": [], "monitor": "nonlinear"}, ["nonlinear"]),
    # nothing reads a curve: the list as given, even empty (the benchmarks' plain baselines)
    ({"split": "uniform", "monitors": []}, []),
    ({"k": 2, "boundaries": [0.4], "monitors": ["acceleration"]}, ["acceleration"]),
])
def test_the_monitors_a_run_reads_are_profiled_and_the_recipe_keeps_the_list_as_given(settings, profiled):
    from cbs_convert.pipeline.recipe import profiled_monitors

    recipe = build_recipe(settings)
    assert recipe.monitors == settings.get("monitors", Recipe().monitors)
    assert profiled_monitors(recipe) == profiled


def test_monitor_alone_drives_the_cuts_and_the_report_says_what_was_profiled(tmp_path):
    import torch

    import cbs_convert
    from cbs_convert.stages.split import plan_split
    from helpers import tiny_model

    _, model = tiny_model("sit")
    source = tmp_path / "sit.pt"
    torch.save(model.state_dict(), source)
    result = cbs_convert.convert(source, k=2, family="sit", num_heads=4, monitor="acceleration", monitors=["dirichlet"],
                                 out=str(tmp_path / "o.safetensors"), steps=0, pool_size=8, ode_steps=2, grid=5,
                                 profile_batches=1, profile_batch_size=4, calib_batches=1, batch_size=4, eval_samples=4)
    report = result.report
    prof, split = report["profile"], report["split"]
    assert list(prof["mean"]) == ["dirichlet", "acceleration"]
    assert report["recipe"]["monitors"] == ["dirichlet"] and report["recipe"]["monitor"] == "acceleration"
    assert [n for n in prof["notes"] if "profiled acceleration as well as --monitors [dirichlet]" in n]
    # the cuts are acceleration's equidistribution, not dirichlet's
    assert split["monitor"] == "acceleration"
    again = plan_split(2, "cbs", prof["grid"], prof["mean"]["acceleration"], "acceleration", min_width=0.05, gamma=0.5)
    assert split["boundaries"] == again.boundaries
    assert split["alternatives"]["cbs:acceleration"] != split["alternatives"]["cbs:dirichlet"]


def test_the_same_cost_preset_is_the_row_the_fashion_mnist_benchmark_measured(monkeypatch):
    """The preset claims the benchmark's winning same-cost row: editing one without the other fails here."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import fmnist_benchmark

    measured = dict(fmnist_benchmark.ROWS["K=2 lora r2 uniform"])
    assert measured.pop("warmup_steps") is None  # unset in the preset too: the default 5% warm-up
    assert read_recipe_file("same_cost") == measured
    recipe = build_recipe(read_recipe_file("same_cost"), {"data": "latents.npz"})
    assert (recipe.experts, recipe.rank, recipe.k, recipe.budget) == ("lora", 2, 2, "1x")
