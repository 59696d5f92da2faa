"""Several processes per expert under torchrun (gloo on CPU): the same weights as one process."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cbs_convert.errors import RecipeError
from cbs_convert.pipeline.ranks import plan_ranks
from helpers import save_training_dict, tiny_model

ROOT = Path(__file__).resolve().parents[1]
# enough steps that a run can be interrupted between two checkpoints; half the budget, so that
# even one expert is pruned and has something to learn
SETTINGS = ["--steps", "60", "--checkpoint-every", "10", "--pool-size", "32", "--ode-steps", "6", "--grid", "6",
            "--profile-batches", "1", "--profile-batch-size", "8", "--calib-batches", "1", "--batch-size", "8",
            "--eval-samples", "16", "--budget", "0.5x", "--quiet"]
PORTS = iter(range(29610, 29700))


def _env():
    # one thread everywhere: CPU reductions are reproducible only at a fixed thread count
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def _command(world, args):
    if world == 1:
        return [sys.executable, "-m", "cbs_convert", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
            str(next(PORTS)), "-m", "cbs_convert", *args]


def convert(tmp_path, world, k, out, *extra):
    result = subprocess.run(_command(world, ["tiny.pt", "--k", str(k), "--out", out, *SETTINGS, *extra]),
                            cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    return result


@pytest.fixture
def source(tmp_path):
    _, model = tiny_model("sit")
    save_training_dict(tmp_path / "tiny.pt", model, num_heads=4)
    return tmp_path


def expert_distance(a_path, b_path, k):
    """Relative distance of expert k's whole weight vector in two routed files.

    Per tensor the rounding can look large: a parameter whose exact gradient is zero (the key bias of
    attention) receives rounding noise only, which Adam normalises to full-size steps."""
    a, b = load_file(str(a_path)), load_file(str(b_path))
    names = [n for n in a if n.startswith(f"experts.{k}.")]
    assert names and set(names) == {n for n in b if n.startswith(f"experts.{k}.")}
    flat_a = torch.cat([a[n].double().flatten() for n in names])
    flat_b = torch.cat([b[n].double().flatten() for n in names])
    return float((flat_a - flat_b).norm() / flat_a.norm())


def ranks_of(report_path):
    return json.loads(Path(report_path).read_text())["ranks"]


def test_plan_ranks_turns_groups_and_refusals():
    assert plan_ranks(1, 2, 8).experts == [[0], [0]]
    assert plan_ranks(2, 3, 8).experts == [[0], [1], [0]]
    assert plan_ranks(4, 2, 8).experts == [[0, 1], [2, 3]]
    assert plan_ranks(8, 2, 8).writer_of(1) == 4
    with pytest.raises(RecipeError, match="--nproc_per_node 2, or 4"):
        plan_ranks(3, 2, 8)
    with pytest.raises(RecipeError, match="--batch-size 6 .* multiple of 4"):
        plan_ranks(8, 2, 6)


@pytest.mark.parametrize("world,k", [(2, 1), (4, 2)])
def test_data_parallel_experts_match_one_process(source, world, k):
    # a pool of two 64-sample chunks, so that the ranks share its drawing
    one = convert(source, 1, k, "one.safetensors", "--pool-size", "128")
    assert one.returncode == 0, one.stderr[-2000:]
    many = convert(source, world, k, "many.safetensors", "--pool-size", "128")
    assert many.returncode == 0, many.stderr[-2000:]
    for e in range(k):
        assert expert_distance(source / "one.safetensors", source / "many.safetensors", e) < 1e-5
    # the ranks drew the pool and measured the grid points in turns: both are one process's, to the bit
    profiles = [json.loads((source / f"{n}.safetensors.work" / "profile.json").read_text()) for n in ("one", "many")]
    assert profiles[0]["mean"] == profiles[1]["mean"] and profiles[0]["stderr"] == profiles[1]["stderr"]
    pools = [load_file(str(source / f"{n}.safetensors.work" / "pool.safetensors")) for n in ("one", "many")]
    assert pools[0].keys() == pools[1].keys() and all(torch.equal(pools[0][k], pools[1][k]) for k in pools[0])
    assert len(profiles[0]["grid"]) == 6 and all(len(v) == 6 for v in profiles[1]["mean"].values())
    # each expert was pruned and measured by its own group's first rank: the same numbers as one process
    reports = [json.loads((source / f"{n}.report.json").read_text()) for n in ("one", "many")]
    assert [e["error_before"] for e in reports[0]["evaluation"]["experts"]] == [e["error_before"] for e in reports[1]["evaluation"]["experts"]]
    for a, b in zip(reports[0]["evaluation"]["experts"], reports[1]["evaluation"]["experts"]):
        assert abs(a["error_after"] - b["error_after"]) < 1e-4 * a["error_after"]
    kept = sorted(p.name for p in (source / "many.safetensors.work" / "pruned").glob("*.kept.json"))
    assert kept == [f"expert_{e}.kept.json" for e in range(k)]
    group = world // k
    assert ranks_of(source / "many.report.json") == {
        "world_size": world, "experts": [list(range(e * group, (e + 1) * group)) for e in range(k)]}
    assert ranks_of(source / "one.report.json") == {"world_size": 1, "experts": [[0]] * k}
    # each expert's log is written once, by its group's first rank, with the full batch's loss
    logs = sorted((source / "many.safetensors.work" / "finetune").glob("expert_*.log.json"))
    assert len(logs) == k


def _workers_of(launcher_pid):
    """The processes torchrun started, by their LOCAL_RANK."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == launcher_pid:
            for item in environ:
                if item.startswith(b"LOCAL_RANK="):
                    found[int(item.split(b"=", 1)[1])] = int(entry.name)
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds torchrun's workers through /proc")
def test_a_rank_killed_mid_run_resumes_to_the_same_weights(source):
    args = ["tiny.pt", "--k", "1", "--out", "many.safetensors", *SETTINGS, "--steps", "600"]
    launcher = subprocess.Popen(_command(2, args), cwd=source, env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    state = source / "many.safetensors.work" / "finetune" / "expert_0.state.pt"
    deadline = time.time() + 240
    while not state.exists() and launcher.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    workers = _workers_of(launcher.pid)
    assert state.exists() and 1 in workers, "the run ended before its first checkpoint"
    os.kill(workers[1], signal.SIGKILL)  # the second rank of the group, not the one that writes
    _, err = launcher.communicate(timeout=240)
    assert launcher.returncode != 0, "the interrupted run claimed success"
    assert not (source / "many.safetensors").exists()

    resumed = convert(source, 2, 1, "many.safetensors", "--steps", "600", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    one = convert(source, 1, 1, "one.safetensors", "--steps", "600")
    assert one.returncode == 0, one.stderr[-2000:]
    assert expert_distance(source / "one.safetensors", source / "many.safetensors", 0) < 1e-5


def test_a_launch_the_experts_cannot_share_is_refused_before_any_work(source):
    result = convert(source, 3, 2, "bad.safetensors")
    assert result.returncode != 0
    # said once (by rank 0), not by every rank; torchrun's own report of the failed ranks follows it
    assert result.stderr.count("error: 3 processes cannot be shared evenly by 2 experts") == 1
    assert "--nproc_per_node 2" in result.stderr
    assert result.stderr.count("warning: 4 attention heads") == 1
    assert not re.search(r'cbs_convert/\w+\.py", line', result.stderr)  # no traceback of ours
    assert not (source / "bad.safetensors").exists()
    assert not (source / "bad.safetensors.work" / "pool.safetensors").exists()


def test_shared_base_experts_train_as_one_data_parallel_model(source):
    rng = np.random.default_rng(0)
    np.savez(source / "lat.npz", features=rng.standard_normal((40, 4, 8, 8)).astype(np.float32), labels=rng.integers(0, 10, 40))
    lora = ["--experts", "lora", "--rank", "2", "--budget", "1x", "--loss", "data", "--data", "lat.npz", "--steps", "20"]
    one = convert(source, 1, 2, "one.safetensors", *lora)
    assert one.returncode == 0, one.stderr[-2000:]
    many = convert(source, 2, 2, "many.safetensors", *lora)
    assert many.returncode == 0, many.stderr[-2000:]
    a, b = load_file(str(source / "one.safetensors")), load_file(str(source / "many.safetensors"))
    assert a.keys() == b.keys() and any(n.startswith("deltas.1.") for n in a)
    for part in ("base.", "deltas."):
        names = [n for n in a if n.startswith(part)]
        flat_a = torch.cat([a[n].double().flatten() for n in names])
        flat_b = torch.cat([b[n].double().flatten() for n in names])
        assert float((flat_a - flat_b).norm() / flat_a.norm()) < 1e-5, part
    # one model, one group of both ranks
    assert ranks_of(source / "many.report.json") == {"world_size": 2, "experts": [[0, 1]]}


def test_a_trunk_trains_on_every_rank_and_branches_as_in_one_process(source):
    trunk = ["--trunk-steps", "20", "--steps", "10"]
    one = convert(source, 1, 2, "one.safetensors", *trunk, "--keep-workdir")
    assert one.returncode == 0, one.stderr[-2000:]
    many = convert(source, 2, 2, "many.safetensors", *trunk, "--keep-workdir")
    assert many.returncode == 0, many.stderr[-2000:]
    trunks = [load_file(str(source / f"{n}.safetensors.work" / "trunk" / "trained.safetensors")) for n in ("one", "many")]
    flat = [torch.cat([t[key].double().flatten() for key in sorted(t)]) for t in trunks]
    assert float((flat[0] - flat[1]).norm() / flat[0].norm()) < 1e-5
    for e in range(2):
        assert expert_distance(source / "one.safetensors", source / "many.safetensors", e) < 1e-5
