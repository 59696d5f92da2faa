"""What every command shares: the parser that suggests the flag meant, the guard that turns a user's
problem into one line and exit code 2, and the flags that describe a source checkpoint.

Every problem the user can fix ends as one line on stderr and exit code 2; ``--debug`` shows the
traceback.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from pathlib import Path
from typing import Dict, Tuple

from cbs_convert.bundled import bundled_or_given
from cbs_convert.errors import CheckpointError, RecipeError, UserError
from cbs_convert.families import FAMILIES
from cbs_convert.storage.loading import is_routed


class Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message}{self._suggestion(message)} (see --help)\n")

    def _suggestion(self, message: str) -> str:
        """For a mistyped flag, the known flag it most resembles, as recipe keys get."""
        known = [o for o in self._option_string_actions if o.startswith("--")]
        guesses = []
        for typed in re.findall(r"(--?[A-Za-z][\w-]*)", message.split(":", 1)[-1]):
            if typed in known:
                continue
            close = difflib.get_close_matches(typed.replace("_", "-"), known, n=1, cutoff=0.6)
            if close:
                guesses.append(f"{typed}: did you mean {close[0]}?")
        return f"; {'; '.join(guesses)}" if guesses else ""


def launch_rank() -> int:
    """This process's rank under torchrun (0 alone)."""
    return int(os.environ.get("RANK", "0") or 0)


#: how a conversion continues after an interruption or a fixed file-system problem
CONVERSION_RERUN = ("rerun the same command with --resume to continue",
                    "then rerun (with --resume if a work directory was made)")


def guarded(work, debug: bool, rerun=CONVERSION_RERUN) -> int:
    """Run ``work``; a user's problem becomes one line and exit 2, a bug of ours exit 1.

    Under torchrun every rank reads the same input and finds the same problem: rank 0 says it once.
    ``rerun`` is the command's own advice (after Ctrl-C, after an OSError), as it continues."""
    try:
        work()
    except UserError as exc:
        if debug:
            raise
        if launch_rank() == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system said no outside the writers that name their file
        if debug:
            raise
        where = f" {exc.filename}" if exc.filename else ""
        print(f"error: cannot use{where}: {exc.strerror or exc}; fix the path or its permissions, {rerun[1]}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {rerun[0]}", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug of ours, not the user's: say so, keep the details one flag away
        if debug:
            raise
        where = f"rank {launch_rank()}: " if "RANK" in os.environ else ""
        print(f"error: {where}internal error {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0


# what add_source_arguments' flags set: the loading hints a source checkpoint's files may lack
SOURCE_HINTS = ("family", "num_heads", "path", "image_size")


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that describe a source checkpoint whose files do not say everything, for the
    commands that take a routed file or a source."""
    parser.add_argument("--family", choices=tuple(FAMILIES), help="source checkpoints only, as for a conversion")
    parser.add_argument("--num-heads", type=int, help="source checkpoints only, as for a conversion")
    parser.add_argument("--path", choices=("linear", "gvp"), help="SiT source checkpoints only")
    parser.add_argument("--image-size", type=int, help="ADM source checkpoints whose files do not say it")


def model_source(args) -> Tuple[Path, Dict[str, object], bool]:
    """(the model's path, the source flags as loading hints, whether it is a routed file) of a
    command's ``model`` argument; a routed file given source flags is refused, as it records its
    own architecture."""
    path = bundled_or_given(args.model)
    if not path.exists():
        raise CheckpointError(f"{args.model}: no such file or folder; give a routed .safetensors or a source checkpoint")
    hints = {name: getattr(args, name) for name in SOURCE_HINTS}
    routed = is_routed(path)
    if routed and any(v is not None for v in hints.values()):
        given = ", ".join(f"--{k.replace('_', '-')}" for k, v in hints.items() if v is not None)
        raise RecipeError(f"{given}: {path} is a routed file, which records its own architecture; drop {given}")
    return path, hints, routed


def check_seed(seed: int) -> None:
    """A sampling seed torch's generators take (they hold 64 bits)."""
    if not 0 <= seed < 2**64:
        raise RecipeError(f"--seed {seed}: seeds are whole numbers from 0 to 2**64 - 1")


__all__ = ["CONVERSION_RERUN", "Parser", "SOURCE_HINTS", "add_source_arguments", "check_seed", "guarded", "launch_rank", "model_source"]
