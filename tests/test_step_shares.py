"""--step-shares length: the experts' steps given out by segment length instead of --steps each."""

import pytest
from safetensors.torch import save_file

import cbs_convert
from cbs_convert.cli.main import main as cli_main
from helpers import tiny_model
from test_end_to_end import QUICK_KW


def test_a_segment_trains_in_proportion_to_its_length_for_the_same_total(tmp_path):
    family, model = tiny_model("sit", depth=2)
    source = tmp_path / "tiny.safetensors"
    save_file(model.state_dict(), str(source))
    settings = dict(k=2, num_heads=4, family="sit", boundaries=[0.25], **{**QUICK_KW, "steps": 6})
    result = cbs_convert.convert(source, step_shares="length", warmup_steps=2, out=str(tmp_path / "length.safetensors"),
                                 **settings)
    finetune = result.report["finetune"]
    # 12 steps in all, a quarter of time and three quarters: 3 and 9, each warming up for its share
    # of the 2 steps given for an expert of --steps 6
    assert [e["settings"]["steps"] for e in finetune["experts"]] == [3, 9]
    assert [e["settings"]["warmup_steps"] for e in finetune["experts"]] == [1, 3]
    assert [e["steps_run"] for e in finetune["experts"]] == [3, 9]
    assert finetune["settings"]["expert_steps"] == [3, 9]
    assert "12 steps shared by segment length (3, 9)" in (tmp_path / "length.report.md").read_text()
    equal = cbs_convert.convert(source, out=str(tmp_path / "equal.safetensors"), **settings)
    assert [e["steps_run"] for e in equal.report["finetune"]["experts"]] == [6, 6]
    assert "expert_steps" not in equal.report["finetune"]["settings"]


def test_step_shares_with_one_shared_base_is_refused_in_one_line(tmp_path, capsys):
    family, model = tiny_model("sit", depth=2)
    source = tmp_path / "tiny.safetensors"
    save_file(model.state_dict(), str(source))
    code = cli_main([str(source), "--k", "2", "--experts", "lora", "--step-shares", "length", "--num-heads", "4",
                     "--family", "sit", "--steps", "0", "--out", str(tmp_path / "lora.safetensors")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--step-shares" in err[0] and "drop" in err[0], err
    assert not (tmp_path / "lora.safetensors").exists()


@pytest.mark.parametrize("value", ["time", "Length"])
def test_an_unknown_share_rule_is_named(tmp_path, capsys, value):
    code = cli_main([str(tmp_path / "none.safetensors"), "--step-shares", value])
    err = capsys.readouterr().err
    assert code == 2 and "step_shares" in err and "equal, length" in err, err


def test_no_steps_at_all_are_not_reported_as_shared(tmp_path):
    family, model = tiny_model("sit", depth=2)
    source = tmp_path / "tiny.safetensors"
    save_file(model.state_dict(), str(source))
    result = cbs_convert.convert(source, k=2, num_heads=4, family="sit", boundaries=[0.25], step_shares="length",
                                 out=str(tmp_path / "none.safetensors"), **{**QUICK_KW, "steps": 0})
    assert "expert_steps" not in result.report["finetune"]["settings"]
    assert "shared by segment length" not in (tmp_path / "none.report.md").read_text()
