"""python -m cbs_convert.sample: the samplers against a Gaussian's exact answer, and the command's files."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cbs_convert.sample.samplers import draw, respaced_steps
from helpers import tiny_model
from test_monitors import CASES, SHAPE, STDS, gaussian_model

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "cbs_convert" / "assets" / "digits_sit.safetensors"
FAST = ["--num-samples", "40", "--batch-size", "8", "--steps", "6", "--quiet"]


def sample_cli(args, cwd, world=1, **popen):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    launch = [sys.executable, "-m"]
    if world > 1:
        launch += ["torch.distributed.run", "--nproc_per_node", str(world), "--master_port", "29701", "-m"]
    command = [*launch, "cbs_convert.sample", *map(str, args)]
    if popen:
        return subprocess.Popen(command, cwd=cwd, env=env, **popen)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_respacing_matches_the_reference_rules():
    assert respaced_steps(1000, "1000") == list(range(1000))
    assert respaced_steps(1000, "ddim50") == list(range(0, 1000, 20))
    steps = respaced_steps(1000, "250")
    assert len(steps) == 250 and steps[0] == 0 and steps[-1] == 999
    assert respaced_steps(10, "2,3") == [0, 4, 5, 7, 9]
    with pytest.raises(ValueError, match="stride"):
        respaced_steps(1000, "ddim300")


# (sampler, settings) at the reference scripts' defaults or finer where they trade accuracy for speed
SETTINGS = [("ode", dict(method="heun", steps=250)), ("ode", dict(method="euler", steps=250)),
            ("sde", dict(steps=1000, last_step=0.01)), ("ddpm", dict(steps=250)), ("ddim", dict(steps=1000))]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("sampler,settings", SETTINGS, ids=[f"{s}-{k.get('method', k['steps'])}" for s, k in SETTINGS])
def test_each_sampler_draws_the_gaussian_it_is_given(case, sampler, settings):
    """With the exact model of x0 ~ N(0, diag(s^2)) every sampler must return that Gaussian:
    per-dimension variances within sampling error (4,000 draws: 2.2% standard error). Dimensions
    with s < 0.3 are resolved only in the last few steps of any grid and are held to the mean alone."""
    family, model = gaussian_model(case)
    if sampler in ("ddpm", "ddim") and getattr(family, "alphas_cumprod", None) is None:
        pytest.skip(f"{family.name} is not a discrete DDPM")
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn((4000, *SHAPE), generator=generator)
    x = draw(family, model, sampler, noise, None, generator=generator, clip=False, **settings)
    ratio = x.var(0) / STDS.pow(2)
    assert abs(ratio.mean().item() - 1) < 0.02, ratio.mean()
    assert (ratio[STDS >= 0.3] - 1).abs().max().item() < 0.12, ratio
    assert x.mean(0).div(STDS).abs().max().item() < 0.1


def test_one_and_two_ranks_write_the_same_images_as_the_evaluator_reads_them(tmp_path):
    one = sample_cli([DIGITS, *FAST, "--out", "one.npz"], tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    assert "wrote" in one.stdout and "40 images 8x8x1 (uint8, NHWC)" in one.stdout
    two = sample_cli([DIGITS, *FAST, "--out", "two.npz"], tmp_path, world=2)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert a["arr_0"].shape == (40, 8, 8, 1) and a["arr_0"].dtype == np.uint8
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])
    assert set(a["labels"].tolist()) <= set(range(10)) and len(set(a["labels"].tolist())) > 3
    assert 0 < a["arr_0"].mean() < 255 and a["arr_0"].std() > 20  # images, not a constant
    # the shards are removed once the .npz is written
    assert not (tmp_path / "one.npz.shards").exists() and not (tmp_path / "two.npz.shards").exists()


def interruptible_and_nice():
    # a suite started as a background job (`pytest &` from a script) inherits SIGINT ignored, and
    # Python then keeps it ignored: the sampler would finish its run through our Ctrl-C (it did, in
    # three such suite runs). A user's terminal gives the default, so the child gets it back here.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.nice(10)


def test_two_ranks_sample_with_the_schedule_rank_0_placed(tmp_path):
    """Rank 0 places the steps (here measuring the profile) and sends them to the other rank, which
    samples by them: the same file as one rank. (On CPUs both ranks would measure alike anyway; the
    refusal of a rank that would not is tested on the shard folder, in test_schedules.)"""
    args = [DIGITS, *FAST, "--schedule", "profile"]
    one = sample_cli([*args, "--out", "one.npz"], tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    two = sample_cli([*args, "--out", "two.npz"], tmp_path, world=2)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "steps: profile, 6" in two.stdout
    assert np.array_equal(np.load(tmp_path / "one.npz")["arr_0"], np.load(tmp_path / "two.npz")["arr_0"])


def test_a_refusal_while_rank_0_places_the_steps_stops_every_rank_with_one_line(tmp_path):
    # the bundled teacher stores no sensitivity profile: rank 0 refuses while the other waits for its steps
    two = sample_cli([DIGITS, *FAST, "--schedule", "profile:sensitivity", "--out", "x.npz"], tmp_path, world=2)
    assert two.returncode != 0
    errors = [line for line in two.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "profile:sensitivity" in errors[0], two.stderr[-2000:]
    assert "internal error" not in two.stderr and not (tmp_path / "x.npz").exists()


def test_an_interrupted_run_continues_where_it_stopped(tmp_path):
    # 250 batches: on an idle machine 25 were drawn before the poll below saw the third one; and the
    # sampler runs at a lower priority than this poll, so that on a loaded machine the poll is not
    # starved while the whole run finishes (it was, with three other jobs on two cores), nor the
    # sampler so starved that it misses the deadline (at the lowest priority it did)
    args = [DIGITS, "--num-samples", "2000", "--batch-size", "8", "--steps", "10", "--quiet", "--out", "cut.npz"]
    process = sample_cli(args, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=interruptible_and_nice)
    first = tmp_path / "cut.npz.shards" / "batch_000002.npz"
    watch = (f'while [ ! -e "{first}" ] && [ ! -e "{tmp_path / "cut.npz"}" ]; do sleep 0.01; done; '
             f"kill -INT {process.pid}")
    subprocess.run(["sh", "-c", watch], timeout=600)
    _, stderr = process.communicate(timeout=120)
    assert first.exists() and not (tmp_path / "cut.npz").exists(), (
        f"the run ended before it could be interrupted (exit {process.returncode}): {stderr.decode()[-1500:]}")
    assert process.returncode == 130 and "rerun the same command to continue" in stderr.decode()
    assert "--resume" not in stderr.decode()  # a flag this command does not have
    done_before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cut.npz.shards").glob("batch_*.npz")}
    assert 0 < len(done_before) < 250

    resumed = sample_cli([*args, "--keep-shards"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # the shards already written were kept, not drawn again
    assert all((tmp_path / "cut.npz.shards" / name).stat().st_mtime_ns == t for name, t in done_before.items())
    whole = sample_cli([*args[:-1], "whole.npz"], tmp_path)
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert np.array_equal(np.load(tmp_path / "cut.npz")["arr_0"], np.load(tmp_path / "whole.npz")["arr_0"])


def test_a_rerun_with_other_settings_is_refused_and_the_samples_kept(tmp_path):
    first = sample_cli([DIGITS, *FAST, "--out", "s.npz", "--keep-shards"], tmp_path)
    assert first.returncode == 0, first.stderr
    (tmp_path / "s.npz").unlink()  # as after an interruption: shards, no output yet
    other = sample_cli([DIGITS, *FAST, "--out", "s.npz", "--seed", "3"], tmp_path)
    assert other.returncode == 2
    assert other.stderr.strip().splitlines()[-1].startswith("error: ") and "seed differ" in other.stderr
    assert "choose another --out" in other.stderr
    assert len(list((tmp_path / "s.npz.shards").glob("batch_*.npz"))) == 5


@pytest.mark.parametrize("flags,expected", [
    (["--sampler", "ddpm"], "--sampler ddpm needs a model trained as a discrete DDPM"),
    (["--vae", "somewhere"], "samples pixels, which need no decoder; drop --vae"),
    (["--class", "10"], "--class 10: the model has 10 classes"),
    (["--out", "x.png"], "name it *.npz"),
    (["--respacing", "ddim7"], "--respacing applies to --sampler ddpm or ddim only"),
    (["--steps", "-3"], "--steps -3: a sampler takes at least 1 step"),
    (["--sampler", "sde", "--last-step", "1.5"], "--last-step 1.5 must lie between 0 and 1"),
    (["--seed", "-1"], "--seed -1: seeds are whole numbers from 0 to 2**64 - 1"),
    (["--seed", str(2**64), "--schedule", "ots"], "seeds are whole numbers from 0 to 2**64 - 1"),
    (["--cfg-scale", "nan"], "--cfg-scale nan: give a finite number"),
    (["--out", "."], "is a folder; give the .npz file to write"),
    (["--out", "/proc/nowhere/x.npz"], "--out"),
    (["--family", "sit"], None),
    (["--num-heads", "0"], "--num-heads 0: give a positive whole number"),
    (["--image-size", "-16"], "--image-size -16: give a positive whole number"),
])
def test_bad_requests_get_one_line_and_exit_2(tmp_path, flags, expected):
    result = sample_cli([DIGITS, *FAST, *flags], tmp_path)
    if expected is None:  # a flag that is only redundant here: the bundled teacher is a SiT
        assert result.returncode == 0, result.stderr
        return
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert "shards" not in result.stderr  # the user named --out, not our working folder
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_a_routed_file_and_its_source_sample_through_one_command(tmp_path):
    """Before and after a conversion, by the same script: a tiny latent DiT, so the latents are kept."""
    import cbs_convert
    from safetensors.torch import save_file

    family, model = tiny_model("dit")
    source = tmp_path / "tiny_dit.safetensors"
    save_file(model.state_dict(), str(source), metadata={"args": '{"num_heads": 4, "model": "DiT-tiny/2"}'})
    routed = cbs_convert.convert(source, k=2, family="dit", out=str(tmp_path / "routed.safetensors"), steps=0,
                                 pool_size=16, grid=4, profile_batches=1, profile_batch_size=4, calib_batches=1,
                                 eval_samples=8, ode_steps=4).output
    for name, path, hint in (("source", source, ["--family", "dit"]), ("routed", routed, [])):
        result = sample_cli([path, "--num-samples", "6", "--batch-size", "4", "--sampler", "ddim", "--steps", "5",
                             "--cfg-scale", "1.5", *hint, "--quiet", "--out", f"{name}.npz"], tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "latents, not images" in result.stdout
        stored = np.load(tmp_path / f"{name}.npz")
        assert "arr_0" not in stored.files and stored["latents"].shape == (6, 4, 8, 8)
        assert np.isfinite(stored["latents"]).all()
    refused = sample_cli([routed, "--num-samples", "2", "--family", "sit", "--quiet", "--out", "x.npz"], tmp_path)
    assert refused.returncode == 2 and "records its own architecture; drop --family" in refused.stderr


def test_an_existing_output_or_the_model_itself_is_never_overwritten(tmp_path):
    import shutil

    model = tmp_path / "model.npz"  # a model whose name looks like an output
    shutil.copy(DIGITS, model)
    before = model.read_bytes()
    result = sample_cli([model, *FAST, "--out", model, "--force"], tmp_path)
    assert result.returncode == 2 and "is the model being sampled" in result.stderr
    assert model.read_bytes() == before
    precious = tmp_path / "reference.npz"
    np.savez(precious, mu=np.zeros(3))
    result = sample_cli([DIGITS, *FAST, "--out", precious], tmp_path)
    assert result.returncode == 2 and "pass --force" in result.stderr
    assert set(np.load(precious).files) == {"mu"}
    assert sample_cli([DIGITS, *FAST, "--out", precious, "--force"], tmp_path).returncode == 0


def test_damaged_shards_are_drawn_again_and_a_touched_model_keeps_its_shards(tmp_path):
    import shutil

    model = tmp_path / "teacher.safetensors"
    shutil.copy(DIGITS, model)
    args = [model, *FAST, "--out", "s.npz", "--keep-shards"]
    first = sample_cli(args, tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    reference = np.load(tmp_path / "s.npz")["arr_0"]
    (tmp_path / "s.npz").unlink()
    shards = tmp_path / "s.npz.shards"
    (shards / "batch_000001.npz").write_bytes(b"PK\x03\x04 cut short")  # a damaged zip
    with np.load(shards / "batch_000002.npz") as whole:
        np.savez(shards / "batch_000002.npz", samples=whole["samples"][:3], labels=whole["labels"][:3])
    data = bytearray((shards / "batch_000003.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped bit: the zip's CRC no longer matches
    (shards / "batch_000003.npz").write_bytes(bytes(data))
    kept = (shards / "batch_000000.npz").stat().st_mtime_ns
    os.utime(model)  # a touch is not a new model
    again = sample_cli(args, tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (shards / "batch_000000.npz").stat().st_mtime_ns == kept
    assert np.array_equal(np.load(tmp_path / "s.npz")["arr_0"], reference)

    (tmp_path / "s.npz").unlink()
    # a flag that agrees with the model's own config builds the same model: the shards are its own
    agreeing = sample_cli([*args, "--family", "sit"], tmp_path)
    assert agreeing.returncode == 0, agreeing.stderr[-2000:]
    assert np.array_equal(np.load(tmp_path / "s.npz")["arr_0"], reference)
    (tmp_path / "s.npz").unlink()
    other = sample_cli([*args, "--seed", "5"], tmp_path)
    assert other.returncode == 2 and "seed differ" in other.stderr and "delete" in other.stderr
    contradicting = sample_cli([*args, "--num-heads", "2"], tmp_path)
    assert contradicting.returncode == 2 and "the model's own config gives num_heads 4" in contradicting.stderr
    data = bytearray(model.read_bytes())
    data[-1] ^= 0x01  # other weights under the same name, size and place
    model.write_bytes(bytes(data))
    retrained = sample_cli(args, tmp_path)
    assert retrained.returncode == 2 and "model_sha256 differ" in retrained.stderr


def test_a_run_that_failed_before_its_first_batch_does_not_block_the_next(tmp_path):
    failed = sample_cli([DIGITS, *FAST, "--cfg-scale", "1e30", "--out", "g.npz"], tmp_path)
    assert failed.returncode == 2 and "NaN/Inf" in failed.stderr
    assert not list((tmp_path / "g.npz.shards").glob("batch_*.npz"))
    fixed = sample_cli([DIGITS, *FAST, "--cfg-scale", "1.5", "--out", "g.npz"], tmp_path)
    assert fixed.returncode == 0, fixed.stderr[-2000:]


def test_a_write_cut_short_inside_the_shard_folder_is_cleared(tmp_path):
    args = [DIGITS, *FAST, "--out", "p.npz", "--keep-shards"]
    assert sample_cli(args, tmp_path).returncode == 0
    shards = tmp_path / "p.npz.shards"
    (shards / "batch_000001.npz").unlink()
    (shards / ".batch_000001.npz.abc123.partial").write_bytes(b"cut short by a kill")
    (tmp_path / "p.npz").unlink()
    again = sample_cli([DIGITS, *FAST, "--out", "p.npz"], tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert not shards.exists() and "kept" not in again.stdout
