"""The benchmarks run at HEAD, their cache makes a rerun free, and the Fashion-MNIST reader reads idx
files and says what to install when they are missing."""

import gzip
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cbs_convert.evaluation.datasets import INSTALL_HINT, fashion_mnist_dir, load_fashion_mnist, read_idx
from cbs_convert.errors import UserError
from cbs_convert.evaluation.metrics import DATASETS

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

HAVE_FMNIST = (fashion_mnist_dir() / "t10k-images-idx3-ubyte.gz").exists() or (fashion_mnist_dir() / "t10k-images-idx3-ubyte").exists()
HAVE_FMNIST_ASSETS = DATASETS["fmnist"].teacher.exists() and DATASETS["fmnist"].classifier.exists()


def write_idx(path: Path, array: np.ndarray, compress: bool) -> Path:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    body = array.astype(array.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if compress else open
    with opener(path, "wb") as handle:
        handle.write(header + body)
    return path


# -- the idx reader ------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_returns_the_array_written(tmp_path, compress):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    wide = np.array([[1, -70000], [2 ** 30, 5]], dtype=np.int32)  # big-endian, multi-byte, signed
    assert np.array_equal(read_idx(write_idx(tmp_path / "a", images, compress)), images)
    assert np.array_equal(read_idx(write_idx(tmp_path / "b", wide, compress)), wide)


def test_read_idx_refuses_a_file_that_is_not_idx_or_is_cut_short(tmp_path):
    (tmp_path / "junk").write_bytes(b"PK\x03\x04 not idx at all")
    with pytest.raises(UserError, match="not an idx file"):
        read_idx(tmp_path / "junk")
    good = write_idx(tmp_path / "good", np.zeros((4, 2, 2), dtype=np.uint8), compress=False)
    (tmp_path / "cut").write_bytes(good.read_bytes()[:-3])
    with pytest.raises(UserError, match="promises"):
        read_idx(tmp_path / "cut")


def test_load_fashion_mnist_scales_pixels_to_minus_one_one_and_pairs_labels(tmp_path):
    rng = np.random.default_rng(0)
    for part, n in (("train", 6), ("t10k", 3)):
        pixels = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        pixels[0, 0, 0], pixels[0, 0, 1] = 0, 255
        write_idx(tmp_path / f"{part}-images-idx3-ubyte.gz", pixels, compress=True)
        # one file plain, one gzipped: the Debian package ships .gz, a manual download may not
        write_idx(tmp_path / f"{part}-labels-idx1-ubyte", np.arange(n, dtype=np.uint8) % 10, compress=False)
    data = load_fashion_mnist(tmp_path)
    assert data.train_x.shape == (6, 1, 28, 28) and data.test_x.shape == (3, 1, 28, 28)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    assert data.train_x[0, 0, 0, 0] == -1.0 and data.train_x[0, 0, 0, 1] == 1.0
    assert data.train_x.min() >= -1.0 and data.train_x.max() <= 1.0
    assert data.test_y.tolist() == [0, 1, 2]


def test_missing_fashion_mnist_names_the_package_to_install(tmp_path, monkeypatch):
    with pytest.raises(UserError) as caught:
        load_fashion_mnist(tmp_path)
    assert INSTALL_HINT in str(caught.value) and "train-images-idx3-ubyte" in str(caught.value)
    # the default folder comes from the environment when set, so the message names the one looked in
    monkeypatch.setenv("CBS_FASHION_MNIST", str(tmp_path / "elsewhere"))
    with pytest.raises(UserError, match="elsewhere"):
        load_fashion_mnist()


@pytest.mark.skipif(not HAVE_FMNIST, reason=INSTALL_HINT)
def test_installed_fashion_mnist_is_the_official_split():
    data = load_fashion_mnist()
    assert data.train_x.shape == (60000, 1, 28, 28) and data.test_x.shape == (10000, 1, 28, 28)
    assert torch.bincount(data.test_y).tolist() == [1000] * 10


@pytest.mark.skipif(not (HAVE_FMNIST and DATASETS["fmnist"].classifier.exists()), reason="fmnist classifier or data missing")
def test_fashion_scorer_separates_real_from_damaged_images():
    data = load_fashion_mnist()
    scorer = DATASETS["fmnist"].scorer()
    real = data.train_x[:5000]
    noised = real + 0.3 * torch.randn(real.shape, generator=torch.Generator().manual_seed(0))
    floor, damaged = scorer.fd(real), scorer.fd(noised)
    assert floor < 0.1 * damaged  # the finite-sample floor sits far below a visible damage
    assert scorer.class_match(data.test_x, data.test_y) > 0.88


# -- the one loader ------------------------------------------------------------------------------------


def test_load_model_reads_a_source_checkpoint_with_args_in_metadata():
    from cbs_convert.families.transformer_net import DiffusionTransformer
    from cbs_convert.storage.loading import is_routed, load_model

    family, model = load_model(DATASETS["digits"].teacher)
    assert not is_routed(DATASETS["digits"].teacher)
    assert family.name == "sit" and isinstance(model, DiffusionTransformer) and not model.training
    assert family.config["num_heads"] == 4  # from the metadata's args: the weights cannot say it


# -- the benchmarks ------------------------------------------------------------------------------------


def _run_digits(tmp_path, *extra):
    import digits_benchmark

    out = tmp_path / "result"
    digits_benchmark.main(["--jobs", "1", "--cache", str(tmp_path / "cache"), "--out", str(out), *extra])
    return json.loads(out.with_suffix(".json").read_text())


def test_digits_quick_scores_the_teacher_and_every_row(tmp_path):
    result = _run_digits(tmp_path, "--quick")
    rows = {r["name"]: r for r in result["rows"]}
    import digits_benchmark

    assert set(rows) == {"real training images", "teacher", *digits_benchmark.QUICK_METHODS}
    # the teacher row is the one that broke when the teacher became a .safetensors source file
    assert np.isfinite(rows["teacher"]["fd_mean"]) and rows["teacher"]["runs"]
    for name in digits_benchmark.QUICK_METHODS:
        assert np.isfinite(rows[name]["gap_mean"]), name
    assert (tmp_path / "result.md").read_text().count("| K=2") == 2


def test_a_rerun_converts_and_samples_nothing_and_a_changed_setting_reruns_only_its_rows(tmp_path):
    from cbs_convert.storage.loading import is_routed, load_model
    from cbs_convert.models.routed import RoutedModel

    tiny = ["--steps", "4", "--samples", "40", "--sample-steps", "3", "--seeds", "0,1", "--train-seeds", "0",
            "--methods", "K=2 uniform"]
    first = _run_digits(tmp_path, *tiny)
    assert first["work_done"] == {"conversions": 1, "scores": 6}  # real, teacher, the row: 2 seeds each
    again = _run_digits(tmp_path, *tiny)
    assert again["work_done"] == {"conversions": 0, "scores": 0}
    assert again["rows"] == first["rows"]
    more = _run_digits(tmp_path, *tiny[:1], "6", *tiny[2:])  # other fine-tuning steps: only the row reruns
    assert more["work_done"] == {"conversions": 1, "scores": 2}
    # a report of what is cached computes nothing, and leaves out what is not there yet
    report = _run_digits(tmp_path, *tiny[:1], "8", *tiny[2:], "--cached-only")
    assert report["work_done"] == {"conversions": 0, "scores": 0}
    assert [r["name"] for r in report["rows"]] == ["real training images", "teacher"]
    routed = sorted((tmp_path / "cache" / "models").glob("*.safetensors"))
    assert len(routed) == 2 and all(is_routed(p) for p in routed)
    family, model = load_model(routed[0])
    assert isinstance(model, RoutedModel) and len(model.experts) == 2


def test_paired_differences_pair_by_seed_and_the_teacher_pairs_with_every_training_seed():
    from _bench import paired

    def runs(name, values):
        return {"name": name, "runs": [{"train_seed": t, "seed": s, "fd": v} for (t, s), v in values.items()]}

    rows = [runs("teacher", {(None, 0): 10.0, (None, 1): 20.0}),
            runs("a", {(0, 0): 11.0, (0, 1): 22.0, (1, 0): 13.0, (1, 1): 20.0}),
            runs("b", {(0, 0): 10.5, (0, 1): 21.0, (1, 0): 12.0})]
    vs_teacher = paired(rows, "a", "teacher")
    assert vs_teacher["n"] == 4 and vs_teacher["mean"] == pytest.approx((1 + 2 + 3 + 0) / 4)
    a_b = paired(rows, "a", "b")  # (1, 1) has no partner in b and is left out
    assert a_b["n"] == 3 and a_b["mean"] == pytest.approx((0.5 + 1 + 1) / 3) and a_b["worse"] == 3


needs_fmnist = pytest.mark.skipif(not (HAVE_FMNIST and HAVE_FMNIST_ASSETS), reason="fmnist data, teacher or classifier missing")


@needs_fmnist
def test_fmnist_benchmark_scores_the_bundled_teacher_and_a_row(tmp_path):
    import fmnist_benchmark

    out = tmp_path / "result"
    fmnist_benchmark.main(["--quick", "--rows", "K=2 uniform", "--jobs", "2", "--cache", str(tmp_path / "cache"),
                           "--out", str(out)])
    result = json.loads(out.with_suffix(".json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["real training images", "teacher", "K=2 uniform"]
    assert np.isfinite(rows["teacher"]["fd_mean"]) and np.isfinite(rows["K=2 uniform"]["gap_mean"])
    assert result["classifier_test_accuracy"] is not None


@pytest.mark.slow
@needs_fmnist
def test_fmnist_quick_runs_every_quick_row_and_resolves_the_best_cbs_row(tmp_path):
    import fmnist_benchmark

    out = tmp_path / "result"
    fmnist_benchmark.main(["--quick", "--jobs", "1", "--cache", str(tmp_path / "cache"), "--out", str(out)])
    result = json.loads(out.with_suffix(".json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert set(fmnist_benchmark.QUICK_ROWS) <= set(rows)
    assert np.isfinite(rows["teacher"]["fd_mean"])
    assert all(np.isfinite(rows[n]["gap_mean"]) for n in fmnist_benchmark.QUICK_ROWS)
    assert result["resolved"] == {"K=4 best cbs": "K=2 cbs dirichlet"}  # the only K=2 cbs row of the quick set
    assert len(rows["K=4 best cbs"]["conversions"][0]["expert_params"]) == 4


def test_best_of_waits_for_its_candidates_and_skips_rows_this_commit_cannot_run(tmp_path):
    from _bench import TEACHER, Bench

    rows = {"a": dict(k=2, split="cbs", monitor="dirichlet"), "b": dict(k=2, split="cbs", monitor="acceleration"),
            "c": dict(k=2, split="cbs", monitor="not_landed_yet"), "best": dict(best_of=["a", "b", "c"], k=4)}
    bench = Bench("digits", str(DATASETS["digits"].teacher), rows, {"lr": 1e-4}, 40, 10, [0], [0], 4, tmp_path)

    def scored(name, fd):
        bench.scores.append({"name": name, "seed": 0, "train_seed": None if name == TEACHER else 0, "fd": fd})

    scored(TEACHER, 5.0)
    scored("a", 7.0)
    assert bench.settings_for("best", 0) is None  # b and c are not scored yet
    scored("b", 6.0)
    assert bench.settings_for("best", 0) is None  # c might still win
    bench.unavailable["c"] = "monitor 'not_landed_yet' is not offered"
    settings = bench.settings_for("best", 0)
    assert bench.resolved["best"] == "b"
    assert settings["monitor"] == "acceleration" and settings["k"] == 4 and settings["steps"] == 10
    assert settings["lr"] == 1e-4 and "best_of" not in settings


def test_a_setting_this_commit_does_not_offer_is_reported_not_raised(tmp_path):
    from _bench import run_conversion

    result = run_conversion("future row", {"checkpoint": str(DATASETS["digits"].teacher), "seed": 0,
                                           "split": "cbs", "monitor": "no_such_monitor"}, str(tmp_path / "x.safetensors"))
    assert "no_such_monitor" in result["unavailable"] and not (tmp_path / "x.safetensors").exists()


def test_per_training_seed_means_are_reported_beside_the_pooled_difference():
    from _bench import markdown_pairs, paired

    def runs(name, values):
        return {"name": name, "runs": [{"train_seed": t, "seed": s, "fd": v} for (t, s), v in values.items()]}

    rows = [runs("a", {(0, 0): 11.0, (0, 1): 12.0, (1, 0): 10.0, (1, 1): 10.0}),
            runs("b", {(0, 0): 10.0, (0, 1): 10.0, (1, 0): 10.5, (1, 1): 10.5})]
    result = paired(rows, "a", "b")
    assert result["by_train_seed"] == {"0": pytest.approx(1.5), "1": pytest.approx(-0.5)}
    assert result["train_worse"] == 1 and result["worse"] == 2
    assert "per training seed +1.500 / -0.500, worse for 1 of 2" in "\n".join(markdown_pairs(rows, [("a", "b")]))


def _bench_with_candidates(tmp_path):
    from _bench import TEACHER, Bench

    rows = {"a": dict(k=2, monitor="dirichlet"), "b": dict(k=2, monitor="acceleration"),
            "best": dict(best_of=["a", "b"], k=4)}
    bench = Bench("digits", str(DATASETS["digits"].teacher), rows, {}, 40, 10, [0, 1], [0], 4, tmp_path)
    for seed in (0, 1):
        bench.scores.append({"name": TEACHER, "seed": seed, "train_seed": None, "fd": 5.0, "class_match": 0.5})
    return bench


def test_a_candidate_whose_samples_blew_up_loses_the_best_of_contest(tmp_path):
    bench = _bench_with_candidates(tmp_path)
    # "a" is the best on the seed that worked; the NaN must not let it win, nor be averaged away
    bench.scores += [{"name": name, "seed": seed, "train_seed": 0, "fd": fd, "class_match": 0.5}
                     for name, seed, fd in [("a", 0, 5.5), ("a", 1, float("nan")), ("b", 0, 6.0), ("b", 1, 6.0)]]
    assert bench.best_of(["a", "b"]) == "b"
    bench.conversions[("a", 0)] = {"name": "a", "train_seed": 0, "expert_params": [1, 1], "expert_flops": [1, 1],
                                   "boundaries": [0.0, 0.5, 1.0]}
    row = {r["name"]: r for r in bench.table_rows(["a"], 1.0, 2)}["a"]
    assert row["gap_n"] == 1 and row["gap_nonfinite"] == 1


def test_a_diverged_candidate_loses_and_is_not_reported_as_unavailable(tmp_path):
    bench = _bench_with_candidates(tmp_path)
    bench.scores += [{"name": "b", "seed": s, "train_seed": 0, "fd": 9.0} for s in (0, 1)]
    assert bench.best_of(["a", "b"]) is None  # "a" is neither scored nor out yet
    bench._note_divergence({"name": "a", "train_seed": 0, "diverged": "the loss became nan at step 1"})
    assert bench.best_of(["a", "b"]) == "b" and "a" not in bench.unavailable


def test_a_training_that_diverges_comes_back_as_a_result(tmp_path):
    from _bench import run_conversion

    result = run_conversion("unstable row", {"checkpoint": str(DATASETS["digits"].teacher), "seed": 0, "k": 2,
                                             "split": "uniform", "monitors": [], "steps": 2, "lr": 1e6,
                                             "pool_size": 64, "eval_samples": 8, "calib_batches": 1,
                                             "batch_size": 8}, str(tmp_path / "x.safetensors"))
    assert "nan" in result["diverged"].lower() and "unavailable" not in result
    assert not (tmp_path / "x.safetensors").exists()


def test_a_cache_refuses_rows_made_under_other_pinned_defaults(tmp_path, monkeypatch, capsys):
    import _bench

    bench = _bench_with_candidates(tmp_path)
    bench.check_manifest()  # the first run records what its rows are made under
    assert json.loads((tmp_path / "manifest.json").read_text())["pinned"] == _bench.PINNED
    bench.check_manifest()
    monkeypatch.setitem(_bench.PINNED, "derivatives", "fd")
    with pytest.raises(SystemExit) as refused:
        bench.run(["a"], compute=False)  # the run itself checks, before it reads or computes anything
    said = capsys.readouterr().err
    assert refused.value.code == 2 and "--cache" in said and "pinned" in said


def test_a_blown_up_run_counts_as_worse_in_the_pairs_and_is_said():
    from _bench import markdown_pairs, paired

    def runs(name, values):
        return {"name": name, "runs": [{"train_seed": 0, "seed": s, "fd": v} for s, v in enumerate(values)]}

    rows = [runs("a", [1.0, float("nan"), float("nan")]), runs("b", [2.0, 2.0, 2.0])]
    result = paired(rows, "a", "b")
    assert result["n"] == 1 and result["worse"] == 2 and result["blown"] == {"first": 2, "base": 0}
    assert "worse in 2 of 3; 2 run(s) of a blew up" in markdown_pairs(rows, [("a", "b")])[-1]


def test_a_cached_diverged_conversion_is_reported_and_its_best_of_row_settles(tmp_path):
    bench = _bench_with_candidates(tmp_path)
    for name in ("a", "b"):
        stem = bench.stem(name, 0, bench.settings_for(name, 0))
        (tmp_path / "conversions").mkdir(exist_ok=True)
        (tmp_path / "conversions" / f"{stem}.json").write_text(json.dumps(
            {"name": name, "train_seed": 0, "diverged": "the loss became nan at step 3", "seconds": 1.0}))
    bench.run(["a", "b", "best"], compute=False)  # only reads the cache
    assert set(bench.diverged) == {"a", "b"} and "nan at step 3" in bench.diverged["a"]
    assert "can be copied" in bench.unavailable["best"]
    assert bench.table_rows(["a", "b", "best"], 1.0, 2)[-1]["name"] == "teacher"  # no scores, no rows



def test_structure_speed_quick_times_each_structure_at_its_planned_shape(tmp_path):
    import structure_speed

    out = tmp_path / "speed"
    result = structure_speed.main(["--quick", "--out", str(out)])
    rows = {row["name"]: row for row in result["rows"]}
    assert list(rows) == ["teacher", *structure_speed.STRUCTURES]
    assert rows["teacher"]["flops_ratio"] == 1.0 and rows["teacher"]["time_ratio"] == 1.0
    # each student was planned at half the teacher's parameters, each in its own way
    for name in structure_speed.STRUCTURES:
        assert rows[name]["params"] <= 0.52 * rows["teacher"]["params"] and rows[name]["seconds_per_step"][0] > 0
    assert "depth 2" in rows["depth"]["layout"] and "by block" in rows["blockwise"]["layout"]
    assert "depth 4" in rows["width"]["layout"] and "by block" not in rows["width"]["layout"]
    assert json.loads(out.with_suffix(".json").read_text())["rows"][0]["name"] == "teacher"
    assert "| blockwise |" in out.with_suffix(".md").read_text()
