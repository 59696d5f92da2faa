"""Architecture facts: key layout of the published files, counts, exact surgery."""

import json
from pathlib import Path

import pytest
import torch

from cbs_convert.errors import CheckpointError
from cbs_convert.families import FAMILIES, detect
from cbs_convert.stages.prune import prune_state_dict, select_units, unit_scores
from cbs_convert.stages.budget import allocate_widths
from helpers import tiny_config, tiny_model

LAYOUTS = json.loads((Path(__file__).parent / "data" / "sit_dit_layouts.json").read_text())
PUBLISHED = {"SiT-XL/2": (28, 1152), "SiT-L/2": (24, 1024), "SiT-B/2": (12, 768), "SiT-S/2": (12, 384)}


def published_state_dict(depth, hidden, learn_sigma=True):
    """Meta tensors with the official shapes: nothing is allocated or downloaded."""
    heads = {1152: 16, 1024: 16, 768: 12, 384: 6}[hidden]
    config = dict(input_size=32, patch_size=2, in_channels=4, hidden_size=hidden, depth=depth, num_heads=heads,
                  head_dim=hidden // heads, mlp_hidden=4 * hidden, num_classes=1000, label_rows=1001,
                  class_dropout_prob=0.1, learn_sigma=learn_sigma, path="linear")
    shapes = FAMILIES["sit"].expected_shapes(config)
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def test_xl_layout_matches_official_keys():
    sd = published_state_dict(28, 1152)
    expected = {}
    for key, shape in LAYOUTS["xl_keys"].items():
        if "{i}" in key:
            expected.update({key.replace("{i}", str(i)): tuple(shape) for i in range(28)})
        else:
            expected[key] = tuple(shape)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


@pytest.mark.parametrize("name", sorted(PUBLISHED))
@pytest.mark.parametrize("family", ["sit", "dit"])
def test_published_sizes_detected_and_counted(name, family):
    depth, hidden = PUBLISHED[name]
    sd = published_state_dict(depth, hidden)
    fam, notes = detect(sd, {"family": family})
    assert fam.name == family
    assert fam.config["num_heads"] == {1152: 16, 1024: 16, 768: 12, 384: 6}[hidden]
    assert fam.param_count(fam.config) == LAYOUTS["published"][name]["params"]
    assert len(sd) == LAYOUTS["published"][name]["keys"]
    assert fam.recipe_name(fam.config) == f"{family}_{name.split('-')[1].split('/')[0].lower()}_2"


def test_layout_variants_are_read_from_shapes():
    # patch 4, 512 px (64x64 latents), no learned sigma, unconditional
    config = tiny_config("sit", patch_size=4, input_size=16, learn_sigma=False, label_rows=0, num_classes=0)
    sd = FAMILIES["sit"].build(config).state_dict()
    fam, _ = detect(sd, {"family": "sit", "num_heads": 4})
    for key in ("patch_size", "input_size", "learn_sigma", "label_rows", "hidden_size", "mlp_hidden"):
        assert fam.config[key] == config[key], key


def test_unknown_width_needs_heads_flag(tiny_sit):
    family, model = tiny_sit
    with pytest.raises(CheckpointError, match="--num-heads"):
        detect(model.state_dict(), {"family": "sit"})


def test_inconsistent_widths_are_named(tiny_sit):
    family, model = tiny_sit
    sd = dict(model.state_dict())
    sd["blocks.1.mlp.fc1.weight"] = torch.zeros(10, 32)
    with pytest.raises(CheckpointError, match="blocks.1.mlp.fc1.weight"):
        detect(sd, {"family": "sit", "num_heads": 4})


@pytest.mark.parametrize("name", ["sit", "dit"])
def test_closed_form_count_equals_numel_after_pruning(name):
    family, model = tiny_model(name)
    for target in (0.3, 0.6, 1.0):
        config = allocate_widths(family, family.config, int(target * family.param_count(family.config)))
        built = family.build(config)
        assert family.param_count(config) == sum(p.numel() for p in built.parameters())


@pytest.mark.parametrize("name", ["sit", "dit"])
@pytest.mark.parametrize("criterion", ["magnitude", "random"])
def test_keeping_every_unit_reproduces_the_source(name, criterion):
    family, model = tiny_model(name)
    sd = model.state_dict()
    pruned, _ = prune_state_dict(family, model, sd, family.config, family.config, criterion, seed=3)
    copy = family.build(family.config)
    copy.load_state_dict(pruned, strict=True)
    copy.eval()
    x, t, y = torch.randn(6, 4, 8, 8), torch.rand(6), torch.randint(0, 10, (6,))
    with torch.no_grad():
        a = model(x, family.native_time(t), y)
        b = copy(x, family.native_time(t), y)
    assert ((a - b).norm() / a.norm()).item() < 1e-5


def test_pruned_weights_load_strictly_and_slice_the_kept_units(tiny_sit):
    family, model = tiny_sit
    target = allocate_widths(family, family.config, family.param_count(family.config) // 2)
    groups = family.unit_groups(family.config, target)
    kept = select_units(groups, unit_scores(model, groups, "magnitude"))
    sd = family.slice_state_dict(model.state_dict(), family.config, kept)
    pruned = family.build(target)
    pruned.load_state_dict(sd, strict=True)
    r, h = kept["residual"], kept["heads.0"]
    hd = family.config["head_dim"]
    q_rows = (h[:, None] * hd + torch.arange(hd)).reshape(-1)
    assert torch.equal(pruned.blocks[0].attn.qkv.weight[: len(q_rows)], model.blocks[0].attn.qkv.weight[q_rows][:, r])
    assert torch.equal(pruned.pos_embed[0], model.pos_embed[0][:, r])


def test_sit_and_dit_time_conventions():
    sit, _ = tiny_model("sit")
    dit, _ = tiny_model("dit")
    t = torch.tensor([0.0, 0.25, 1.0])
    assert torch.allclose(sit.native_time(t), 1 - t)
    assert torch.allclose(dit.native_time(t), t * 999)
    assert torch.allclose(dit.canonical_time(torch.tensor([0, 999])), torch.tensor([0.0, 1.0]))
    alpha, sigma = dit.schedule(torch.tensor([0.0, 1.0]))
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ab = torch.cumprod(1 - betas, 0)
    assert torch.allclose(alpha.double() ** 2, ab[[0, -1]], rtol=1e-4)


def test_dit_velocity_matches_the_derivative_of_its_path():
    """With an oracle eps, the converted velocity is d/dt (alpha x0 + sigma eps)."""
    dit, _ = tiny_model("dit")
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0.1, 0.5, 0.9])

    def path(t_):
        a, s = dit.schedule(t_)
        return a[:, None, None, None] * x0 + s[:, None, None, None] * eps

    x_t, exact = torch.func.jvp(path, (t,), (torch.ones_like(t),))
    assert torch.allclose(dit.velocity_from_native(eps, x_t, t), exact, rtol=1e-3, atol=1e-4)


def _echo_state_dict(sign):
    """A tiny transformer whose output is ``sign`` times its input (up to a positive scale).

    Blocks and final modulation are switched off by zero adaLN weights; the patch embedding is a
    zero-mean orthonormal map (so LayerNorm only rescales) and the output layer is its inverse.
    """
    family, model = tiny_model("dit", learn_sigma=False)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for k in sd:
        if "adaLN_modulation" in k:
            sd[k].zero_()
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(32, 16))
    w = q - q.mean(0, keepdim=True)
    sd["x_embedder.proj.weight"] = w.reshape(32, 4, 2, 2)
    sd["x_embedder.proj.bias"].zero_()
    sd["pos_embed"].zero_()
    inverse = torch.linalg.pinv(w)  # rows indexed by conv order (c, p, q)
    order = [c * 4 + p * 2 + qq for p in range(2) for qq in range(2) for c in range(4)]  # unpatchify order (p, q, c)
    sd["final_layer.linear.weight"] = sign * inverse[order]
    sd["final_layer.linear.bias"].zero_()
    return sd


@pytest.mark.parametrize("sign,expected", [(1.0, "dit"), (-1.0, "sit")])
def test_detection_probe_tells_a_noise_predictor_from_a_velocity_model(sign, expected):
    fam, notes = detect(_echo_state_dict(sign), {"num_heads": 4, "source_name": "checkpoint.pt"})
    assert fam.name == expected
    assert any("probe" in n for n in notes)


def test_detection_prefers_args_then_file_name(tiny_sit):
    _, model = tiny_sit
    sd = model.state_dict()
    assert detect(sd, {"num_heads": 4, "args_model": "DiT-tiny/2"})[0].name == "dit"
    assert detect(sd, {"num_heads": 4, "source_name": "/x/SiT-XL-2-256.pt"})[0].name == "sit"
    assert detect(sd, {"num_heads": 4, "source_name": "/x/DiT-XL-2-256x256.pt"})[0].name == "dit"


def test_pruning_heads_and_mlp_channels_equals_silencing_them(tiny_dit):
    """With the residual width kept, removing units must equal zeroing what they write."""
    family, model = tiny_dit
    target = family.with_widths(family.config, {"num_heads": 2, "mlp_hidden": 40})
    groups = family.unit_groups(family.config, target)
    kept = select_units(groups, unit_scores(model, groups, "random", seed=5))
    pruned = family.build(target)
    pruned.load_state_dict(family.slice_state_dict(model.state_dict(), family.config, kept), strict=True)
    silenced = family.build(family.config)
    silenced.load_state_dict(model.state_dict())
    hd = family.config["head_dim"]
    with torch.no_grad():
        for i, block in enumerate(silenced.blocks):
            heads = set(kept[f"heads.{i}"].tolist())
            for h in range(family.config["num_heads"]):
                if h not in heads:
                    block.attn.proj.weight[:, h * hd:(h + 1) * hd] = 0
            mask = torch.ones(family.config["mlp_hidden"], dtype=torch.bool)
            mask[kept[f"mlp.{i}"]] = False
            block.mlp.fc2.weight[:, mask] = 0
    x, t, y = torch.randn(4, 4, 8, 8), torch.rand(4) * 999, torch.randint(0, 10, (4,))
    with torch.no_grad():
        assert torch.allclose(pruned.eval()(x, t, y), silenced.eval()(x, t, y), atol=1e-5)
