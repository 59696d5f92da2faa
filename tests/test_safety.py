"""Bad input, faults and untrusted files: one clear line, exit code 2, nothing lost."""

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cbs_convert.cli.main import main
from helpers import save_training_dict, tiny_model

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--steps", "12", "--pool-size", "16", "--ode-steps", "4", "--grid", "4", "--profile-batches", "1",
         "--profile-batch-size", "4", "--calib-batches", "1", "--batch-size", "4", "--eval-samples", "8", "--quiet"]


def cli(argv, capsys):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code, err, *needles):
    """Exit 2 and one error line; warnings printed before the failure (one line each) may precede it."""
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip() and not line.startswith("warning: ")]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def tiny_pt(tmp_path):
    _, model = tiny_model("sit")
    path = tmp_path / "tiny.pt"
    save_training_dict(path, model, num_heads=4)
    return path


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "PWNED"
    _, model = tiny_model("sit")
    evil = tmp_path / "evil.pt"
    torch.save({"model": model.state_dict(), "args": Payload(str(marker))}, evil)
    code, _, err = cli([evil, "--k", "2"], capsys)
    assert_one_line_error(code, err, "evil.pt", "unsafe pickle")
    assert not marker.exists()
    # and with a raw pickle (not a torch zip) as well
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(Payload(str(marker))))
    code, _, err = cli([raw, "--k", "2"], capsys)
    assert code == 2 and "Traceback" not in err
    assert not marker.exists()


def test_truncated_and_damaged_files(tmp_path, tiny_pt, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tiny_pt.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    code, _, err = cli([cut, "--k", "2"], capsys)
    assert_one_line_error(code, err, "cut.pt", "truncated")

    _, model = tiny_model("sit")
    good = tmp_path / "good.safetensors"
    save_file(model.state_dict(), str(good))
    blob = good.read_bytes()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(blob[: len(blob) - 100])
    code, _, err = cli([broken, "--k", "2", "--num-heads", "4"], capsys)
    assert_one_line_error(code, err, "broken.safetensors", "truncated")

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    code, _, err = cli([garbage, "--k", "2"], capsys)
    assert_one_line_error(code, err, "garbage.safetensors")


@pytest.mark.parametrize("case,needle", [
    ("empty", "empty"), ("directory", "directory"), ("missing", "no such file"), ("text", "unknown file type"),
    ("text.pt", "not a readable PyTorch checkpoint"), ("list.pt", "not a state dict"),
])
def test_files_that_are_not_checkpoints(tmp_path, capsys, monkeypatch, case, needle):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / case
    if case == "empty":
        path = tmp_path / "empty.pt"
        path.write_bytes(b"")
    elif case == "directory":
        path.mkdir()
    elif case == "text":
        path = tmp_path / "notes.txt"
        path.write_text("hello, these are not weights\n" * 10)
    elif case == "text.pt":
        path.write_text("hello, these are not weights\n")
    elif case == "list.pt":
        torch.save([1, 2, 3], path)
    code, _, err = cli([path, "--k", "2"], capsys)
    assert_one_line_error(code, err, needle)


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from cbs_convert.errors import CheckpointError

    with pytest.raises(CheckpointError):
        main([str(tmp_path / "missing.pt"), "--debug"])


def test_unknown_architecture_and_mismatched_shapes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    other = tmp_path / "unet.pt"
    torch.save({"input_blocks.0.0.weight": torch.zeros(4, 3, 3, 3), "time_embed.0.weight": torch.zeros(8, 4)}, other)
    code, _, err = cli([other, "--k", "2", "--family", "sit"], capsys)
    assert_one_line_error(code, err, "does not fit", "input_blocks.0.0.weight")
    alien = tmp_path / "alien.pt"
    torch.save({"encoder.conv.weight": torch.zeros(4, 3, 3, 3)}, alien)
    code, _, err = cli([alien, "--k", "2"], capsys)
    assert_one_line_error(code, err, "unknown architecture", "encoder.conv.weight")

    _, model = tiny_model("sit")
    sd = model.state_dict()
    sd["blocks.0.attn.qkv.weight"] = torch.zeros(96, 31)
    sd["extra.weight"] = torch.zeros(2)
    bad = tmp_path / "bad.pt"
    torch.save(sd, bad)
    code, _, err = cli([bad, "--k", "2", "--num-heads", "4"], capsys)
    assert_one_line_error(code, err, "blocks.0.attn.qkv.weight")


def test_nan_weights_are_detected(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, model = tiny_model("sit")
    sd = model.state_dict()
    sd["blocks.1.mlp.fc2.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(sd, path)
    code, _, err = cli([path, "--k", "2", "--num-heads", "4"], capsys)
    assert_one_line_error(code, err, "blocks.1.mlp.fc2.weight", "NaN")


@pytest.mark.parametrize("flags,needle", [
    (["--k", "0"], "at least one expert"),
    (["--k", "25"], "do not fit"),
    (["--budget", "1000"], "cannot hold 2 experts"),
    (["--boundaries", "0.7,0.3", "--k", "3"], "strictly increasing"),
    (["--boundaries", "1.3"], "inside"),
    (["--steps", "-1"], "steps=-1"),
    (["--steps", "-3"], "no fine-tuning"),
    (["--steps", "many"], "--steps must be an integer"),
    (["--lr", "x"], "--lr must be a number"),
    (["--split", "magic"], "'split' must be one of"),
    (["--no-such-flag"], "unrecognized arguments"),
])
def test_impossible_requests_fail_before_heavy_work(tiny_pt, capsys, monkeypatch, flags, needle):
    monkeypatch.chdir(tiny_pt.parent)
    started = time.time()
    code, _, err = cli([tiny_pt, *flags], capsys)
    assert_one_line_error(code, err, needle)
    assert time.time() - started < 5
    assert not list(tiny_pt.parent.glob("*.work"))  # nothing was started


def test_recipe_errors_reach_the_cli_as_one_line(tiny_pt, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("k: 2\nmin_widht: 0.1\n")
    code, _, err = cli([tiny_pt, "--recipe", recipe], capsys)
    assert_one_line_error(code, err, "r.yaml", "min_widht", "min_width")
    recipe.write_text("k: 2\n steps: [3\n")
    code, _, err = cli([tiny_pt, "--recipe", recipe], capsys)
    assert_one_line_error(code, err, "line")


def test_existing_output_needs_force_and_source_is_untouched(tiny_pt, capsys, monkeypatch):
    monkeypatch.chdir(tiny_pt.parent)
    source_bytes = tiny_pt.read_bytes()
    source_mtime = tiny_pt.stat().st_mtime_ns
    code, out, err = cli([tiny_pt, "--k", "2", *QUICK], capsys)
    assert code == 0, err
    output = tiny_pt.parent / "tiny-cbs-k2.safetensors"
    first = output.read_bytes()
    code, _, err = cli([tiny_pt, "--k", "2", *QUICK], capsys)
    assert_one_line_error(code, err, "exists", "--force")
    assert output.read_bytes() == first
    code, _, err = cli([tiny_pt, "--k", "2", "--out", tiny_pt, "--force", *QUICK], capsys)
    assert_one_line_error(code, err, "source checkpoint")
    assert tiny_pt.read_bytes() == source_bytes and tiny_pt.stat().st_mtime_ns == source_mtime
    code, _, err = cli([tiny_pt, "--k", "2", "--force", *QUICK], capsys)
    assert code == 0, err


def test_same_seed_same_result(tiny_pt, capsys, monkeypatch):
    monkeypatch.chdir(tiny_pt.parent)
    import json

    outputs = []
    for name in ("a", "b"):
        code, _, err = cli([tiny_pt, "--k", "2", "--out", f"{name}.safetensors", *QUICK], capsys)
        assert code == 0, err
        outputs.append(name)
    a, b = (load_file(f"{n}.safetensors") for n in outputs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    kept = [json.loads(Path(f"{n}.safetensors.work/pruned/expert_0.kept.json").read_text()) for n in outputs]
    assert kept[0] == kept[1]
    splits = [json.loads(Path(f"{n}.safetensors.work/split.json").read_text())["split"]["boundaries"] for n in outputs]
    assert splits[0] == splits[1]


def _spawn(args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "cbs_convert", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_during_fine_tuning_then_resume_gives_the_same_result(tiny_pt, tmp_path):
    slow = [a if a != "12" else "150" for a in QUICK] + ["--checkpoint-every", "5"]
    reference = subprocess.run([sys.executable, "-m", "cbs_convert", tiny_pt, "--k", "2", "--out", "ref.safetensors",
                                *slow], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                               text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr
    process = _spawn([tiny_pt, "--k", "2", "--out", "run.safetensors", *slow], tmp_path)
    state = tmp_path / "run.safetensors.work" / "finetune" / "expert_0.state.pt"
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert state.exists(), "fine-tuning never checkpointed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "run.safetensors").exists()
    resumed = subprocess.run([sys.executable, "-m", "cbs_convert", tiny_pt, "--k", "2", "--out", "run.safetensors",
                              "--resume", *slow], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_file(str(tmp_path / "ref.safetensors")), load_file(str(tmp_path / "run.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_run_without_resume_is_refused(tiny_pt, capsys, monkeypatch):
    monkeypatch.chdir(tiny_pt.parent)
    code, _, err = cli([tiny_pt, "--k", "2", *QUICK], capsys)
    assert code == 0, err
    os.unlink("tiny-cbs-k2.safetensors")
    code, _, err = cli([tiny_pt, "--k", "2", *QUICK], capsys)
    assert_one_line_error(code, err, "holds an earlier run", "--resume", "--force")


def test_resume_with_other_settings_is_refused(tiny_pt, capsys, monkeypatch):
    monkeypatch.chdir(tiny_pt.parent)
    code, _, err = cli([tiny_pt, "--k", "2", "--out", "x.safetensors", *QUICK], capsys)
    assert code == 0, err
    os.unlink("x.safetensors")
    code, _, err = cli([tiny_pt, "--k", "2", "--out", "x.safetensors", "--resume", "--seed", "3", *QUICK], capsys)
    assert_one_line_error(code, err, "different settings", "seed")


WRITER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import cbs_convert.storage.files as files
real = files.os.replace
class DyingOs:
    def __getattr__(self, name):
        return getattr(os, name)
    def replace(self, src, dst):
        if os.path.basename(dst) == {output!r}:
            # die half-way through writing the routed checkpoint, before it takes its name
            with open(src, "r+b") as handle:
                handle.truncate(os.path.getsize(src) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst)
files.os = DyingOs()
from cbs_convert.cli.main import main
main(sys.argv[1:])
"""


def test_sigkill_while_writing_leaves_the_previous_output(tiny_pt, tmp_path):
    good = subprocess.run([sys.executable, "-m", "cbs_convert", tiny_pt, "--k", "2", *QUICK], cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300)
    assert good.returncode == 0, good.stderr
    output = tmp_path / "tiny-cbs-k2.safetensors"
    before = output.read_bytes()
    script = tmp_path / "dying.py"
    script.write_text(WRITER.format(root=str(ROOT), output="tiny-cbs-k2.safetensors"))
    killed = subprocess.run([sys.executable, str(script), str(tiny_pt), "--k", "2", "--force", *QUICK], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert output.read_bytes() == before  # the previous good output, whole
    assert list(tmp_path.glob(".tiny-cbs-k2.safetensors.*.partial"))  # the half file never took its name
    # the next run clears the stale temporary
    again = subprocess.run([sys.executable, "-m", "cbs_convert", tiny_pt, "--k", "2", "--force", *QUICK], cwd=tmp_path,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert not list(tmp_path.glob(".tiny-cbs-k2.safetensors.*.partial"))


def test_safetensors_args_metadata_is_read_and_checked(tmp_path, capsys, monkeypatch):
    import json

    monkeypatch.chdir(tmp_path)
    _, model = tiny_model("sit")
    described = tmp_path / "described.safetensors"
    save_file(model.state_dict(), str(described), metadata={"args": json.dumps({"num_heads": 4, "model": "SiT-tiny"})})
    code, _, err = cli([described, "--k", "2", *QUICK], capsys)
    assert code == 0, err
    broken = tmp_path / "broken_meta.safetensors"
    save_file(model.state_dict(), str(broken), metadata={"args": "{not json"})
    code, _, err = cli([broken, "--k", "2"], capsys)
    assert_one_line_error(code, err, "broken_meta.safetensors", "not JSON")
