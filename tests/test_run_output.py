"""What a run tells its user: the stages as they happen, the fine-tuning it did (or why not), and
what its numbers are measured on."""

import json

import torch
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


def test_each_expert_gets_the_fine_tuning_of_its_case_and_the_report_records_what_ran(tiny_pt, tmp_path, capsys):
    import numpy as np

    source, _ = tiny_pt
    data = tmp_path / "latents.npz"
    rng = np.random.default_rng(0)
    np.savez(data, features=rng.standard_normal((16, 4, 8, 8)).astype(np.float32), labels=rng.integers(0, 10, 16))
    settled = {}
    for budget in ("1x", "2x"):  # pruned students, then full-width copies of the source
        out = tmp_path / f"o{budget}.safetensors"
        code, _, err = cli([source, "--k", "2", "--budget", budget, "--loss", "both", "--data", data,
                            "--out", out, *QUICK], capsys)
        assert code == 0, err
        report = json.loads(out.with_name(f"o{budget}.report.json").read_text())
        assert report["finetune"]["settings"]["lr"] is None  # "auto" as given
        settled[budget] = [e["settings"] for e in report["finetune"]["experts"]]
        md = out.with_name(f"o{budget}.report.md").read_text()
        assert "0.9 x distill + 0.1 x data" in md and "warm-up steps, then a cosine down to" in md
    for pruned, full in zip(settled["1x"], settled["2x"]):
        assert (pruned["lr"], pruned["ema_warmup"]) == (3e-4, True)
        assert (full["lr"], full["ema_warmup"]) == (1e-4, False)
        for ran in (pruned, full):
            assert ran["warmup_steps"] == 1 and ran["lr_schedule"] == "cosine"  # 5% of 12 steps
            assert (ran["distill_weight"], ran["data_weight"]) == (0.9, 0.1)


def test_a_resume_refuses_a_change_of_the_fine_tuning_recipe(tiny_pt, tmp_path, capsys):
    from test_safety import assert_one_line_error

    source, _ = tiny_pt
    out = tmp_path / "o.safetensors"
    base = [source, "--k", "2", "--out", out, "--workdir", tmp_path / "w", *QUICK]
    code, _, err = cli(base, capsys)
    assert code == 0, err
    out.unlink()
    for flags, name in ((["--lr-schedule", "constant"], "lr_schedule"), (["--warmup-steps", "5"], "warmup_steps"),
                        (["--lr-floor", "0.5"], "lr_floor"), (["--no-ema-warmup"], "ema_warmup"),
                        (["--ema-decay", "0.99"], "ema_decay"), (["--lr", "1e-3"], "lr")):
        code, _, err = cli([*base, "--resume", *flags], capsys)
        assert_one_line_error(code, err, "different settings", name)
    code, _, err = cli([*base, "--resume"], capsys)
    assert code == 0, err
    # a run begun when a one-term loss still accepted (and recorded) the weights of --loss both
    marker_path = tmp_path / "w" / "cbs_convert_run.json"
    marker = json.loads(marker_path.read_text())
    marker["recipe"].update(distill_weight=1.0, data_weight=1.0)
    marker_path.write_text(json.dumps(marker))
    out.unlink()
    code, _, err = cli([*base, "--resume"], capsys)
    assert code == 0, err


def test_the_pools_digest_reads_values_not_memory_layout():
    from cbs_convert.pipeline.steps import Pool

    x0 = torch.randn(4, 1, 3, 3)
    plain = Pool(x0, torch.tensor([5]), "d").digest()
    # a one-element label tensor cut from a slice keeps a stride of 5, which the byte view refuses
    assert Pool(x0, torch.arange(10)[::5][1:], "d").digest() == plain
    assert Pool(x0.transpose(2, 3).contiguous().transpose(2, 3), torch.tensor([5]), "d").digest() == plain
    assert Pool(x0.to(torch.bfloat16), torch.tensor([5]), "d").digest() != plain


def test_a_resume_refuses_other_data_at_the_same_path_and_accepts_the_same_data_moved(tiny_pt, tmp_path, capsys):
    import numpy as np

    from test_safety import assert_one_line_error

    source, _ = tiny_pt
    data, moved = tmp_path / "latents.npz", tmp_path / "moved" / "latents.npz"

    def write_latents(seed):
        rng = np.random.default_rng(seed)
        np.savez(data, features=rng.standard_normal((16, 4, 8, 8)).astype(np.float32), labels=rng.integers(0, 10, 16))

    write_latents(0)
    out = tmp_path / "o.safetensors"
    run = [source, "--k", "2", "--out", out, "--workdir", tmp_path / "w", *QUICK]
    code, _, err = cli([*run, "--data", data], capsys)
    assert code == 0, err
    out.unlink()
    moved.parent.mkdir()
    data.replace(moved)
    write_latents(1)  # other latents under the first run's path
    code, _, err = cli([*run, "--data", data, "--resume"], capsys)
    assert_one_line_error(code, err, "--data", "another pool than the run")
    assert not out.exists()
    code, _, err = cli([*run, "--resume"], capsys)  # nor the teacher's own samples in its place
    assert_one_line_error(code, err, "no --data", "another pool than the run")
    # the run's own data, under another spelling of its path, resumes
    code, _, err = cli([*run, "--data", moved, "--resume"], capsys)
    assert code == 0, err
    # a run begun before pools were pinned recorded the --data path instead: it is compared as then
    marker_path = tmp_path / "w" / "cbs_convert_run.json"
    marker = json.loads(marker_path.read_text())
    del marker["inputs"]
    marker["recipe"]["data"] = str(moved)
    marker_path.write_text(json.dumps(marker))
    out.unlink()
    code, _, err = cli([*run, "--data", data, "--resume"], capsys)
    assert_one_line_error(code, err, "data was", "different settings")
    code, _, err = cli([*run, "--data", moved, "--resume"], capsys)
    assert code == 0, err


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

    from cbs_convert.bundled import DIGITS_TEACHER

    out = tmp_path / "digits.safetensors"
    code, stdout, err = cli([DIGITS_TEACHER, "--k", "2", "--out", out, *QUICK], capsys)
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
    # 12 steps leave the experts far from the teacher, and the run says so with the measured gap
    verdict = [w for w in json.loads(out.with_name("digits.report.json").read_text())["warnings"] if "clearly worse" in w]
    assert len(verdict) == 1 and f"{quality['delta_fd']:+.2f}" in verdict[0] and "--steps 12" in verdict[0]
    assert "clearly worse" in err
    # the bundled teacher's head count is its own, not a claim to warn about; a stranger's file's is
    assert "cannot confirm" not in err

    source, _ = tiny_pt
    other = tmp_path / "o.safetensors"
    code, stdout, err = cli([source, "--k", "2", "--out", other, *QUICK], capsys)
    assert code == 0, err
    assert "sample_quality" not in json.loads(other.with_name("o.report.json").read_text())
    assert "4 attention heads taken from the checkpoint's args, which the weights cannot confirm" in err


def test_a_loss_still_falling_at_the_end_is_called_under_training_and_a_flat_one_is_not():
    from cbs_convert.pipeline.quality import late_improvement, undertraining_verdicts

    falling = [1.0 / (1 + 0.01 * i) for i in range(500)]
    flat = [0.1 + 0.001 * ((-1) ** i) for i in range(500)]
    assert late_improvement(falling) > 0.15 and abs(late_improvement(flat)) < 0.01
    assert late_improvement(falling[:15]) is None  # too short to tell
    report = {"finetune": {"settings": {"steps": 500}, "experts": [
        {"trained": True, "steps_run": 500, "late_improvement": late_improvement(falling)},
        {"trained": True, "steps_run": 500, "late_improvement": late_improvement(flat)},
        {"trained": False}]}}
    verdicts = undertraining_verdicts(report)
    assert len(verdicts) == 1 and verdicts[0].startswith("expert 0 was still improving") and "of its 500 steps; more --steps" in verdicts[0]
    report["sample_quality"] = {"samples": 500, "teacher": {"fd": 10.0}, "converted": {"fd": 11.0}, "delta_fd": 1.0}
    assert len(undertraining_verdicts(report)) == 1  # 10% worse: within what the experts can be expected to reach
    report["sample_quality"].update(converted={"fd": 17.0}, delta_fd=7.0)
    assert any("clearly worse" in v and "+7.00" in v for v in undertraining_verdicts(report))


def test_a_mistyped_flag_gets_the_flag_it_resembles(capsys):
    code, _, err = cli(["x.pt", "--stpes", "3", "--num_heads", "2"], capsys)
    assert code == 2
    assert "--stpes: did you mean --steps?" in err and "--num_heads: did you mean --num-heads?" in err


def test_the_bundled_teacher_and_recipes_are_found_by_name_from_any_directory(tmp_path, monkeypatch, capsys):
    from cbs_convert.pipeline.recipe import read_recipe_file

    monkeypatch.chdir(tmp_path)
    code, stdout, err = cli(["profile", "digits_sit", "--k", "2", *QUICK], capsys)
    assert code == 0, err
    assert (tmp_path / "digits_sit-cbs-k2.preview.report.json").is_file()
    assert read_recipe_file("sit_xl_2_k4.yaml")["k"] == 4 and read_recipe_file("sit_xl_2_k4")["k"] == 4
    code, _, err = cli(["digits_sit", "--recipe", "no_such_recipe.yaml"], capsys)
    assert code == 2 and "recipe not found" in err and "sit_xl_2_k4" in err


def test_a_step_profile_that_cannot_place_steps_is_left_out_with_a_warning_and_the_file_still_loads(tiny_pt, tmp_path,
                                                                                                   monkeypatch):
    import cbs_convert
    from cbs_convert.pipeline import steps
    from test_end_to_end import QUICK_KW

    measured = steps.profile_model

    def with_inf(*args, **kwargs):
        profile = measured(*args, **kwargs)
        if "path_acceleration" in profile.mean:
            profile.mean["path_acceleration"][-1] = float("inf")
        return profile

    monkeypatch.setattr(steps, "profile_model", with_inf)
    with pytest.warns(UserWarning, match="path_acceleration curve has NaN or Inf"):
        result = cbs_convert.convert(tiny_pt[0], k=2, num_heads=4, out=str(tmp_path / "o.safetensors"), **QUICK_KW)
    assert "step_profile" not in cbs_convert.load(result.output).metadata and "step_profile" not in result.report
