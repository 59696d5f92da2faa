"""Lose nothing, misread nothing, fail early: the work directory, the reading of real checkpoints,
and the file system saying no."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cbs_convert.errors import CheckpointError
from cbs_convert.families import detect
from cbs_convert.storage.workdir import MARKER
from helpers import save_training_dict, tiny_config, tiny_model
from test_safety import QUICK, assert_one_line_error, cli


@pytest.fixture
def tiny_pt(tmp_path):
    _, model = tiny_model("sit")
    path = tmp_path / "tiny.pt"
    save_training_dict(path, model, num_heads=4)
    return path


def _user_files(folder: Path):
    (folder / "sub").mkdir(parents=True)
    (folder / "thesis.tex").write_text("\\section{years of work}")
    (folder / "sub" / "notes.txt").write_text("keep me")


def _assert_user_files(folder: Path):
    assert (folder / "thesis.tex").read_text() == "\\section{years of work}"
    assert (folder / "sub" / "notes.txt").read_text() == "keep me"


# -- the work directory ------------------------------------------------------------------------------


@pytest.mark.parametrize("force", [False, True])
def test_a_folder_of_user_files_is_never_used_as_work_directory(tiny_pt, tmp_path, capsys, force):
    folder = tmp_path / "D"
    _user_files(folder)
    code, _, err = cli([tiny_pt, "--k", "2", "--workdir", folder, "--out", tmp_path / "o.safetensors",
                        *(["--force"] if force else []), *QUICK], capsys)
    assert_one_line_error(code, err, str(folder), "holds no cbs_convert run", "--workdir")
    assert "earlier run" not in err
    _assert_user_files(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["sub", "thesis.tex"]
    assert not (tmp_path / "o.safetensors").exists()


def test_force_removes_only_what_the_earlier_run_listed(tiny_pt, tmp_path, capsys):
    folder = tmp_path / "D"
    out = tmp_path / "o.safetensors"
    args = [tiny_pt, "--k", "2", "--workdir", folder, "--out", out, "--keep-workdir", *QUICK]
    code, _, err = cli(args, capsys)
    assert code == 0, err
    # a user later drops files into the run's folders
    _user_files(folder)
    (folder / "finetune" / "my_plot.png").write_bytes(b"png")
    code, _, err = cli([*args, "--force", "--seed", "1"], capsys)
    assert code == 0, err
    _assert_user_files(folder)
    assert (folder / "finetune" / "my_plot.png").read_bytes() == b"png"
    marker = json.loads((folder / MARKER).read_text())
    assert marker["recipe"]["seed"] == 1  # the new run's, not the old one's


def test_a_marker_that_points_outside_is_refused_and_deletes_nothing(tiny_pt, tmp_path, capsys):
    folder = tmp_path / "D"
    folder.mkdir()
    victim = tmp_path / "precious.txt"
    victim.write_text("x")
    (folder / MARKER).write_text(json.dumps({"cbs_convert_workdir": 1, "files": ["../precious.txt"]}))
    code, _, err = cli([tiny_pt, "--k", "2", "--workdir", folder, "--out", tmp_path / "o.safetensors", "--force",
                        *QUICK], capsys)
    assert_one_line_error(code, err, "../precious.txt")
    assert victim.read_text() == "x"


def test_after_success_only_the_small_artifacts_stay_and_every_file_was_listed(tiny_pt, tmp_path, capsys):
    for keep in (True, False):
        folder = tmp_path / f"work_{keep}"
        code, out, err = cli([tiny_pt, "--k", "2", "--workdir", folder, "--out", tmp_path / f"o_{keep}.safetensors",
                              *(["--keep-workdir"] if keep else []), *QUICK], capsys)
        assert code == 0, err
        listed = set(json.loads((folder / MARKER).read_text())["files"])
        present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
        assert present <= listed, present - listed  # nothing was written that --force could not remove
        weights = {p for p in present if p.endswith(".safetensors") and p != "pool.safetensors"} | {
            p for p in present if p.endswith(".state.pt")}
        assert not [p for p in present if p.endswith(".state.pt")]  # spent once each expert's weights are saved
        if keep:
            # two pruned and two fine-tuned experts, each with its measurement against the teacher
            assert len([p for p in weights if not p.endswith(".measured.safetensors")]) == 4
            assert len([p for p in weights if p.endswith(".measured.safetensors")]) == 4
        else:
            assert weights == set()
            assert {"profile.json", "split.json", "pool.safetensors", MARKER} <= present
        assert str(folder) in out and ("were removed" in out) == (not keep)
        report = json.loads((tmp_path / f"o_{keep}.report.json").read_text())
        assert report["workdir"]["removed"] == (not keep)


# -- misreadings ---------------------------------------------------------------------------------------


def _table_model(rows, num_classes):
    config = tiny_config("sit", num_classes=num_classes, label_rows=rows)
    from cbs_convert.families import FAMILIES

    torch.manual_seed(0)
    return FAMILIES["sit"].build(config).eval()


def test_a_label_table_without_null_row_is_read_from_the_args(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = _table_model(rows=10, num_classes=10)
    for args, expected in (({"num_classes": 10}, 10), ({"class_dropout_prob": 0.0}, 10)):
        family, notes = detect(model.state_dict(), {"family": "sit", "num_heads": 4, **{f"args_{k}": v for k, v in args.items()}})
        assert family.num_classes(family.config) == expected and family.null_label(family.config) is None, notes
    family, notes = detect(model.state_dict(), {"family": "sit", "num_heads": 4, "num_classes": 10})
    assert family.null_label(family.config) is None
    with pytest.raises(CheckpointError, match="--num-classes"):
        detect(model.state_dict(), {"family": "sit", "num_heads": 4, "num_classes": 8})
    # the published ImageNet table: 1000 classes and the null row, no doubt about it
    big = {k: v for k, v in model.state_dict().items()}
    big["y_embedder.embedding_table.weight"] = torch.zeros(1001, 32)
    family, notes = detect(big, {"family": "sit", "num_heads": 4})
    assert family.num_classes(family.config) == 1000 and family.null_label(family.config) == 1000


def test_a_label_table_the_file_does_not_explain_is_a_warning_naming_the_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = _table_model(rows=10, num_classes=10)
    source = tmp_path / "ten_rows.safetensors"
    save_file(model.state_dict(), str(source))
    code, out, err = cli([source, "--k", "2", "--family", "sit", "--num-heads", "4", *QUICK], capsys)
    assert code == 0, err
    warning = [line for line in err.splitlines() if line.startswith("warning: ") and "label table" in line]
    assert len(warning) == 1 and "--num-classes 10" in warning[0], err
    report = json.loads((tmp_path / "ten_rows-cbs-k2.report.json").read_text())
    assert any("--num-classes 10" in w for w in report["warnings"])
    assert "--num-classes 10" in (tmp_path / "ten_rows-cbs-k2.report.md").read_text()
    # told, it is no longer an assumption
    code, out, err = cli([source, "--k", "2", "--family", "sit", "--num-heads", "4", "--num-classes", "10",
                          "--force", *QUICK], capsys)
    assert code == 0 and "label table" not in err, err


def test_an_inconclusive_family_probe_refuses_and_names_the_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, model = tiny_model("sit")
    state = model.state_dict()
    # A zero output layer: the prediction says nothing about noise, so the probe cannot decide.
    state["final_layer.linear.weight"] = torch.zeros_like(state["final_layer.linear.weight"])
    state["final_layer.linear.bias"] = torch.zeros_like(state["final_layer.linear.bias"])
    source = tmp_path / "model_final.safetensors"
    save_file(state, str(source), metadata={"args": json.dumps({"num_heads": 4, "num_classes": 10})})
    code, _, err = cli([source, "--k", "2", *QUICK], capsys)
    assert_one_line_error(code, err, "--family sit", "--family dit")
    assert not list(tmp_path.glob("*.work"))


def test_args_that_contradict_the_weights_are_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, model = tiny_model("sit")
    for args, needle in (({"model": "SiT-XL/2", "num_heads": 4}, "SiT-XL/2"),
                         ({"num_heads": 4, "num_classes": 7}, "num_classes"),
                         ({"num_heads": 4, "learn_sigma": False}, "learn_sigma"),
                         ({"num_heads": 4, "image_size": 256}, "image size 256")):
        source = tmp_path / "sit_contradicted.safetensors"
        save_file(model.state_dict(), str(source), metadata={"args": json.dumps(args)})
        code, _, err = cli([source, "--k", "2", *QUICK], capsys)
        assert_one_line_error(code, err, needle)


def test_a_head_count_the_weights_cannot_confirm_is_a_warning(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, model = tiny_model("sit")  # 4 heads of width 8
    source = tmp_path / "sit_heads.safetensors"
    save_file(model.state_dict(), str(source), metadata={"args": json.dumps({"num_heads": 16, "num_classes": 10})})
    code, _, err = cli([source, "--k", "2", *QUICK], capsys)
    assert code == 0, err
    assert any(line.startswith("warning: 16 attention heads") and "--num-heads" in line for line in err.splitlines()), err


def test_args_naming_a_published_model_must_agree_on_heads():
    from cbs_convert.families.sit import SiTFamily

    config = dict(tiny_config("sit"), hidden_size=1152, depth=28, num_heads=16, head_dim=72, mlp_hidden=4608,
                  input_size=32, num_classes=1000, label_rows=1001)
    with torch.device("meta"):
        state = SiTFamily.build(config).state_dict()
    family, _ = detect(state, {"family": "sit", "args_model": "SiT-XL/2", "args_num_heads": 16})
    assert family.config["num_heads"] == 16
    with pytest.raises(CheckpointError, match="SiT-XL/2 has 16"):
        detect(state, {"family": "sit", "args_model": "SiT-XL/2", "args_num_heads": 12})


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_compile_and_ddp_prefixes_are_stripped(tmp_path, prefix):
    from cbs_convert.storage.checkpoint import read_checkpoint

    _, model = tiny_model("sit")
    path = tmp_path / "compiled.pt"
    torch.save({prefix + k: v for k, v in model.state_dict().items()}, path)
    source = read_checkpoint(path)
    assert set(source.state_dict) == set(model.state_dict())
    family, _ = detect(source.state_dict, {"family": "sit", "num_heads": 4})
    assert family.config["depth"] == 2


# -- the file system says no -----------------------------------------------------------------------


@pytest.fixture
def mount_tmpfs(tmp_path):
    """A real small or read-only file system (tmpfs), for ENOSPC and EROFS as they really happen."""
    mounted = []

    def mount(name, size="4m", read_only=False):
        point = tmp_path / name
        point.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.mark.parametrize("where", ["--out", "--workdir"])
def test_a_read_only_destination_is_refused_before_any_work(tiny_pt, tmp_path, capsys, mount_tmpfs, where):
    read_only = mount_tmpfs("ro", read_only=True)
    out = read_only / "o.safetensors" if where == "--out" else tmp_path / "o.safetensors"
    work = tmp_path / "w" if where == "--out" else read_only / "w"
    code, _, err = cli([tiny_pt, "--k", "2", "--out", out, "--workdir", work, *QUICK], capsys)
    assert_one_line_error(code, err, where, "Read-only file system")
    assert not (tmp_path / "w").exists()  # refused before the work directory was even made


def test_a_full_disk_is_one_line_keeps_the_work_and_resume_finishes(tiny_pt, tmp_path, capsys, mount_tmpfs):
    small = mount_tmpfs("small", size="200k")
    out, work = tmp_path / "o.safetensors", small / "w"
    args = [tiny_pt, "--k", "2", "--out", out, "--workdir", work, *QUICK]
    code, _, err = cli(args, capsys)
    assert_one_line_error(code, err, "cannot write", "No space left on device", "--resume", str(work))
    assert (work / MARKER).is_file() and (work / "profile.json").is_file()  # what was done is kept
    assert not out.exists()
    subprocess.run(["mount", "-o", "remount,size=16m", str(small)], check=True)
    code, _, err = cli([*args, "--resume"], capsys)
    assert code == 0, err
    assert out.is_file()


def test_outputs_get_the_users_file_mode(tiny_pt, tmp_path, capsys):
    previous = os.umask(0o022)
    try:
        out = tmp_path / "o.safetensors"
        code, _, err = cli([tiny_pt, "--k", "2", "--out", out, *QUICK], capsys)
    finally:
        os.umask(previous)
    assert code == 0, err
    for path in [out, *tmp_path.glob("o.report.*"), *tmp_path.glob("o.profile.png")]:
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_the_profile_plot_is_written_atomically(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from cbs_convert.pipeline import report as report_module

    targets = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, fname, **kw: (targets.append(str(fname)), real(self, fname, **kw))[1])
    report = {"profile": {"grid": [0.1, 0.5, 0.9], "mean": {"dirichlet": [3.0, 2.0, 1.0]}, "stderr": {"dirichlet": [0, 0, 0]}},
              "split": {"boundaries": [0, 0.5, 1], "shares": [0.5, 0.5], "monitor": "dirichlet"},
              "source": {"architecture": "tiny: test"}}
    final = tmp_path / "x.profile.png"
    assert report_module.plot_profile(report, final)
    assert final.is_file() and targets and all(Path(t) != final and t.endswith(".partial") for t in targets)


def test_a_budget_above_k_full_experts_is_said_to_be_capped(tiny_pt, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    code, _, err = cli([tiny_pt, "--k", "2", "--budget", "3x", "--out", out, *QUICK], capsys)
    assert code == 0, err
    capped = [line for line in err.splitlines() if line.startswith("warning: budget 3x")]
    assert len(capped) == 1 and "2 full-width experts" in capped[0], err
    report = json.loads((tmp_path / "o.report.json").read_text())
    assert any(w.startswith("budget 3x") for w in report["warnings"])
    assert report["budget"]["achieved"] == 2 * report["source"]["params"]


def test_a_diverging_learning_rate_is_one_line_naming_lr(tiny_pt, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    code, _, err = cli([tiny_pt, "--k", "2", "--out", out, *QUICK, "--steps", "3", "--lr", "1e12"], capsys)
    assert_one_line_error(code, err, "loss became", "--lr")
    assert not out.exists()


def test_a_run_begun_before_a_setting_existed_resumes_when_that_setting_is_at_its_default(tmp_path):
    from cbs_convert.errors import WorkdirError
    from cbs_convert.storage.workdir import WorkDir

    folder = tmp_path / "D"
    WorkDir(folder).start({"source_sha256": "abc", "recipe": {"k": 2}}, ["profile.json"], resume=False, force=False)
    newer = {"source_sha256": "abc", "recipe": {"k": 2, "derivatives": "jvp"}}
    WorkDir(folder).start(newer, ["profile.json"], resume=True, force=False, defaults={"derivatives": "jvp"})
    changed = {"source_sha256": "abc", "recipe": {"k": 2, "derivatives": "fd"}}
    with pytest.raises(WorkdirError, match="derivatives"):
        WorkDir(folder).start(changed, ["profile.json"], resume=True, force=False, defaults={"derivatives": "jvp"})


def test_without_matplotlib_the_output_says_no_plot_was_written_and_how_to_get_one(tiny_pt, tmp_path, capsys,
                                                                                     monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails, find_spec says absent
    out = tmp_path / "o.safetensors"
    code, stdout, err = cli([tiny_pt, "--k", "2", "--out", out, *QUICK], capsys)
    assert code == 0, err
    assert "plot: none written" in stdout and "cbs_convert[plot]" in stdout
    assert not out.with_name("o.profile.png").exists()


def test_an_unreadable_marker_is_named_and_nothing_beside_it_is_touched(tiny_pt, tmp_path, capsys):
    folder = tmp_path / "D"
    _user_files(folder)
    (folder / MARKER).write_text("not json")
    code, _, err = cli([tiny_pt, "--k", "2", "--workdir", folder, "--out", tmp_path / "o.safetensors", "--force",
                        *QUICK], capsys)
    assert_one_line_error(code, err, "holds no cbs_convert run", "not a run marker")
    _assert_user_files(folder)
    assert (folder / MARKER).read_text() == "not json"


# -- a config that builds the network is obeyed, not overridden -------------------------------------


def test_flags_that_contradict_a_bundled_teacher_are_refused(tmp_path, capsys):
    for flags, needle in ((["--family", "dit"], "the model's own config gives family sit"),
                          (["--num-heads", "2"], "the model's own config gives num_heads 4"),
                          (["--num-head-channels", "16"], "splits attention by num_heads 4")):
        code, _, err = cli(["digits_sit", "--k", "2", "--out", tmp_path / "x.safetensors", *flags, *QUICK], capsys)
        assert_one_line_error(code, err, needle)
    assert not list(tmp_path.iterdir())


def test_a_run_resumes_under_new_defaults_only_with_its_own_values(tmp_pt_run):
    folder, run, capsys = tmp_pt_run
    marker = json.loads((folder / MARKER).read_text())
    # as a work directory made before --derivatives existed (it ran with jvp, the default of the time)
    del marker["recipe"]["derivatives"]
    (folder / MARKER).write_text(json.dumps(marker))
    code, _, err = run([], capsys)
    assert_one_line_error(code, err, "derivatives was 'jvp', now 'fd'")
    code, _, err = run(["--derivatives", "jvp"], capsys)
    assert code == 0, err


def test_a_width_run_begun_when_every_run_recorded_a_block_selector_resumes(tmp_pt_run):
    folder, run, capsys = tmp_pt_run
    marker = json.loads((folder / MARKER).read_text())
    # before recovery became the default, every marker recorded importance and the mask's sigma,
    # with no depth pruning or feature distillation to use them
    marker["recipe"].update(block_selector="importance", feature_mask_sigma=3.0)
    (folder / MARKER).write_text(json.dumps(marker))
    code, _, err = run([], capsys)
    assert code == 0, err


@pytest.fixture
def tmp_pt_run(tiny_pt, tmp_path, capsys, monkeypatch):
    """A conversion stopped after its profile, to resume; the source named by another spelling each time."""
    folder = tmp_path / "work"
    base = ["--k", "2", "--workdir", folder, "--out", tmp_path / "o.safetensors", *QUICK]
    code, _, err = cli([tiny_pt, *base, "--num-heads", "4"], capsys)
    assert code == 0, err
    (tmp_path / "o.safetensors").unlink()
    monkeypatch.chdir(Path(tiny_pt).parent)

    def run(extra, capsys):
        return cli([Path(tiny_pt).name, *base, "--num-heads", "4", "--resume", *extra], capsys)

    return folder, run, capsys


def test_an_unknown_monitor_is_named_before_anything_else(tmp_path, capsys):
    code, _, err = cli(["digits_sit", "--k", "2", "--monitors", "bogus", *QUICK], capsys)
    assert_one_line_error(code, err, "monitors: 'bogus' is unknown; choose from")


def test_a_resume_compares_the_model_flags_build_not_how_they_are_typed(tmp_pt_run, tiny_pt, tmp_path, capsys):
    folder, run, capsys = tmp_pt_run
    # --num-heads 4 was given at the start; the file's own args say 4 as well
    code, _, err = cli([Path(tiny_pt).name, "--k", "2", "--workdir", folder, "--out", tmp_path / "o.safetensors",
                        *QUICK, "--resume", "--use-checkpoint", "--force"], capsys)
    assert code == 0, err  # the same model, and activation checkpointing only saves memory
    (tmp_path / "o.safetensors").unlink()
    code, _, err = run(["--num-heads", "2", "--force"], capsys)
    assert_one_line_error(code, err, "another reading of the model's architecture")


def test_a_flag_that_agrees_with_a_bundled_teacher_in_another_case_is_accepted():
    from cbs_convert import RecipeError, read_checkpoint
    from cbs_convert.storage.checkpoint import with_user_hints

    hints = read_checkpoint("digits_sit").hints
    assert with_user_hints(hints, {"path": "Linear", "family": "SiT"})["path"] == "Linear"
    with pytest.raises(RecipeError, match="--path gvp: the model's own config gives path linear"):
        with_user_hints(hints, {"path": "gvp"})
