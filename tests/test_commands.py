"""python -m cbs_convert info / extract: what a routed file holds, and one expert on its own."""

import torch

from cbs_convert.storage.checkpoint import read_checkpoint
from cbs_convert.families import detect
from cbs_convert.storage.routed_file import save_routed
import cbs_convert
from test_routed import three_experts
from test_safety import assert_one_line_error, cli


def _routed(tmp_path, name):
    family, experts, configs, boundaries = three_experts(name)
    path = save_routed(tmp_path / f"{name}.safetensors", family, [e.state_dict() for e in experts], configs, boundaries)
    return family, experts, configs, boundaries, path


def test_info_shows_segments_in_both_times_and_each_experts_size(tmp_path, capsys):
    family, experts, configs, boundaries, path = _routed(tmp_path, "dit")
    code, out, err = cli(["info", path], capsys)
    assert code == 0, err
    lines = out.splitlines()
    expert_lines = [line for line in lines if line.startswith("expert ")]
    assert len(expert_lines) == 3
    source_params = family.param_count(family.config)
    for k, line in enumerate(expert_lines):
        assert f"t in [{boundaries[k]:.4f}, {boundaries[k + 1]:.4f}" in line
        assert f"{family.param_count(configs[k]):,} params" in line
        # DiT's native time is the step n = t * 999
        assert f"native [{boundaries[k] * 999:.6g}, {boundaries[k + 1] * 999:.6g}" in line
        assert f"({family.param_count(configs[k]) / source_params:.3f}x)" in line
    assert f"{source_params:,} parameters" in out


def test_info_refuses_a_file_that_is_not_routed(tmp_path, capsys):
    plain = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(plain))
    code, _, err = cli(["info", plain], capsys)
    assert_one_line_error(code, err, "not a routed checkpoint")


def test_an_extracted_expert_reads_back_as_itself(tmp_path, capsys):
    for name in ("sit", "dit"):
        family, experts, configs, boundaries, path = _routed(tmp_path, name)
        out = tmp_path / f"{name}_expert1.safetensors"
        code, stdout, err = cli(["extract", path, "--expert", "1", "--out", out], capsys)
        assert code == 0, err
        source = read_checkpoint(out)
        read, _ = detect(source.state_dict, {**source.hints, "family": name})
        assert read.config == configs[1], (read.config, configs[1])
        model = read.instantiate(read.config, source.state_dict)
        x, t, y = torch.randn(3, 4, 8, 8), family.native_time(torch.tensor([0.4, 0.5, 0.6])), torch.arange(3)
        with torch.no_grad():
            assert torch.equal(model(x, t, y), experts[1](x, t, y))
        # the .pt form is the flat state dict the official loaders take
        pt = tmp_path / f"{name}_expert0.pt"
        code, _, err = cli(["extract", path, "--expert", "0", "--out", pt], capsys)
        assert code == 0, err
        flat = torch.load(pt, weights_only=True)
        assert {k: tuple(v.shape) for k, v in flat.items()} == family.expected_shapes(configs[0])


def test_a_pruned_experts_bare_pt_says_the_flags_that_read_it_back_as_itself(tmp_path, capsys):
    for name in ("sit", "dit"):
        family, experts, configs, boundaries, path = _routed(tmp_path, name)
        for k in (0, 1):  # narrower than the source: a .pt of it records no widths
            pt = tmp_path / f"{name}_expert{k}.pt"
            code, stdout, err = cli(["extract", path, "--expert", str(k), "--out", pt], capsys)
            assert code == 0, err
            said = stdout.split("reads it back from its shapes with ")[1].split(")")[0].split()
            flags = dict(zip(said[::2], said[1::2]))
            hints = {"family": flags.pop("--family")}
            hints.update({flag[2:].replace("-", "_"): int(v) if v.isdigit() else v for flag, v in flags.items()})
            read, _ = detect(torch.load(pt, weights_only=True), hints)
            assert read.config == configs[k], (read.config, configs[k])
        code, stdout, err = cli(["extract", path, "--expert", "0", "--out", tmp_path / f"{name}_expert0.safetensors"], capsys)
        assert code == 0 and "reads it from the file itself" in stdout, err


def test_extract_refuses_bad_requests_in_one_line(tmp_path, capsys):
    family, experts, configs, boundaries, path = _routed(tmp_path, "sit")
    code, _, err = cli(["extract", path, "--expert", "3", "--out", tmp_path / "e.pt"], capsys)
    assert_one_line_error(code, err, "--expert 3", "0 to 2")
    code, _, err = cli(["extract", path, "--expert", "0", "--out", path, "--force"], capsys)
    assert_one_line_error(code, err, "routed checkpoint itself")
    (tmp_path / "taken.pt").write_bytes(b"mine")
    code, _, err = cli(["extract", path, "--expert", "0", "--out", tmp_path / "taken.pt"], capsys)
    assert_one_line_error(code, err, "exists", "--force")
    assert (tmp_path / "taken.pt").read_bytes() == b"mine"
    code, _, err = cli(["extract", path, "--out", tmp_path / "e.pt"], capsys)
    assert_one_line_error(code, err, "--expert")
    assert cbs_convert.load(path)  # the routed file is untouched and still loads


def test_profile_plans_the_split_without_pruning_and_the_conversion_resumes_from_it(tmp_path, capsys, monkeypatch):
    import json

    from helpers import save_training_dict, tiny_model
    from test_safety import QUICK

    monkeypatch.chdir(tmp_path)
    _, model = tiny_model("sit")
    source = tmp_path / "tiny.pt"
    save_training_dict(source, model, num_heads=4)
    code, out, err = cli(["profile", source, "--k", "2", *QUICK], capsys)
    assert code == 0, err
    assert "nothing pruned or trained" in out
    report = json.loads((tmp_path / "tiny-cbs-k2.preview.report.json").read_text())
    assert report["preview"] and len(report["evaluation"]["experts"]) == 2
    assert all("error_after" not in e for e in report["evaluation"]["experts"])
    work = tmp_path / "tiny-cbs-k2.safetensors.work"
    assert not (tmp_path / "tiny-cbs-k2.safetensors").exists() and not (work / "pruned").exists()
    profile_bytes = (work / "profile.json").read_bytes()
    code, out, err = cli([source, "--k", "2", "--resume", *QUICK], capsys)
    assert code == 0, err
    final = json.loads((tmp_path / "tiny-cbs-k2.report.json").read_text())
    assert final["split"] == report["split"] and final["profile"] == report["profile"]
    assert (work / "profile.json").read_bytes() == profile_bytes  # reused, not measured again
