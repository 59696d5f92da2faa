"""cbs_convert: complexity-balanced splitting of diffusion and flow-matching checkpoints.

Every stage is a plain function over plain objects; ``convert`` runs them all.
"""

import warnings as _warnings

# torch's first forward-mode derivative loads its own JVP decompositions through torch.jit.script,
# which then warns about its own deprecation: noise on every run, nothing the user can act on.
_warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning,
                         module=r"torch\.jit\._script")

from .checkpoint import read_checkpoint  # noqa: E402  (after the filter)
from .errors import BudgetError, CheckpointError, RecipeError, UserError, WorkdirError
from .families import FAMILIES, detect, family_from_config
from .finetune import FinetuneSettings, finetune_expert, relative_error, seam_gap
from .pipeline import Conversion, ConversionResult, convert
from .profile import Profile, profile_model
from .prune import calibration_batches, prune_state_dict, select_units, unit_scores
from .recipe import Recipe, read_recipe_file
from .routed import RoutedModel, load, read_metadata, save_routed
from .sample import sample_ode
from .split import Split, allocate_widths, budget_targets, equidistribute, parse_budget, plan_split

__version__ = "0.1.0"

__all__ = [
    "BudgetError", "CheckpointError", "Conversion", "ConversionResult", "FAMILIES", "FinetuneSettings",
    "Profile", "Recipe", "RecipeError", "RoutedModel", "Split", "UserError", "WorkdirError",
    "allocate_widths", "budget_targets", "calibration_batches", "convert", "detect", "equidistribute",
    "family_from_config", "finetune_expert", "load", "parse_budget", "plan_split", "profile_model",
    "prune_state_dict", "read_checkpoint", "read_metadata", "read_recipe_file", "relative_error",
    "sample_ode", "save_routed", "seam_gap", "select_units", "unit_scores",
]
