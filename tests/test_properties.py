"""Property-based: whatever the flags or recipe values, either a conversion that did what the flags
asked, or exit 2 with one line that names an offending flag or key."""

import contextlib
import io
import json
import re

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import pytest

from cbs_convert.cli.main import main
from cbs_convert.errors import RecipeError
from cbs_convert.pipeline.recipe import build_recipe, read_recipe_file
from helpers import save_training_dict, tiny_model

numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.integers(-3, 40))
junk = st.one_of(numbers, st.text(max_size=6), st.booleans(), st.none(), st.lists(numbers, max_size=3))
FLAG_VALUES = {
    "--k": st.one_of(st.integers(-2, 30), st.text(max_size=3)),
    "--steps": st.one_of(st.integers(-2, 3), st.text(max_size=3)),
    "--min-width": numbers,
    "--gamma": numbers,
    "--floor": numbers,
    "--budget": st.sampled_from(["1x", "0.5x", "2x", "1000", "abc", "-1x", "1e12", "0", "inf", "nanx"]),
    "--boundaries": st.lists(numbers, max_size=3).map(lambda v: ",".join(map(str, v)) or ","),
    "--split": st.sampled_from(["cbs", "uniform", "explicit", "bogus"]),
    "--monitor": st.sampled_from(["dirichlet", "acceleration", "path_acceleration", "x"]),
    "--monitors": st.sampled_from(["dirichlet", "acceleration,dirichlet", "path_acceleration", "", "nope"]),
    "--lr": numbers,
    "--t-min": numbers,
    "--t-max": numbers,
    "--grid": st.integers(-1, 5),
    "--prune": st.sampled_from(["segment", "magnitude", "random", "best"]),
    "--loss": st.sampled_from(["distill", "data", "both"]),
    "--label-dropout": numbers,
    "--ema-decay": numbers,
    "--margin": numbers,
}


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(st.sampled_from(sorted(FLAG_VALUES)), st.just(None), max_size=5).flatmap(
    lambda keys: st.fixed_dictionaries({k: FLAG_VALUES[k] for k in keys})))
def test_cli_flags_do_what_they_say_or_name_the_bad_one(tmp_path_factory, flags):
    tmp = tmp_path_factory.mktemp("prop")
    _, model = tiny_model("sit")
    source = tmp / "tiny.pt"
    save_training_dict(source, model, num_heads=4)
    argv = [str(source), "--out", str(tmp / "o.safetensors"), "--force", "--quiet", "--pool-size", "8",
            "--ode-steps", "2", "--profile-batches", "1", "--profile-batch-size", "4", "--calib-batches", "1",
            "--batch-size", "4", "--eval-samples", "4"]
    if "--grid" not in flags:
        argv += ["--grid", "3"]
    if "--steps" not in flags:
        argv += ["--steps", "2"]
    for flag, value in flags.items():
        argv += [flag, str(value)]
    stderr = io.StringIO()
    # redirected here, inside the example: pytest re-installs its own capture around each test
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    err = stderr.getvalue()
    assert "Traceback" not in err
    if code == 2:
        errors = [line for line in err.splitlines() if line.strip() and not line.startswith("warning: ")]
        assert len(errors) == 1 and errors[0].startswith("error: "), (argv, err)
        assert any(_names(errors[0], flag) for flag in flags) or "unrecognized" in errors[0], (flags, errors[0])
        return
    assert code == 0, (argv, err)
    report = json.loads((tmp / "o.report.json").read_text())
    recipe = report["recipe"]
    for flag, value in flags.items():
        name = flag[2:].replace("-", "_")
        if name in ("k", "steps", "grid"):
            assert recipe[name] == int(value), (flag, value, recipe[name])
        elif name in ("split", "prune", "loss", "monitor"):
            assert recipe[name] == value or (name == "split" and recipe[name] == "explicit")
    assert len(report["evaluation"]["experts"]) == recipe["k"]


#: words by which an error line may name each flag (its recipe key, the flag, or the thing it sets)
ALIASES = {
    "--k": ("k=", "--k", "k "), "--min-width": ("min_width", "minimum width", "--min-width"),
    "--t-min": ("t_min",), "--t-max": ("t_max",), "--label-dropout": ("label_dropout",),
    "--ema-decay": ("ema_decay",), "--budget": ("budget",), "--boundaries": ("boundaries",),
    "--monitors": ("monitors",), "--monitor": ("monitor",), "--split": ("split",),
}


def _names(line, flag):
    words = ALIASES.get(flag, ()) + (flag, flag[2:].replace("-", "_"))
    return any(re.search(rf"(^|[^a-z_]){re.escape(w)}", line) for w in words)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(["k", "steps", "lr", "budget", "boundaries", "split", "monitors", "gamma",
                                        "floor", "min_width", "t_min", "t_max", "bf16", "seed", "ksteps", "device"]),
                       junk, max_size=6))
def test_recipe_values_are_validated_or_rejected_cleanly(tmp_path_factory, values):
    path = tmp_path_factory.mktemp("recipe") / "r.yaml"
    path.write_text(yaml.safe_dump(values))
    try:
        recipe = build_recipe(read_recipe_file(path))
    except RecipeError as exc:
        # the message names a key of the file that is at fault (or the file, for a bad key name)
        assert any(re.search(rf"(^|[^a-z_]){key}([^a-z_]|$)", str(exc)) for key in values), (values, str(exc))
        return
    for key, value in values.items():
        if value is None or key in ("boundaries", "split"):
            continue  # unset, or rewritten together (boundaries imply the explicit split)
        expected = value if key != "budget" else str(value)
        if key == "monitors":
            expected = [str(v).strip() for v in value if str(v).strip()]
        assert getattr(recipe, key) == expected or getattr(recipe, key) == pytest.approx(expected), (key, value)
