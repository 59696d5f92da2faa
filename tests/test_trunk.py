"""--trunk-steps: one student trained on all of time first, every expert cut from it (eDiff-I's branching)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import cbs_convert
from cbs_convert.cli.main import main as cli_main
from cbs_convert.families.transformer_net import block_widths
from cbs_convert.pipeline.experts import compose_kept
from helpers import tiny_model
from test_end_to_end import QUICK_KW


def _cli(args, cwd, capsys):
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        code = cli_main([str(a) for a in args])
    return code, capsys.readouterr()


def _source(tmp_path, depth=3):
    family, model = tiny_model("sit", depth=depth)
    source = tmp_path / "tiny.safetensors"
    save_file(model.state_dict(), str(source))
    return family, source


def _convert(tmp_path, source, name, **settings):
    # a cut at 0.25 with mass allocation: two experts of different widths
    return cbs_convert.convert(source, k=2, num_heads=4, family="sit", boundaries=[0.25], out=str(tmp_path / name),
                               keep_workdir=True, **{**QUICK_KW, **settings})


def _expert(path, k):
    tensors = load_file(str(path))
    return {key[len(f"experts.{k}."):]: value for key, value in tensors.items() if key.startswith(f"experts.{k}.")}


def test_compose_kept_maps_a_cut_of_a_cut_back_to_the_source():
    trunk = {"residual": [0, 2, 5, 7], "blocks.0.heads": [1, 3], "blocks": [0, 2]}
    expert = {"residual": [1, 3], "blocks.0.mlp": [4]}
    assert compose_kept(trunk, expert) == {"residual": [2, 7], "blocks.0.heads": [1, 3], "blocks": [0, 2],
                                           "blocks.0.mlp": [4]}


def test_experts_are_cut_from_the_trained_trunk_not_from_the_source(tmp_path):
    family, source = _source(tmp_path)
    result = _convert(tmp_path, source, "trunk.safetensors", trunk_steps=12, steps=0)
    work = tmp_path / "trunk.safetensors.work"
    plan = json.loads((work / "split.json").read_text())
    trunk_config, configs = plan["trunk"], plan["configs"]
    params = [family.param_count(c) for c in configs]
    assert params[0] != params[1] and family.param_count(trunk_config) == max(params)
    trained = load_file(str(work / "trunk" / "trained.safetensors"))
    pruned = load_file(str(work / "trunk" / "pruned.safetensors"))
    assert any(not torch.equal(trained[key], pruned[key]) for key in trained)  # the trunk did train
    widest = params.index(max(params))
    # with no expert steps, the widest expert is the trained trunk itself, to the bit
    expert = _expert(result.output, widest)
    assert expert.keys() == trained.keys() and all(torch.equal(expert[key], trained[key]) for key in trained)
    # the narrower one is the trained trunk narrowed: its record names source units the trunk holds,
    # and slicing the trunk by those units gives its weights, to the bit
    trunk_kept = json.loads((work / "trunk" / "pruned.kept.json").read_text())
    narrow = 1 - widest
    narrow_kept = json.loads((work / "pruned" / f"expert_{narrow}.kept.json").read_text())
    assert set(narrow_kept["residual"]) < set(trunk_kept["residual"])
    assert configs[narrow]["hidden_size"] < trunk_config["hidden_size"]
    within_trunk = {name: torch.tensor([trunk_kept[name].index(i) for i in index] if name in trunk_kept else index)
                    for name, index in narrow_kept.items() if name != "blocks"}
    sliced = family.slice_state_dict(trained, trunk_config, within_trunk)
    expert = _expert(result.output, narrow)
    assert expert.keys() == sliced.keys() and all(torch.equal(expert[key], sliced[key]) for key in sliced)
    from_source = family.slice_state_dict(load_file(str(source)), family.config, {
        name: torch.tensor(index) for name, index in narrow_kept.items() if name != "blocks"})
    assert any(not torch.equal(expert[key], from_source[key]) for key in sliced)  # not the source's weights
    report = result.report["finetune"]
    assert report["settings"]["trunk_steps"] == 12 and report["trunk"]["steps_run"] == 12
    assert report["trunk"]["params"] == max(params) and "trunk" in result.report["timings_s"]
    assert (tmp_path / "trunk.report.md").read_text().count("- trunk:") >= 2


def test_a_trunk_that_ends_inside_its_warm_up_is_warned_of(tmp_path):
    family, source = _source(tmp_path, depth=2)
    result = _convert(tmp_path, source, "warm.safetensors", trunk_steps=4, steps=6, warmup_steps=4)
    report = result.report["finetune"]
    # the warm-up as given, for the trunk as for each expert (a work dir begun before resumes alike)
    assert report["trunk"]["settings"]["warmup_steps"] == 4
    assert [e["settings"]["warmup_steps"] for e in report["experts"]] == [4, 4]
    assert any("never trains at the peak lr" in w for w in result.report["warnings"])


def test_a_blockwise_trunk_chooses_the_blocks_widths_once_for_every_expert(tmp_path):
    family, source = _source(tmp_path)
    result = _convert(tmp_path, source, "blockwise.safetensors", trunk_steps=8, steps=4, structure="blockwise",
                      feature_weight=1.0)
    plan = json.loads((tmp_path / "blockwise.safetensors.work" / "split.json").read_text())
    trunk_blocks = block_widths(plan["trunk"])
    for config in plan["configs"]:  # each expert fits inside the trunk, block by block
        assert all(h <= th and m <= tm for (h, m), (th, tm) in zip(block_widths(config), trunk_blocks))
    assert all(e["error_after"] < e["error_before"] for e in result.report["evaluation"]["experts"])
    routed = cbs_convert.load(result.output)
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.isfinite(routed(x, family.native_time(torch.tensor([0.1, 0.9])), y)).all()


def test_a_resumed_trunk_run_is_not_trained_again_and_a_changed_trunk_is_refused(tmp_path, capsys):
    _, source = _source(tmp_path, depth=2)
    first = _convert(tmp_path, source, "r.safetensors", trunk_steps=6, steps=2)
    trained = tmp_path / "r.safetensors.work" / "trunk" / "trained.safetensors"
    stamp = trained.stat().st_mtime_ns
    again = cbs_convert.convert(source, k=2, num_heads=4, family="sit", boundaries=[0.25], out=str(tmp_path / "r.safetensors"),
                                keep_workdir=True, resume=True, force=True, **{**QUICK_KW, "trunk_steps": 6, "steps": 2})
    assert trained.stat().st_mtime_ns == stamp
    a, b = load_file(str(first.output)), load_file(str(again.output))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    args = ["tiny.safetensors", "--k", 2, "--num-heads", 4, "--family", "sit", "--boundaries", "0.25", "--out",
            "r.safetensors", "--resume", "--force", "--trunk-steps", 7]
    for key, value in QUICK_KW.items():
        args += [f"--{key.replace('_', '-')}", value]
    code, printed = _cli(args, tmp_path, capsys)
    lines = printed.err.strip().splitlines()
    assert code == 2 and "trunk_steps" in printed.err, printed.err
    assert len([line for line in lines if line.startswith("error")]) == 1


@pytest.mark.parametrize("extra, expected", [
    (["--trunk-steps", "-1"], "trunk_steps=-1 must be 0"),
    (["--trunk-steps", "5", "--k", "1"], "give those steps to --steps instead"),
    (["--trunk-steps", "5", "--experts", "lora", "--loss", "data", "--data", "lat.npz"], "--experts lora already shares one base"),
])
def test_a_trunk_that_cannot_be_is_refused_in_one_line(tmp_path, capsys, extra, expected):
    _source(tmp_path, depth=2)
    code, printed = _cli(["tiny.safetensors", "--k", 2, "--num-heads", 4, "--family", "sit", *extra], tmp_path, capsys)
    lines = [line for line in printed.err.strip().splitlines() if line]
    assert code == 2 and len(lines) == 1 and expected in lines[0], lines
    assert not (tmp_path / "tiny-cbs-k2.safetensors").exists()


def test_blockwise_experts_of_four_sizes_are_all_cut_from_the_trunk_and_the_widest_is_the_trunk(tmp_path):
    family, source = _source(tmp_path, depth=4)
    result = cbs_convert.convert(source, k=4, num_heads=4, family="sit", boundaries=[0.1, 0.25, 0.6], structure="blockwise",
                                 trunk_steps=2, out=str(tmp_path / "four.safetensors"), keep_workdir=True,
                                 **{**QUICK_KW, "steps": 0})
    plan = json.loads((tmp_path / "four.safetensors.work" / "split.json").read_text())
    widest = max(range(4), key=lambda k: plan["targets"][k])
    assert plan["configs"][widest] == plan["trunk"]
    for entry in result.report["evaluation"]["experts"]:
        assert abs(entry["params_vs_target"]) <= 0.01


def test_a_trunk_that_cannot_learn_is_said_before_any_work(tmp_path):
    _, source = _source(tmp_path, depth=2)
    result = _convert(tmp_path, source, "idle.safetensors", trunk_steps=5, steps=0, budget="1.5x")
    said = [w for w in result.report["warnings"] if "the trunk is a full-width copy" in w]
    assert len(said) == 1 and "5 steps are skipped" in said[0]
    assert result.report["finetune"]["trunk"]["trained"] is False
    report = (tmp_path / "idle.report.md").read_text()
    assert "steps of one trunk on all of time" not in report and "- trunk: not trained" in report


def test_an_adm_trunk_converts_and_each_narrower_expert_keeps_only_units_the_trunk_holds(tmp_path):
    # gamma near 0: shares near the segments' lengths, so two widths under one trunk, the narrower
    # cut from the trunk's own groups (the caps themselves: test_adm's block-by-block source)
    from test_adm import tiny

    family, model = tiny()
    source = tmp_path / "adm.pt"
    torch.save(model.state_dict(), source)
    result = cbs_convert.convert(source, k=2, num_heads=2, image_size=8, boundaries=[0.4], gamma=0.05, trunk_steps=2, steps=0, keep_workdir=True,
                                 out=str(tmp_path / "adm_trunk.safetensors"), pool_size=16, ode_steps=4, grid=4,
                                 profile_batches=1, profile_batch_size=4, calib_batches=1, batch_size=4, eval_samples=8)
    plan = json.loads((tmp_path / "adm_trunk.safetensors.work" / "split.json").read_text())
    trunk, configs = plan["trunk"], plan["configs"]
    assert len(set(trunk["res_groups"])) > 1 and configs[0] != configs[1]
    for config in configs:
        assert all(a <= b for a, b in zip(config["res_groups"], trunk["res_groups"]))
        assert all(a <= b for a, b in zip(config["attn_heads"], trunk["attn_heads"]))
    assert all(abs(e["params_vs_target"]) <= 0.01 for e in result.report["evaluation"]["experts"])
    with torch.no_grad():
        out = cbs_convert.load(result.output)(torch.randn(2, 3, 8, 8), torch.tensor([0.1, 0.9]), torch.tensor([1, 2]))
    assert torch.isfinite(out).all()
