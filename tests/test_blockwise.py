"""Per-block widths (--structure blockwise): each block keeps its own heads and MLP channels, the
totals and the accounting those of the uniform widths."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import cbs_convert
from cbs_convert.errors import BudgetError
from cbs_convert.cli.main import main as cli_main
from cbs_convert.families import family_from_config
from cbs_convert.families.transformer_net import block_widths
from cbs_convert.stages.budget import allocate_widths, spread_over_blocks
from cbs_convert.storage.loading import load_model
from helpers import tiny_model
from test_end_to_end import QUICK_KW


def _cli(args, cwd, capsys):
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        code = cli_main([str(a) for a in args])
    return code, capsys.readouterr()


@pytest.mark.parametrize("name", ["sit", "dit"])
def test_per_block_widths_build_count_and_compute_what_their_blocks_hold(name):
    family, _ = tiny_model(name, depth=3)
    config = family.with_block_widths(family.config, {"num_heads": [1, 4, 2], "mlp_hidden": [16, 5, 64]})
    assert config["num_heads"] == 4 and config["mlp_hidden"] == 64
    model = family.build(config)
    assert family.param_count(config) == sum(p.numel() for p in model.state_dict().values())
    assert [b.attn.qkv.out_features for b in model.blocks] == [3 * h * config["head_dim"] for h in (1, 4, 2)]
    assert [b.mlp.fc1.out_features for b in model.blocks] == [16, 5, 64]
    # FLOPs are additive over blocks: the mixed model costs the mean of the uniform ones it mixes
    uniform = [family.with_widths(family.config, {"num_heads": h, "mlp_hidden": m}) for h, m in ((1, 16), (4, 5), (2, 64))]
    overhead = family.forward_flops(family.with_depth(family.config, 0))
    per_block = sum(family.forward_flops(family.with_depth(c, 1)) - overhead for c in uniform)
    assert family.forward_flops(config) == overhead + per_block


def test_units_go_to_the_blocks_that_score_highest_and_every_block_keeps_one():
    family, _ = tiny_model("sit", depth=3)
    source = family.config
    uniform = family.with_widths(source, {"num_heads": 2, "mlp_hidden": 8})
    heads, mlp = source["num_heads"], source["mlp_hidden"]
    scores = {
        "heads.0": torch.tensor([9.0, 8.0, 7.0, 6.0][:heads]), "heads.1": torch.tensor([0.1, 0.2, 0.3, 0.4][:heads]),
        "heads.2": torch.tensor([5.0, 0.0, 0.0, 0.0][:heads]),
        "mlp.0": torch.zeros(mlp), "mlp.1": torch.arange(mlp, dtype=torch.float32) + 100, "mlp.2": torch.ones(mlp),
    }
    spread = spread_over_blocks(family, source, uniform, scores)
    # 6 heads in all: block 0's four, then block 2's best (5.0), block 1 keeps its best one only
    assert spread["block_heads"] == [4, 1, 1]
    # 24 MLP channels: block 1 scores far above the others, which keep their one each
    assert spread["block_mlp"] == [1, 22, 1]
    assert family.param_count(spread) == family.param_count(uniform)
    assert family.forward_flops(spread) == family.forward_flops(uniform)


def _convert(tmp_path, **settings):
    family, model = tiny_model("sit", depth=3)
    source = tmp_path / "tiny.safetensors"
    save_file(model.state_dict(), str(source))
    result = cbs_convert.convert(source, k=2, structure="blockwise", num_heads=4, family="sit",
                                 out=str(tmp_path / "blockwise.safetensors"), **{**QUICK_KW, **settings})
    return family, model, result


def test_a_blockwise_conversion_meets_the_uniform_budget_and_extracts_experts_that_load_as_themselves(tmp_path, capsys):
    family, model, result = _convert(tmp_path)
    routed = cbs_convert.load(result.output)
    configs = [entry["config"] for entry in routed.metadata["experts"]]
    for k, (config, expert) in enumerate(zip(configs, result.report["evaluation"]["experts"])):
        uniform = allocate_widths(family, family.config, result.report["evaluation"]["experts"][k]["target_params"])
        heads, mlp = zip(*block_widths(config))
        assert sum(mlp) == 3 * uniform["mlp_hidden"] and sum(heads) == 3 * uniform["num_heads"]
        assert expert["params"] == family.param_count(config) == family.param_count(uniform)
    assert any(len(set(c.get("block_mlp", []))) > 1 for c in configs)  # the scores did move units between blocks
    code, printed = _cli(["extract", "blockwise.safetensors", "--expert", 1, "--out", "e1.safetensors"], tmp_path, capsys)
    assert code == 0, printed.err
    plain_family, plain = load_model(tmp_path / "e1.safetensors")
    assert plain_family.config["block_mlp"] == configs[1]["block_mlp"]
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    t = family.native_time(torch.tensor([0.9, 0.95]))
    with torch.no_grad():
        assert torch.allclose(plain(x, t, y), routed(x, t, y), atol=1e-5)
    # an expert with widths of its own per block is a source like any other: pruned again, uniformly
    again = cbs_convert.convert(tmp_path / "e1.safetensors", k=2, budget="0.8x", out=str(tmp_path / "again.safetensors"),
                                **QUICK_KW)
    source_blocks = block_widths(configs[1])
    # uniform experts of a per-block source: the file still holds per-block widths (its source's)
    assert cbs_convert.read_metadata(again.output)["format_version"] == 3
    for entry, expert in zip(cbs_convert.load(again.output).metadata["experts"], again.report["evaluation"]["experts"]):
        pruned_blocks = block_widths(entry["config"])
        assert all(h <= sh and m <= sm for (h, m), (sh, sm) in zip(pruned_blocks, source_blocks))
        assert pruned_blocks != source_blocks and abs(expert["params_vs_target"]) <= 0.02


@pytest.mark.parametrize("edit, expected", [
    (lambda c: c.update(block_heads=c["block_heads"][:-1]), "block_heads"),
    (lambda c: c.update(block_mlp=[c["mlp_hidden"] + 1] * 3), "block_mlp[0]"),
    (lambda c: c.update(mlp_hidden=c["mlp_hidden"] + 1), "the widest block of block_mlp"),
])
def test_per_block_widths_that_contradict_the_file_are_refused_in_one_line(tmp_path, capsys, edit, expected):
    _convert(tmp_path)
    path = tmp_path / "blockwise.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["cbs_convert"])
    edit(meta["experts"][1]["config"])
    broken = tmp_path / "broken.safetensors"
    save_file(load_file(str(path)), str(broken), metadata={"cbs_convert": json.dumps(meta)})
    code, printed = _cli(["info", broken], tmp_path, capsys)
    lines = printed.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and expected in lines[0], lines


def test_blockwise_on_a_unet_is_refused_by_name(tmp_path, capsys):
    from test_adm import HINTS, tiny as tiny_adm

    _, unet = tiny_adm()
    save_file(unet.state_dict(), str(tmp_path / "unet.safetensors"))
    code, printed = _cli(["unet.safetensors", "--structure", "blockwise", "--num-heads", HINTS["num_heads"],
                          "--image-size", HINTS["image_size"], "--quiet"], tmp_path, capsys)
    assert code == 2 and "shares one width over its blocks" in printed.err and len(printed.err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.work"))


def test_diffusers_cannot_hold_a_blockwise_dit_expert_and_says_so():
    from cbs_convert.errors import CheckpointError
    from cbs_convert.families.diffusers_dit import model_config

    family, _ = tiny_model("dit", depth=3)
    config = family.with_block_widths({**family.config, "numerics": "diffusers"},
                                      {"num_heads": [4, 4, 4], "mlp_hidden": [8, 16, 4 * family.config["hidden_size"]]})
    with pytest.raises(CheckpointError, match="widths of its own in each block"):
        model_config(config, "expert 1")


def test_units_go_in_chunks_of_the_knobs_multiple_when_the_uniform_widths_hold_them():
    family, _ = tiny_model("sit", depth=3, mlp_hidden=256, hidden_size=256, num_heads=4)
    source = family.config
    multiple = next(k.multiple for k in family.width_knobs(source) if k.name == "mlp_hidden")
    uniform = family.with_widths(source, {"mlp_hidden": 128})
    generator = torch.Generator().manual_seed(0)
    scores = {g.name: torch.rand(g.size, generator=generator) * (1 + int(g.name.rpartition(".")[2] or 0))
              for g in family.unit_groups(source, uniform) if "." in g.name}
    spread = spread_over_blocks(family, source, uniform, scores)
    assert multiple == 8 and all(m % 8 == 0 for m in spread["block_mlp"]) and sum(spread["block_mlp"]) == 3 * 128
    assert family.param_count(spread) == family.param_count(uniform)


def test_full_width_blockwise_experts_are_the_source_and_are_not_trained_on_distillation(tmp_path):
    family, model, result = _convert(tmp_path, budget="2x")
    assert [e["config"] for e in cbs_convert.load(result.output).metadata["experts"]] == [family.config] * 2
    assert not any(e["trained"] for e in result.report["finetune"]["experts"])
    assert any("full-width copy of the teacher" in w for w in result.report["warnings"])


def test_a_blockwise_expert_cannot_be_depth_pruned_or_extracted_to_a_bare_pt(tmp_path, capsys):
    _convert(tmp_path)
    code, printed = _cli(["extract", "blockwise.safetensors", "--expert", 1, "--out", "e1.pt"], tmp_path, capsys)
    assert code == 2 and "a bare .pt cannot say" in printed.err and len(printed.err.strip().splitlines()) == 1
    assert not (tmp_path / "e1.pt").exists()
    assert _cli(["extract", "blockwise.safetensors", "--expert", 1, "--out", "e1.safetensors"], tmp_path, capsys)[0] == 0
    code, printed = _cli(["e1.safetensors", "--structure", "depth", "--budget", "0.7x", "--quiet"], tmp_path, capsys)
    assert code == 2 and "widths of its own in each block" in printed.err and len(printed.err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("e1*.work"))


def test_per_block_files_have_a_format_of_their_own_that_an_older_reader_calls_newer(tmp_path, capsys, monkeypatch):
    from cbs_convert.storage import routed_schema

    _, _, result = _convert(tmp_path)
    path = tmp_path / "blockwise.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["cbs_convert"])
    assert meta["format_version"] == routed_schema.PER_BLOCK_FORMAT
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    t = torch.tensor([0.1, 0.9])
    with torch.no_grad():
        expected = cbs_convert.load(path)(x, t, y)
    # what a file written before format 3 existed says of itself: it still loads, the same model
    meta["format_version"] = routed_schema.WHOLE_EXPERTS_FORMAT
    relabelled = tmp_path / "relabelled.safetensors"
    save_file(load_file(str(path)), str(relabelled), metadata={"cbs_convert": json.dumps(meta)})
    with torch.no_grad():
        assert torch.equal(cbs_convert.load(relabelled)(x, t, y), expected)
    # a reader without per-block widths refuses the file as newer, in one line
    monkeypatch.setattr(routed_schema, "SUPPORTED_FORMAT_VERSIONS", (1, 2))
    code, printed = _cli(["info", "blockwise.safetensors"], tmp_path, capsys)
    lines = printed.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "format version 3" in lines[0] and "newer" in lines[0], lines


def test_a_per_block_source_pruned_mildly_keeps_every_block_within_its_own_width():
    # a trunk a 4-expert blockwise run planned: pruned to three quarters of it, the MLP width the
    # allocator tries last must stay capped by each block's own
    family, _ = tiny_model("sit", depth=4, hidden_size=19)
    source = family.with_block_widths(family.config, {"mlp_hidden": [47, 44, 50, 43], "num_heads": [4, 2, 2, 4]})
    source_family = type(family)(source)
    full = source_family.param_count(source)
    fitted = 0
    for share in [s / 100 for s in range(50, 96)]:
        try:
            config = allocate_widths(source_family, source, int(full * share))
        except BudgetError:  # a tiny model's widths are coarse: some targets have no width within 1%
            continue
        fitted += 1
        for (heads, mlp), (source_heads, source_mlp) in zip(block_widths(config), block_widths(source)):
            assert heads <= source_heads and mlp <= source_mlp, (share, block_widths(config))
        assert all(0 < g.keep <= g.size for g in source_family.unit_groups(source, config))
    assert fitted >= 20


def test_a_shared_base_over_a_per_block_source_has_its_own_format_too(tmp_path, capsys, monkeypatch):
    from cbs_convert.storage import routed_schema

    _convert(tmp_path)
    code, printed = _cli(["extract", "blockwise.safetensors", "--expert", "0", "--out", "expert0.safetensors"], tmp_path, capsys)
    assert code == 0, printed.err
    source = tmp_path / "expert0.safetensors"
    result = cbs_convert.convert(source, k=2, experts="lora", rank=2, steps=0, out=str(tmp_path / "lora.safetensors"),
                                 **{k: v for k, v in QUICK_KW.items() if k != "steps"})
    meta = cbs_convert.read_metadata(result.output)
    assert meta["format_version"] == routed_schema.PER_BLOCK_SHARED_BASE_FORMAT
    assert family_from_config(meta["family"], meta["family_config"]).per_block_widths(meta["family_config"])
    # zero deltas: the routed model is the per-block source itself
    x, y, t = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([0.1, 0.9])
    with torch.no_grad():
        assert torch.allclose(cbs_convert.load(result.output)(x, t, y), load_model(source)[1](x, t, y), atol=1e-6)
    # what such a file said of itself before format 4 existed: it still loads, the same model
    meta["format_version"] = routed_schema.SHARED_BASE_FORMAT
    relabelled = tmp_path / "relabelled.safetensors"
    save_file(load_file(str(result.output)), str(relabelled), metadata={"cbs_convert": json.dumps(meta)})
    with torch.no_grad():
        assert torch.equal(cbs_convert.load(relabelled)(x, t, y), cbs_convert.load(result.output)(x, t, y))
    # a reader from before format 4 refuses the file as newer, in one line
    monkeypatch.setattr(routed_schema, "SUPPORTED_FORMAT_VERSIONS", (1, 2, 3))
    code, printed = _cli(["info", "lora.safetensors"], tmp_path, capsys)
    lines = printed.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "format version 4" in lines[0] and "newer" in lines[0], lines
