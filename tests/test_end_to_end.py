"""Every stage, GPU-free, for both families: the CLI on a tiny checkpoint and the library call."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import cbs_convert
from cbs_convert.sample import sample_ode
from cbs_convert.sample.model_schedules import build_schedule
from helpers import save_training_dict, tiny_model

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--steps", "20", "--pool-size", "32", "--ode-steps", "6", "--grid", "6", "--profile-batches", "1",
         "--profile-batch-size", "8", "--calib-batches", "1", "--batch-size", "8", "--eval-samples", "16"]
QUICK_KW = dict(steps=20, pool_size=32, ode_steps=6, grid=6, profile_batches=1, profile_batch_size=8,
                calib_batches=1, batch_size=8, eval_samples=16)


def run_cli(args, cwd, **env_extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **env_extra)
    return subprocess.run([sys.executable, "-m", "cbs_convert", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("name", ["sit", "dit"])
def test_cli_converts_a_tiny_checkpoint_and_the_result_samples(tmp_path, name):
    family, model = tiny_model(name)
    source = tmp_path / f"tiny_{name}.pt"
    save_training_dict(source, model, num_heads=4, model_name=f"{name.upper()}-tiny/2")
    before = source.read_bytes()
    result = run_cli([source.name, "--k", "2", "--quiet", *QUICK], tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / f"tiny_{name}-cbs-k2.safetensors"
    assert out.is_file() and f"wrote {out}" in result.stdout
    assert source.read_bytes() == before  # the source is never modified
    report = json.loads((tmp_path / f"tiny_{name}-cbs-k2.report.json").read_text())
    assert report["source"]["family"] == name
    experts = report["evaluation"]["experts"]
    assert len(experts) == 2
    for e in experts:
        assert abs(e["params_vs_target"]) <= 0.01
        assert e["error_after"] < e["error_before"]
    assert sum(e["params"] for e in experts) == pytest.approx(family.param_count(family.config), rel=0.01)
    assert (tmp_path / f"tiny_{name}-cbs-k2.report.md").read_text().startswith("# cbs_convert report")

    routed = cbs_convert.load(out)
    labels = torch.arange(4) % 10
    samples = sample_ode(routed.family, routed, (4, 4, 8, 8), labels, steps=4, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (4, 4, 8, 8) and torch.isfinite(samples).all()
    with torch.no_grad():
        native = routed.family.native_time(torch.tensor([0.1, 0.9, 0.4, 0.6]))
        # SiT's forward drops the learned-variance half, DiT's keeps it, as in the reference code
        channels = model.out_channels if name == "dit" else 4
        assert routed(torch.randn(4, 4, 8, 8), native, labels).shape[1] == channels


def test_library_call_with_data_uniform_split_and_magnitude_pruning(tmp_path):
    family, model = tiny_model("sit")
    source = tmp_path / "tiny.safetensors"
    save_file(model.state_dict(), str(source))
    data = tmp_path / "latents.npz"
    rng = np.random.default_rng(0)
    np.savez(data, features=rng.standard_normal((40, 4, 8, 8)).astype(np.float32), labels=rng.integers(0, 10, 40))
    result = cbs_convert.convert(
        source, k=3, split="uniform", prune="magnitude", loss="both", data=str(data), num_heads=4, family="sit",
        out=str(tmp_path / "out.safetensors"), **QUICK_KW,
    )
    assert result.report["split"]["boundaries"] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert result.report["profile"]["source"].startswith("data")
    loaded = cbs_convert.load(result.output)
    assert len(loaded.experts) == 3
    # the profile schedule's curve came with the file: placing steps by it calls no model
    stored = loaded.metadata["step_profile"]
    assert stored["grid"] == pytest.approx(np.linspace(0.02, 0.98, QUICK_KW["grid"]).tolist())
    assert list(stored["mean"]) == ["path_acceleration"] and "step_profile" in result.report["timings_s"]
    schedule = build_schedule(family, loaded, "profile", 9)
    assert "profile_seconds" not in schedule.details and "stored at conversion" in schedule.notes[0]
    assert schedule.times == build_schedule(family, loaded, "profile", 9, profile=stored).times


def test_explicit_boundaries_and_a_2x_budget(tmp_path):
    family, model = tiny_model("dit")
    source = tmp_path / "dit.pt"
    torch.save(model.state_dict(), source)
    result = cbs_convert.convert(source, k=2, boundaries=[0.3], budget="2x", num_heads=4, family="dit",
                                 out=str(tmp_path / "o.safetensors"), **QUICK_KW)
    experts = result.report["evaluation"]["experts"]
    assert result.report["split"]["boundaries"] == [0.0, 0.3, 1.0]
    # 2x for K=2 means every expert keeps the full width
    assert all(e["params"] == family.param_count(family.config) for e in experts)


def test_fast_dit_folder_layout(tmp_path):
    family, model = tiny_model("sit")
    source = tmp_path / "sit.pt"
    save_training_dict(source, model, num_heads=4)
    (tmp_path / "lat" / "features").mkdir(parents=True)
    (tmp_path / "lat" / "labels").mkdir()
    for i in range(12):
        np.save(tmp_path / "lat" / "features" / f"{i}.npy", np.random.randn(1, 4, 8, 8).astype(np.float32))
        np.save(tmp_path / "lat" / "labels" / f"{i}.npy", np.array([i % 10], dtype=np.int64))
    result = cbs_convert.convert(source, k=2, data=str(tmp_path / "lat"), out=str(tmp_path / "o.safetensors"), **QUICK_KW)
    assert "12 latents" in result.report["profile"]["source"]


def test_torchrun_splits_experts_across_processes_with_the_same_result(tmp_path):
    """Two gloo processes, one expert each, give the single-process file bit for bit."""
    from safetensors.torch import load_file

    _, model = tiny_model("sit")
    source = tmp_path / "tiny.pt"
    save_training_dict(source, model, num_heads=4)
    # one thread in both runs: CPU reductions are bitwise reproducible only at a fixed thread count
    single = run_cli([source.name, "--k", "2", "--quiet", "--out", "one.safetensors", *QUICK], tmp_path, OMP_NUM_THREADS="1")
    assert single.returncode == 0, single.stderr
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    multi = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         "-m", "cbs_convert", source.name, "--k", "2", "--quiet", "--out", "two.safetensors", *QUICK],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert multi.returncode == 0, multi.stderr[-2000:]
    a, b = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "two.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs = sorted((tmp_path / "two.safetensors.work" / "finetune").glob("expert_*.log.json"))
    assert len(logs) == 2


DIGITS = ROOT / "cbs_convert" / "assets" / "digits_sit.safetensors"


def test_the_bundled_digits_teacher_converts_without_flags(tmp_path):
    result = run_cli([str(DIGITS), "--k", "2", "--quiet", *QUICK], tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "digits_sit-cbs-k2.report.json").read_text())
    assert report["source"]["params"] == 1_274_372
    assert any("4 attention heads" in note for note in report["source"]["assumptions"])


@pytest.mark.slow
def test_readme_main_command_with_default_settings(tmp_path):
    """The README's first command, as it is (about 15 s on 2 cores)."""
    result = run_cli([str(DIGITS), "--k", "2", "--force"], tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "digits_sit-cbs-k2.report.json").read_text())
    for expert in report["evaluation"]["experts"]:
        assert expert["error_after"] < 0.5 * expert["error_before"]
    assert (tmp_path / "digits_sit-cbs-k2.profile.png").is_file()


def test_no_fine_tuning_writes_the_pruned_experts(tmp_path):
    family, model = tiny_model("dit")
    source = tmp_path / "tiny.safetensors"
    save_file(model.state_dict(), str(source))
    settings = {**QUICK_KW, "steps": 0}
    result = cbs_convert.convert(source, k=2, family="dit", num_heads=4, out=str(tmp_path / "o.safetensors"), **settings)
    routed = cbs_convert.load(result.output)
    kept = json.loads((tmp_path / "o.safetensors.work" / "pruned" / "expert_1.kept.json").read_text())
    pruned = family.slice_state_dict(model.state_dict(), family.config, {k: torch.tensor(v) for k, v in kept.items()})
    assert all(torch.equal(routed.experts[1].state_dict()[k], v) for k, v in pruned.items())
    for e in result.report["evaluation"]["experts"]:
        assert e["error_after"] == e["error_before"] > 0
    assert not (tmp_path / "o.safetensors.work" / "finetune").exists()
