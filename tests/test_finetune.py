"""Fine-tuning: it learns, and an interrupted run resumes onto the uninterrupted path."""

import torch

from cbs_convert.finetune import FinetuneSettings, finetune_expert, relative_error
from cbs_convert.prune import prune_state_dict
from cbs_convert.split import allocate_widths
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
    assert result.steps_run == 60 and len(result.losses) == 60


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
    assert resumed.steps_run == 7
    assert resumed.losses == straight.losses
    for a, b in zip(resumed.model.state_dict().values(), straight.model.state_dict().values()):
        assert torch.equal(a, b)


def test_label_dropout_feeds_the_null_class():
    from cbs_convert.batches import draw_batch

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
            settings = FinetuneSettings(steps=60, batch_size=16, lr=1e-3, ema_decay=0.9, loss=loss, seed=0)
            result = finetune_expert(family, teacher, student(), segment, pool, labels, settings, progress=False)
            after = _held_out_data_loss(family, result.model, pool, labels, segment)
            assert after < 0.85 * before, (name, loss, before, after)


def test_data_loss_from_a_given_prediction_equals_running_the_model():
    from cbs_convert.batches import noised

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

    from cbs_convert.finetune import FinetuneSettings
    from cbs_convert.recipe import Recipe

    cli = Recipe()
    library = FinetuneSettings()
    for f in fields(FinetuneSettings):
        if f.name != "label_dropout":  # the CLI reads that one from the checkpoint
            assert getattr(library, f.name) == getattr(cli, f.name), f.name
