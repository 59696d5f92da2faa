"""The digits metric: a real-vs-real Fréchet distance sits near its floor, damaged digits score far
worse, and the bundled classifier recognises held-out digits."""

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from cbs_convert.bundled import DIGITS_CLASSIFIER
from cbs_convert.evaluation.metrics import DigitsScorer, frechet_distance, load_classifier, load_digits_split

pytestmark = pytest.mark.skipif(not DIGITS_CLASSIFIER.exists(), reason="run benchmarks/train_digits_classifier.py")


@pytest.fixture(scope="module")
def halves():
    data = load_digits_split()
    images = torch.cat([data.train_x, data.test_x])
    labels = torch.cat([data.train_y, data.test_y])
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    a, b = order[: len(order) // 2], order[len(order) // 2:]
    return DigitsScorer(load_classifier(), reference=images[a]), images[b], labels[b]


def test_frechet_distance_matches_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.1, 2.0, size=5), rng.uniform(0.1, 2.0, size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_a_gaussian_with_itself_is_zero():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(6, 6))
    cov = a @ a.T
    assert abs(frechet_distance(np.ones(6), cov, np.ones(6), cov)) < 1e-8


def test_two_halves_of_the_real_digits_score_far_below_damaged_digits(halves):
    scorer, images, _ = halves
    real = scorer.fd(images)
    pixels = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    shuffled = images.flatten(1)[:, pixels].reshape(images.shape)
    noised = images + 0.5 * torch.randn(images.shape, generator=torch.Generator().manual_seed(2))
    assert real < 10.0
    assert scorer.fd(shuffled) > 20 * real
    assert scorer.fd(noised) > 4 * real


def test_class_match_is_high_on_real_digits_and_low_on_wrong_labels(halves):
    scorer, images, labels = halves
    assert scorer.class_match(load_digits_split().test_x, load_digits_split().test_y) > 0.97
    assert scorer.class_match(images, (labels + 1) % 10) < 0.05
