"""Depth pruning: whole blocks removed per expert, chosen on its segment, exact bookkeeping."""

import pytest
import torch
from safetensors.torch import save_file

import cbs_convert
from cbs_convert.cli.main import main as cli_main
from cbs_convert.stages.depth import RecoverySettings, allocate_depth, choose_blocks, skipping
from cbs_convert.storage.loading import load_model
from cbs_convert.stages.prune import calibration_batches
from helpers import tiny_model
from test_end_to_end import QUICK_KW


def _setup(name="sit", depth=4):
    family, model = tiny_model(name, depth=depth)
    torch.manual_seed(0)
    pool, labels = torch.randn(48, 4, 8, 8), torch.randint(0, 10, (48,))
    calibration = calibration_batches(family, pool, labels, (0.0, 0.6), 2, 12, 0)
    return family, model, pool, labels, calibration


@pytest.mark.parametrize("name", ["sit", "dit"])
def test_keeping_blocks_computes_what_skipping_the_others_does(name):
    family, model, _, _, calibration = _setup(name)
    kept = [0, 2]
    state, config = family.keep_blocks(model.state_dict(), family.config, kept)
    assert config["depth"] == 2 and family.param_count(config) == sum(v.numel() for v in state.values())
    shallow = family.instantiate(config, state)
    x, t, y = calibration[0]
    with torch.no_grad(), skipping(model, ["blocks.1", "blocks.3"]):
        assert torch.allclose(shallow(x, t, y), model(x, t, y), atol=1e-6)


def test_a_block_that_computes_nothing_is_the_first_removed():
    family, model, _, _, calibration = _setup()
    with torch.no_grad():  # zero gates: block 2 passes its input through unchanged
        model.blocks[2].adaLN_modulation[1].weight.zero_()
        model.blocks[2].adaLN_modulation[1].bias.zero_()
    kept, record = choose_blocks(family, model, model.state_dict(), family.config, 3, calibration, "importance")
    assert kept == [0, 1, 3] and record["greedy_removed"] == ["blocks.2"] and record["greedy_error"] == [0.0]
    assert min(record["skip_error_alone"].values()) == 0.0 < record["skip_error_alone"]["blocks.0"]


def test_the_recovery_selector_keeps_the_set_that_recovered_best():
    family, model, pool, labels, calibration = _setup()
    kept, record = choose_blocks(family, model, model.state_dict(), family.config, 2, calibration, "recovery",
                                 segment=(0.0, 0.6), x0_pool=pool, labels_pool=labels,
                                 recovery=RecoverySettings(candidates=3, steps=8, batch_size=8))
    candidates = record["candidates"]
    assert len(candidates) >= 2 and candidates[0]["removed"] == sorted(record["greedy_removed"])
    best = min(candidates, key=lambda c: c["recovered_error"])
    assert [f"blocks.{i}" for i in range(4) if i not in kept] == best["removed"]


def test_the_depth_budget_leaves_width_the_remainder():
    family, model, *_ = _setup(depth=6)
    full = family.param_count(family.config)
    shallow = allocate_depth(family, family.config, full // 2)
    assert family.param_count(shallow) >= full // 2 > family.param_count(family.with_depth(family.config, shallow["depth"] - 1))


def test_a_depth_pruned_conversion_writes_shallower_experts_that_extract_as_plain_models(tmp_path, capsys):
    family, model, *_ = _setup()
    save_file(model.state_dict(), str(tmp_path / "tiny.safetensors"))
    result = cbs_convert.convert(tmp_path / "tiny.safetensors", k=2, structure="depth", num_heads=4, family="sit",
                                 out=str(tmp_path / "deep.safetensors"), **QUICK_KW)
    experts = result.report["evaluation"]["experts"]
    for e in experts:
        assert len(e["kept_blocks"]) == 2 and e["block_selector"] == "recovery"  # the default
        assert abs(e["params_vs_target"]) <= 0.01
    routed = cbs_convert.load(result.output)
    assert [expert.config["depth"] for expert in routed.experts] == [2, 2]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        assert cli_main(["extract", "deep.safetensors", "--expert", "1", "--out", "e1.safetensors"]) == 0
    plain_family, plain = load_model(tmp_path / "e1.safetensors")
    assert plain_family.config["depth"] == 2
    x = torch.randn(2, 4, 8, 8)
    t = family.native_time(torch.tensor([0.9, 0.95]))
    with torch.no_grad():
        assert torch.allclose(plain(x, t, torch.tensor([1, 2])), routed(x, t, torch.tensor([1, 2])), atol=1e-5)


def test_a_budget_only_depth_pruning_reaches_is_taken_under_depth_and_refused_under_width(tmp_path):
    from cbs_convert.errors import BudgetError

    family, model, *_ = _setup()
    save_file(model.state_dict(), str(tmp_path / "tiny.safetensors"))
    settings = dict(k=2, budget="0.12x", num_heads=4, family="sit", **QUICK_KW)
    # below two of the narrowest 4-block experts, above two of the narrowest 1-block ones
    with pytest.raises(BudgetError, match="raise --budget"):
        cbs_convert.convert(tmp_path / "tiny.safetensors", out=str(tmp_path / "width.safetensors"), **settings)
    result = cbs_convert.convert(tmp_path / "tiny.safetensors", structure="depth", out=str(tmp_path / "depth.safetensors"),
                                 **settings)
    for expert in result.report["evaluation"]["experts"]:
        assert len(expert["kept_blocks"]) == 1 and abs(expert["params_vs_target"]) <= 0.01
    # the sensitivity monitor's student is width-pruned at full depth: refused before any work, with the way out
    with pytest.raises(BudgetError, match="sensitivity monitor's student.*profile another monitor"):
        cbs_convert.convert(tmp_path / "tiny.safetensors", structure="depth", monitor="sensitivity",
                            out=str(tmp_path / "sensitive.safetensors"), **settings)
    assert not list(tmp_path.glob("sensitive*"))


def test_depth_pruning_a_unet_is_refused_by_name(tmp_path, capsys):
    from test_adm import HINTS, tiny as tiny_adm

    _, model = tiny_adm()
    save_file(model.state_dict(), str(tmp_path / "unet.safetensors"))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        code = cli_main(["unet.safetensors", "--structure", "depth", "--num-heads", str(HINTS["num_heads"]),
                         "--image-size", str(HINTS["image_size"]), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "has no blocks that can be removed whole" in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.work"))
