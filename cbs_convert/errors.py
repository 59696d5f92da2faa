"""Errors that reach the user as one line and exit code 2.

Every problem a user can fix (a bad path, an unreadable checkpoint, an impossible request) raises a
subclass of :class:`UserError`; the CLI prints ``error: <message>`` and exits with 2. Anything else is a
bug in cbs_convert and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the input or the request, with the fix in the message."""


class CheckpointError(UserError):
    """The checkpoint cannot be read, is unsafe, or is not a model this tool knows."""


class RecipeError(UserError):
    """The recipe or the command-line flags ask for something invalid."""


class BudgetError(UserError):
    """The parameter budget cannot be met with the requested split."""


class TrainingDiverged(RecipeError, FloatingPointError):
    """Fine-tuning produced a non-finite loss: the settings (usually the learning rate) are too
    aggressive for this model. Still a FloatingPointError for code that caught that before."""


class WorkdirError(UserError):
    """The work directory or output path conflicts with the request."""


class WriteError(UserError):
    """A file could not be written: no space, no permission, a read-only file system."""


class MissingDependency(UserError):
    """An optional package that one step needs is not installed; the message names the extra that
    brings it, so the step can be skipped with that line instead of ending the run."""


class WarningNote(str):
    """A note about the source that the user should see at once, not only in the report: an
    assumption the file does not confirm. It is a plain string everywhere else."""


def is_warning(note) -> bool:
    return isinstance(note, WarningNote)
