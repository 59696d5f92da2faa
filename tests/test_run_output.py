"""What a run tells its user: the stages as they happen, the fine-tuning it did (or why not), and
what its numbers are measured on."""

import json

from safetensors.torch import load_file

from helpers import save_training_dict, tiny_model
from test_safety import QUICK, cli

import pytest


@pytest.fixture
def tiny_pt(tmp_path):
    _, model = tiny_model("sit")
    path = tmp_path / "tiny.pt"
    save_training_dict(path, model, num_heads=4)
    return path, model


def test_full_width_experts_under_distillation_are_not_trained_and_the_run_says_so_first(tiny_pt, tmp_path, capsys):
    source, model = tiny_pt
    out = tmp_path / "o.safetensors"
    code, stdout, err = cli([source, "--k", "2", "--budget", "2x", "--split", "uniform", "--monitors", "",
                             "--out", out, *QUICK], capsys)
    assert code == 0, err
    warning = [line for line in err.splitlines() if "zero gradient" in line]
    assert len(warning) == 1 and "every expert" in warning[0] and "--loss data" in warning[0] and "--data" in warning[0]
    report = json.loads(out.with_name("o.report.json").read_text())
    assert [e["trained"] for e in report["finetune"]["experts"]] == [False, False]
    assert any("zero gradient" in w for w in report["warnings"])
    # nothing was trained: each expert is the teacher, bit for bit
    routed = load_file(str(out))
    for name, value in model.state_dict().items():
        for k in (0, 1):
            assert (routed[f"experts.{k}.{name}"] == value).all(), name


def test_the_report_gives_the_fine_tuning_settings_its_loss_curves_and_what_errors_are_measured_on(tiny_pt, tmp_path,
                                                                                                     capsys):
    source, _ = tiny_pt
    out = tmp_path / "o.safetensors"
    code, _, err = cli([source, "--k", "2", "--out", out, *QUICK, "--lr", "2e-4"], capsys)
    assert code == 0, err
    report = json.loads(out.with_name("o.report.json").read_text())
    finetune = report["finetune"]
    assert finetune["settings"]["lr"] == 2e-4 and finetune["settings"]["steps"] == 12
    assert finetune["settings"]["loss"] == "distill" and finetune["settings"]["batch_size"] == 4
    for expert in finetune["experts"]:
        assert expert["trained"] and expert["steps_run"] == 12
        assert expert["loss_curve"][-1][0] == 12 and len(expert["loss_curve"]) <= 50
    assert "8 x_t" in report["measured_on"]["error"] and "boundary" in report["measured_on"]["seam"]
    md = out.with_name("o.report.md").read_text()
    assert "## Fine-tuning" in md and "lr 0.0002" in md and "Rel. error:" in md and "Seam gap:" in md


def test_every_stage_says_what_it_is_doing_and_experts_are_numbered_as_in_the_report(tiny_pt, tmp_path, capsys):
    source, _ = tiny_pt
    out = tmp_path / "o.safetensors"
    code, _, err = cli([source, "--k", "2", "--out", out, *[a for a in QUICK if a != "--quiet"]], capsys)
    assert code == 0, err
    for stage in ("allocating widths", "pruning expert 0", "pruning expert 1", "measuring expert 1",
                  "measuring the fine-tuned experts", "writing"):
        assert f"cbs_convert: {stage}" in err, stage
    assert "expert 0 [" in err and "expert 1 [" in err  # the progress bars
    assert "expert 2" not in err and "expert 1/2" not in err


def test_a_conversion_of_the_bundled_digits_teacher_reports_its_sample_quality_and_others_do_not(tiny_pt, tmp_path,
                                                                                                  capsys):
    import math

    from cbs_convert.metrics import TEACHER_PATH

    out = tmp_path / "digits.safetensors"
    code, stdout, err = cli([TEACHER_PATH, "--k", "2", "--out", out, *QUICK], capsys)
    assert code == 0, err
    quality = json.loads(out.with_name("digits.report.json").read_text())["sample_quality"]
    assert quality["dataset"] == "digits" and quality["samples"] == 500
    for model in ("teacher", "converted"):
        assert math.isfinite(quality[model]["fd"]) and 0 <= quality[model]["class_match"] <= 1
    # the bundled teacher's samples are digits its classifier recognises
    assert quality["teacher"]["class_match"] > 0.8
    assert quality["delta_fd"] == quality["converted"]["fd"] - quality["teacher"]["fd"]
    assert "samples (500, same noise, digits classifier)" in stdout
    assert "## Sample quality" in out.with_name("digits.report.md").read_text()

    source, _ = tiny_pt
    other = tmp_path / "o.safetensors"
    code, stdout, err = cli([source, "--k", "2", "--out", other, *QUICK], capsys)
    assert code == 0, err
    assert "sample_quality" not in json.loads(other.with_name("o.report.json").read_text())
