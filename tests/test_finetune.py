"""Fine-tuning: it learns, and an interrupted run resumes onto the uninterrupted path."""

import pytest
import torch

from cbs_convert.stages.finetune import FinetuneSettings, finetune_expert, relative_error
from cbs_convert.stages.prune import prune_state_dict
from cbs_convert.stages.budget import allocate_widths
from helpers import tiny_model


def setup(name="sit"):
    family, teacher = tiny_model(name)
    config = allocate_widths(family, family.config, family.param_count(family.config) // 2)
    sd, _ = prune_state_dict(family, teacher, teacher.state_dict(), family.config, config, "magnitude")

    def student():
        model = family.build(config)
        model.load_state_dict(sd, strict=True)
        return model

    torch.manual_seed(0)
    pool = torch.randn(64, 4, 8, 8)
    labels = torch.randint(0, 10, (64,))
    return family, teacher, student, pool, labels


def test_distillation_reduces_the_error_on_the_segment():
    family, teacher, student, pool, labels = setup()
    segment = (0.5, 1.0)
    before = relative_error(family, student(), teacher, segment, pool, labels)
    settings = FinetuneSettings(steps=60, batch_size=16, lr=1e-3, ema_decay=0.9, seed=1)
    result = finetune_expert(family, teacher, student(), segment, pool, labels, settings, progress=False)
    after = relative_error(family, result.model, teacher, segment, pool, labels)
    assert after < 0.8 * before, (before, after)
    assert result.steps_run == 60 and len(result.losses) == 60 and result.resumed_at == 0


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path):
    family, teacher, student, pool, labels = setup("dit")
    settings = FinetuneSettings(steps=10, batch_size=8, lr=1e-3, checkpoint_every=3, seed=7)
    straight = finetune_expert(family, teacher, student(), (0.0, 0.6), pool, labels, settings, progress=False)
    state = tmp_path / "state.pt"
    first = finetune_expert(family, teacher, student(), (0.0, 0.6), pool, labels, settings, state_path=state,
                            progress=False, stop_after=5)
    assert first.steps_run == 5
    assert torch.load(state, weights_only=True)["step"] == 3  # the last periodic checkpoint
    resumed = finetune_expert(family, teacher, student(), (0.0, 0.6), pool, labels, settings, state_path=state,
                              progress=False)
    # the count is the run's, not this call's: the report and the under-training warning read it
    assert (resumed.steps_run, resumed.resumed_at, len(resumed.losses)) == (10, 3, 10)
    assert resumed.losses == straight.losses
    for a, b in zip(resumed.model.state_dict().values(), straight.model.state_dict().values()):
        assert torch.equal(a, b)


def test_label_dropout_feeds_the_null_class():
    from cbs_convert.stages.batches import draw_batch

    family, _, _, pool, labels = setup()
    generator = torch.Generator().manual_seed(0)
    _, y, t, _ = draw_batch(family, pool, labels, (0.2, 0.4), 2000, generator, margin=0.05, label_dropout=0.1)
    null_share = (y == family.null_label(family.config)).float().mean().item()
    assert 0.07 < null_share < 0.13
    assert t.min() >= 0.15 - 1e-6 and t.max() <= 0.45 + 1e-6


def _held_out_data_loss(family, model, pool, labels, segment):
    """The family's data loss on a fixed batch of the segment: same x0, noise and t before and after."""
    generator = torch.Generator().manual_seed(123)
    t = segment[0] + (segment[1] - segment[0]) * torch.rand(pool.shape[0], generator=generator)
    noise = torch.randn(pool.shape, generator=generator)
    with torch.no_grad():
        return family.data_loss(model.eval(), pool, labels, t, noise).item()


def test_training_on_data_lowers_the_data_loss_for_both_families():
    segment = (0.2, 0.7)
    for name in ("sit", "dit"):
        family, teacher, student, _, _ = setup(name)
        # Data a small model can learn: one fixed pattern per class.
        generator = torch.Generator().manual_seed(5)
        patterns = torch.randn(10, 4, 8, 8, generator=generator)
        labels = torch.arange(64) % 10
        pool = patterns[labels]
        for loss in ("data", "both"):
            before = _held_out_data_loss(family, student(), pool, labels, segment)
            # equal weights: under the default 0.1 the data term only nudges a distilling student
            settings = FinetuneSettings(steps=60, batch_size=16, lr=1e-3, ema_decay=0.9, loss=loss, seed=0,
                                        distill_weight=1.0, data_weight=1.0)
            result = finetune_expert(family, teacher, student(), segment, pool, labels, settings, progress=False)
            after = _held_out_data_loss(family, result.model, pool, labels, segment)
            assert after < 0.85 * before, (name, loss, before, after)


def test_data_loss_from_a_given_prediction_equals_running_the_model():
    from cbs_convert.stages.batches import noised

    for name in ("sit", "dit"):
        family, model = tiny_model(name)
        x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
        t, y = torch.tensor([0.1, 0.4, 0.6, 0.9]), torch.randint(0, 10, (4,))
        with torch.no_grad():
            prediction = model(noised(family, x0, t, noise), family.native_time(t), y)
            direct = family.data_loss(model, x0, y, t, noise, teacher_out=prediction)
            given = family.data_loss(model, x0, y, t, noise, teacher_out=prediction, prediction=prediction)
        assert torch.allclose(direct, given)


def test_library_defaults_are_the_clis():
    from dataclasses import fields

    from cbs_convert.stages.finetune import FinetuneSettings
    from cbs_convert.pipeline.recipe import Recipe

    from cbs_convert.pipeline.experts import expert_defaults

    cli = Recipe()
    library = FinetuneSettings()
    # the CLI's "auto" (None) settles per expert; a library caller gets the pruned student's values
    settled = {**expert_defaults(cli, full_width=False), "warmup_steps": round(0.05 * cli.steps)}
    for f in fields(FinetuneSettings):
        if f.name != "label_dropout":  # the CLI reads that one from the checkpoint
            assert getattr(library, f.name) == settled.get(f.name, getattr(cli, f.name)), f.name


def test_the_lr_warms_up_linearly_then_decays_by_a_cosine_to_its_floor():
    from cbs_convert.stages.finetune import learning_rate

    settings = FinetuneSettings(steps=100, lr=1e-3, warmup_steps=10, lr_floor=0.1)
    assert learning_rate(settings, 0) == pytest.approx(1e-4)
    assert learning_rate(settings, 9) == pytest.approx(1e-3)
    assert learning_rate(settings, 10) == pytest.approx(1e-3)
    # half-way through the decay the cosine is at the mean of peak and floor
    assert learning_rate(settings, 10 + 89 / 2) == pytest.approx((1e-3 + 1e-4) / 2)
    assert learning_rate(settings, 99) == pytest.approx(1e-4)
    lrs = [learning_rate(settings, s) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    constant = FinetuneSettings(steps=100, lr=1e-3, warmup_steps=0, lr_schedule="constant")
    assert {learning_rate(constant, s) for s in range(100)} == {1e-3}


def test_the_optimizer_runs_the_scheduled_lr(monkeypatch):
    from cbs_convert.stages import finetune as module

    family, teacher, student, pool, labels = setup()
    seen = []
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    settings = FinetuneSettings(steps=6, batch_size=4, lr=1e-3, warmup_steps=2, lr_floor=0.5, seed=0)
    finetune_expert(family, teacher, student(), (0.0, 1.0), pool, labels, settings, progress=False)
    assert seen == pytest.approx([module.learning_rate(settings, s) for s in range(6)])
    assert seen[1] == pytest.approx(1e-3) and seen[-1] == pytest.approx(5e-4)


def test_without_ema_warmup_the_saved_weights_stay_near_the_start():
    from cbs_convert.stages.finetune import ema_decay_at

    anchored = FinetuneSettings(ema_decay=0.999, ema_warmup=False)
    ramped = FinetuneSettings(ema_decay=0.999, ema_warmup=True)
    assert ema_decay_at(anchored, 0) == 0.999 and ema_decay_at(ramped, 0) == pytest.approx(0.1)

    family, teacher, student, pool, labels = setup()
    start = student()
    drift = {}
    for warmup in (False, True):
        settings = FinetuneSettings(steps=20, batch_size=8, lr=1e-2, ema_decay=0.99, ema_warmup=warmup,
                                    warmup_steps=0, seed=3)
        result = finetune_expert(family, teacher, student(), (0.0, 1.0), pool, labels, settings, progress=False)
        drift[warmup] = sum(float((a.detach() - b.detach()).pow(2).sum()) for a, b in
                            zip(result.model.parameters(), start.parameters())) ** 0.5
    # 20 steps at decay 0.99 keep 0.99**20 = 82% of the start in the anchored EMA
    assert drift[False] < 0.5 * drift[True], drift


def test_both_losses_are_weighted_as_given():
    family, teacher, student, pool, labels = setup()
    losses = {}
    for weights in ((1.0, 0.0), (0.0, 1.0), (0.9, 0.1)):
        settings = FinetuneSettings(steps=1, batch_size=8, lr=1e-12, loss="both", distill_weight=weights[0],
                                    data_weight=weights[1], seed=5)
        result = finetune_expert(family, teacher, student(), (0.0, 1.0), pool, labels, settings, progress=False)
        losses[weights] = result.losses[0]
    # one step from the same start on the same draws: the loss is linear in the weights
    assert losses[(0.9, 0.1)] == pytest.approx(0.9 * losses[(1.0, 0.0)] + 0.1 * losses[(0.0, 1.0)], rel=1e-5)
    assert losses[(1.0, 0.0)] != pytest.approx(losses[(0.0, 1.0)])


# -- block-feature distillation -------------------------------------------------------------------

from cbs_convert.stages.batches import draw_batch, noised  # noqa: E402
from cbs_convert.stages.finetune import _FeatureTaps  # noqa: E402


def _feature_gap(family, teacher, student, channels, pool, labels):
    """The masked feature loss of ``student`` on a fixed batch (what feature distillation lowers)."""
    x0, y, t, noise = draw_batch(family, pool, labels, (0.0, 1.0), 32, torch.Generator().manual_seed(7))
    taps = _FeatureTaps(family, teacher, student, channels)
    with torch.no_grad():
        x_t, native = noised(family, x0, t, noise), family.native_time(t)
        teacher(x_t, native, y)
        student(x_t, native, y)
        gap = float(taps.loss(2.0))
    taps.remove()
    return gap


def test_feature_distillation_matches_the_kept_channels_of_every_block():
    family, teacher = tiny_model("sit")
    config = allocate_widths(family, family.config, family.param_count(family.config) // 2)
    sd, kept = prune_state_dict(family, teacher, teacher.state_dict(), family.config, config, "magnitude")
    channels = family.feature_channels(kept)
    assert channels.numel() == config["hidden_size"] < family.config["hidden_size"]
    torch.manual_seed(0)
    pool, labels = torch.randn(64, 4, 8, 8), torch.randint(0, 10, (64,))
    # an unpruned copy has no gap, whatever its batch
    assert _feature_gap(family, teacher, family.instantiate(family.config, dict(teacher.state_dict())), None, pool, labels) == 0.0
    student = family.instantiate(config, {k: v.clone() for k, v in sd.items()})
    before = _feature_gap(family, teacher, student, channels, pool, labels)
    settings = FinetuneSettings(steps=40, batch_size=16, lr=1e-3, ema_decay=0.0, seed=1, loss="distill", feature_weight=1.0)
    result = finetune_expert(family, teacher, student, (0.0, 1.0), pool, labels, settings, progress=False,
                             feature_channels=channels)
    after = _feature_gap(family, teacher, result.model, channels, pool, labels)
    assert after < 0.8 * before, (before, after)
    # the hooks are gone: the teacher computes as before, with nothing caught
    assert not teacher.blocks[0]._forward_hooks


def test_feature_outliers_beyond_the_mask_do_not_count():
    family, teacher = tiny_model("sit")
    taps = _FeatureTaps(family, teacher, teacher, None)
    base = torch.randn(4, 16, 32)
    outlier = base.clone()
    outlier[0, 0, 0] = 1e4  # one huge teacher activation
    for name in taps.taps:
        taps.caught["teacher"][name] = outlier
        taps.caught["student"][name] = base  # differs from the teacher only at the outlier
    assert float(taps.loss(2.0)) == 0.0
    for name in taps.taps:
        taps.caught["teacher"][name] = outlier
        taps.caught["student"][name] = base
    assert float(taps.loss(1e9)) > 0  # unmasked, the outlier dominates
    taps.remove()


def test_a_failed_run_takes_its_feature_hooks_off_the_teacher(monkeypatch):
    from cbs_convert.errors import TrainingDiverged
    from cbs_convert.stages import finetune

    family, teacher, student, pool, labels = setup()
    channels = torch.arange(student().config["hidden_size"])
    settings = FinetuneSettings(steps=5, batch_size=8, lr=1e30, warmup_steps=0, seed=0, feature_weight=1.0)
    with pytest.raises(TrainingDiverged):
        finetune_expert(family, teacher, student(), (0.0, 1.0), pool, labels, settings, progress=False,
                        feature_channels=channels)
    assert not any(block._forward_hooks for block in teacher.blocks)

    def out_of_memory(*args):  # any error the loop does not raise itself, as a library caller may meet it
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(finetune, "ema_update", out_of_memory)
    settings = FinetuneSettings(steps=5, batch_size=8, lr=1e-3, seed=0, feature_weight=1.0)
    with pytest.raises(RuntimeError, match="out of memory"):
        finetune_expert(family, teacher, student(), (0.0, 1.0), pool, labels, settings, progress=False,
                        feature_channels=channels)
    assert not any(block._forward_hooks for block in teacher.blocks)


def test_the_ema_moves_every_tensor_as_lerp_would_frozen_ones_too():
    from cbs_convert.stages.finetune import ema_update

    family, model = tiny_model("sit", depth=2)
    ema = family.build(family.config)
    ema.load_state_dict(model.state_dict())
    expected = {k: v.clone() for k, v in ema.state_dict().items()}
    model.blocks[0].attn.qkv.weight.requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    names = dict(model.named_parameters())
    ema_update(ema, model, 0.99)
    for name, value in ema.named_parameters():
        assert torch.equal(value, expected[name].lerp(names[name], 0.01)), name
