"""Step schedules: their shape, the profile's equal shares, alignment to expert cuts, per-expert steps
and guidance, the ots fit against its reference, the exports, and the refusals."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cbs_convert.families import FAMILIES
from cbs_convert.models.routed import RoutedModel
from cbs_convert.storage.routed_file import save_routed
from cbs_convert.sample.samplers import Guided, draw
from cbs_convert.sample.model_schedules import build_schedule
from cbs_convert.sample.schedules import SCHEDULES, allocate, check_times, native_lists, place, profile_rule
from helpers import tiny_config, tiny_model
from test_monitors import gaussian_model

SHAPE = (4, 8, 8)  # the tiny families' sample shape
STDS = torch.tensor(np.geomspace(0.05, 2.0, int(np.prod(SHAPE))), dtype=torch.float32).reshape(SHAPE)
# a known curve for the profile rule: phi = (1 + t)^2, tempered by 1/2 to 1 + t
PROFILE = {"grid": np.linspace(0.0, 1.0, 401).tolist(), "mean": {"path_acceleration": ((1 + np.linspace(0, 1, 401)) ** 2).tolist()}}


def gaussian(case="sit linear"):
    """The exact model of x0 ~ N(0, diag(STDS^2)): its ODE's solution from noise at t = 1 is STDS * noise."""
    return gaussian_model(case, STDS)


class Recording(torch.nn.Module):
    """A model that writes (its name, the native time) to a shared log at every call."""

    def __init__(self, model, name, log):
        super().__init__()
        self.model, self.name, self.log = model, name, log

    def forward(self, x, t, y=None):
        self.log.append((self.name, float(t[0])))
        return self.model(x, t, y)


def routed(cuts=(0.0, 0.4, 1.0), log=None):
    family, _ = tiny_model("sit")
    experts = [tiny_model("sit", seed=k)[1] for k in range(len(cuts) - 1)]
    if log is not None:
        experts = [Recording(e, k, log) for k, e in enumerate(experts)]
    return family, RoutedModel(family, experts, list(cuts))


def mass(f, times):
    """Shares of the integral of f (an antiderivative) carried by each step."""
    values = np.asarray([f(t) for t in times])
    return -np.diff(values) / (values[0] - values[-1])


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("t_end", [0.0, 0.05])
def test_every_schedule_runs_strictly_down_from_one_to_its_end(name, t_end):
    family, model = gaussian()
    for steps in (1, 2, 7):
        if name == "ots" and steps != 7:
            continue  # the fit is checked below; one length is enough here
        schedule = build_schedule(family, model, name, steps, t_end=t_end, profile=PROFILE, method="euler",
                                  ots_batch=4, ots_reference_steps=20, ots_sweeps=1, ots_evaluations=4)
        times = schedule.times
        assert len(times) == steps + 1 and times[0] == 1.0 and times[-1] == t_end
        assert all(b < a for a, b in zip(times, times[1:])), times
        # the samplers step in float32: the steps must stay distinct there too
        assert torch.tensor(times, dtype=torch.float32).diff().lt(0).all()


def test_the_rules_place_steps_where_their_densities_say():
    family, model = gaussian()
    assert build_schedule(family, model, "uniform", 4).times == [1.0, 0.75, 0.5, 0.25, 0.0]
    # edm: s = t / (1 - t) on the linear path, s^(1/7) equally spaced between EDM's 80 and 0.002
    edm = build_schedule(family, model, "edm", 5).times
    s = np.array([t / (1 - t) for t in edm[1:-1]]) ** (1 / 7)
    ends = np.array([80.0, 0.002]) ** (1 / 7)
    assert np.allclose(s, ends[0] + (ends[1] - ends[0]) * np.arange(1, 5) / 5, atol=1e-9)
    logsnr = build_schedule(family, model, "logsnr", 4).times
    lam = [2 * np.log((1 - t) / t) for t in logsnr[1:-1]]
    assert np.allclose(np.diff(lam), np.diff(lam)[0]) and np.diff(lam)[0] > 0


@pytest.mark.parametrize("gamma,antiderivative", [
    (1.0, lambda t: t + t ** 2 + t ** 3 / 3),  # (1 + t)^2
    (0.5, lambda t: t + t ** 2 / 2),  # 1 + t
])
def test_the_profile_schedule_gives_every_step_an_equal_share_of_the_curve(gamma, antiderivative):
    times, counts, _ = place(profile_rule(PROFILE, gamma=gamma), 6)
    assert counts == [6]
    assert np.allclose(mass(antiderivative, times), 1 / 6, atol=1e-5)
    # a denser curve near the noise end gets the shorter steps there
    assert times[0] - times[1] < times[-2] - times[-1]


def test_aligned_schedules_put_a_step_edge_on_every_cut_and_share_steps_by_mass():
    family, model = routed((0.0, 0.3, 0.65, 1.0))
    for name in ("uniform", "edm", "logsnr", "profile"):
        schedule = build_schedule(family, model, name, 9, profile=PROFILE, gamma=1.0)
        assert {0.3, 0.65} <= set(schedule.times) and schedule.boundaries == [0.3, 0.65], name
        assert sum(schedule.counts) == 9 and min(schedule.counts) >= 1
        for a, b in zip(schedule.times, schedule.times[1:]):  # no step spans a cut
            assert not any(b < cut < a for cut in (0.3, 0.65)), (name, a, b)
    # uniform: the counts follow the segments' widths, 0.3 : 0.35 : 0.35 of 9 steps
    assert build_schedule(family, model, "uniform", 9).counts == [3, 3, 3]
    assert allocate(10, [0.05, 0.5, 0.45]) == [1, 5, 4]
    # within a segment the profile steps still carry equal shares of it
    times = build_schedule(family, model, "profile", 9, profile=PROFILE, gamma=1.0).times
    top = [t for t in times if t >= 0.65]
    assert np.allclose(mass(lambda t: t + t ** 2 + t ** 3 / 3, top), 1 / (len(top) - 1), atol=1e-5)
    unaligned = build_schedule(family, model, "uniform", 9, align=False)
    assert not unaligned.aligned and unaligned.times == pytest.approx(np.linspace(1, 0, 10).tolist())


def test_steps_per_expert_are_honoured():
    family, model = routed((0.0, 0.4, 1.0))
    schedule = build_schedule(family, model, "edm", None, steps_per_expert=[5, 2])
    times = schedule.times
    assert schedule.counts == [5, 2] and len(times) == 8
    assert sum(t < 0.4 for t in times[:-1]) == 4 and times.index(0.4) == 2  # 2 steps above the cut, 5 below


def test_aligned_steps_are_each_computed_by_one_expert():
    """The router alone sends a time on the cut to one side (which one, float32 rounding of 1 - t
    decides), so one of the two Heun steps that meet there mixes two experts; pinned, no step does,
    and the cut is evaluated by both: as the end of the noisier expert's last step and the start of
    the other's first."""
    log = []
    family, model = routed((0.0, 0.4, 1.0), log)
    schedule = build_schedule(family, model, "uniform", 5)
    noise = torch.randn(2, *SHAPE)
    y = torch.tensor([1, 2])

    def steps(pin):
        log.clear()
        draw(family, model, "ode", noise, y, times=schedule.times, pin_experts=pin)
        # Heun: two calls a step, the last step one
        return [log[i:i + 2] for i in range(0, len(log), 2)]

    pinned = steps(True)
    assert len(pinned) == 5 and all(len({name for name, _ in step}) == 1 for step in pinned)
    assert [step[0][0] for step in pinned] == [1, 1, 1, 0, 0]  # 3 steps above the cut (0.6 of the width), 2 below
    at_cut = {name for step in pinned for name, tau in step if abs(tau - 0.6) < 1e-6}
    assert at_cut == {0, 1}
    assert any(len({name for name, _ in step}) == 2 for step in steps(False))


def test_default_sampling_is_the_uniform_grid_and_a_given_grid_is_followed():
    family, model = tiny_model("sit")
    noise = torch.randn(3, *SHAPE)
    y = torch.tensor([0, 1, 2])
    default = draw(family, model, "ode", noise, y, steps=6)
    same = draw(family, model, "ode", noise, y, times=torch.linspace(1, 0, 7).tolist())
    assert torch.equal(default, same)
    other = draw(family, model, "ode", noise, y, times=build_schedule(family, model, "edm", 6).times)
    assert not torch.allclose(default, other)
    # a schedule by name is built for the model and followed
    assert torch.equal(draw(family, model, "ode", noise, y, steps=6, schedule="edm"), other)
    # naming the uniform schedule steps as giving none does, to the bit, at every count
    for steps in range(1, 40):
        assert build_schedule(family, model, "uniform", steps).times == torch.linspace(1, 0, steps + 1).tolist(), steps
    assert torch.equal(draw(family, model, "ode", noise, y, steps=3, schedule="uniform"),
                       draw(family, model, "ode", noise, y, steps=3))
    from cbs_convert.sample import sample_ode

    by_name = sample_ode(family, model, noise.shape, y, steps=6, noise=noise, schedule="edm")
    assert torch.equal(by_name, sample_ode(family, model, noise.shape, y, noise=noise,
                                           times=build_schedule(family, model, "edm", 6).times))
    assert not torch.equal(by_name, sample_ode(family, model, noise.shape, y, steps=6, noise=noise))


def test_a_guidance_scale_per_expert_guides_each_sample_by_its_own_expert():
    family, model = routed((0.0, 0.5, 1.0))
    x = torch.randn(4, *SHAPE)
    y = torch.tensor([1, 2, 3, 4])
    native = family.native_time(torch.tensor([0.2, 0.3, 0.7, 0.9]))
    both = Guided(family, model, 1.0, [2.0, 5.0])(x, native, y)
    low, high = Guided(family, model, 2.0)(x, native, y), Guided(family, model, 5.0)(x, native, y)
    assert torch.allclose(both[:2], low[:2], atol=1e-6) and torch.allclose(both[2:], high[2:], atol=1e-6)
    assert not torch.allclose(both[2:], low[2:], atol=1e-4)


def test_the_ots_schedule_is_no_worse_than_its_start_against_the_reference():
    """The fit's own bookkeeping (prefix states, trials) against an independent computation: the
    sampler rerun with the start and the fitted times on the same batch, scored against the same
    reference solution, and against the exact answer on a fresh batch."""
    family, model = gaussian()
    batch, reference_steps = 8, 60
    start = build_schedule(family, model, "edm", 6)
    fitted = build_schedule(family, model, "ots", 6, method="euler", seed=3, ots_batch=batch,
                            ots_reference_steps=reference_steps, ots_sweeps=2, ots_evaluations=6)
    assert fitted.times != start.times
    noise = torch.randn((batch, *SHAPE), generator=torch.Generator().manual_seed(3))
    reference = draw(family, model, "ode", noise, None, method="heun",
                     times=build_schedule(family, model, "edm", reference_steps).times)

    def error(times, against, x):
        return float((draw(family, model, "ode", x, None, method="euler", times=times).double() - against.double()).pow(2).mean())

    before, after = error(start.times, reference, noise), error(fitted.times, reference, noise)
    assert after <= before and after < 0.7 * before, (before, after)
    assert after == pytest.approx(fitted.details["error"], rel=1e-4)
    assert before == pytest.approx(fitted.details["error_start"], rel=1e-4)
    fresh = torch.randn((64, *SHAPE), generator=torch.Generator().manual_seed(99))
    exact = STDS * fresh
    assert error(fitted.times, exact, fresh) < error(start.times, exact, fresh)


def test_the_ots_fit_counts_every_sample_the_model_evaluates():
    """The fit's cost in model evaluations (what carries over to a larger model) against a count
    kept by the model itself."""
    family, model = gaussian()
    seen = []

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x, t, y=None):
            seen.append(len(x))
            return self.inner(x, t, y)

    fitted = build_schedule(family, Counting(), "ots", 5, method="heun", ots_batch=3, ots_reference_steps=12,
                            ots_sweeps=2, ots_evaluations=4)
    assert fitted.details["sample_evaluations"] == sum(seen) > 0
    assert set(seen) == {3}
    assert f"{sum(seen):,} model evaluations" in fitted.notes[-1]


def test_a_guided_ots_fit_counts_both_network_passes_of_each_sample():
    """Under classifier-free guidance each velocity runs the network on [x; x]: the count is of
    network passes, checked by a hook on the network itself."""
    family, model = tiny_model("sit")
    passes = []
    hook = model.register_forward_pre_hook(lambda module, args: passes.append(len(args[0])))
    try:
        fitted = build_schedule(family, model, "ots", 4, method="heun", forward=Guided(family, model, 2.0),
                                ots_batch=2, ots_reference_steps=6, ots_sweeps=1, ots_evaluations=3)
    finally:
        hook.remove()
    assert set(passes) == {4}  # two samples, doubled
    assert fitted.details["sample_evaluations"] == sum(passes)


def test_the_exports_are_what_diffusers_schedulers_take():
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    family, model = gaussian()
    times = build_schedule(family, model, "edm", 6).times
    lists = native_lists(family, times)
    assert lists["native"] == pytest.approx([1 - t for t in times])
    flow = FlowMatchEulerDiscreteScheduler()
    flow.set_timesteps(sigmas=lists["diffusers_flow_sigmas"])
    assert flow.sigmas.tolist() == pytest.approx([*times[:-1], 0.0], abs=1e-6)

    dit = FAMILIES["dit"](tiny_config("dit"))
    times = build_schedule(dit, model, "logsnr", 6).times
    lists = native_lists(dit, times)
    steps = lists["diffusers_timesteps"]
    assert steps[0] == 999 and len(steps) == 6 and all(b < a for a, b in zip(steps, steps[1:]))
    assert steps == [round(t * 999) for t in times[:-1]]
    ddpm = DDPMScheduler()
    ddpm.set_timesteps(timesteps=steps)
    assert ddpm.timesteps.tolist() == steps
    # at whole training steps the sigmas are diffusers' own noise levels, from its alphas_cumprod
    lists = native_lists(dit, [1.0, 500 / 999, 18 / 999, 0.0])
    assert lists["diffusers_timesteps"] == [999, 500, 18]
    cumprod = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").alphas_cumprod.double()
    expected = ((1 - cumprod[[999, 500, 18]]) / cumprod[[999, 500, 18]]).sqrt().tolist()
    assert lists["diffusers_sigmas"] == pytest.approx([*expected, 0.0], rel=1e-5)  # diffusers: float32


@pytest.fixture(scope="module")
def routed_file(tmp_path_factory):
    family, model = routed((0.0, 0.5, 1.0))
    path = tmp_path_factory.mktemp("routed") / "tiny.safetensors"
    save_routed(path, family, [e.state_dict() for e in model.experts], [family.config] * 2, [0.0, 0.5, 1.0])
    return path


def test_the_schedule_command_prints_native_and_diffusers_lists(routed_file, tmp_path, capsys):
    from cbs_convert.cli.main import main

    out = tmp_path / "s.json"
    assert main(["schedule", str(routed_file), "--steps-per-expert", "2,3", "--schedule", "logsnr", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    stored = json.loads(out.read_text())
    assert stored["counts"] == [2, 3] and 0.5 in stored["times"] and len(stored["times"]) == 6
    assert "aligned to the expert cuts 0.5: 2 + 3 steps" in text and "FlowMatchEulerDiscreteScheduler" in text
    assert ",".join(repr(float(t)) for t in stored["times"]) in text  # in full, so a pasted list keeps the cut
    # SiT's own time runs the other way (0 = noise)
    assert f"native t (sit, 0 = noise):\n  {','.join(format(1 - t, '.6g') for t in stored['times'])}\n" in text


def test_sample_draws_with_a_schedule_steps_and_guidance_per_expert(routed_file, tmp_path, capsys):
    from cbs_convert.cli.sample import main as sample

    args = [str(routed_file), "--num-samples", "4", "--batch-size", "4", "--quiet"]
    assert sample([*args, "--out", str(tmp_path / "plain.npz")]) == 0
    assert sample([*args, "--schedule", "edm", "--steps-per-expert", "2,3", "--cfg-scale-per-expert", "1.5,3",
                   "--out", str(tmp_path / "scheduled.npz")]) == 0
    out = capsys.readouterr().out
    assert "steps: edm, 5 (2 + 3 by expert, expert 0 first)" in out and "0.5" in out
    plain, scheduled = (np.load(tmp_path / f"{n}.npz")["latents"] for n in ("plain", "scheduled"))
    assert scheduled.shape == plain.shape and np.isfinite(scheduled).all() and not np.allclose(plain, scheduled)


@pytest.mark.parametrize("flags,expected", [
    (["--schedule", "1,0.5,0.7,0"], "not strictly decreasing"),
    (["--schedule", "1,0.5,-0.2"], "outside [0, 1]"),
    (["--schedule", "0.9,0.5,0"], "starts at 0.9"),
    (["--schedule", "karras", "--steps", "4"], "--schedule 'karras' is unknown"),
    (["--schedule", "edm", "--steps", "1"], "--steps 1 is below the 2 experts"),
    (["--steps-per-expert", "2,3,4"], "the model has 2 experts"),
    (["--steps-per-expert", "2,0"], "at least 1"),
    (["--schedule", "profile:nothing", "--steps", "4"], "unknown monitor 'nothing'"),
    (["--schedule", "edm", "--steps", "5", "--rho", "0.005"], "--rho 0.005: give a number from 0.1 to 100"),
    (["--schedule", "edm", "--steps", "5", "--rho", "1e300"], "give a number from 0.1 to 100"),
    (["--schedule", "logsnr", "--steps", "5", "--rho", "3"], "--schedule logsnr does not use it"),
    (["--steps", "5", "--rho", "3"], "the default (uniform) schedule does not use it"),
    (["--schedule", "profile:sensitivity", "--steps", "4"], "only a conversion records it"),
])
def test_bad_schedules_get_one_line_and_exit_2(routed_file, tmp_path, capsys, flags, expected):
    from cbs_convert.cli.main import main
    from cbs_convert.cli.sample import main as sample

    assert main(["schedule", str(routed_file), *flags]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    # the sample command refuses the same way, before it writes anything
    assert sample([str(routed_file), *flags, "--num-samples", "2", "--quiet", "--out", str(tmp_path / "x.npz")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert not list(tmp_path.iterdir())


def test_a_schedule_file_samples_as_its_times_and_only_for_the_model_it_was_computed_for(routed_file, tmp_path, capsys):
    from cbs_convert.cli.main import main
    from cbs_convert.cli.sample import main as sample

    saved = tmp_path / "edm.json"
    assert main(["schedule", str(routed_file), "--steps", "5", "--schedule", "edm", "--json", str(saved)]) == 0
    times = json.loads(saved.read_text())["times"]
    args = ["--num-samples", "4", "--batch-size", "4", "--quiet"]
    assert sample([str(routed_file), *args, "--schedule", str(saved), "--out", str(tmp_path / "file.npz")]) == 0
    assert sample([str(routed_file), *args, "--schedule", ",".join(map(repr, times)), "--out", str(tmp_path / "list.npz")]) == 0
    assert sample([str(routed_file), *args, "--schedule", "edm", "--steps", "5", "--out", str(tmp_path / "named.npz")]) == 0
    assert sample([str(routed_file), *args, "--schedule", str(saved), "--no-align", "--out", str(tmp_path / "free.npz")]) == 0
    file, listed, named, free = (np.load(tmp_path / f"{n}.npz")["latents"] for n in ("file", "list", "named", "free"))
    assert np.array_equal(file, listed) and np.array_equal(file, named)
    assert not np.array_equal(file, free)  # unpinned, a Heun step that ends on the cut asks the other expert
    # the same architecture and cuts with one weight moved is another model
    with safe_open(str(routed_file), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(routed_file))
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1e-3
    other = tmp_path / "other.safetensors"
    save_file(tensors, str(other), metadata=metadata)
    capsys.readouterr()
    for command in (lambda: sample([str(other), *args, "--schedule", str(saved), "--out", str(tmp_path / "o.npz")]),
                    lambda: main(["schedule", str(other), "--schedule", str(saved)])):
        assert command() == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "was computed for another model" in lines[0], lines
    assert not (tmp_path / "o.npz").exists()


@pytest.mark.parametrize("content,expected", [
    (None, "no such file"),
    ("{not json", "not a readable JSON file"),
    ('{"model_sha256": "00"}', "holds no list of times"),
    ('{"times": [1.0, 0.5, 0.0]}', "does not say which model"),
    ('{"times": [1.0, "half", 0.0], "model_sha256": "00"}', "its times must be numbers"),
    ('{"times": [], "model_sha256": "00"}', "at least two"),
    ('{"times": [1.0, 0.5, 0.0], "model_sha256": "00", "model_config": "x"}', "model_config is damaged"),
    ('{"times": [1.0, 1' + "0" * 400 + ', 0.0], "model_sha256": "00"}', "too large a number"),
])
def test_a_damaged_schedule_file_gets_one_line_and_exit_2(routed_file, tmp_path, capsys, content, expected):
    from cbs_convert.cli.sample import main as sample

    saved = tmp_path / "given" / "s.json"
    saved.parent.mkdir()
    if content is not None:
        saved.write_text(content)
    out = tmp_path / "x.npz"
    assert sample([str(routed_file), "--schedule", str(saved), "--num-samples", "2", "--quiet", "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], lines
    assert not out.exists()


def test_sample_refuses_schedule_flags_where_they_cannot_apply(routed_file, tmp_path, capsys):
    from cbs_convert.cli.sample import main as sample

    base = [str(routed_file), "--num-samples", "2", "--quiet", "--out", str(tmp_path / "x.npz")]
    for flags, expected in ((["--schedule", "edm", "--sampler", "sde"], "sde takes its own steps"),
                            (["--cfg-scale-per-expert", "2,3,4"], "the model has 2 experts"),
                            (["--cfg-scale-per-expert", "2,3", "--cfg-scale", "4"], "give one of them"),
                            (["--no-align"], "sampling without --schedule is not aligned"),
                            (["--sampler", "sde", "--no-align"], "sampling without --schedule is not aligned")):
        assert sample([*base, *flags]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], lines


def test_a_curve_that_is_zero_everywhere_cannot_place_steps():
    zero = {"grid": [0.0, 0.5, 1.0], "mean": {"path_acceleration": [0.0, 0.0, 0.0]}}
    with pytest.raises(Exception, match="zero everywhere"):
        profile_rule(zero)
    assert profile_rule({"grid": [0.0, 0.5, 1.0], "mean": {"path_acceleration": [0.0, 1.0, 0.0]}}) is not None


def test_check_times_names_what_is_wrong():
    assert check_times([1, 0.5, 0]) == [1.0, 0.5, 0.0]
    with pytest.raises(Exception, match="ends at 0.5"):
        check_times([1, 0.5], t_end=0.0)
    with pytest.raises(Exception, match="at least two times"):
        check_times([1])
    # distinct in float64, one time in the float32 the samplers step in: a step of length 0
    with pytest.raises(Exception, match="the same time in float32"):
        check_times([1, 0.9999999999, 0])


def test_the_cli_pins_aligned_steps_and_guides_each_expert_by_its_scale(routed_file, tmp_path, monkeypatch):
    """What reaches the sampler from `sample`: each aligned step pinned to one expert, and the
    guidance per expert, not the bare model."""
    import cbs_convert.cli.sample_shards as shards
    from cbs_convert.cli.sample import main as sample

    seen = []

    def recording(family, forward, *args, **kwargs):
        seen.append((forward, kwargs["pin_experts"], kwargs["times"]))
        return draw(family, forward, *args, **kwargs)

    monkeypatch.setattr(shards, "draw", recording)
    base = [str(routed_file), "--num-samples", "2", "--batch-size", "2", "--quiet"]
    assert sample([*base, "--schedule", "uniform", "--steps", "5", "--cfg-scale-per-expert", "1.5,3",
                   "--out", str(tmp_path / "a.npz")]) == 0
    forward, pinned, times = seen[-1]
    assert pinned and 0.5 in times
    assert isinstance(forward, Guided) and list(forward.segment_scales) == [1.5, 3.0]
    assert sample([*base, "--schedule", "uniform", "--steps", "5", "--no-align", "--out", str(tmp_path / "b.npz")]) == 0
    assert seen[-1][1] is False
    # a file written unaligned steps unpinned, though its uniform times hold the cut
    from cbs_convert.cli.main import main

    free = tmp_path / "free.json"
    assert main(["schedule", str(routed_file), "--steps", "8", "--no-align", "--json", str(free)]) == 0
    assert 0.5 in json.loads(free.read_text())["times"]
    assert sample([*base, "--schedule", str(free), "--out", str(tmp_path / "c.npz")]) == 0
    assert seen[-1][1] is False


def test_the_schedule_command_fits_ots_under_the_guidance_sample_will_use(routed_file, tmp_path, capsys):
    from cbs_convert.cli.main import main
    from cbs_convert.storage.loading import load_model

    family, model = load_model(routed_file)
    guided_file, plain_file = tmp_path / "guided.json", tmp_path / "plain.json"
    assert main(["schedule", str(routed_file), "--steps", "6", "--schedule", "ots", "--cfg-scale-per-expert", "4,8",
                 "--json", str(guided_file)]) == 0
    assert main(["schedule", str(routed_file), "--steps", "6", "--schedule", "ots", "--json", str(plain_file)]) == 0
    guided = json.loads(guided_file.read_text())
    assert guided["cfg_scale_per_expert"] == [4.0, 8.0]
    expected = build_schedule(family, model, "ots", 6, forward=Guided(family, model, 1.0, [4.0, 8.0])).times
    assert guided["times"] == pytest.approx(expected, abs=1e-12)
    assert guided["times"] != json.loads(plain_file.read_text())["times"]
    capsys.readouterr()
    assert main(["schedule", str(routed_file), "--steps", "4", "--cfg-scale", "2"]) == 2
    assert "--schedule is not ots" in capsys.readouterr().err
    # the fit is sampled only as it was fitted: the same sampler method and guidance
    from cbs_convert.cli.sample import main as sample

    base = [str(routed_file), "--schedule", str(guided_file), "--num-samples", "2", "--batch-size", "2", "--quiet"]
    for flags, expected in (([], "made for --cfg-scale-per-expert 4,8, and this run samples with no --cfg-scale-per-expert"),
                            (["--cfg-scale-per-expert", "4,8", "--method", "euler"],
                             "made for --method heun, and this run samples with --method euler")):
        out = tmp_path / "refused.npz"
        assert sample([*base, *flags, "--out", str(out)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], lines
        assert not out.exists()
    assert sample([*base, "--cfg-scale-per-expert", "4,8", "--out", str(tmp_path / "fitted.npz")]) == 0
    # written again from the file, it is still that fit
    copy = tmp_path / "copy.json"
    assert main(["schedule", str(routed_file), "--schedule", str(guided_file), "--json", str(copy)]) == 0
    assert json.loads(copy.read_text())["times"] == guided["times"]
    capsys.readouterr()
    assert sample([*base[:2], str(copy), *base[3:], "--out", str(tmp_path / "copied.npz")]) == 2
    assert "made for --cfg-scale-per-expert 4,8" in capsys.readouterr().err


def test_a_schedule_file_is_refused_for_its_model_read_as_another_architecture(tmp_path, capsys):
    """The same bytes read with another --path are another model: edm's times differ between the
    paths, so the file's would be misread."""
    from cbs_convert.cli.main import main
    from cbs_convert.cli.sample import main as sample

    _, model = tiny_model("sit")
    source = tmp_path / "tiny_sit.pt"
    torch.save(model.state_dict(), source)
    read_as = [str(source), "--num-heads", "4"]
    linear, gvp = tmp_path / "linear.json", tmp_path / "gvp.json"
    for path, saved in (("linear", linear), ("gvp", gvp)):
        assert main(["schedule", *read_as, "--path", path, "--schedule", "edm", "--steps", "5", "--json", str(saved)]) == 0
    assert json.loads(linear.read_text())["times"] != json.loads(gvp.read_text())["times"]
    drawn = ["--num-samples", "2", "--batch-size", "2", "--quiet"]
    assert sample([*read_as, "--path", "linear", *drawn, "--schedule", str(linear), "--out", str(tmp_path / "a.npz")]) == 0
    capsys.readouterr()
    for command in (lambda: sample([*read_as, "--path", "gvp", *drawn, "--schedule", str(linear), "--out", str(tmp_path / "b.npz")]),
                    lambda: main(["schedule", *read_as, "--path", "gvp", "--schedule", str(linear)])):
        assert command() == 2
        lines = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("warning: ")]
        assert len(lines) == 1 and "read as other settings (path differs)" in lines[0], lines
    assert not (tmp_path / "b.npz").exists()
    # a file that does not record the architecture cannot be checked: written again, not guessed
    old = json.loads(linear.read_text())
    del old["model_family"], old["model_config"]
    linear.write_text(json.dumps(old))
    assert sample([*read_as, "--path", "linear", *drawn, "--schedule", str(linear), "--out", str(tmp_path / "c.npz")]) == 2
    assert "does not say which architecture" in capsys.readouterr().err


def test_a_rank_that_would_sample_otherwise_than_rank_0_is_refused(tmp_path):
    from cbs_convert.cli.sample_shards import open_shards
    from cbs_convert.errors import UserError

    shards = tmp_path / "s.npz.shards"
    open_shards(shards, {"schedule_times": [1.0, 0.6, 0.0]}, 0)
    open_shards(shards, {"schedule_times": [1.0, 0.6, 0.0]}, 1)  # the same settings: it joins
    with pytest.raises(UserError, match=r"rank 1 would sample otherwise than rank 0 \(schedule_times differ\)"):
        open_shards(shards, {"schedule_times": [1.0, 0.55, 0.0]}, 1)


def test_the_schedule_command_refuses_what_it_cannot_write_or_seed(routed_file, tmp_path, capsys):
    from cbs_convert.cli.main import main

    for flags, expected in ((["--json", ""], "name the file *.json"),
                            (["--seed", str(2**64), "--schedule", "ots"], "seeds are whole numbers from 0 to 2**64 - 1")):
        assert main(["schedule", str(routed_file), "--steps", "4", *flags]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], lines


def test_schedule_json_never_overwrites_the_model_and_an_existing_file_only_with_force(routed_file, tmp_path, capsys):
    import shutil

    from cbs_convert.cli.main import main

    model = tmp_path / "model.safetensors"
    shutil.copy(routed_file, model)
    before = model.read_bytes()
    saved = tmp_path / "s.json"
    saved.write_text("the user's notes")
    for target, expected in ((model, "name the file *.json"), (saved, "exists; pass --force")):
        assert main(["schedule", str(model), "--steps", "4", "--json", str(target)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], lines
    assert model.read_bytes() == before and saved.read_text() == "the user's notes"
    assert main(["schedule", str(model), "--steps", "4", "--json", str(saved), "--force"]) == 0
    assert json.loads(saved.read_text())["times"][0] == 1.0


def test_a_damaged_cut_profile_is_refused_where_a_schedule_reads_it(routed_file, tmp_path, capsys):
    from cbs_convert.cli.main import main

    with safe_open(str(routed_file), framework="pt") as handle:
        metadata = handle.metadata()
    meta = json.loads(metadata["cbs_convert"])
    meta["profile"] = {"grid": [0.1, 0.5, 0.9], "mean": {"dirichlet": [3.0, float("nan"), 1.0], "denoiser": [1.0, 2.0, 0.5]}}
    damaged = tmp_path / "damaged.safetensors"
    save_file(load_file(str(routed_file)), str(damaged), metadata={**metadata, "cbs_convert": json.dumps(meta)})
    assert main(["schedule", str(damaged), "--steps", "4", "--schedule", "profile:dirichlet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "profile.mean.dirichlet[1]" in lines[0], lines
    assert main(["schedule", str(damaged), "--steps", "4", "--schedule", "edm"]) == 0  # the weights still load
    # a curve the schedule does not read is not held against it
    assert main(["schedule", str(damaged), "--steps", "4", "--schedule", "profile:denoiser"]) == 0


def test_repeated_integer_timesteps_are_not_offered_to_diffusers():
    dit = FAMILIES["dit"](tiny_config("dit"))
    family, model = gaussian()
    lists = native_lists(dit, build_schedule(dit, model, "logsnr", 50).times)
    assert "diffusers_timesteps" not in lists and "diffusers refuses repeated timesteps" in lists["diffusers_note"]
    assert len(lists["diffusers_sigmas"]) == 51


def test_a_segment_where_the_rule_is_flat_gets_equal_steps_in_t():
    family, model = gaussian()
    for cuts in ((0.0, 0.995, 1.0), (0.0, 0.001, 1.0)):
        for rule in ("edm", "logsnr"):
            times, counts, _ = place(__import__("cbs_convert.sample.schedules", fromlist=["base_rule"]).base_rule(family, rule),
                                     6, 0.0, cuts, [3, 3])
            assert counts == [3, 3] and check_times(times) == times
            flat = np.diff(times[:4]) if cuts[1] > 0.5 else np.diff(times[3:])  # the segment beyond EDM's sigma range
            assert np.allclose(flat, flat[0]), (cuts, rule, times)


def test_a_shard_folder_records_the_steps_and_refuses_other_ones(routed_file, tmp_path, capsys, monkeypatch):
    import cbs_convert.cli.sample_shards as shards
    from cbs_convert.cli.sample import main as sample

    calls = []

    def one_batch_then_killed(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return draw(*args, **kwargs)

    monkeypatch.setattr(shards, "draw", one_batch_then_killed)
    out = tmp_path / "s.npz"
    args = [str(routed_file), "--num-samples", "4", "--batch-size", "2", "--schedule", "edm", "--steps", "5", "--quiet",
            "--out", str(out)]
    assert sample(args) != 0  # stopped after its first batch, as a kill would
    marker_path = tmp_path / "s.npz.shards" / shards.SHARD_MARKER
    marker = json.loads(marker_path.read_text())
    assert marker["pinned"] is True and 0.5 in marker["schedule_times"] and "rho" not in marker
    # a folder drawn with other steps (as an older version placed them) is not continued
    marker["schedule_times"][1] -= 0.01
    marker_path.write_text(json.dumps(marker))
    monkeypatch.setattr(shards, "draw", draw)
    capsys.readouterr()
    assert sample(args) == 2
    assert "schedule_times" in capsys.readouterr().err and not out.exists()
