"""Shared-base experts (--experts lora): one base, a low-rank delta per segment, one routed file."""

import json
import re
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import cbs_convert
from cbs_convert.cli.main import main as cli_main
from cbs_convert.errors import CheckpointError
from cbs_convert.stages.finetune import FinetuneSettings, finetune_expert
from cbs_convert.storage.loading import load_model
from cbs_convert.storage.routed_file import save_shared_base
from cbs_convert.models.shared_base import SharedBaseModel, describe_shared_base
from helpers import tiny_model
from test_adm import inputs as adm_inputs, tiny as tiny_adm
from test_end_to_end import QUICK_KW

BOUNDARIES = [0.0, 0.3, 0.7, 1.0]


def _model_and_inputs(name, n=6):
    if name == "adm":
        family, model = tiny_adm()
        x, t, y = adm_inputs(family, n=n)
        return family, model, x, t, y
    family, model = tiny_model(name)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, 8, 8, generator=generator)
    # times spread over every segment, one exactly at an inner cut
    t = family.native_time(torch.tensor([0.05, 0.3, 0.45, 0.69, 0.8, 0.99][:n], dtype=torch.float64)).float()
    return family, model, x, t, torch.arange(n) % 10


def _randomise_deltas(model, scale=0.05, seed=3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.deltas.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * scale)


@pytest.mark.parametrize("name", ["sit", "dit", "adm"])
def test_zero_deltas_compute_the_source_exactly(name):
    family, source, x, t, y = _model_and_inputs(name)
    with torch.no_grad():
        expected = source(x, t, y)
    shared = SharedBaseModel(family, source, BOUNDARIES, rank=3).eval()
    with torch.no_grad():
        assert torch.equal(shared(x, t, y), expected)
        if hasattr(source, "forward_with_cfg"):  # the official transformers have one, ADM's UNet does not
            assert torch.equal(shared.forward_with_cfg(x, t, y, 4.0), source.forward_with_cfg(x, t, y, 4.0))


@pytest.mark.parametrize("name", ["sit", "adm"])
def test_each_sample_of_a_mixed_batch_is_computed_by_its_own_segments_expert(name):
    family, source, x, t, y = _model_and_inputs(name)
    shared = SharedBaseModel(family, source, BOUNDARIES, rank=3).eval()
    _randomise_deltas(shared)
    which = shared.expert_index(t)
    # the host-side router (bisect over python floats) as an independent oracle for the tensor one
    assert which.tolist() == [shared.segment_of(float(v)) for v in t]
    assert sorted(set(which.tolist())) == [0, 1, 2]
    with torch.no_grad():
        routed = shared(x, t, y)
        for k in range(3):
            expert = family.instantiate(family.config, shared.merged_state_dict(k))
            rows = which == k
            alone = expert(x[rows], t[rows], None if y is None else y[rows])
            assert torch.allclose(routed[rows], alone, atol=1e-5, rtol=1e-4), k
        # the deltas matter: without routing (the bare base) the output differs
        assert not torch.allclose(routed, shared.base(x, t, y), atol=1e-4)


@pytest.mark.parametrize("sampler", ["data", "ode"])
def test_a_sampler_step_on_a_cut_uses_one_segments_delta_like_a_file_of_separate_experts(sampler):
    from cbs_convert.models.routed import RoutedModel
    from cbs_convert.sample.model_schedules import build_schedule
    from cbs_convert.sample.samplers import sample_ode, sample_ode_x

    family, source = tiny_model("sit")
    shared = SharedBaseModel(family, source, BOUNDARIES, rank=3).eval()
    _randomise_deltas(shared, scale=0.3)
    copies = RoutedModel(family, [family.instantiate(family.config, shared.merged_state_dict(k)) for k in range(3)],
                         BOUNDARIES).eval()
    schedule = build_schedule(family, shared, "uniform", 10, sampler=sampler)
    assert schedule.aligned and {0.3, 0.7} <= {round(float(v), 9) for v in schedule.times}
    generator = torch.Generator().manual_seed(0)
    noise, labels = torch.randn(3, 4, 8, 8, generator=generator), torch.arange(3)

    def run(model, pin=True):
        if sampler == "data":
            return sample_ode(family, model, None, labels, noise=noise, times=schedule, pin_experts=pin)
        return sample_ode_x(family, model, noise, labels, times=schedule, pin_experts=pin)

    with torch.no_grad():
        pinned = run(shared)
        assert torch.allclose(pinned, run(copies), atol=1e-4, rtol=1e-4)
        # the steps do meet on the cuts: routing each call by its own time mixes two deltas there
        assert not torch.allclose(pinned, run(shared, pin=False), atol=1e-2)


def test_one_segments_view_carries_the_shared_models_weights_through_the_module_tree():
    from cbs_convert.sample.samplers import Guided

    family, source, x, t, y = _model_and_inputs("sit")
    shared = SharedBaseModel(family, source, BOUNDARIES, rank=3)
    _randomise_deltas(shared)
    view = shared.expert_at(float(family.native_time(torch.tensor([0.5], dtype=torch.float64))[0]))
    assert view.segment == 1
    # a caller that reads the device or dtype, freezes weights, or looks a parameter up by the name
    # the view gives it (torch.func, torch.export, DDP's reducer) reaches the shared weights
    named = dict(view.named_parameters())
    assert {id(p) for p in named.values()} == {id(p) for p in shared.parameters()} and named
    assert all(view.get_parameter(name) is parameter for name, parameter in named.items())
    assert [id(b) for b in view.buffers()] == [id(b) for b in shared.buffers()]
    with torch.no_grad():
        called = torch.func.functional_call(view, {k: v.clone() for k, v in named.items()}, (x, t, y))
        assert torch.equal(called, view(x, t, y))
    shared.eval()
    assert view.training is False
    view.train()
    assert shared.training and view.training
    view.eval().half()
    assert next(shared.parameters()).dtype == torch.float16 and shared.native_inner.dtype == torch.float64
    view.double()
    # its own state dict is the shared model's, and the shared model merges it into a plain expert
    assert set(view.state_dict()) == {f"shared.{key}" for key in shared.state_dict()}
    state = shared.merged_state_dict(view.segment)
    expert = family.instantiate(family.config, state).double().eval()
    with torch.no_grad():
        assert torch.allclose(expert(x.double(), t.double(), y), view(x.double(), t.double(), y), atol=1e-9)
    # a module that wraps the view (the guided sampler does) saves and loads through the module tree
    guided = Guided(family, view, 4.0)
    assert len(list(guided.parameters())) == len(named)
    saved = {k: v.clone() for k, v in guided.state_dict().items()}
    _randomise_deltas(shared, seed=9)
    guided.load_state_dict(saved)
    assert all(torch.equal(value, state[key]) for key, value in shared.merged_state_dict(1).items())


@pytest.mark.parametrize("name", ["sit", "adm"])
def test_training_and_sampling_compute_the_same_deltas_and_training_saves_less_than_gathering(name, monkeypatch):
    from cbs_convert.models.shared_base import SegmentDeltas

    family, source, x, t, y = _model_and_inputs(name)
    shared = SharedBaseModel(family, source, BOUNDARIES, rank=3)
    _randomise_deltas(shared)

    def run():
        shared.zero_grad()
        out = shared(x, t, y)
        out.pow(2).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in shared.deltas.named_parameters()}

    def saved_elements():
        count = [0]

        def pack(tensor):
            count[0] += tensor.numel()
            return tensor
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            shared(x, t, y)
        return count[0]

    with torch.no_grad():
        sampled = shared(x, t, y)
    trained, grads = run()
    masked_saved = saved_elements()
    assert torch.allclose(trained, sampled, atol=1e-5, rtol=1e-4)
    # the gathering form (sampling's) under autograd: the same gradients, and more saved for backward
    monkeypatch.setattr(SegmentDeltas, "delta", lambda self, inputs, index: self._delta_gathered(inputs, index))
    gathered, gathered_grads = run()
    assert torch.allclose(trained, gathered, atol=1e-5, rtol=1e-4)
    for key, grad in grads.items():
        assert torch.allclose(grad, gathered_grads[key], atol=1e-5, rtol=1e-4), key
    assert saved_elements() > masked_saved


@pytest.mark.parametrize("layer,inputs,masked", [
    (torch.nn.Linear(96, 384), torch.randn(8, 16, 96), True),  # a transformer's few tokens
    (torch.nn.Conv2d(8, 8, 3, padding=1), torch.randn(8, 8, 32, 32), False),  # a UNet's full resolution
])
def test_training_takes_the_delta_form_that_keeps_less_for_backward(layer, inputs, masked):
    from cbs_convert.models.shared_base import SegmentDeltas, _Route

    route = _Route()
    deltas = SegmentDeltas(layer, 3, 4, route)
    layer.register_forward_hook(deltas.hook)
    index = torch.arange(len(inputs)) % 3

    def kept(form=None):
        count, parameters = [0], {p.data_ptr() for p in deltas.parameters()}

        def pack(tensor):
            count[0] += 0 if tensor.data_ptr() in parameters else tensor.numel()
            return tensor
        route.index = index
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            if form is None:
                layer(inputs)
            else:
                form(inputs, index)
        route.index = None
        return count[0]

    kept()  # a routed forward of the layer: its hook counts the positions the rule reads
    through_every, gathered = kept(deltas._delta_through_every_segment), kept(deltas._delta_gathered)
    assert deltas._masking_saves_memory() is masked
    assert (through_every < gathered) is masked


def test_the_routed_forward_compiles_as_one_graph():
    family, source, x, t, y = _model_and_inputs("sit")
    shared = SharedBaseModel(family, source, BOUNDARIES, rank=2).eval()
    _randomise_deltas(shared)
    # fullgraph: a host sync or a data-dependent branch in the routing would fail to trace
    compiled = torch.compile(shared, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(x, t, y), shared(x, t, y), atol=1e-6)
        one_segment = t.new_full(t.shape, float(t[0]))
        assert torch.allclose(compiled(x, one_segment, y), shared(x, one_segment, y), atol=1e-6)


def test_sizes_are_counted_from_the_layers_and_flops_from_a_forward():
    family, source, *_ = _model_and_inputs("sit")
    config = family.config
    described = describe_shared_base(family, BOUNDARIES, rank=4)
    hidden, mlp = config["hidden_size"], config["mlp_hidden"]
    per_block = 4 * ((hidden + 3 * hidden) + (hidden + hidden) + (hidden + mlp) + (mlp + hidden) + (hidden + 6 * hidden))
    final = 4 * (hidden + 2 * hidden)
    assert described["delta_params"] == config["depth"] * per_block + final
    assert described["base_params"] == family.param_count(config)
    tokens = (config["input_size"] // config["patch_size"]) ** 2
    per_block_flops = 2 * 4 * (tokens * ((hidden + 3 * hidden) + 2 * hidden + (hidden + mlp) + (mlp + hidden)) + 7 * hidden)
    assert described["delta_flops"] == config["depth"] * per_block_flops + 2 * 4 * 3 * hidden


def test_a_frozen_base_stays_the_source_while_the_deltas_learn():
    family, source, *_ = _model_and_inputs("sit")
    before = {k: v.clone() for k, v in source.state_dict().items()}
    teacher = family.instantiate(family.config, {k: v.clone() for k, v in before.items()})
    shared = SharedBaseModel(family, source, BOUNDARIES, rank=2)
    pool = torch.randn(16, 4, 8, 8)
    labels = torch.arange(16) % 10
    settings = FinetuneSettings(steps=4, batch_size=8, lr=1e-2, loss="data", ema_decay=0.0, seed=0)
    result = finetune_expert(family, teacher, shared, (0.0, 1.0), pool, labels, settings, progress=False,
                             param_groups=[(shared.delta_parameters(), 1.0), (shared.base_parameters(), 0.0)])
    trained = result.model
    assert all(torch.equal(trained.base.state_dict()[k], v) for k, v in before.items())
    assert any(float(p.abs().max()) > 0 for name, p in trained.deltas.named_parameters() if name.endswith("up"))


def _data(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "latents.npz"
    np.savez(path, features=rng.standard_normal((40, 4, 8, 8)).astype(np.float32), labels=rng.integers(0, 10, 40))
    return path


def _cli(args, cwd, capsys):
    """The CLI in this process (a subprocess would import torch again): exit code and stderr."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        code = cli_main(list(args))
    return code, capsys.readouterr()


def test_a_lora_conversion_writes_one_base_and_k_deltas_that_load_extract_and_describe(tmp_path, capsys):
    family, source, x, t, y = _model_and_inputs("sit")
    checkpoint = tmp_path / "tiny.safetensors"
    save_file(source.state_dict(), str(checkpoint))
    out = tmp_path / "lora.safetensors"
    result = cbs_convert.convert(checkpoint, k=3, experts="lora", rank=2, split="uniform", loss="data", data=str(_data(tmp_path)),
                                 num_heads=4, family="sit", out=str(out), warmup_steps=2, **QUICK_KW)
    report = result.report
    shared = report["shared_base"]
    assert shared["rank"] == 2 and shared["base_params"] == family.param_count(family.config)
    assert report["budget"]["achieved"] == shared["base_params"] + 3 * shared["delta_params"]
    # the steps the K copies would take, in one run
    assert report["finetune"]["settings"]["joint_steps"] == report["finetune"]["experts"][0]["settings"]["steps"] == 3 * QUICK_KW["steps"]
    assert report["finetune"]["experts"][0]["steps_run"] == 3 * QUICK_KW["steps"]
    assert report["finetune"]["experts"][0]["settings"]["warmup_steps"] == 2  # as given: only step shares scale it
    assert all(e["error_after"] > 0 for e in report["evaluation"]["experts"])  # the deltas and base moved
    markdown = out.with_name("lora.report.md").read_text()
    assert "times drawn from all of [0, 1]" in markdown and "widened by" not in markdown
    with safe_open(str(out), framework="pt") as handle:
        keys = list(handle.keys())
        meta = json.loads(handle.metadata()["cbs_convert"])
    assert meta["format_version"] == 2
    assert sum(key.startswith("base.") for key in keys) == len(source.state_dict())
    assert sum(key.startswith("deltas.") for key in keys) == 3 * 2 * len(shared["layers"])

    routed = cbs_convert.load(out)
    assert isinstance(routed, SharedBaseModel)
    with torch.no_grad():
        mixed = routed(x, t, y)
    which = routed.expert_index(t)
    for k in range(3):
        extracted = tmp_path / f"expert_{k}.safetensors"
        code, printed = _cli(["extract", str(out), "--expert", str(k), "--out", str(extracted)], tmp_path, capsys)
        assert code == 0, printed.err
        plain = load_model(extracted)[1]
        rows = which == k
        with torch.no_grad():
            assert torch.allclose(plain(x[rows], t[rows], y[rows]), mixed[rows], atol=1e-5, rtol=1e-4)
    code, shown = _cli(["info", str(out)], tmp_path, capsys)
    assert code == 0, shown.err
    assert f"shared base: {shared['base_params']:,} parameters" in shown.out
    assert shown.out.count(f"delta of {shared['delta_params']:,} params") == 3


def test_a_file_saved_from_the_library_round_trips(tmp_path):
    family, source, x, t, y = _model_and_inputs("adm")
    shared = SharedBaseModel(family, source, BOUNDARIES, rank=2).eval()
    _randomise_deltas(shared)
    path = save_shared_base(tmp_path / "adm_lora.safetensors", shared)
    loaded = cbs_convert.load(path)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), shared(x, t, y))


def test_a_damaged_delta_is_named(tmp_path, capsys):
    family, source, *_ = _model_and_inputs("sit")
    shared = SharedBaseModel(family, source, BOUNDARIES, rank=2)
    path = save_shared_base(tmp_path / "lora.safetensors", shared)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    del tensors["deltas.1.blocks.0.mlp.fc1.up"]
    save_file(tensors, str(tmp_path / "damaged.safetensors"), metadata)
    with pytest.raises(CheckpointError, match=r"tensor deltas\.1\.blocks\.0\.mlp\.fc1\.up of shape \[64, 2\] \(rank 2\)"):
        cbs_convert.load(tmp_path / "damaged.safetensors")
    for command in (["extract", "damaged.safetensors", "--expert", "1", "--out", "e.safetensors"], ["info", "damaged.safetensors"]):
        code, printed = _cli(command, tmp_path, capsys)
        assert code == 2 and "deltas.1.blocks.0.mlp.fc1.up" in printed.err and len(printed.err.strip().splitlines()) == 1
    assert not (tmp_path / "e.safetensors").exists()


@pytest.mark.parametrize("part,damage,needle", [
    # the right number of values in another layout: read in the wrong order if only the size were checked
    ("up", lambda up: up.reshape(64, 1, 2), "of shape [64, 2]"),
    ("down", lambda down: down.reshape(2, 2, -1), "of shape [2, 32]"),
    ("down", lambda down: down.reshape(-1, 2), "of shape [2, 32]"),
    ("up", lambda up: up.index_fill(0, torch.tensor([3]), float("nan")), "NaN/Inf"),
])
def test_a_delta_of_another_layout_or_with_nan_is_refused_in_one_line(tmp_path, capsys, part, damage, needle):
    family, source, *_ = _model_and_inputs("sit")
    shared = SharedBaseModel(family, source, BOUNDARIES, rank=2)
    _randomise_deltas(shared)
    path = save_shared_base(tmp_path / "lora.safetensors", shared)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    key = f"deltas.1.blocks.0.mlp.fc1.{part}"
    tensors[key] = damage(tensors[key]).clone()
    save_file(tensors, str(tmp_path / "damaged.safetensors"), metadata)
    with pytest.raises(CheckpointError, match=re.escape(needle)):
        cbs_convert.load(tmp_path / "damaged.safetensors")
    code, printed = _cli(["extract", "damaged.safetensors", "--expert", "1", "--out", "e.safetensors"], tmp_path, capsys)
    assert code == 2 and needle in printed.err and len(printed.err.strip().splitlines()) == 1, printed.err
    assert not (tmp_path / "e.safetensors").exists()


def test_a_delta_flop_count_that_the_deltas_do_not_add_up_to_is_refused(tmp_path, capsys):
    family, source, *_ = _model_and_inputs("sit")
    path = save_shared_base(tmp_path / "lora.safetensors", SharedBaseModel(family, source, BOUNDARIES, rank=2))
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["cbs_convert"])
    honest = meta["shared_base"]["delta_flops"]
    for claimed in (0, honest + 2):
        meta["shared_base"]["delta_flops"] = claimed
        save_file(load_file(str(path)), str(tmp_path / "edited.safetensors"), {"cbs_convert": json.dumps(meta)})
        code, printed = _cli(["info", "edited.safetensors"], tmp_path, capsys)
        assert code == 2 and "shared_base.delta_flops" in printed.err and f"{honest:,}" in printed.err, printed.err


@pytest.mark.parametrize("edit,field", [
    (lambda meta: meta["shared_base"].update(rank=3), "deltas.0"),
    (lambda meta: meta["shared_base"].update(layers=["blocks.0.norm1"]), "shared_base.layers[0]"),
    (lambda meta: meta["shared_base"].update(delta_params=1), "shared_base.delta_params"),
    (lambda meta: meta["shared_base"].pop("layers"), "shared_base.layers"),
    (lambda meta: meta["experts"][1].update(params=5), "experts[1].params"),
    (lambda meta: meta["experts"][0]["config"].update(depth=1), "experts[0].config"),
    (lambda meta: meta.update(format_version=4), "format_version"),  # per-block widths, over a plain source
])
def test_shared_base_metadata_that_contradicts_the_tensors_is_refused(tmp_path, capsys, edit, field):
    family, source, *_ = _model_and_inputs("sit")
    path = save_shared_base(tmp_path / "lora.safetensors", SharedBaseModel(family, source, BOUNDARIES, rank=2))
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["cbs_convert"])
    edit(meta)
    save_file(load_file(str(path)), str(tmp_path / "edited.safetensors"), {"cbs_convert": json.dumps(meta)})
    code, printed = _cli(["info", "edited.safetensors"], tmp_path, capsys)
    assert code == 2 and field in printed.err and len(printed.err.strip().splitlines()) == 1, printed.err


def test_a_layer_listed_twice_is_refused_not_given_its_delta_twice(tmp_path, capsys):
    family, source, x, t, y = _model_and_inputs("sit")
    shared = SharedBaseModel(family, source, BOUNDARIES, rank=2).eval()
    _randomise_deltas(shared)
    path = save_shared_base(tmp_path / "lora.safetensors", shared)
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["cbs_convert"])
    # every count edited to agree with the repeated layer: only the repetition is wrong. Accepted,
    # load hooked that layer's delta twice while extract folded it in once (outputs 5e-3 apart).
    layer = meta["shared_base"]["layers"][0]
    once = shared.delta(layer).params_per_segment()
    meta["shared_base"]["layers"].append(layer)
    meta["shared_base"]["delta_params"] += once
    for entry in meta["experts"]:
        entry["params"] += once
    save_file(load_file(str(path)), str(tmp_path / "twice.safetensors"), {"cbs_convert": json.dumps(meta)})
    with pytest.raises(CheckpointError, match=r"shared_base\.layers\[\d+\].*not listed before"):
        cbs_convert.load(tmp_path / "twice.safetensors")
    code, printed = _cli(["extract", "twice.safetensors", "--expert", "0", "--out", "e.safetensors"], tmp_path, capsys)
    assert code == 2 and "shared_base.layers[" in printed.err and not (tmp_path / "e.safetensors").exists()
    with pytest.raises(ValueError, match="more than once"):
        SharedBaseModel(family, family.instantiate(family.config, source.state_dict()), BOUNDARIES, 2, [layer, layer])


def test_activation_checkpointing_in_the_base_keeps_every_delta_in_training(tmp_path):
    # ADM with use_checkpoint (--use-checkpoint) recomputes each block in backward, after the
    # routing was cleared: torch.utils.checkpoint refused the delta-less recomputation ("A different
    # number of tensors was saved") at the first backward of every --experts lora run with it
    from cbs_convert.pipeline.conversion import Conversion
    from test_adm import HINTS

    save_file(tiny_adm()[1].state_dict(), str(tmp_path / "unet.safetensors"))
    conversion = Conversion({"checkpoint": str(tmp_path / "unet.safetensors"), "experts": "lora", "use_checkpoint": True, "steps": 0,
                             "out": str(tmp_path / "lora.safetensors"), **HINTS}, progress=False)
    conversion.load()  # the run says that the memory it was asked to save is not saved
    assert any("--use-checkpoint does not apply to --experts lora" in w for w in conversion.warnings)
    grads = {}
    for checkpointing in (False, True):
        family, source = tiny_adm(use_checkpoint=checkpointing)
        x, t, y = adm_inputs(family, n=4)
        shared = SharedBaseModel(family, source, BOUNDARIES, rank=2).train()
        _randomise_deltas(shared)
        shared(x, t, y).pow(2).mean().backward()
        grads[checkpointing] = {name: p.grad.clone() for name, p in shared.named_parameters()}
    assert grads[True].keys() == grads[False].keys()
    for name, grad in grads[False].items():
        assert torch.allclose(grads[True][name], grad, atol=1e-6, rtol=1e-5), name
    assert any(float(g.abs().max()) > 0 for name, g in grads[True].items() if name.endswith(".up"))


@pytest.mark.parametrize("flags,message", [
    (["--experts", "lora", "--budget", "2x"], "--experts lora keeps the source's width"),
    (["--base-lr-scale", "0.5"], "applies to --experts lora only"),
    (["--experts", "lora", "--rank", "0"], "rank=0 must be 1 or more"),
    (["--experts", "lora"], "--experts lora trains its deltas on data"),
    (["--experts", "lora", "--structure", "depth", "--steps", "0"], "--structure depth prunes copies"),
    (["--recipe", "same_cost"], "loss 'data' needs real latents: pass --data"),
])
def test_contradictory_lora_flags_are_refused_before_any_work(tmp_path, capsys, flags, message):
    family, source, *_ = _model_and_inputs("sit")
    save_file(source.state_dict(), str(tmp_path / "tiny.safetensors"))
    code, printed = _cli(["tiny.safetensors", "--num-heads", "4", "--family", "sit", *flags], tmp_path, capsys)
    assert code == 2 and message in printed.err
    assert len(printed.err.strip().splitlines()) == 1 and not list(tmp_path.glob("*.work"))


@pytest.mark.parametrize("kind", ["dit", "unet"])
def test_diffusers_sources_convert_to_zero_deltas_that_equal_them_inside_diffusers(tmp_path, kind):
    pytest.importorskip("diffusers")
    import test_diffusers as td

    model = td.tiny_diffusers_dit() if kind == "dit" else td.tiny_unet()
    folder = (td.save_pipeline_folder if kind == "dit" else td.save_ddpm_folder)(model, tmp_path / "source")
    result = cbs_convert.convert(folder, k=2, experts="lora", rank=2, steps=0, out=str(tmp_path / "lora.safetensors"),
                                 pool_size=8, grid=4, profile_batches=1, profile_batch_size=4, calib_batches=1,
                                 eval_samples=4, ode_steps=3)
    wrapped = cbs_convert.load(result.output, format="diffusers")
    generator = torch.Generator().manual_seed(1)
    if kind == "dit":
        x, t, y = td.inputs()
        with torch.no_grad():
            assert torch.allclose(wrapped(hidden_states=x, timestep=t, class_labels=y).sample,
                                  model(x, timestep=t, class_labels=y).sample, atol=1e-5, rtol=1e-5)
    else:
        x, t = torch.randn(2, 3, 16, 16, generator=generator), torch.tensor([900, 20])
        with torch.no_grad():
            assert torch.allclose(wrapped(x, t).sample, model(x, t).sample, atol=1e-5, rtol=1e-5)


def test_the_same_cost_preset_converts_by_name_into_two_rank_2_deltas_over_the_source(tmp_path, capsys):
    family, source, *_ = _model_and_inputs("sit")
    save_file(source.state_dict(), str(tmp_path / "tiny.safetensors"))
    code, printed = _cli(["tiny.safetensors", "--num-heads", "4", "--family", "sit", "--recipe", "same_cost",
                          "--data", str(_data(tmp_path)), "--steps", "2", "--pool-size", "16", "--batch-size", "4",
                          "--eval-samples", "4", "--grid", "6", "--quiet", "--out", "same.safetensors"], tmp_path, capsys)
    assert code == 0, printed.err
    with safe_open(str(tmp_path / "same.safetensors"), framework="pt") as handle:
        meta = json.loads(handle.metadata()["cbs_convert"])
    assert meta["boundaries"] == [0.0, 0.5, 1.0] and meta["shared_base"]["rank"] == 2
    assert meta["recipe"]["split"] == "uniform" and meta["recipe"]["lr"] == 1e-3
