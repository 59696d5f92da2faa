"""Where the files that ship inside the package live: the demo teachers, their classifiers, the recipes.

Kept at the bottom of the import graph so that reading a checkpoint can recognise a bundled teacher
without importing the evaluation layer that scores its samples.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

PACKAGE = Path(__file__).resolve().parent
ASSETS = PACKAGE / "assets"
RECIPES = PACKAGE / "recipes"

DIGITS_TEACHER = ASSETS / "digits_sit.safetensors"
DIGITS_CLASSIFIER = ASSETS / "digits_classifier.safetensors"
FMNIST_TEACHER = ASSETS / "fmnist_sit.safetensors"
FMNIST_CLASSIFIER = ASSETS / "fmnist_classifier.safetensors"
#: the family each bundled teacher was trained as (benchmarks/train_*_teacher.py)
TEACHER_FAMILIES = {DIGITS_TEACHER: "sit", FMNIST_TEACHER: "sit"}


def bundled_teacher(source_sha256: str) -> Optional[Path]:
    """The bundled teacher whose content has this sha256, if any."""
    for teacher in TEACHER_FAMILIES:
        if not teacher.exists():
            continue
        if hashlib.sha256(teacher.read_bytes()).hexdigest() == source_sha256:
            return teacher
    return None


def bundled_or_given(path) -> Path:
    """A bundled teacher by its name (``digits_sit``, ``fmnist_sit.safetensors``) when no such file is
    here, so the demo runs from any directory after any install; otherwise the path as given."""
    path = Path(path)
    if path.exists() or path.parent != Path("."):
        return path
    for candidate in (ASSETS / path.name, ASSETS / f"{path.name}.safetensors"):
        if candidate.is_file() and "_sit" in candidate.stem:
            return candidate
    return path
