"""The routed checkpoint: mixed-time routing, round trip, guidance, refusal of inconsistent files."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import cbs_convert
from cbs_convert.errors import CheckpointError
from cbs_convert.models.routed import RoutedModel
from cbs_convert.storage.routed_file import METADATA_KEY, save_routed
from cbs_convert.stages.budget import allocate_widths
from helpers import tiny_model


def three_experts(name):
    family, teacher = tiny_model(name)
    experts, configs = [], []
    for seed, fraction in zip((1, 2, 3), (0.5, 0.7, 1.0)):
        config = allocate_widths(family, family.config, int(fraction * family.param_count(family.config)))
        torch.manual_seed(seed)
        experts.append(family.build(config).eval())
        configs.append(config)
    return family, experts, configs, [0.0, 0.3, 0.65, 1.0]


@pytest.mark.parametrize("name", ["sit", "dit"])
def test_mixed_time_batch_equals_calling_each_expert(name):
    family, experts, _, boundaries = three_experts(name)
    routed = RoutedModel(family, experts, boundaries).eval()
    t = torch.tensor([0.05, 0.95, 0.31, 0.5, 0.64, 0.66, 1.0, 0.0, 0.299])
    owner = [0, 2, 1, 1, 1, 2, 2, 0, 0]
    x = torch.randn(len(t), 4, 8, 8)
    y = torch.randint(0, 10, (len(t),))
    native = family.native_time(t)
    with torch.no_grad():
        out = routed(x, native, y)
        for i, k in enumerate(owner):
            single = experts[k](x[i:i + 1], native[i:i + 1], y[i:i + 1])
            assert torch.allclose(out[i:i + 1], single, atol=1e-6), (i, k)


def test_dit_integer_timesteps_route_by_their_own_time():
    family, experts, _, boundaries = three_experts("dit")
    routed = RoutedModel(family, experts, boundaries)
    steps = torch.tensor([0, 299, 300, 649, 650, 999])
    # step n is canonical n / 999; 0.3 * 999 = 299.7
    assert routed.expert_index(steps).tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("name", ["sit", "dit"])
def test_round_trip_and_guidance(tmp_path, name):
    family, experts, configs, boundaries = three_experts(name)
    path = save_routed(tmp_path / "routed.safetensors", family, [e.state_dict() for e in experts], configs, boundaries)
    loaded = cbs_convert.load(path)
    original = RoutedModel(family, experts, boundaries)
    x = torch.randn(4, 4, 8, 8)
    t = family.native_time(torch.tensor([0.1, 0.4, 0.7, 0.9]))
    y = torch.tensor([1, 2, 10, 10])  # the second half is the null class, as in the reference sampling scripts
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), original(x, t, y))
        guided = loaded.forward_with_cfg(x, t, y, cfg_scale=4.0)
        half = loaded(torch.cat([x[:2], x[:2]]), t, y)
    assert guided.shape == half.shape
    cond, uncond = half[:2, :3], half[2:, :3]
    assert torch.allclose(guided[:2, :3], uncond + 4.0 * (cond - uncond), atol=1e-5)
    assert torch.allclose(guided[:, 3:], half[:, 3:])
    meta = loaded.metadata
    assert meta["family"] == name and meta["boundaries"] == boundaries
    assert [e["params"] for e in meta["experts"]] == [family.param_count(c) for c in configs]
    assert len(meta["time_convention"]["native_boundaries"]) == 4


def _rewrite(path, mutate_meta=None, mutate_tensors=None):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()[METADATA_KEY])
    tensors = load_file(str(path))
    if mutate_meta:
        mutate_meta(meta)
    if mutate_tensors:
        mutate_tensors(tensors)
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta)})


def test_metadata_that_disagrees_with_the_tensors_is_refused(tmp_path):
    family, experts, configs, boundaries = three_experts("sit")
    path = save_routed(tmp_path / "r.safetensors", family, [e.state_dict() for e in experts], configs, boundaries)
    _rewrite(path, mutate_meta=lambda m: m.update(boundaries=[0.0, 0.5, 1.0]))
    with pytest.raises(CheckpointError, match="3 experts but 3 boundaries"):
        cbs_convert.load(path)
    path = save_routed(tmp_path / "r2.safetensors", family, [e.state_dict() for e in experts], configs, boundaries)
    _rewrite(path, mutate_meta=lambda m: m["experts"][1]["config"].update(mlp_hidden=7))
    with pytest.raises(CheckpointError, match="expert 1 does not match its config"):
        cbs_convert.load(path)
    path = save_routed(tmp_path / "r3.safetensors", family, [e.state_dict() for e in experts], configs, boundaries)
    _rewrite(path, mutate_meta=lambda m: m.update(boundaries=[0.0, 0.7, 0.3, 1.0]))
    with pytest.raises(CheckpointError, match="increase"):
        cbs_convert.load(path)


def test_plain_safetensors_is_not_a_routed_checkpoint(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="not a routed checkpoint"):
        cbs_convert.load(path)


@pytest.mark.parametrize("name", ["sit", "dit"])
def test_casting_the_model_does_not_move_the_cuts(name):
    family, experts, _, _ = three_experts(name)
    boundaries = [0.0, 0.4988, 0.7731, 1.0]  # cuts that bf16 cannot represent
    reference = RoutedModel(family, experts, boundaries)
    native = family.native_time(torch.linspace(0, 1, 100_001, dtype=torch.float64))
    expected = reference.expert_index(native)
    for cast in (lambda m: m.bfloat16(), lambda m: m.half(), lambda m: m.to(torch.float16), lambda m: m.double()):
        routed = cast(RoutedModel(family, experts, boundaries))
        assert routed.native_inner.dtype == torch.float64
        assert torch.equal(routed.expert_index(native), expected)
    # and the routing itself is right: canonical [lo, hi), up to the rounding of the time conversion
    canonical = family.canonical_time(native)
    cuts = torch.tensor(boundaries[1:-1], dtype=torch.float64)
    wrong = expected != torch.bucketize(canonical, cuts, right=True)
    assert ((canonical[wrong, None] - cuts).abs().min(dim=1).values < 1e-12).all()


@pytest.mark.parametrize("name", ["sit", "dit"])
def test_a_stored_native_boundary_routes_to_the_segment_that_starts_there(tmp_path, name):
    family, experts, configs, _ = three_experts(name)
    boundaries = [0.0, 0.4988, 0.7731, 1.0]
    path = save_routed(tmp_path / "r.safetensors", family, [e.state_dict() for e in experts], configs, boundaries)
    routed = cbs_convert.load(path)
    native = routed.metadata["time_convention"]["native_boundaries"]
    assert native == family.native_time(torch.tensor(boundaries, dtype=torch.float64)).tolist()  # float64, not float32
    index = routed.expert_index(torch.tensor(native, dtype=torch.float64))
    assert index.tolist() == [0, 1, 2, 2]


@pytest.mark.parametrize("name", ["sit", "dit"])
def test_a_batch_owned_by_one_expert_calls_it_directly(name, monkeypatch):
    family, experts, _, boundaries = three_experts(name)
    routed = RoutedModel(family, experts, boundaries).eval()
    x, y = torch.randn(5, 4, 8, 8), torch.randint(0, 10, (5,))
    for t, k in ((0.1, 0), (0.5, 1), (0.9, 2), (0.3, 1), (1.0, 2), (0.0, 0)):
        native = family.native_time(torch.full((5,), t))
        assert routed.expert_at(float(native[0])) is experts[k]
        with torch.no_grad():
            expected = experts[k](x, native, y)
            with monkeypatch.context() as patched:
                patched.setattr(torch, "nonzero", lambda *a, **kw: (_ for _ in ()).throw(AssertionError("gathered")))
                assert torch.equal(routed(x, native, y), expected)
