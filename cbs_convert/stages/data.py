"""Real latents for profiling and the data loss: the fast-DiT folder layout or one array file.

* folder: ``features/{i}.npy`` of shape (1, C, H, W) float32 and ``labels/{i}.npy`` of shape (1,) int64;
* ``.npz`` with a latents array (``features``, ``latents`` or ``x``) and optionally ``labels`` or ``y``;
* ``.npy`` of latents (N, C, H, W), unlabelled.

At most ``limit`` items are read, a seeded random subset when there are more.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from cbs_convert.errors import UserError


def load_latents(path, expected_shape, limit: int, seed: int = 0) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"--data {path}: no such file or folder")
    rng = np.random.default_rng(seed)
    if path.is_dir():
        features, labels = _read_folder(path, limit, rng)
    elif path.suffix in (".npz", ".npy"):
        features, labels = _read_array_file(path, limit, rng)
    else:
        raise UserError(f"--data {path}: expected a fast-DiT folder (features/, labels/) or a .npy/.npz file")
    if tuple(features.shape[1:]) != tuple(expected_shape):
        raise UserError(
            f"--data {path}: latents have shape {tuple(features.shape[1:])}, the model expects {tuple(expected_shape)}"
        )
    if not torch.isfinite(features).all():
        raise UserError(f"--data {path}: latents contain NaN or Inf")
    return features, labels


def _subset(n: int, limit: int, rng) -> np.ndarray:
    return np.sort(rng.choice(n, size=limit, replace=False)) if n > limit else np.arange(n)


def _read_folder(path: Path, limit: int, rng):
    feature_dir, label_dir = path / "features", path / "labels"
    if not feature_dir.is_dir():
        raise UserError(f"--data {path}: no features/ folder (fast-DiT layout: features/{{i}}.npy, labels/{{i}}.npy)")
    names = sorted(p.name for p in feature_dir.glob("*.npy"))
    if not names:
        raise UserError(f"--data {path}: features/ holds no .npy files")
    chosen = [names[i] for i in _subset(len(names), limit, rng)]
    try:
        arrays = [np.load(feature_dir / n, allow_pickle=False) for n in chosen]
        features = np.stack([a.reshape(a.shape[-3:]) for a in arrays])
        labels = None
        if label_dir.is_dir():
            labels = np.concatenate([np.load(label_dir / n, allow_pickle=False).reshape(-1)[:1] for n in chosen])
    except (OSError, ValueError) as exc:
        raise UserError(f"--data {path}: unreadable array ({exc})") from None
    return torch.from_numpy(features).float(), None if labels is None else torch.from_numpy(labels).long()


def _read_array_file(path: Path, limit: int, rng):
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"--data {path}: unreadable array file ({exc})") from None
    if isinstance(loaded, np.ndarray):
        features, labels = loaded, None
    else:
        key = next((k for k in ("features", "latents", "x") if k in loaded.files), None)
        if key is None:
            raise UserError(f"--data {path}: no 'features', 'latents' or 'x' array (found {', '.join(loaded.files)})")
        features = loaded[key]
        label_key = next((k for k in ("labels", "y") if k in loaded.files), None)
        labels = loaded[label_key].reshape(-1) if label_key else None
    if features.ndim != 4:
        raise UserError(f"--data {path}: latents must be (N, C, H, W), got shape {features.shape}")
    index = _subset(features.shape[0], limit, rng)
    features = torch.from_numpy(np.ascontiguousarray(features[index])).float()
    labels = None if labels is None else torch.from_numpy(np.ascontiguousarray(labels[index])).long()
    return features, labels
