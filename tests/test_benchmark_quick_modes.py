"""The --quick modes of the speed and memory benchmarks run, so their README numbers stay reproducible."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_quick_surgery_benchmark_measures_both_children(capsys):
    import surgery_memory

    result = surgery_memory.main(["--quick"])
    # a 1x budget at K=2: the routed file holds about the source's parameters once
    assert abs(result["output_bytes"] / result["source_bytes"] - 1) < 0.05
    for child in ("floor", "conversion"):
        assert result[child]["wall_s"] > 0 and result[child]["peak_rss_bytes"] > result["source_bytes"]
    out = capsys.readouterr().out
    assert "x the file" in out and "x the floor" in out


def test_quick_router_benchmark_times_the_same_computation(capsys):
    import router_overhead

    result = router_overhead.main(["--quick"])
    assert result["bare_s"] > 0 and result["routed_s"] > 0 and result["ratio"] > 0
    assert "router overhead" in capsys.readouterr().out


def test_quick_full_size_path_benchmark_converts_loads_and_runs(tmp_path):
    import json
    import subprocess

    out = tmp_path / "xl.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "xl_scale_cpu.py"), "--quick", "--json", str(out)],
                   check=True, capture_output=True, text=True)
    result = json.loads(out.read_text())
    assert len(result["experts"]) == 2 and result["output_shape"] == [2, 4, 32, 32]
    for expert in result["experts"]:
        assert abs(expert["params_vs_target"]) < 0.01
    assert result["peak_rss_gb"] > 0 and result["convert_s"] > 0


def test_quick_finetune_benchmark_times_both_loops(capsys):
    import finetune_overhead

    result = finetune_overhead.main(["--quick"])
    assert result["tool_steps_per_s"] > 0 and result["bare_steps_per_s"] > 0
    assert len(result["paired_ratios"]) == 2
    assert "goal >= 0.95" in capsys.readouterr().out


def test_quick_probe_benchmark_times_both_derivatives_and_compares_their_curves(capsys):
    import probe_cost

    result = probe_cost.main(["--quick", "--agreement", str(ROOT / "cbs_convert" / "assets" / "digits_sit.safetensors")])
    assert {"dirichlet (jvp)", "dirichlet (fd)"} <= set(result["vs_forward"])
    # the two ways of differentiating agree on a trained model far inside the curve's own noise
    assert result["agreement"]["dirichlet"]["max_difference_in_stderr"] < 0.5
    assert "goal <= 3x" in capsys.readouterr().out


def _gpu_check_holds(result):
    conversion = result["conversion"]
    assert len(conversion["experts"]) == 2 and conversion["profile_s"] > 0
    for expert in conversion["experts"]:
        assert expert["steps_per_s"] > 0 and expert["error_after"] < expert["error_before"]
    assert result["finetune_overhead"]["ratio"] > 0 and result["router_overhead"]["ratio"] > 0
    # a process group of one gives the weights of no group at all
    assert result["data_parallel"]["weights_rel_distance"] < 1e-6
    assert result["ema"]["bitwise_equal"] and result["ema"]["speedup"] > 0


def test_quick_gpu_check_runs_every_part_on_whatever_device_there_is(capsys):
    import gpu_check

    _gpu_check_holds(gpu_check.main(["--quick"]))
    assert "data-parallel path (DDP, 1 process)" in capsys.readouterr().out


@pytest.mark.slow
def test_gpu_check_at_the_small_size(tmp_path):
    import gpu_check

    _gpu_check_holds(gpu_check.main(["--size", "small", "--json", str(tmp_path / "check.json")]))


def test_quick_schedule_benchmark_scores_every_schedule_aligned_and_not_and_times_them(tmp_path, capsys):
    import math

    import schedule_benchmark
    from cbs_convert.storage.routed_file import read_metadata

    result = schedule_benchmark.main(["--quick", "--dataset", "digits", "--out", str(tmp_path / "schedules"),
                                      "--cache", str(tmp_path / "cache")])
    rows = {(s["model"], s["row"], s["steps"], s["method"]) for s in result["scores"]}
    for name in schedule_benchmark.SCHEDULES:
        for steps in result["steps"]:
            for method in ("euler", "heun"):
                assert ("teacher", name, steps, method) in rows
                for variant in ("aligned", "not aligned"):
                    assert ("routed K=2", f"{name}, {variant}", steps, method) in rows
    assert all(math.isfinite(s["fd"]) for s in result["scores"])
    cut = read_metadata(result["models"]["routed K=2"])["boundaries"][1]
    for label, times in result["schedule_times"].items():
        assert times[0] == 1.0 and times[-1] == 0.0
        if label.startswith("routed K=2: ") and ", aligned," in label:
            assert cut in times, label
    assert result["timing"]["schedules"]["ots"]["max_s"] > result["timing"]["schedules"]["uniform"]["max_s"]
    out = capsys.readouterr().out
    assert "## Goals" in out and "## Computing a schedule" in out
    table = (tmp_path / "schedules.md").read_text()
    assert "Paired RMS differences, aligned − not aligned" in table
    # the ots fit's share of a real conversion, in model evaluations: counted, and bounded per recipe
    counted = result["timing"]["sample_evaluations"]["ots"]
    assert [entry["steps"] for entry in counted] == sorted(result["steps"])
    assert 0 < counted[0]["max"] < counted[-1]["max"]  # more steps, more to fit
    assert result["timing"]["recipes"]["sit_xl_2_k2"]["samples"] == 2 * 10000 * 64
    for entry in counted:
        assert f"| ots | {entry['steps']} | {entry['max']:,} | " in table
    # a checkout without the routed file (it is not committed) tabulates every cached row, fine ones too
    Path(result["models"]["routed K=2"]).unlink()
    for kept in (tmp_path / "cache" / "models").glob("fine_*.npy"):
        kept.unlink()
    again = schedule_benchmark.main(["--quick", "--dataset", "digits", "--cached-only", "--out", str(tmp_path / "again"),
                                     "--cache", str(tmp_path / "cache")])
    assert sorted(map(str, again["scores"])) == sorted(map(str, result["scores"]))
