"""Writing files so that an interrupted write never leaves a half file under the final name."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from cbs_convert.errors import WorkdirError, WriteError


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write(path, write: Callable[[str], None]) -> Path:
    """Write through ``write(tmp_path)`` to a hidden temporary beside ``path``, then rename it in.

    The temporary is named ``.{name}.*.partial``; a run killed mid-write leaves only that behind.
    The file gets the mode ``open()`` would give it (0666 less the umask), not mkstemp's private
    0600. A failed write (no space, no permission) raises WriteError naming the file.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=str(path.parent))
        os.close(fd)
        write(tmp)
        # after the write: some writers (safetensors) replace the file rather than fill it
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except Exception as exc:
        _raise_as_write_error(path, exc)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_folder(path, write: Callable[[Path], None], replaceable: Sequence[str] = ()) -> Path:
    """Fill a hidden temporary folder beside ``path`` through ``write(tmp)``, then rename it in.

    Readers never see a folder with some files missing: it is complete or absent. An existing
    ``path`` is replaced only when every entry in it is named in ``replaceable`` (the caller's own
    earlier output); after the new folder is in place those files are removed one by one, never a
    whole tree, so anything else that appeared meanwhile stays. A failure leaves the old folder.
    """
    path = Path(path)
    tmp = old = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=str(path.parent)))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's folder is private; the result should not be
        write(tmp)
        if path.exists():
            stray = sorted(entry.name for entry in path.iterdir() if entry.name not in replaceable)
            if not path.is_dir() or stray:
                raise WorkdirError(f"{path}: holds {stray[0] if stray else 'a file'}, which this command did not write; "
                                   "choose another path")
            old = Path(str(tmp)[: -len(".partial")] + ".old")
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)
                old = None
            raise
        tmp = None
    except Exception as exc:
        _raise_as_write_error(path, exc)
    finally:
        for folder in (tmp, old):
            if folder is not None and folder.is_dir():
                names = replaceable if folder is old else [entry.name for entry in folder.iterdir()]
                for name in names:
                    if (folder / name).is_file():
                        (folder / name).unlink()
                try:
                    folder.rmdir()
                except OSError:
                    pass  # something not ours in it: left in place rather than deleted
    return path


def _raise_as_write_error(path, exc: Exception):
    """Re-raise ``exc``: as a WriteError naming ``path`` when the file system refused the write."""
    reason = _write_failure(exc)
    if reason is None:
        raise exc
    raise WriteError(f"cannot write {path}: {reason}") from exc


def _write_failure(exc: BaseException):
    """The reason, when ``exc`` is the file system refusing a write; None for anything else.

    torch.save and safetensors do not raise OSError for a full disk: torch's zip writer raises a
    RuntimeError ("file write failed"), safetensors its own error carrying the OS error code.
    """
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    text = str(exc)
    if "write failed" in text or "PytorchStreamWriter" in text or "os error" in text.lower() or "Os { code" in text:
        return text.splitlines()[0][:200]
    return None


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path, data) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2))


def check_writable(directory, flag: str) -> None:
    """Refuse a folder the run could not write into, before any work is done.

    The folder may not exist yet: then the nearest existing parent must take new entries. Probed by
    creating and removing a file, which also catches read-only mounts that mode bits do not show.
    """
    directory = Path(directory)
    probe_in = directory
    while not probe_in.exists():
        if probe_in.parent == probe_in:
            break
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise WorkdirError(f"{flag} {directory}: {probe_in} is a file, not a folder; choose another path")
    try:
        with tempfile.TemporaryFile(prefix=".cbs_convert-probe-", dir=str(probe_in)):
            pass
    except OSError as exc:
        raise WorkdirError(
            f"{flag} {directory}: cannot write in {probe_in} ({exc.strerror or exc}); choose a writable location"
        ) from None
