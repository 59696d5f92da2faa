"""diffusers' DiT in and out: tiny random models built here, nothing downloaded."""

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import cbs_convert  # noqa: E402
from cbs_convert import read_checkpoint  # noqa: E402
from cbs_convert.families.diffusers_dit import diffusers_to_official, official_to_diffusers  # noqa: E402
from cbs_convert.families import detect  # noqa: E402

CONFIG = dict(num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
              patch_size=2, num_embeds_ada_norm=10)


def tiny_diffusers_dit(seed=0):
    """A random DiTTransformer2DModel whose blocks share one embedder, as converted checkpoints do."""
    torch.manual_seed(seed)
    model = diffusers.DiTTransformer2DModel(**CONFIG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
        first = model.transformer_blocks[0].norm1.emb
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first.state_dict())
    return model


def save_pipeline_folder(model, folder):
    model.save_pretrained(folder / "transformer")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    return folder


def inputs(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 8, 8, generator=g), torch.tensor([999, 500, 3][:n]), torch.tensor([1, 7, 10][:n]))


def test_the_keys_round_trip_both_ways():
    theirs = tiny_diffusers_dit().state_dict()
    official = diffusers_to_official(theirs, dict(CONFIG), "tiny")
    assert "pos_embed" in official and "blocks.1.attn.qkv.weight" in official and official["blocks.1.attn.qkv.weight"].shape == (96, 32)
    back = official_to_diffusers(official, depth=2)
    assert back.keys() == theirs.keys() and all(torch.equal(back[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("given", ["pipeline folder", "model folder", "weights file", "sharded weights"])
def test_a_diffusers_dit_reads_as_the_same_function(tmp_path, given):
    model = tiny_diffusers_dit()
    folder = save_pipeline_folder(model, tmp_path / "pipe")
    if given == "sharded weights":
        import shutil

        shutil.rmtree(folder / "transformer")
        model.save_pretrained(folder / "transformer", max_shard_size="20KB")
        assert len(list((folder / "transformer").glob("*.safetensors"))) > 1
    path = {"pipeline folder": folder, "model folder": folder / "transformer",
            "weights file": folder / "transformer" / "diffusion_pytorch_model.safetensors",
            "sharded weights": folder}[given]
    source = read_checkpoint(path)
    assert source.container.startswith("diffusers folder")
    family, notes = detect(source.state_dict, source.hints)
    assert family.name == "dit" and family.config["numerics"] == "diffusers"
    assert family.num_classes(family.config) == 10 and family.null_label(family.config) == 10
    ours = family.instantiate(family.config, source.state_dict).eval()
    x, t, y = inputs()
    with torch.no_grad():
        expected = model(x, timestep=t, class_labels=y).sample
        got = ours(x, t, y)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (got - expected).abs().max()


def test_official_numerics_would_not_match(tmp_path):
    """The two numerics differences are real: without them the same weights compute another function."""
    model = tiny_diffusers_dit()
    source = read_checkpoint(save_pipeline_folder(model, tmp_path / "pipe"))
    family, _ = detect(source.state_dict, source.hints)
    official = dict(family.config)
    official.pop("numerics")
    ours = family.instantiate(official, source.state_dict).eval()
    x, t, y = inputs()
    with torch.no_grad():
        gap = (ours(x, t, y) - model(x, timestep=t, class_labels=y).sample).abs().max()
    assert gap > 1e-3


def _convert_unpruned(tmp_path, folder):
    # K=2 at 2x: both experts are full-width copies, so the routed model must equal the source
    return cbs_convert.convert(folder, k=2, budget="2x", steps=0, out=str(tmp_path / "routed.safetensors"),
                               pool_size=8, grid=4, profile_batches=1, profile_batch_size=4, calib_batches=1,
                               eval_samples=4, ode_steps=3)


def test_the_routed_model_drops_into_diffusers_and_equals_the_source(tmp_path):
    model = tiny_diffusers_dit()
    folder = save_pipeline_folder(model, tmp_path / "pipe")
    result = _convert_unpruned(tmp_path, folder)
    routed = cbs_convert.load(result.output, format="diffusers")
    x, t, y = inputs()
    with torch.no_grad():
        expected = model(x, timestep=t, class_labels=y).sample
        out = routed(hidden_states=x, timestep=t, class_labels=y)
        plain = routed(x, t, y, return_dict=False)[0]
    assert type(out).__name__ == "Transformer2DModelOutput"
    assert torch.allclose(out.sample, expected, atol=1e-5, rtol=1e-5) and torch.equal(plain, out.sample)
    assert routed.config.in_channels == 4 and routed.config.sample_size == 8 and routed.config.out_channels == 8

    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                                  norm_num_groups=4, sample_size=8).eval()
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000)
    images = {}
    for name, transformer in (("source", model), ("routed", routed)):
        pipe = diffusers.DiTPipeline(transformer=model, vae=vae, scheduler=scheduler)
        pipe.transformer = transformer
        images[name] = pipe(class_labels=[1, 3], guidance_scale=1.0, num_inference_steps=4,
                            generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images["source"].shape == images["routed"].shape
    assert abs(images["source"] - images["routed"]).max() < 1e-4


def test_pruned_experts_stay_dits_of_diffusers_numerics(tmp_path):
    model = tiny_diffusers_dit()
    folder = save_pipeline_folder(model, tmp_path / "pipe")
    result = cbs_convert.convert(folder, k=2, steps=0, out=str(tmp_path / "pruned.safetensors"), pool_size=8, grid=4,
                                 profile_batches=1, profile_batch_size=4, calib_batches=1, eval_samples=4, ode_steps=3)
    routed = cbs_convert.load(result.output)
    assert all(e.config.get("numerics") == "diffusers" for e in routed.experts)
    assert sum(p.numel() for p in routed.parameters()) < 2 * sum(p.numel() for p in model.parameters())


# --- UNet2DModel: the original DDPM's layout, read as a guided-diffusion UNet -----------------

UNET = dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64, 64),
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            # the google/ddpm-* settings, each different from guided-diffusion's
            norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1)


def tiny_unet(seed=0, **overrides):
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**{**UNET, **overrides}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return model


def save_ddpm_folder(model, folder):
    model.save_pretrained(folder / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    return folder


@pytest.mark.parametrize("overrides", [{}, {"attention_head_dim": 16}, {"num_class_embeds": 5}],
                         ids=["ddpm", "heads of 16", "class-conditional"])
def test_a_unet2dmodel_reads_as_the_same_function(tmp_path, overrides):
    model = tiny_unet(**overrides)
    source = read_checkpoint(save_ddpm_folder(model, tmp_path / "ddpm"))
    family, notes = detect(source.state_dict, source.hints)
    assert family.name == "adm" and family.config["downsample_padding"] == 0
    ours = family.instantiate(family.config, source.state_dict).eval()
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([999, 17])
    y = torch.tensor([0, 4]) if overrides.get("num_class_embeds") else None
    with torch.no_grad():
        expected = model(x, t, class_labels=y).sample
        got = ours(x, t, y)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4), (got - expected).abs().max()


def test_unet_keys_round_trip():
    from cbs_convert.families.diffusers_unet import adm_to_unet, unet_to_adm

    model = tiny_unet()
    theirs = model.state_dict()
    config = dict(model.config)
    back = adm_to_unet(unet_to_adm(theirs, config, "tiny"), config)
    assert back.keys() == theirs.keys() and all(torch.equal(back[k], theirs[k]) for k in theirs)


def test_unsupported_unet_options_are_refused(tmp_path):
    from cbs_convert import CheckpointError

    model = tiny_unet(resnet_time_scale_shift="scale_shift")
    with pytest.raises(CheckpointError, match="resnet_time_scale_shift"):
        read_checkpoint(save_ddpm_folder(model, tmp_path / "ddpm"))


def test_a_routed_unet_drops_into_the_ddpm_pipelines(tmp_path):
    model = tiny_unet()
    folder = save_ddpm_folder(model, tmp_path / "ddpm")
    result = _convert_unpruned(tmp_path, folder)
    routed = cbs_convert.load(result.output, format="diffusers")
    assert routed.config.sample_size == 16 and routed.config.in_channels == 3
    for pipeline in (diffusers.DDPMPipeline, diffusers.DDIMPipeline):
        images = {}
        for name, unet in (("source", model), ("routed", routed)):
            scheduler = (diffusers.DDPMScheduler if pipeline is diffusers.DDPMPipeline else diffusers.DDIMScheduler)(num_train_timesteps=1000)
            pipe = pipeline(unet=model, scheduler=scheduler)
            pipe.unet = unet
            images[name] = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0),
                                output_type="np").images
        assert abs(images["source"] - images["routed"]).max() < 1e-4, pipeline.__name__

    pruned = cbs_convert.convert(folder, k=2, steps=0, out=str(tmp_path / "pruned.safetensors"), pool_size=8, grid=4,
                                 profile_batches=1, profile_batch_size=4, calib_batches=1, eval_samples=4, ode_steps=3)
    experts = cbs_convert.load(pruned.output).experts
    assert all(e.config["downsample_padding"] == 0 and e.config["norm_eps"] == 1e-6 for e in experts)
    assert any(sum(e.config["res_groups"]) < 32 * len(e.config["res_groups"]) for e in experts)


# --- what a diffusers folder must never lose, and what it must not be misread as --------------

def _edit_config(file, **changes):
    config = json.loads(file.read_text())
    for key, value in changes.items():
        if value is _DELETE:
            config.pop(key, None)
        else:
            config[key] = value
    file.write_text(json.dumps(config))


_DELETE = object()


def _assert_refused(folder, config_file, changes, message):
    from cbs_convert import CheckpointError

    _edit_config(folder / config_file, **changes)
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(folder)


@pytest.mark.parametrize("target", ["transformer/diffusion_pytorch_model.safetensors", "transformer/config.json"])
def test_an_output_onto_a_file_of_the_source_folder_is_refused(tmp_path, target):
    import subprocess
    import sys

    folder = save_pipeline_folder(tiny_diffusers_dit(), tmp_path / "pipe")
    before = {f: f.read_bytes() for f in folder.rglob("*") if f.is_file()}
    result = subprocess.run([sys.executable, "-m", "cbs_convert", str(folder), "--k", "2", "--steps", "0",
                             "--out", str(folder / target), "--force", "--quiet"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr[-1500:]
    assert "inside the source model's folder" in result.stderr and "Traceback" not in result.stderr
    assert {f: f.read_bytes() for f in folder.rglob("*") if f.is_file()} == before


@pytest.mark.parametrize("changes,message", [
    ({"mid_block_scale_factor": 2.0}, "mid_block_scale_factor"),
    ({"attn_norm_num_groups": 8}, "attn_norm_num_groups"),
    ({"time_embedding_dim": 64}, "time_embedding_dim"),
    ({"downsample_type": "resnet"}, "downsample_type"),
    ({"sample_size": [16, 8]}, "only square inputs"),
], ids=["mid scale", "attention groups", "time width", "resnet downsampling", "oblong"])
def test_unet_configs_that_change_the_function_are_refused(tmp_path, changes, message):
    _assert_refused(save_ddpm_folder(tiny_unet(), tmp_path / "ddpm"), "unet/config.json", changes, message)


@pytest.mark.parametrize("changes,message", [
    ({"prediction_type": "v_prediction"}, "prediction_type='v_prediction'"),
    ({"trained_betas": [0.1] * 1000}, "trained_betas"),
    ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
    ({"beta_schedule": "scaled_linear"}, "beta schedule 'scaled_linear'"),
])
@pytest.mark.parametrize("kind", ["dit", "unet"])
def test_schedulers_the_families_do_not_model_are_refused(tmp_path, changes, message, kind):
    if kind == "dit":
        folder = save_pipeline_folder(tiny_diffusers_dit(), tmp_path / "pipe")
        diffusers.DDIMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    else:
        folder = save_ddpm_folder(tiny_unet(), tmp_path / "ddpm")
    _assert_refused(folder, "scheduler/scheduler_config.json", changes, message)


def test_a_dit_pipelines_scheduler_sets_its_betas(tmp_path):
    folder = save_pipeline_folder(tiny_diffusers_dit(), tmp_path / "pipe")
    diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").save_pretrained(folder / "scheduler")
    source = read_checkpoint(folder)
    family, _ = detect(source.state_dict, source.hints)
    assert family.config["beta_schedule"] == "cosine"
    assert any(f.name == "scheduler_config.json" for f in source.files)


@pytest.mark.parametrize("changes,message", [
    ({"activation_fn": "geglu"}, "activation_fn='geglu'"),
    ({"norm_eps": 1e-6}, "norm_eps=1e-06"),
    ({"norm_elementwise_affine": True}, "norm_elementwise_affine"),
    ({"num_attention_heads": 0}, "num_attention_heads 0 in the config must be a positive whole number"),
    ({"num_attention_heads": -4}, "num_attention_heads -4 in the config must be a positive whole number"),
    ({"sample_size": True}, "sample_size True in the config must be a positive whole number"),
    ({"patch_size": 4}, "the config does not belong to these weights"),
    ({"num_attention_heads": 3}, "the config does not belong to these weights"),
])
def test_dit_configs_that_change_the_function_or_do_not_fit_the_weights_are_refused(tmp_path, changes, message):
    _assert_refused(save_pipeline_folder(tiny_diffusers_dit(), tmp_path / "pipe"), "transformer/config.json", changes,
                    message)


def test_a_hand_written_config_takes_the_class_defaults(tmp_path):
    folder = save_pipeline_folder(tiny_diffusers_dit(), tmp_path / "pipe")
    assert CONFIG["patch_size"] == 2  # DiTTransformer2DModel's default
    _edit_config(folder / "transformer" / "config.json", patch_size=_DELETE, sample_size=[8, 8])
    source = read_checkpoint(folder)
    family, _ = detect(source.state_dict, source.hints)
    assert family.config["patch_size"] == 2 and family.config["input_size"] == 8


def _same_function(folder, model):
    source = read_checkpoint(folder)
    family, _ = detect(source.state_dict, source.hints)
    ours = family.instantiate(family.config, source.state_dict).eval()
    x, t, y = inputs()
    with torch.no_grad():
        expected = model(x, t, class_labels=y).sample
        got = ours(x, t, y)
    return (got - expected).abs().max().item()


def test_sharded_bin_weights_and_a_lone_variant_are_read(tmp_path):
    model = tiny_diffusers_dit()
    model.save_pretrained(tmp_path / "bin" / "transformer", safe_serialization=False, max_shard_size="20KB")
    assert (tmp_path / "bin" / "transformer" / "diffusion_pytorch_model.bin.index.json").is_file()
    assert _same_function(tmp_path / "bin", model) < 1e-5
    model.half().save_pretrained(tmp_path / "fp16" / "transformer", variant="fp16")
    assert _same_function(tmp_path / "fp16", model.float()) < 1e-2  # the fp16 rounding of the weights
    assert "float16" in read_checkpoint(tmp_path / "fp16").dtype


def test_a_named_variant_file_is_the_one_read(tmp_path):
    model = tiny_diffusers_dit()
    folder = tmp_path / "pipe" / "transformer"
    model.save_pretrained(folder)
    tiny_diffusers_dit(seed=5).save_pretrained(folder, variant="ema")
    plain, ema = read_checkpoint(folder), read_checkpoint(folder / "diffusion_pytorch_model.ema.safetensors")
    assert plain.sha256 != ema.sha256
    assert not torch.equal(plain.state_dict["blocks.0.attn.qkv.weight"], ema.state_dict["blocks.0.attn.qkv.weight"])


def test_damaged_folders_are_named_for_what_is_wrong(tmp_path):
    from safetensors.torch import load_file, save_file

    from cbs_convert import CheckpointError

    folder = save_pipeline_folder(tiny_diffusers_dit(), tmp_path / "pipe")
    (folder / "transformer" / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match=r"config.json: not readable as JSON"):
        read_checkpoint(folder)

    unet = save_ddpm_folder(tiny_unet(), tmp_path / "ddpm") / "unet"
    weights = unet / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    del tensors["down_blocks.0.resnets.0.conv1.weight"]
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError, match=r"missing down_blocks\.0\.resnets\.0\.conv1\.weight"):
        read_checkpoint(unet.parent)


def test_outputs_are_named_after_the_model_not_its_folder_layout(tmp_path, monkeypatch):
    from cbs_convert.pipeline.conversion import default_output

    folder = save_pipeline_folder(tiny_diffusers_dit(), tmp_path / "DiT-tiny")
    monkeypatch.chdir(folder)
    for given in (".", "transformer", "transformer/diffusion_pytorch_model.safetensors"):
        assert default_output(given, 2).name == "DiT-tiny-cbs-k2.safetensors", given



def _cli(args, cwd):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "cbs_convert", *map(str, args), "--steps", "0", "--quiet"],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def test_nothing_is_written_inside_the_source_models_folder(tmp_path):
    model = tiny_diffusers_dit()
    variant_only = tmp_path / "B"
    model.half().save_pretrained(variant_only / "transformer", variant="fp16")
    pipeline = save_pipeline_folder(tiny_diffusers_dit(), tmp_path / "A")
    (pipeline / "vae").mkdir()
    (pipeline / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"the user's VAE")
    cases = [(variant_only, variant_only / "transformer" / "diffusion_pytorch_model.safetensors", []),
             (pipeline, pipeline / "model_index.json", ["--force"]),
             (pipeline, pipeline / "vae" / "diffusion_pytorch_model.safetensors", ["--force"]),
             (pipeline, tmp_path / "elsewhere.safetensors", ["--workdir", pipeline / "work"])]
    for source, out, extra in cases:
        before = {f: f.read_bytes() for f in source.rglob("*") if f.is_file()}
        result = _cli([source, "--k", "2", "--out", out, *extra], tmp_path)
        assert result.returncode == 2, (out, result.stderr[-1500:])
        assert "inside the source model's folder" in result.stderr
        assert {f: f.read_bytes() for f in source.rglob("*") if f.is_file()} == before


@pytest.mark.parametrize("flags,message", [
    (["--num-heads", "8"], "--num-heads 8: the model's own config gives num_heads 4"),
    (["--family", "sit"], "--family sit: the model's own config gives family dit"),
])
def test_flags_that_contradict_a_diffusers_config_are_refused(tmp_path, flags, message):
    folder = save_pipeline_folder(tiny_diffusers_dit(), tmp_path / "pipe")
    result = _cli([folder, "--k", "2", "--out", tmp_path / "x.safetensors", *flags], tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-1500:]
    agreeing = _cli([folder, "--k", "2", "--out", tmp_path / "y.safetensors", "--num-heads", "4", "--pool-size", "8",
                     "--grid", "4", "--profile-batches", "1", "--profile-batch-size", "4", "--calib-batches", "1",
                     "--eval-samples", "4", "--ode-steps", "3"], tmp_path)
    assert agreeing.returncode == 0, agreeing.stderr[-1500:]


@pytest.mark.parametrize("where,changes", [
    ("transformer/config.json", {"patch_size": "two"}),
    ("transformer/config.json", {"num_attention_heads": None}),
    ("scheduler/scheduler_config.json", {"num_train_timesteps": "1e3"}),
    ("scheduler/scheduler_config.json", {"beta_start": None}),
])
def test_damaged_config_values_are_named_not_crashed_on(tmp_path, where, changes):
    folder = save_pipeline_folder(tiny_diffusers_dit(), tmp_path / "pipe")
    diffusers.DDIMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    _assert_refused(folder, where, changes, "a config value this reader cannot use|must be a positive whole number")


def test_unet_configs_with_damaged_values_are_named(tmp_path):
    _assert_refused(save_ddpm_folder(tiny_unet(), tmp_path / "ddpm"), "unet/config.json", {"layers_per_block": None},
                    "a config value this reader cannot use")


def test_sharded_variants_are_read(tmp_path):
    model = tiny_diffusers_dit()
    folder = tmp_path / "pipe" / "transformer"
    model.half().save_pretrained(folder, variant="fp16", max_shard_size="20KB")
    assert len(list(folder.glob("*-of-*"))) > 1
    assert _same_function(tmp_path / "pipe", model.float()) < 1e-2
    index = next(folder.glob("*.index.fp16.json"))
    assert read_checkpoint(index).sha256 == read_checkpoint(tmp_path / "pipe").sha256


def test_schedulers_of_other_processes_are_refused(tmp_path):
    from cbs_convert import CheckpointError

    folder = save_pipeline_folder(tiny_diffusers_dit(), tmp_path / "pipe")
    diffusers.FlowMatchEulerDiscreteScheduler().save_pretrained(folder / "scheduler")
    with pytest.raises(CheckpointError, match="a FlowMatchEulerDiscreteScheduler; the DDPM families here need"):
        read_checkpoint(folder)


def test_weights_without_their_config_are_named(tmp_path):
    from cbs_convert import CheckpointError

    folder = save_pipeline_folder(tiny_diffusers_dit(), tmp_path / "pipe")
    (folder / "transformer" / "config.json").unlink()
    for given in (folder, folder / "transformer" / "diffusion_pytorch_model.safetensors"):
        with pytest.raises(CheckpointError, match="diffusers weights without their config.json"):
            read_checkpoint(given)


def test_a_unet_configs_head_split_is_not_overridden(tmp_path):
    from cbs_convert import RecipeError
    from cbs_convert.storage.checkpoint import with_user_hints

    one_head = read_checkpoint(save_ddpm_folder(tiny_unet(attention_head_dim=None), tmp_path / "one"))
    with pytest.raises(RecipeError, match="--num-head-channels 16: the model's own config splits attention by num_heads 1"):
        with_user_hints(one_head.hints, {"num_head_channels": 16})
    by_width = read_checkpoint(save_ddpm_folder(tiny_unet(), tmp_path / "eight"))
    with pytest.raises(RecipeError, match="--num-heads 2: the model's own config splits attention by num_head_channels 8"):
        with_user_hints(by_width.hints, {"num_heads": 2})
    assert with_user_hints(by_width.hints, {"num_head_channels": 8})["num_head_channels"] == 8
    _edit_config(tmp_path / "eight" / "unet" / "config.json", sample_size=0)
    from cbs_convert import CheckpointError

    with pytest.raises(CheckpointError, match="sample_size 0 in the config must be a positive whole number"):
        read_checkpoint(tmp_path / "eight")


def test_a_pruned_unet_expert_extracts_and_reads_back_as_itself(tmp_path):
    from cbs_convert.cli.commands import extract
    from cbs_convert.errors import WorkdirError

    folder = save_ddpm_folder(tiny_unet(), tmp_path / "ddpm")
    routed = cbs_convert.convert(folder, k=2, steps=0, out=str(tmp_path / "r.safetensors"), pool_size=8, grid=4,
                                 profile_batches=1, profile_batch_size=4, calib_batches=1, eval_samples=4, ode_steps=3)
    experts = cbs_convert.load(routed.output).experts
    # the pruned groups differ from block to block, which the shapes alone cannot always resolve
    assert any(sum(e.config["res_groups"]) < 32 * len(e.config["res_groups"]) for e in experts)
    for k in range(2):
        out = tmp_path / f"e{k}.safetensors"
        extract(routed.output, k, out)
        source = read_checkpoint(out)
        family, _ = detect(source.state_dict, source.hints)
        model = family.instantiate(family.config, source.state_dict).eval()
        x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)), torch.tensor([900, 40])
        with torch.no_grad():
            assert torch.equal(model(x, t, None), experts[k](x, t, None))
    # DDPM's own numerics (GroupNorm eps 1e-6, ...) cannot ride in a bare state dict
    with pytest.raises(WorkdirError, match="computes differently from the official adm code"):
        extract(routed.output, 0, tmp_path / "e0.pt")


def _diffusers_trained_dit(differs):
    """A tiny DiT as training in diffusers leaves it: each block's copy of the embedders moved on its own."""
    model = tiny_diffusers_dit()
    with torch.no_grad():
        if differs == "every block's own":
            for block in model.transformer_blocks[1:]:
                for p in block.norm1.emb.parameters():
                    p.add_(torch.randn_like(p) * 1e-3)
        elif differs == "timestep embedder":
            model.transformer_blocks[1].norm1.emb.timestep_embedder.linear_2.bias[0] += 1e-6
        else:
            model.transformer_blocks[1].norm1.emb.class_embedder.embedding_table.weight[3, 0] += 1e-6
    return model


@pytest.mark.parametrize("differs", ["every block's own", "timestep embedder", "label embedder"])
def test_a_dit_trained_in_diffusers_is_refused_in_one_line_and_its_shared_form_converts_exactly(tmp_path, differs):
    from cbs_convert.errors import CheckpointError

    trained = _diffusers_trained_dit(differs)
    folder = save_pipeline_folder(trained, tmp_path / "pipe")
    out = tmp_path / "routed.safetensors"
    result = _cli([folder, "--k", "2", "--out", out], tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-1500:]
    assert "trained in diffusers" in lines[0] and "is not supported" in lines[0] and "block 1's" in lines[0], lines[0]
    assert "internal error" not in result.stderr and not out.exists()
    with pytest.raises(CheckpointError, match="is not supported"):
        read_checkpoint(folder)
    # the same weights with block 0's embedders in every block: one shared copy, read exactly
    with torch.no_grad():
        for block in trained.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(trained.transformer_blocks[0].norm1.emb.state_dict())
    shared = save_pipeline_folder(trained, tmp_path / "shared")
    assert _same_function(shared, trained) < 1e-5


# --- extract --format diffusers: one expert back as a folder that from_pretrained reads ---------

def _extract(routed, out, *flags, capsys=None):
    from cbs_convert.cli.main import main as cli_main

    code = cli_main(["extract", str(routed), "--expert", "1", "--out", str(out), "--format", "diffusers", *flags])
    return code, capsys.readouterr() if capsys is not None else None


def _segment_inputs(family, segment, classes):
    """Inputs whose times lie inside one expert's segment (so a routed model runs that expert)."""
    g = torch.Generator().manual_seed(4)
    lo, hi = segment
    x = torch.randn(3, *family.sample_shape(family.config), generator=g)
    t = family.native_time(torch.tensor([lo + 0.1 * (hi - lo), lo + 0.5 * (hi - lo), lo + 0.9 * (hi - lo)],
                                        dtype=torch.float64)).round().float()
    return x, t, (torch.tensor([0, 3, 4]) if classes else None)


@pytest.mark.parametrize("experts", ["copies", "lora"])
@pytest.mark.parametrize("kind", ["dit", "unet"])
def test_an_expert_written_as_a_diffusers_folder_is_the_expert_in_diffusers(tmp_path, capsys, kind, experts):
    from cbs_convert.storage.routed_file import save_shared_base
    from test_shared_base import _randomise_deltas

    model = tiny_diffusers_dit() if kind == "dit" else tiny_unet(num_class_embeds=5)
    folder = (save_pipeline_folder if kind == "dit" else save_ddpm_folder)(model, tmp_path / "source")
    if experts == "copies":  # unpruned: both experts full-width copies
        routed = _convert_unpruned(tmp_path, folder).output
    else:  # one base and a delta per segment, the deltas moved off zero so expert 1 differs from the source
        result = cbs_convert.convert(folder, k=2, experts="lora", rank=2, steps=0, out=str(tmp_path / "lora0.safetensors"),
                                     pool_size=8, grid=4, profile_batches=1, profile_batch_size=4, calib_batches=1,
                                     eval_samples=4, ode_steps=3)
        shared = cbs_convert.load(result.output)
        _randomise_deltas(shared)
        routed = save_shared_base(tmp_path / "lora.safetensors", shared)
    meta = cbs_convert.read_metadata(routed)
    before = routed.read_bytes() if experts == "lora" else None
    code, shown = _extract(routed, tmp_path / "expert1", capsys=capsys)
    assert code == 0, shown.err
    assert sorted(p.name for p in (tmp_path / "expert1").iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json"]
    cls = diffusers.DiTTransformer2DModel if kind == "dit" else diffusers.UNet2DModel
    theirs = cls.from_pretrained(tmp_path / "expert1").eval()
    family = cbs_convert.family_from_config(meta["family"], meta["family_config"])
    x, t, y = _segment_inputs(family, meta["experts"][1]["segment"], classes=True)
    loaded = cbs_convert.load(routed)
    with torch.no_grad():
        # the routed model at times of segment 1 is expert 1, however it is stored
        expected = loaded(x, t, y)
        if experts == "copies":
            assert torch.equal(expected, loaded.experts[1](x, t, y))
        else:
            assert not torch.allclose(expected, model(x, t, class_labels=y).sample, atol=1e-3)
        got = theirs(x, t, class_labels=y).sample
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (got - expected).abs().max()
    scheduler = diffusers.DDPMScheduler.from_pretrained(tmp_path / "expert1")
    assert torch.allclose(scheduler.alphas_cumprod.double(), family.alphas_cumprod, atol=1e-6)
    # and it reads back into cbs_convert as the same network
    source = read_checkpoint(tmp_path / "expert1")
    back_family, _ = detect(source.state_dict, source.hints)
    back = back_family.instantiate(back_family.config, source.state_dict).eval()
    with torch.no_grad():
        assert torch.allclose(back(x, t, y), expected, atol=1e-5, rtol=1e-5)
    if before is not None:
        assert routed.read_bytes() == before


def _one_line_refusal(code, shown, *words):
    assert code == 2 and shown.out == "" and len(shown.err.strip().splitlines()) == 1, shown.err
    for word in words:
        assert word in shown.err, shown.err


def _routed_of(tmp_path, family, model, name):
    from cbs_convert.storage.routed_file import save_routed

    state = model.state_dict()
    return save_routed(tmp_path / f"{name}.safetensors", family, [state, state], [family.config] * 2, [0.0, 0.5, 1.0])


@pytest.mark.parametrize("name,words", [
    ("sit", ["SiT", "diffusers has no SiT class"]),
    # an official DiT's timestep frequencies are not among the values diffusers' DiT can be configured with
    ("dit", ["official DiT", "cannot", ".safetensors"]),
])
def test_what_diffusers_cannot_compute_is_refused_in_one_line(tmp_path, capsys, name, words):
    from helpers import tiny_model

    family, model = tiny_model(name)
    routed = _routed_of(tmp_path, family, model, name)
    code, shown = _extract(routed, tmp_path / "out", capsys=capsys)
    _one_line_refusal(code, shown, *words)
    assert not (tmp_path / "out").exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_a_width_pruned_expert_is_refused(tmp_path, capsys):
    folder = save_pipeline_folder(tiny_diffusers_dit(), tmp_path / "source")
    routed = cbs_convert.convert(folder, k=2, steps=0, out=str(tmp_path / "pruned.safetensors"), pool_size=8, grid=4,
                                 profile_batches=1, profile_batch_size=4, calib_batches=1, eval_samples=4, ode_steps=3)
    config = cbs_convert.read_metadata(routed.output)["experts"][1]["config"]
    assert config["mlp_hidden"] < 4 * CONFIG["num_attention_heads"] * CONFIG["attention_head_dim"]
    code, shown = _extract(routed.output, tmp_path / "out", capsys=capsys)
    _one_line_refusal(code, shown, "width-pruned", "4x")
    assert not (tmp_path / "out").exists()


def test_an_existing_out_is_replaced_only_with_force_and_only_if_extract_wrote_it(tmp_path, capsys):
    model = tiny_diffusers_dit()
    source = read_checkpoint(save_pipeline_folder(model, tmp_path / "source"))
    family, _ = detect(source.state_dict, source.hints)
    routed = _routed_of(tmp_path, family, family.instantiate(family.config, source.state_dict), "routed")
    out = tmp_path / "expert1"
    out.mkdir()
    _one_line_refusal(*_extract(routed, out, capsys=capsys), "exists", "--force")
    # a folder this command did not write (here the user's own diffusers model) is never replaced
    user = tmp_path / "source" / "transformer"
    files = {p.name: p.read_bytes() for p in user.iterdir()}
    _one_line_refusal(*_extract(routed, user, "--force", capsys=capsys), "only a folder this command wrote")
    assert {p.name: p.read_bytes() for p in user.iterdir()} == files
    # nor the folder that holds the routed file, nor a file name
    _one_line_refusal(*_extract(routed, tmp_path, "--force", capsys=capsys), "holds the routed checkpoint")
    _one_line_refusal(*_extract(routed, tmp_path / "e.safetensors", capsys=capsys), "writes a folder")
    out.rmdir()
    assert _extract(routed, out, capsys=capsys)[0] == 0
    code, shown = _extract(routed, out, "--force", capsys=capsys)
    assert code == 0, shown.err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    (out / "notes.txt").write_text("mine")
    _one_line_refusal(*_extract(routed, out, "--force", capsys=capsys), "holds notes.txt")
    assert (out / "notes.txt").read_text() == "mine" and (out / "config.json").is_file()


def test_a_computed_schedule_runs_in_dit_pipeline_through_its_scheduler(tmp_path):
    """DiTPipeline calls set_timesteps(num_inference_steps) itself; the wrapped scheduler keeps the
    list that `schedule --json` wrote, and the transformer is called once per listed timestep."""
    import subprocess
    import sys

    from cbs_convert.errors import RecipeError
    from cbs_convert.sample.schedules import scheduler_with_timesteps

    model = tiny_diffusers_dit()
    folder = save_pipeline_folder(model, tmp_path / "pipe")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear"}))
    written = tmp_path / "edm6.json"
    run = subprocess.run([sys.executable, "-m", "cbs_convert", "schedule", str(folder), "--steps", "6", "--schedule",
                          "edm", "--json", str(written)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-1500:]
    timesteps = json.loads(written.read_text())["diffusers_timesteps"]
    assert len(timesteps) == 6 and timesteps == sorted(set(timesteps), reverse=True)

    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                                  norm_num_groups=4, sample_size=8).eval()
    scheduler = scheduler_with_timesteps(diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000), timesteps)
    pipe = diffusers.DiTPipeline(transformer=model, vae=vae, scheduler=scheduler)
    called = []
    model.register_forward_hook(lambda module, args, kwargs_or_out: called.append(1))
    pipe(class_labels=[1], guidance_scale=1.0, num_inference_steps=25, generator=torch.Generator().manual_seed(0),
         output_type="np")
    assert pipe.scheduler.timesteps.tolist() == timesteps and len(called) == len(timesteps)
    again = scheduler_with_timesteps(scheduler, timesteps[1:])  # wrapping twice wraps the scheduler's own method
    again.set_timesteps(25)
    assert again.timesteps.tolist() == timesteps[1:]
    # the model's own files are never a --json target, a .json among them neither
    config = folder / "transformer" / "config.json"
    before = config.read_bytes()
    run = subprocess.run([sys.executable, "-m", "cbs_convert", "schedule", str(folder), "--steps", "6", "--json", str(config),
                          "--force"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 2 and "is the model's own file" in run.stderr and config.read_bytes() == before
    # nor any file in the model's folder, where a loader would read a stray .json as the model's
    index = folder / "model_index.json"
    index_before = index.read_bytes()  # the pipeline's own index: --force must not let --json replace it
    for target, force in ((index, ["--force"]), (folder / "scheduler" / "extra.json", [])):
        run = subprocess.run([sys.executable, "-m", "cbs_convert", "schedule", str(folder), "--steps", "6", "--json",
                              str(target), *force], capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert run.returncode == 2 and "inside the model's folder" in run.stderr, run.stderr
    assert not (folder / "scheduler" / "extra.json").exists()
    assert index.read_bytes() == index_before
    # DiTPipeline starts from unit noise: a scheduler whose start noise is larger (Euler's, ~157 here)
    # would start from almost none, and is refused rather than let collapse the samples
    with pytest.raises(RecipeError, match="init_noise_sigma"):
        scheduler_with_timesteps(diffusers.EulerDiscreteScheduler(num_train_timesteps=1000), timesteps)
    with pytest.raises(RecipeError, match="takes no timesteps list"):
        scheduler_with_timesteps(diffusers.DDIMScheduler(num_train_timesteps=1000), timesteps)
