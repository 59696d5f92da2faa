"""cbs_convert: complexity-balanced splitting of diffusion and flow-matching checkpoints.

Every stage is a plain function over plain objects; ``convert`` runs them all.
"""

import warnings as _warnings

# torch's first forward-mode derivative loads its own JVP decompositions through torch.jit.script,
# which then warns about its own deprecation: noise on every run, nothing the user can act on.
_warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning,
                         module=r"torch\.jit\._script")

from cbs_convert.storage.checkpoint import read_checkpoint  # noqa: E402  (after the filter)
from cbs_convert.errors import BudgetError, CheckpointError, RecipeError, UserError, WorkdirError
from cbs_convert.families import FAMILIES, detect, family_from_config
from cbs_convert.stages.finetune import FinetuneSettings, finetune_expert, relative_error, seam_gap
from cbs_convert.pipeline.conversion import Conversion, ConversionResult, convert
from cbs_convert.stages.profile import Profile, profile_model
from cbs_convert.stages.prune import calibration_batches, prune_state_dict, select_units, unit_scores
from cbs_convert.pipeline.recipe import Recipe, read_recipe_file
from cbs_convert.models.routed import RoutedModel
from cbs_convert.storage.routed_file import load, read_metadata, save_routed
from cbs_convert.sample import sample_ode
from cbs_convert.stages.budget import allocate_widths, budget_targets, parse_budget
from cbs_convert.stages.split import Split, equidistribute, plan_split

__version__ = "0.1.0"

__all__ = [
    "BudgetError", "CheckpointError", "Conversion", "ConversionResult", "FAMILIES", "FinetuneSettings",
    "Profile", "Recipe", "RecipeError", "RoutedModel", "Split", "UserError", "WorkdirError",
    "allocate_widths", "budget_targets", "calibration_batches", "convert", "detect", "equidistribute",
    "family_from_config", "finetune_expert", "load", "parse_budget", "plan_split", "profile_model",
    "prune_state_dict", "read_checkpoint", "read_metadata", "read_recipe_file", "relative_error",
    "sample_ode", "save_routed", "seam_gap", "select_units", "unit_scores",
]
