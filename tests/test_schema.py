"""One schema for every self-describing file (issue 17.2), and damaged sample shards (17.3).

Real files made from tiny models, their metadata mutated field by field, read through every entry
point: ``info``, ``extract``, ``python -m cbs_convert.sample`` and ``load`` for a routed file;
``python -m cbs_convert.sample``, ``read_checkpoint`` + ``detect`` (how a conversion starts) and the
conversion command for an extracted expert. Each must refuse with exit 2 and one line, or give the
very model the tensors hold; never an internal error, never more than a few seconds.
"""

import copy
import io
import json
import time
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import cbs_convert
from cbs_convert.storage.checkpoint import read_checkpoint
from cbs_convert.cli.main import main as cli_main
from cbs_convert.errors import UserError, is_warning
from cbs_convert.families import detect
from cbs_convert.storage.routed_file import METADATA_KEY, save_routed
from cbs_convert.cli.sample import main as sample_main
from test_routed import three_experts

#: the issue's bound: a malformed file is refused in under 5 s, whatever it claims
REFUSAL_SECONDS = 5.0
SAMPLE = ["--num-samples", "2", "--batch-size", "2", "--steps", "2", "--quiet", "--force"]
DELETE = object()


def run(entry, argv):
    """(exit code, stdout, stderr, seconds) of a command's entry function, in this process."""
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = entry([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue(), time.perf_counter() - start


def judged(result, path):
    """The exit code of a run that refused in one line naming the file, or succeeded."""
    code, _, err, seconds = result
    assert "internal error" not in err and "Traceback" not in err, err
    assert code in (0, 2), err
    assert seconds < REFUSAL_SECONDS, (seconds, err)
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning: ")]
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert str(path) in lines[0], lines[0]
    return code


def fields(tree, prefix=()):
    """Every place in a JSON tree, the root included."""
    yield prefix
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        yield from fields(value, prefix + (key,))


def mutated(tree, where, value):
    tree = copy.deepcopy(tree)
    if not where:
        return value
    parent = tree
    for key in where[:-1]:
        parent = parent[key]
    if value is DELETE:
        del parent[where[-1]]
    else:
        parent[where[-1]] = value
    return tree


def at(tree, where):
    for key in where:
        tree = tree[key]
    return tree


def replacements(draw_from, original):
    """What a hand edit or damage puts in a field: other types, non-finite numbers, absurd sizes,
    a list for an object, nearby values of the right type, or nothing at all."""
    generic = ["four", float("nan"), float("inf"), -1, 0, 10**9, 10**30, 0.5, True, False, None, [], {},
               [original], {"value": original}, DELETE]
    if isinstance(original, (int, float)) and not isinstance(original, bool):
        generic += [original + 1, original - 1, original * 2, -original, str(original)]
    if isinstance(original, list) and original:
        generic += [original[::-1], original[:-1], original + original[-1:]]
    return draw_from(st.one_of(st.sampled_from(generic), st.integers(-3, 2**40), st.floats(), st.text(max_size=4)))


def samples_of(path):
    with np.load(path) as stored:
        return {name: stored[name] for name in stored.files}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A routed SiT of three experts of different widths (with a run description, as the CLI writes
    it), an expert extracted from it, and what each computes and samples when intact."""
    root = tmp_path_factory.mktemp("schema")
    family, experts, configs, boundaries = three_experts("sit")
    extra = {
        "source": {"sha256": "0" * 64, "params": family.param_count(family.config), "container": "safetensors",
                   "architecture": family.describe(family.config)},
        "split": {"boundaries": boundaries, "shares": [0.3, 0.35, 0.35], "method": "cbs", "monitor": "denoiser"},
        "recipe": {"k": 3, "steps": 0, "monitor": "denoiser"},
        "profile": {"grid": [0.1, 0.5, 0.9], "mean": {"denoiser": [1.0, 0.5, 0.2]}},
        "step_profile": {"grid": [0.1, 0.5, 0.9], "mean": {"path_acceleration": [4.0, 1.0, 0.5]}},
    }
    routed = save_routed(root / "routed.safetensors", family, [e.state_dict() for e in experts], configs, boundaries,
                         extra=extra)
    with safe_open(str(routed), framework="pt") as handle:
        meta = json.loads(handle.metadata()[METADATA_KEY])
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, 8, 8, generator=generator)
    t = family.native_time(torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8, 1.0]))
    y = torch.arange(6)
    with torch.no_grad():
        outputs = cbs_convert.load(routed)(x, t, y)
    expert = root / "expert1.safetensors"
    assert judged(run(cli_main, ["extract", routed, "--expert", 1, "--out", expert]), routed) == 0
    with safe_open(str(expert), framework="pt") as handle:
        expert_meta = handle.metadata()
    assert judged(run(sample_main, [routed, *SAMPLE, "--out", root / "routed.npz"]), routed) == 0
    assert judged(run(sample_main, [expert, *SAMPLE, "--out", root / "expert.npz"]), expert) == 0
    return dict(root=root, family=family, configs=configs, routed=routed, meta=meta, tensors=load_file(str(routed)),
                inputs=(x, t, y), outputs=outputs, params=[family.param_count(c) for c in configs],
                expert=expert, expert_meta=expert_meta, args=json.loads(expert_meta["args"]),
                expert_tensors=load_file(str(expert)), routed_samples=samples_of(root / "routed.npz"),
                expert_samples=samples_of(root / "expert.npz"), count=[0])


def _name(world, stem):
    world["count"][0] += 1
    return world["root"] / f"{stem}{world['count'][0]}.safetensors"


def write_routed(world, meta):
    path = _name(world, "routed")
    save_file(world["tensors"], str(path), metadata={METADATA_KEY: json.dumps(meta)})
    return path


def write_expert(world, args):
    path = _name(world, "expert")
    save_file(world["expert_tensors"], str(path), metadata={**world["expert_meta"], "args": json.dumps(args)})
    return path


def assert_routed_verdict(world, meta):
    """Every entry point refuses the file in one line, or all of them read the model it holds."""
    path = write_routed(world, meta)
    out = path.with_suffix(".npz")
    verdicts = {
        "info": judged(shown := run(cli_main, ["info", path]), path),
        "extract": judged(run(cli_main, ["extract", path, "--expert", 1, "--out", path.with_suffix(".pt")]), path),
        "sample": judged(run(sample_main, [path, *SAMPLE, "--out", out]), path),
    }
    try:
        start = time.perf_counter()
        model = cbs_convert.load(path)
        verdicts["load"] = 0
    except UserError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc), str(exc)
        verdicts["load"] = 2
    assert time.perf_counter() - start < REFUSAL_SECONDS
    assert len(set(verdicts.values())) == 1, verdicts  # one schema, whichever way the file is read
    if verdicts["load"] == 2:
        return False
    x, t, y = world["inputs"]
    with torch.no_grad():
        assert torch.equal(model(x, t, y), world["outputs"])
    lines = {line.split(":")[0]: line for line in shown[1].splitlines() if line.startswith("expert ")}
    assert [f"{params:,} params" in lines[f"expert {k}"] for k, params in enumerate(world["params"])] == [True] * 3
    extracted = torch.load(path.with_suffix(".pt"), weights_only=True)
    assert extracted.keys() == {k[len("experts.1."):] for k in world["tensors"] if k.startswith("experts.1.")}
    got = samples_of(out)
    assert got.keys() == world["routed_samples"].keys()
    assert all(np.array_equal(got[k], world["routed_samples"][k]) for k in got)
    return True


def assert_expert_verdict(world, args):
    """The sample command and the start of a conversion refuse in one line, or build the model the
    tensors hold; a model the args could only guess at comes with a warning that says so."""
    path = write_expert(world, args)
    out = path.with_suffix(".npz")
    result = run(sample_main, [path, *SAMPLE, "--out", out])
    code = judged(result, path)
    start = time.perf_counter()
    try:
        source = read_checkpoint(path)
        family, notes = detect(source.state_dict, source.hints)
        started = 0
    except UserError as exc:
        assert "\n" not in str(exc), str(exc)
        started = 2
    assert time.perf_counter() - start < REFUSAL_SECONDS
    assert started == code, (started, result[2])
    if code == 2:
        return False
    warned = any(is_warning(note) for note in notes) and "warning: " in result[2]
    assert family.config == world["configs"][1] or warned, family.config
    got = samples_of(out)
    same = all(np.array_equal(got[k], world["expert_samples"][k]) for k in got)
    assert same or warned
    return True


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_a_mutated_routed_file_is_refused_in_one_line_or_read_as_what_it_holds(world, data):
    where = data.draw(st.sampled_from(list(fields(world["meta"]))))
    value = replacements(data.draw, at(world["meta"], where))
    if value is DELETE and not where:
        value = {}
    assert_routed_verdict(world, mutated(world["meta"], where, value))


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_a_mutated_extracted_expert_is_refused_in_one_line_or_read_as_what_it_holds(world, data):
    where = data.draw(st.sampled_from(list(fields(world["args"]))))
    value = replacements(data.draw, at(world["args"], where))
    if value is DELETE and not where:
        value = {}
    assert_expert_verdict(world, mutated(world["args"], where, value))


#: the hostile battery's categories, each once, whatever hypothesis happens to draw: where, and
#: the damage as a function of the intact metadata
ROUTED_CASES = {
    "nan boundary": (("boundaries", 1), lambda m: float("nan")),
    "string boundary": (("boundaries", 1), lambda m: str(m["boundaries"][1])),
    "unordered boundaries": (("boundaries",), lambda m: [0.0, m["boundaries"][2], m["boundaries"][1], 1.0]),
    "boundaries past 1": (("boundaries",), lambda m: m["boundaries"][:-1] + [1.5]),
    "absurd expert depth": (("experts", 1, "config", "depth"), lambda m: 10**9),
    "absurd source depth": (("family_config", "depth"), lambda m: 10**12),
    "absurd width": (("family_config", "hidden_size"), lambda m: 10**30),
    "heads contradicting the tensors": (("experts", 0, "config", "num_heads"),
                                        lambda m: m["experts"][0]["config"]["num_heads"] + 1),
    "heads as a word": (("experts", 0, "config", "num_heads"), lambda m: "four"),
    "family contradicting its config": (("family",), lambda m: "dit"),
    "unknown family": (("family",), lambda m: "unet"),
    "list for the config": (("family_config",), lambda m: [m["family_config"]]),
    "list for an expert": (("experts", 0), lambda m: [m["experts"][0]]),
    "list for the whole": ((), lambda m: [m]),
    "missing family": (("family",), lambda m: DELETE),
    "missing config": (("experts", 2, "config"), lambda m: DELETE),
    "missing experts": (("experts",), lambda m: DELETE),
    "string segment": (("experts", 0, "segment"), lambda m: "0-0.3"),
    "native boundaries that disagree": (("time_convention", "native_boundaries", 1), lambda m: 0.5),
    "list for the split": (("split",), lambda m: ["cbs"]),
    "string shares": (("split", "shares", 0), lambda m: "a third"),
    "params that lie": (("experts", 1, "params"), lambda m: 10**6),
    "format from the future": (("format_version",), lambda m: 99),
    "per-block format over plain widths": (("format_version",), lambda m: 3),
    "per-block shared-base format over whole experts": (("format_version",), lambda m: 4),
    "shared-base entry beside whole experts": (("shared_base",), lambda m: {"rank": 2}),
    "step profile times falling": (("step_profile", "grid", 2), lambda m: 0.3),
    "step profile time past 1": (("step_profile", "grid", 2), lambda m: 1.5),
    "nan in the step profile": (("step_profile", "mean", "path_acceleration", 1), lambda m: float("nan")),
    "negative step profile": (("step_profile", "mean", "path_acceleration", 0), lambda m: -1.0),
    "step profile shorter than its grid": (("step_profile", "mean", "path_acceleration"), lambda m: [4.0, 1.0]),
    "step profile without a grid": (("step_profile", "grid"), lambda m: DELETE),
}


@pytest.mark.parametrize("case", list(ROUTED_CASES))
def test_each_category_of_damage_is_refused_by_every_entry_point(world, case):
    where, damage = ROUTED_CASES[case]
    assert not assert_routed_verdict(world, mutated(world["meta"], where, damage(world["meta"]))), case


@pytest.mark.parametrize("where, value", [
    (("cbs_convert_config", "depth"), 10**9),
    (("num_heads",), "four"),
    (("num_heads",), 8),
    (("cbs_convert_config", "num_heads"), 5),
    (("family",), "dit"),
    (("family",), ["sit"]),
    (("cbs_convert_config",), ["a list"]),
    (("path_type",), "GVP"),
    (("num_classes",), 3),
    (("cbs_convert_config", "path"), DELETE),
])
def test_an_extracted_expert_that_contradicts_itself_is_refused(world, where, value):
    assert not assert_expert_verdict(world, mutated(world["args"], where, value))


def _wider_source(meta, family):
    """A source wider than every expert (as a small budget leaves it), its count recorded to match."""
    meta = mutated(meta, ("family_config", "hidden_size"), meta["family_config"]["hidden_size"] + 8)
    return mutated(meta, ("source", "params"), family.param_count(meta["family_config"]))


HARMLESS = {
    "no time convention": lambda m, f: mutated(m, ("time_convention",), DELETE),  # an optional entry
    "no source": lambda m, f: mutated(m, ("source",), DELETE),
    "another split name": lambda m, f: mutated(m, ("split", "method"), "uniform"),
    "another recipe": lambda m, f: mutated(m, ("recipe", "k"), 2),
    "no profile": lambda m, f: mutated(m, ("profile",), DELETE),
    "a wider source": _wider_source,
}


@pytest.mark.parametrize("case", list(HARMLESS))
def test_edits_that_leave_the_model_alone_are_read_as_the_model(world, case):
    assert assert_routed_verdict(world, HARMLESS[case](world["meta"], world["family"]))


@pytest.mark.parametrize("where, value", [
    (("model",), "my own expert"),
    (("define_the_model",), False),
    (("num_heads",), DELETE),
    (("path_type",), "linear"),
    (("cbs_convert_config",), DELETE),  # read from the shapes and the remaining args instead
])
def test_an_extracted_expert_with_harmless_edits_reads_back_as_itself(world, where, value):
    assert assert_expert_verdict(world, mutated(world["args"], where, value))


def test_the_conversion_of_a_damaged_expert_stops_in_one_line_before_any_work(world):
    for where, value in ((("cbs_convert_config", "depth"), 10**9), (("num_heads",), 2)):
        path = write_expert(world, mutated(world["args"], where, value))
        result = run(cli_main, ["profile", path, "--workdir", path.with_suffix(".work"), "--quiet"])
        assert judged(result, path) == 2 and where[-1] in result[2], result[2]
        assert not path.with_suffix(".work").exists()


def test_saved_args_of_a_training_dict_meet_the_same_schema(tmp_path):
    from helpers import save_training_dict, tiny_model

    _, model = tiny_model("sit")
    path = tmp_path / "train.pt"
    save_training_dict(path, model, num_heads="four")
    result = run(cli_main, ["profile", path, "--workdir", tmp_path / "w", "--quiet"])
    assert judged(result, path) == 2 and "num_heads" in result[2] and "whole number" in result[2]


def test_adm_files_claiming_more_blocks_than_they_hold_are_refused_at_once(tmp_path):
    from cbs_convert.stages.budget import allocate_widths
    from test_adm import tiny

    family, _ = tiny()
    configs = [allocate_widths(family, family.config, int(f * family.param_count(family.config))) for f in (0.6, 1.0)]
    experts = [family.build(c).eval() for c in configs]
    path = save_routed(tmp_path / "adm.safetensors", family, [e.state_dict() for e in experts], configs, [0.0, 0.5, 1.0])
    assert judged(run(cli_main, ["info", path]), path) == 0
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()[METADATA_KEY])
    tensors = load_file(str(path))
    for where, value, needle in (
        (("experts", 0, "config", "num_res_blocks"), 10**8, "num_res_blocks"),
        (("family_config", "channel_mult"), [1, 2] * 10**5, "channel_mult"),
        (("experts", 1, "config", "channel_mult"), [1, 2, 4], "channel_mult"),
        (("family_config", "image_size"), 10**9, "image_size"),
        (("experts", 0, "config", "attn_heads", 0), 99, "attn_heads"),
        (("family",), "sit", "family_config"),
    ):
        broken = tmp_path / f"{needle}.safetensors"
        save_file(tensors, str(broken), metadata={METADATA_KEY: json.dumps(mutated(meta, where, value))})
        result = run(cli_main, ["info", broken])
        assert judged(result, broken) == 2 and needle in result[2], result[2]
    expert = tmp_path / "expert.safetensors"
    assert judged(run(cli_main, ["extract", path, "--expert", 0, "--out", expert]), path) == 0
    with safe_open(str(expert), framework="pt") as handle:
        metadata = handle.metadata()
    args = json.loads(metadata["args"])
    for where, value, needle in ((("cbs_convert_config", "num_res_blocks"), 10**8, "num_res_blocks"),
                                 (("cbs_convert_config", "channel_mult"), [1] * 10**5, "channel_mult"),
                                 (("image_size",), 10**7, "image_size")):
        broken = tmp_path / f"expert_{needle}.safetensors"
        save_file(load_file(str(expert)), str(broken), metadata={**metadata, "args": json.dumps(mutated(args, where, value))})
        result = run(sample_main, [broken, *SAMPLE, "--out", tmp_path / "adm.npz"])
        assert judged(result, broken) == 2 and needle in result[2], result[2]


def test_damaged_shards_of_any_shape_dtype_or_label_count_are_drawn_again(world):
    routed, root = world["routed"], world["root"]
    args = [routed, "--num-samples", "12", "--batch-size", "2", "--steps", "2", "--quiet", "--keep-shards"]
    assert judged(run(sample_main, [*args, "--out", root / "shards.npz"]), routed) == 0
    reference = samples_of(root / "shards.npz")
    (root / "shards.npz").unlink()
    shards = root / "shards.npz.shards"
    whole = samples_of(shards / "batch_000000.npz")
    samples, labels = whole["samples"], whole["labels"]
    damage = {
        1: dict(samples=np.zeros((2, 4, 9, 9), samples.dtype), labels=labels),  # another model's size
        2: dict(samples=samples.astype(np.float64), labels=labels),  # another dtype
        3: dict(samples=samples, labels=labels[:1]),  # a label short
        4: dict(samples=samples, labels=np.array([0, 99])),  # a label the model does not have
        5: dict(samples=np.array(["a", "b"]), labels=labels),  # not numbers at all
    }
    for batch, arrays in damage.items():
        np.savez(shards / f"batch_{batch:06d}.npz", **arrays)
    result = run(sample_main, [*args, "--out", root / "shards.npz"])
    assert judged(result, routed) == 0
    again = samples_of(root / "shards.npz")
    assert all(np.array_equal(again[k], reference[k]) for k in reference)
    for batch in damage:  # each drawn again in full, as an intact run draws it
        redrawn = samples_of(shards / f"batch_{batch:06d}.npz")
        assert redrawn["samples"].shape == samples.shape and redrawn["samples"].dtype == samples.dtype
