"""The guided-diffusion (ADM) UNet family: published layouts, surgery, and the whole conversion."""

import json
from pathlib import Path

import pytest
import torch

import cbs_convert
from cbs_convert.storage.checkpoint import read_checkpoint
from cbs_convert.cli.main import main as cli_main
from cbs_convert.errors import BudgetError, CheckpointError
from cbs_convert.families import FAMILIES, detect
from cbs_convert.families.adm_detect import PUBLISHED
from cbs_convert.families.adm_net import AttentionBlock, ResBlock
from cbs_convert.stages.prune import calibration_batches, prune_state_dict
from cbs_convert.pipeline.recipe import bundled_recipe, read_recipe_file
from cbs_convert.storage.routed_file import read_metadata, save_safetensors_atomic
from cbs_convert.stages.budget import allocate_widths, check_budget_feasible, smallest_config

ADM = FAMILIES["adm"]
LAYOUTS = json.loads((Path(__file__).parent / "data" / "adm_published_layouts.json").read_text())["layouts"]
#: fixture layout -> (published name, classes)
RELEASED = {"64_cond": ("adm_64", 1000), "128_cond": ("adm_128", 1000), "256_cond": ("adm_256", 1000),
            "256_uncond": ("adm_256", 0)}
TINY = dict(in_channels=3, model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_ds=[2], num_heads=2,
            num_head_channels=-1, image_size=8, num_classes=5, out_channels=6, attention_order="legacy")
HINTS = {"num_heads": 2, "image_size": 8}


def tiny(seed=0, **overrides):
    config = dict(TINY, **overrides)
    torch.manual_seed(seed)
    return ADM(config), ADM.build(config).eval()


def inputs(family, n=4, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *family.sample_shape(family.config), generator=generator)
    steps = torch.randint(0, 1000, (n,), generator=generator).float()
    classes = family.num_classes(family.config)
    y = torch.randint(0, classes, (n,), generator=generator) if classes else None
    return x, steps, y


def relative(a, b):
    return float((a - b).norm() / b.norm())


# -- the published files ---------------------------------------------------------------------


def published_config(name):
    pub, classes = RELEASED[name]
    facts = PUBLISHED[pub]
    keys = ("model_channels", "channel_mult", "num_res_blocks", "attention_ds", "num_heads", "num_head_channels",
            "attention_order", "beta_schedule", "image_size")
    return dict(in_channels=3, out_channels=6, num_classes=classes, **{k: facts[k] for k in keys})


def published_state_dict(name):
    """Meta tensors with the released shapes: from the listing where it has the keys, else built."""
    layout = LAYOUTS[name]
    if layout["keys"] is not None:
        shapes = layout["keys"]
    elif name == "256_uncond":  # the listing's counts say: the conditional file without its label table
        shapes = {k: v for k, v in LAYOUTS["256_cond"]["keys"].items() if k != "label_emb.weight"}
    else:
        shapes = ADM.expected_shapes(published_config(name))
    return {k: torch.empty(tuple(v), device="meta") for k, v in shapes.items()}


def block_summary(model):
    def layers(seq):
        out = []
        for m in seq:
            if isinstance(m, ResBlock):
                out.append(["ResBlock", m.channels, m.out_channels, None])
            elif isinstance(m, AttentionBlock):
                out.append(["AttentionBlock", m.norm.num_channels, None, m.heads])
            else:
                out.append([type(m).__name__, None, m.out_channels, None])
        return out

    return ([["input_blocks", i, layers(b)] for i, b in enumerate(model.input_blocks)]
            + [["middle", None, [type(m).__name__ for m in model.middle_block]]]
            + [["output_blocks", i, layers(b)] for i, b in enumerate(model.output_blocks)])


def listed_summary(blocks):
    return [[b["section"], b["index"], [l["type"] for l in b["layers"]] if b["section"] == "middle"
             else [[l["type"], l["in"], l["out"], l["heads"]] for l in b["layers"]]] for b in blocks]


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_published_layouts_are_read_counted_and_named(name):
    layout = LAYOUTS[name]
    sd = published_state_dict(name)
    family, notes = detect(sd, {})
    config = family.config
    assert family.name == "adm" and len(sd) == layout["key_count"]
    assert family.expected_shapes(config) == {k: tuple(v.shape) for k, v in sd.items()}
    assert family.param_count(config) == layout["params"] == sum(v.numel() for v in sd.values())
    assert config["channel_mult"] == layout["channel_mult"] and config["attention_ds"] == layout["attention_ds"]
    assert family.recipe_name(config) == RELEASED[name][0]
    assert family.num_classes(config) == RELEASED[name][1] and family.null_label(config) is None
    # Heads and qkv order are invisible in the shapes: they come from the published flags.
    with torch.device("meta"):
        model = family.build(config)
    assert block_summary(model) == listed_summary(layout["blocks"])
    order = {"QKVAttention": "new", "QKVAttentionLegacy": "legacy"}[layout["attention_impl"]]
    assert config["attention_order"] == order
    assert config["beta_schedule"] == ("cosine" if name == "64_cond" else "linear")
    assert family.sample_shape(config) == (3, int(name.split("_")[0]), int(name.split("_")[0]))


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_smallest_budget_at_k2_and_below_it(name):
    family = ADM(published_config(name))
    config = family.config
    full = family.param_count(config)
    floor = smallest_config(family, config)
    smallest = family.param_count(floor)
    assert set(floor["res_groups"]) == {1} and set(floor["attn_heads"]) == {1}  # one group, one head per block
    assert family.param_count(allocate_widths(family, config, smallest)) == smallest
    for fraction in (0.5, 0.3):  # a 1x budget split over two experts, and a smaller one
        target = int(fraction * full)
        assert abs(family.param_count(allocate_widths(family, config, target)) / target - 1) <= 0.01
    check_budget_feasible(family, config, 2 * smallest, 2)
    with pytest.raises(BudgetError, match=f"cannot hold 2 experts of at least {smallest:,} each"):
        check_budget_feasible(family, config, int(0.95 * 2 * smallest), 2)
    with pytest.raises(BudgetError, match=f"below the smallest prunable model \\({smallest:,}\\)"):
        allocate_widths(family, config, int(0.95 * smallest))


def test_head_split_of_an_unknown_layout_must_be_given():
    _, model = tiny()
    with pytest.raises(CheckpointError, match="--num-heads"):
        detect(model.state_dict(), {})
    with pytest.raises(CheckpointError, match="not divisible"):
        detect(model.state_dict(), {"num_heads": 3})


def test_inconsistent_shapes_are_named():
    _, model = tiny()
    sd = dict(model.state_dict())
    sd["output_blocks.1.0.skip_connection.weight"] = torch.zeros(64, 95, 1, 1)
    with pytest.raises(CheckpointError, match="output_blocks.1.0.skip_connection.weight"):
        detect(sd, HINTS)


# -- tiny models -------------------------------------------------------------------------------

VARIANTS = {
    "cond": {},
    "uncond": dict(num_classes=0),
    "no_sigma": dict(out_channels=3),
    "new_order": dict(attention_order="new", num_head_channels=32, num_heads=-1),
    "plain_resampling": dict(resblock_updown=False, use_scale_shift_norm=False, num_res_blocks=2, channel_mult=[1, 2, 2],
                             attention_ds=[2, 4]),
    "pool_resampling": dict(resblock_updown=False, conv_resample=False, num_classes=0, attention_order="new"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tiny_layouts_are_read_back_from_shapes(tmp_path, variant):
    family, model = tiny(**VARIANTS[variant])
    path = tmp_path / "tiny.pt"
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)  # released ADM files are fp16
    source = read_checkpoint(path)
    hints = dict(HINTS, attention_order=family.config["attention_order"])
    if family.config["num_head_channels"] > 0:
        hints = dict(hints, num_heads=None, num_head_channels=family.config["num_head_channels"])
    found, _ = detect(source.state_dict, hints)
    assert found.name == "adm" and found.config == family.config
    ADM.build(found.config).load_state_dict(source.state_dict, strict=True)
    assert found.param_count(found.config) == sum(p.numel() for p in model.parameters())
    assert found.recipe_name(found.config) is None


@pytest.mark.parametrize("variant", ["cond", "new_order", "plain_resampling", "pool_resampling"])
def test_keeping_every_unit_reproduces_the_teacher(variant):
    family, model = tiny(**VARIANTS[variant])
    config = family.config
    calibration = calibration_batches(family, torch.randn(8, 3, 8, 8), None if not config["num_classes"] else
                                      torch.arange(8) % config["num_classes"], (0.2, 0.6), 1, 4, seed=0)
    sd, kept = prune_state_dict(family, model, model.state_dict(), config, config, "segment", calibration)
    assert all(len(v) == n for v, n in zip(kept.values(), [g.size for g in family.unit_groups(config, config)]))
    copy = ADM.build(config).eval()
    copy.load_state_dict(sd, strict=True)
    x, t, y = inputs(family)
    with torch.no_grad():
        assert relative(copy(x, t, y), model(x, t, y)) < 1e-5


@pytest.mark.parametrize("variant", ["cond", "new_order", "plain_resampling"])
def test_pruning_equals_silencing_the_removed_units(variant):
    """Dropping whole GroupNorm groups and whole heads changes nothing but their contribution: the
    pruned model equals the teacher with the removed units' input columns of conv2/proj_out zeroed.
    This pins the qkv row order, the emb scale/shift halves and the group slicing."""
    family, model = tiny(**VARIANTS[variant])
    source = family.config
    target = allocate_widths(family, source, int(0.6 * family.param_count(source)))
    assert target["inner_groups"] < source["inner_groups"] and target["attention_heads"] < source["attention_heads"]
    sd, kept = prune_state_dict(family, model, model.state_dict(), source, target, "random", seed=3)
    pruned = ADM.build(target).eval()
    pruned.load_state_dict(sd, strict=True)
    assert family.param_count(target) == sum(p.numel() for p in pruned.parameters())
    silenced = {k: v.clone() for k, v in model.state_dict().items()}
    for group in family.unit_groups(source, target):
        weight = silenced[group.consumers[0] + ".weight"]
        for unit in sorted(set(range(group.size)) - set(kept[group.name].tolist())):
            weight[:, unit * group.unit_width:(unit + 1) * group.unit_width] = 0
    reference = ADM.build(source).eval()
    reference.load_state_dict(silenced)
    x, t, y = inputs(family)
    with torch.no_grad():
        assert relative(pruned(x, t, y), reference(x, t, y)) < 1e-5
        assert relative(pruned(x, t, y), model(x, t, y)) > 1e-3  # and something was removed


def test_time_convention_and_losses():
    family, model = tiny(beta_schedule="cosine")
    t = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(family.native_time(t), torch.tensor([0.0, 499.5, 999.0]))
    assert torch.allclose(family.canonical_time(torch.tensor([999])), torch.tensor([1.0]))
    alpha, sigma = family.schedule(torch.tensor([0.0, 1.0]))
    assert alpha[0] > 0.99 and alpha[1] < 1e-3 and torch.allclose(alpha ** 2 + sigma ** 2, torch.ones(2))
    x, steps, y = inputs(family)
    ts = family.canonical_time(steps)
    with torch.no_grad():
        teacher_out = model(x, steps, y)
        assert family.velocity(model, x, ts, y).shape == x.shape
        loss = family.data_loss(model, x, y, ts, torch.randn_like(x), teacher_out=teacher_out)
    assert torch.isfinite(loss)


def test_guidance_over_all_noise_channels_and_unconditional_refusal():
    family, model = tiny()
    x, t, _ = inputs(family)
    y = torch.tensor([1, 2, 0, 0])
    with torch.no_grad():
        out = family.guided_forward(model, x, t, y, 3.0)
        both = model(torch.cat([x[:2], x[:2]]), t, y)
    cond, uncond = both[:2, :3], both[2:, :3]
    assert torch.allclose(out[:2, :3], uncond + 3.0 * (cond - uncond), atol=1e-5)
    assert torch.equal(out[:2, :3], out[2:, :3]) and torch.equal(out[:, 3:], both[:, 3:])
    family, model = tiny(num_classes=0)
    with pytest.raises(ValueError, match="unconditional"):
        family.guided_forward(model, x, t, None, 3.0)


def test_activation_checkpointing_with_frozen_parameters():
    family, plain = tiny()
    checkpointed = ADM.build(dict(family.config, use_checkpoint=True))
    checkpointed.load_state_dict(plain.state_dict())
    x, t, y = inputs(family)
    grads = []
    for model in (plain, checkpointed):
        model.train()
        for name, p in model.named_parameters():
            p.requires_grad_(not name.startswith(("input_blocks.0", "time_embed")))
        model(x, t, y).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


def test_bundled_recipes():
    for stem in ("adm_64", "adm_128", "adm_256"):
        path = bundled_recipe(stem, 2)
        assert path is not None and read_recipe_file(path)["k"] == 2


# -- the whole conversion ----------------------------------------------------------------------


def test_conversion_of_a_tiny_adm_end_to_end(tmp_path, capsys):
    family, model = tiny()
    source = tmp_path / "tiny_adm.pt"
    torch.save(model.state_dict(), source)
    out = tmp_path / "tiny_adm-k2.safetensors"
    result = cbs_convert.convert(
        checkpoint=source, k=2, steps=5, pool_size=16, ode_steps=4, grid=4, profile_batches=1, profile_batch_size=4,
        calib_batches=1, batch_size=4, eval_samples=8, out=str(out), progress=False, num_heads=2,
    )
    assert result.report["source"]["family"] == "adm"
    experts = result.report["evaluation"]["experts"]
    assert all(abs(e["params_vs_target"]) <= 0.01 for e in experts)
    routed = cbs_convert.load(out)
    x, t, y = inputs(family)
    with torch.no_grad():
        native = torch.tensor([50.0, 900.0, 400.0, 999.0])
        assert routed(x, native, y).shape == (4, 6, 8, 8)
        assert torch.isfinite(routed(x, native, y)).all()
    # Asking for less than the smallest prunable pair of experts is a user error: exit code 2.
    code = cli_main([str(source), "--k", "2", "--quiet", "--num-heads", "2", "--budget", "1000", "--pool-size", "4",
                     "--ode-steps", "2", "--grid", "2", "--profile-batches", "1", "--profile-batch-size", "2",
                     "--out", str(tmp_path / "too_small.safetensors")])
    assert code == 2 and "budget" in capsys.readouterr().err


def test_the_512_layout_whose_first_multiplier_is_a_half():
    """guided-diffusion sizes the input convolution by int(channel_mult[0] * model_channels), so
    the 512x512 model's input conv has 128 channels for model_channels 256: both must be read right."""
    facts = PUBLISHED["adm_512"]
    config = {"in_channels": 3, "model_channels": 256, "channel_mult": facts["channel_mult"], "num_res_blocks": 2,
              "attention_ds": facts["attention_ds"], "num_heads": 4, "num_head_channels": 64, "num_classes": 1000,
              "learn_sigma": True, "image_size": 512, "attention_order": "legacy"}
    with torch.device("meta"):
        sd = ADM.build(dict(config)).state_dict()
    assert tuple(sd["input_blocks.0.0.weight"].shape) == (128, 3, 3, 3)
    assert tuple(sd["time_embed.0.weight"].shape) == (1024, 256)
    assert tuple(sd["input_blocks.1.0.in_layers.2.weight"].shape) == (128, 128, 3, 3)
    assert tuple(sd["out.2.weight"].shape) == (6, 128, 3, 3)
    family, notes = detect(sd, {})
    read = family.config
    assert read["model_channels"] == 256 and read["channel_mult"] == [0.5, 1, 1, 2, 2, 4, 4]
    assert any("ADM-512" in note for note in notes) and read["image_size"] == 512
    assert family.param_count(read) == sum(v.numel() for v in sd.values())


def test_a_tiny_unet_with_a_half_first_multiplier_round_trips():
    family, model = tiny(model_channels=64, channel_mult=[0.5, 1])
    read, _ = detect(model.state_dict(), HINTS)
    assert read.config["model_channels"] == 64 and read.config["channel_mult"] == [0.5, 1]
    rebuilt = read.instantiate(read.config, model.state_dict())
    x, steps, y = inputs(read)
    with torch.no_grad():
        assert torch.equal(rebuilt(x, steps, y), model(x, steps, y))


def test_a_source_pruned_block_by_block_is_only_narrowed_further(tmp_path):
    """A source whose ResBlocks keep different group counts (an expert of this tool, or one pruned
    by hand): every expert keeps at most the source's own count in each block, on budget."""
    family, model = tiny()
    full = family.config
    uneven = dict(full, res_groups=[4, 8] + list(full["res_groups"][2:]), attn_heads=[1] + list(full["attn_heads"][1:]))
    uneven["inner_groups"], uneven["attention_heads"] = sum(uneven["res_groups"]), sum(uneven["attn_heads"])
    sd, _ = prune_state_dict(family, model, model.state_dict(), full, uneven, "random", seed=3)
    source = tmp_path / "uneven_adm.safetensors"  # self-describing, as `extract` writes such an expert
    args = {**family.saved_args(uneven), "family": "adm", "cbs_convert_config": uneven, "define_the_model": True}
    save_safetensors_atomic(sd, source, {"args": json.dumps(args)})
    found, _ = detect(read_checkpoint(source).state_dict, read_checkpoint(source).hints)
    assert found.config["res_groups"] == uneven["res_groups"] and found.config["attn_heads"] == uneven["attn_heads"]
    target = allocate_widths(found, found.config, int(0.5 * found.param_count(found.config)))
    assert all(a <= b for a, b in zip(target["res_groups"], uneven["res_groups"]))
    assert all(a <= b for a, b in zip(target["attn_heads"], uneven["attn_heads"]))
    assert abs(found.param_count(target) / int(0.5 * found.param_count(found.config)) - 1) <= 0.01
    out = tmp_path / "uneven-k2.safetensors"
    result = cbs_convert.convert(
        checkpoint=source, k=2, steps=2, pool_size=16, ode_steps=4, grid=4, profile_batches=1, profile_batch_size=4,
        calib_batches=1, batch_size=4, eval_samples=8, out=str(out), progress=False, num_heads=2,
    )
    assert all(abs(e["params_vs_target"]) <= 0.01 for e in result.report["evaluation"]["experts"])
    experts = read_metadata(out)["experts"]
    assert len(experts) == 2
    for expert in experts:
        assert all(a <= b for a, b in zip(expert["config"]["res_groups"], uneven["res_groups"]))
        assert all(a <= b for a, b in zip(expert["config"]["attn_heads"], uneven["attn_heads"]))
