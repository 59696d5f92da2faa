"""The work directory of a run: its stage artifacts, and the only files the tool may ever delete.

A directory is a work directory when it holds the marker file ``MARKER``. The marker names every
file the run may write there, and it is written before any of them, so the list is complete even
after a crash. ``--force`` and the clean-up after success remove listed files only (and the hidden
temporaries ``files.atomic_write`` makes beside them), then the listed folders if they are empty:
whatever else is in the directory, a user's file included, stays where it is. A directory that is
not empty and has no marker is never used.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any, Dict, Iterable, List, Optional, Tuple

from cbs_convert.errors import WorkdirError
from cbs_convert.storage.files import atomic_write_json

MARKER = "cbs_convert_run.json"
FORMAT = 1


class WorkDir:
    def __init__(self, root):
        self.root = Path(root)
        self.marker_path = self.root / MARKER
        self._marker: Optional[Dict[str, Any]] = None
        self._resumed_recipe: Dict[str, Any] = {}  # the recipe of the run that start() resumed, as stored

    # -- what is there ----------------------------------------------------------------------------
    def read_marker(self) -> Optional[Dict[str, Any]]:
        """The marker's content, or None when the directory carries no (readable) marker."""
        if not self.marker_path.is_file():
            return None
        try:
            data = json.loads(self.marker_path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("cbs_convert_workdir") != FORMAT or not isinstance(data.get("files"), list):
            return None
        return data

    def check_usable(self, resume: bool, force: bool) -> None:
        """Refuse, before any work, a directory this run must not use. Reads only."""
        if not self.root.exists():
            return
        if not self.root.is_dir():
            raise WorkdirError(f"work directory {self.root} is a file; choose another --workdir")
        if not any(self.root.iterdir()):
            return
        if self.read_marker() is None:
            why = f"its {MARKER} is not a run marker this version can read" if self.marker_path.exists() else f"no {MARKER}"
            raise WorkdirError(
                f"work directory {self.root} is not empty and holds no cbs_convert run ({why}); "
                "nothing in it is touched: choose another --workdir or an empty folder"
            )
        if not (resume or force):
            raise WorkdirError(
                f"work directory {self.root} holds an earlier run; pass --resume to continue it or --force "
                "to start over (only that run's own files are removed)"
            )

    # -- starting a run ---------------------------------------------------------------------------
    def start(self, identity: Dict[str, Any], files: Iterable[str], resume: bool, force: bool,
              defaults: Optional[Dict[str, Any]] = None) -> None:
        """Make the directory this run's: check a resumed run's identity, or clear an earlier one.

        ``identity`` is what a resumed run must match (source hash, recipe); ``files`` are the
        relative paths the run may write. ``defaults``: a setting the stored run does not list (it
        was added to cbs_convert after that run began) counts as unchanged at its default value.
        """
        self.check_usable(resume, force)
        self.root.mkdir(parents=True, exist_ok=True)
        planned = sorted({_relative(name) for name in files})
        stored = self.read_marker()
        inputs: Dict[str, str] = {}
        if stored is not None and resume:
            self._resumed_recipe = dict(stored.get("recipe", {}))
            if stored.get("source_sha256") != identity.get("source_sha256"):
                raise WorkdirError(f"{self.root} belongs to another source checkpoint; use --force to start over")
            before = {**(defaults or {}), **stored.get("recipe", {})}
            if "architecture" in stored and stored["architecture"] != identity.get("architecture"):
                raise WorkdirError(f"{self.root} was made for another reading of the model's architecture (other "
                                   "--family/--num-heads/... flags); rerun with the earlier flags to continue, or "
                                   "--force without --resume to start over")
            changed = [k for k in identity.get("recipe", {}) if before.get(k) != identity["recipe"][k]]
            if changed:
                raise self._changed_settings([(k, before.get(k), identity["recipe"][k]) for k in changed[:4]])
            planned = sorted(set(planned) | set(stored["files"]))
            inputs = stored.get("inputs", {})  # what pin_input recorded: the resumed stages were made from it
        elif stored is not None:  # --force: the earlier run's own files go, nothing else
            self.remove(stored["files"])
        self._write_marker({**identity, "cbs_convert_workdir": FORMAT, "files": planned, **({"inputs": inputs} if inputs else {})})

    def _changed_settings(self, changes: List[Tuple[str, Any, Any]]) -> WorkdirError:
        # name the earlier values: after a default changed, the user has to pass them to continue
        was = "; ".join(f"{key} was {before!r}, now {now!r}" for key, before, now in changes)
        return WorkdirError(f"{self.root} was made with different settings ({was}); rerun with the earlier values "
                            "to continue, or --force without --resume to start over")

    def _write_marker(self, data: Dict[str, Any]) -> None:
        atomic_write_json(self.marker_path, data)
        self._marker = data

    def pin_input(self, name: str, digest: str, what: str, record: bool = True,
                  legacy: Optional[Tuple[str, Any]] = None) -> None:
        """Refuse a resumed run whose input ``name`` now reads differently.

        For an input the run reads after its identity is checked, by path only (``--data``): the
        same path may hold other content by now, and the stages already made from the old content
        would be mixed with training on the new. The first read records the digest (``record``:
        the one process that writes the marker). ``legacy``: (recipe key, value) that a marker
        written before inputs were pinned recorded in its recipe instead; it is compared as then."""
        marker = self._marker if self._marker is not None else self.read_marker()
        if marker is None:
            return
        inputs = marker.get("inputs", {})
        if name not in inputs and legacy is not None and legacy[0] in self._resumed_recipe:
            key, value = legacy
            if self._resumed_recipe[key] != value:
                raise self._changed_settings([(key, self._resumed_recipe[key], value)])
        if name in inputs and inputs[name] != digest:
            raise WorkdirError(
                f"{what} gives another {name} than the run in {self.root} began with (SHA-256 {digest[:12]}..., "
                f"was {inputs[name][:12]}...); resume with that run's data, or --force without --resume to start over"
            )
        if name not in inputs and record:
            self._write_marker({**marker, "inputs": {**inputs, name: digest}})

    # -- using it ---------------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        """Where artifact ``name`` lives; it must be one the marker lists (so that it can be removed)."""
        marker = self._marker if self._marker is not None else self.read_marker()
        if marker is None or _relative(name) not in marker["files"]:
            raise AssertionError(f"work file {name!r} is not listed in {self.marker_path}; add it to the run's plan")
        return self.root / name

    def remove(self, names: Iterable[str]) -> List[Path]:
        """Delete the listed files and their temporaries, then their folders if nothing else is in them."""
        removed: List[Path] = []
        folders = set()
        for name in names:
            relative = _relative(name)
            target = self.root / relative
            if not _inside(target.parent, self.root):
                continue  # a listed folder that is now a link to elsewhere: not ours to empty
            for candidate in [target, *target.parent.glob(f".{target.name}.*.partial")]:
                if candidate.is_symlink() or candidate.is_file():
                    candidate.unlink()
                    removed.append(candidate)
            parent = PurePosixPath(relative).parent
            while str(parent) not in ("", "."):
                folders.add(parent)
                parent = parent.parent
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            path = self.root / folder
            if path.is_dir() and not path.is_symlink() and _inside(path, self.root) and not any(path.iterdir()):
                path.rmdir()
        return removed

    def size_of(self, names: Iterable[str]) -> int:
        return sum((self.root / n).stat().st_size for n in names if (self.root / n).is_file())


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def _relative(name: str) -> str:
    """A marker entry: a relative path inside the directory, never one that climbs out of it."""
    path = PurePosixPath(str(name))
    if path.is_absolute() or ".." in path.parts or str(path) in ("", "."):
        raise WorkdirError(f"work file name {name!r} must be a relative path inside the work directory")
    return str(path)
