"""Offline sample-quality metrics on scikit-learn's 8x8 digits, with nothing to download.

scikit-learn ships the digits set (1,797 images, 10 classes), and ``assets/`` ships a small CNN
trained on its training split. Two numbers come out of them for a batch of generated digits:

* ``fd``: the Fréchet distance between Gaussians fitted to the classifier's penultimate features of
  the generated digits and of the held-out real digits (FID's recipe, with a digits classifier in
  place of Inception). Both sets are finite, so even two real sets score above zero: compare
  numbers measured with the same sample sizes only, next to the real-vs-real floor.
* ``class_match``: the share of generated digits the classifier assigns to their conditioning class.

The split is fixed (stratified, 20 % held out, seed 0); models are trained on the training split only,
so the held-out digits measure generalisation rather than memory. Images are (N, 1, 8, 8) in [-1, 1]:
pixel values 0..16 scaled linearly.

The same two numbers exist for Fashion-MNIST (``apt-get install dataset-fashion-mnist``, read by
``cbs_convert.evaluation.datasets``): one Fréchet distance and one scorer, with a classifier per dataset
(``DATASETS``); the reference set there is the official 10,000 test images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn

from cbs_convert.bundled import DIGITS_CLASSIFIER, DIGITS_TEACHER, FMNIST_CLASSIFIER, FMNIST_TEACHER, bundled_teacher
from cbs_convert.errors import MissingDependency
from cbs_convert.evaluation.datasets import load_fashion_mnist
from cbs_convert.sample import sample_ode

SPLIT_SEED = 0
HELD_OUT = 0.2


@dataclass
class DigitsSplit:
    train_x: torch.Tensor  # (N, 1, 8, 8) float32 in [-1, 1]
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_digits_split() -> DigitsSplit:
    """The fixed train / held-out split every digits script and test uses."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise MissingDependency(
            "scikit-learn is not installed, and its digits are the reference images of this check; "
            "pip install 'cbs_convert[demo]' adds it"
        ) from None

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    y = digits.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        x, y, test_size=HELD_OUT, random_state=SPLIT_SEED, stratify=y
    )
    as_t = torch.from_numpy
    return DigitsSplit(as_t(train_x), as_t(train_y), as_t(test_x), as_t(test_y))


class DigitsClassifier(nn.Module):
    """Two 3x3 conv layers and a 64-d penultimate layer: small enough that 360 held-out digits
    give a usable covariance estimate for the Fréchet distance."""

    feature_dim = 64

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.GELU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.GELU(),  # 8x8 -> 4x4
            nn.Flatten(),
            nn.Linear(64 * 16, self.feature_dim), nn.GELU(),
        )
        self.head = nn.Linear(self.feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class FashionClassifier(nn.Module):
    """Three 3x3 conv layers (28 -> 14 -> 7) and a 128-d penultimate layer for 28x28 images: the
    10,000 test images estimate a 128-d covariance well, and a wider layer would mostly add noise."""

    feature_dim = 128

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.GELU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.GELU(),  # 28 -> 14
            nn.Conv2d(64, 64, 3, padding=1, stride=2), nn.GELU(),  # 14 -> 7
            nn.Flatten(),
            nn.Linear(64 * 49, self.feature_dim), nn.GELU(),
        )
        self.head = nn.Linear(self.feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def load_classifier(path=DIGITS_CLASSIFIER, architecture=DigitsClassifier) -> nn.Module:
    from safetensors.torch import load_file

    model = architecture()
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval().requires_grad_(False)


def gaussian_stats(features: torch.Tensor) -> Tuple[np.ndarray, np.ndarray]:
    f = features.detach().double().cpu().numpy()
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1 C2)^1/2).

    tr (C1 C2)^1/2 equals tr (S C2 S)^1/2 with S = C1^1/2, and S C2 S is symmetric PSD, so two
    symmetric eigendecompositions do it, with no scipy and no complex round-off to discard.
    """
    s1 = _sqrt_psd(cov1)
    cross = _sqrt_psd(s1 @ cov2 @ s1)
    diff = np.asarray(mu1) - np.asarray(mu2)
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(cross))


class FeatureScorer:
    """Scores generated images against a fixed real reference set on one classifier's features."""

    def __init__(self, classifier: nn.Module, reference: torch.Tensor):
        self.classifier = classifier
        self.reference_stats = gaussian_stats(self.features(reference))

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.classifier.features(chunk.float()) for chunk in images.split(1024)])

    @torch.no_grad()
    def class_match(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        predicted = torch.cat([self.classifier(chunk.float()).argmax(1) for chunk in images.split(1024)])
        return float((predicted == labels.to(predicted.device)).float().mean())

    def fd(self, images: torch.Tensor) -> float:
        return frechet_distance(*gaussian_stats(self.features(images)), *self.reference_stats)

    def score(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> dict:
        out = {"fd": self.fd(images)}
        if labels is not None:
            out["class_match"] = self.class_match(images, labels)
        return out


class DigitsScorer(FeatureScorer):
    """The digits scorer: the bundled classifier, the held-out digits as reference unless given."""

    def __init__(self, classifier: Optional[nn.Module] = None, reference: Optional[torch.Tensor] = None):
        super().__init__(classifier if classifier is not None else load_classifier(),
                         reference if reference is not None else load_digits_split().test_x)


class FashionScorer(FeatureScorer):
    """The Fashion-MNIST scorer: the bundled classifier, the 10,000 test images as reference unless given."""

    def __init__(self, classifier: Optional[nn.Module] = None, reference: Optional[torch.Tensor] = None):
        if reference is None:
            reference = load_fashion_mnist().test_x
        super().__init__(classifier if classifier is not None else load_classifier(FMNIST_CLASSIFIER, FashionClassifier),
                         reference)


@dataclass(frozen=True)
class Dataset:
    """What a benchmark needs of one dataset, by name, so that worker processes can rebuild it."""

    name: str
    split: Callable[[], object]  # -> an object with train_x, train_y, test_x, test_y
    scorer: Callable[[], FeatureScorer]
    teacher: Path
    classifier: Path


DATASETS: Dict[str, Dataset] = {
    "digits": Dataset("digits", load_digits_split, DigitsScorer, DIGITS_TEACHER, DIGITS_CLASSIFIER),
    "fmnist": Dataset("fmnist", load_fashion_mnist, FashionScorer, FMNIST_TEACHER, FMNIST_CLASSIFIER),
}


def bundled_dataset(source_sha256: str) -> Optional[Dataset]:
    """The dataset whose bundled teacher has this sha256, if any: a conversion of it can be scored."""
    teacher = bundled_teacher(source_sha256)
    return next((dataset for dataset in DATASETS.values() if dataset.teacher == teacher), None)


def paired_sample_quality(family, teacher: nn.Module, converted: nn.Module, dataset: Dataset, samples: int,
                          seed: int = 0, steps: int = 16, device="cpu") -> dict:
    """FD and class match of the teacher and the converted model on the same noise and labels.

    One sampling seed: the paired difference is the number to read, since both models see the same
    noise; the benchmarks give the spread over seeds.
    """
    scorer = dataset.scorer()
    classes = family.num_classes(family.config)
    labels = torch.arange(samples) % classes if classes else None
    shape = family.sample_shape(family.config)
    noise = torch.randn((samples, *shape), generator=torch.Generator().manual_seed(seed))
    scores = {}
    for name, model in (("teacher", teacher), ("converted", converted)):
        y = None if labels is None else labels.to(device)
        images = sample_ode(family, model, (samples, *shape), y, steps=steps, noise=noise.to(device)).cpu()
        scores[name] = scorer.score(images, labels)
    return {
        "dataset": dataset.name, "samples": samples, "sampling_seed": seed, "heun_steps": steps, **scores,
        "delta_fd": scores["converted"]["fd"] - scores["teacher"]["fd"],
    }
