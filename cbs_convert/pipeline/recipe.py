"""The recipe: every setting of a conversion, one schema for YAML files, flags and library calls.

Precedence, lowest first: built-in defaults (sized for tiny models), the bundled recipe of a
recognised published architecture, the user's recipe file, command-line flags.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

from cbs_convert.bundled import RECIPES
from cbs_convert.errors import RecipeError
from cbs_convert.stages.finetune import FinetuneSettings
from cbs_convert.stages.budget import parse_budget
from cbs_convert.stages.split import parse_allocation, validate_boundaries


@dataclass
class Recipe:
    checkpoint: Optional[str] = field(default=None, metadata={"help": "source checkpoint (.pt, .pth or .safetensors)"})
    k: int = field(default=2, metadata={"help": "number of time-segment experts"})
    out: Optional[str] = field(default=None, metadata={"help": "routed checkpoint to write (default: <checkpoint stem>-cbs-k<K>.safetensors)"})
    workdir: Optional[str] = field(default=None, metadata={"help": "stage artifacts for resume (default: <out>.work)"})
    # what the source is
    family: Optional[str] = field(default=None, metadata={"help": "model family, overrides detection: sit, dit or adm"})
    path: Optional[str] = field(default=None, metadata={"help": "SiT interpolant: linear (default) or gvp"})
    beta_schedule: Optional[str] = field(default=None, metadata={"help": "DiT/ADM noise schedule: linear or cosine (default: the published one, else linear)"})
    num_heads: Optional[int] = field(default=None, metadata={"help": "attention heads, needed for unpublished widths"})
    num_head_channels: Optional[int] = field(default=None, metadata={"help": "ADM: channels per attention head (instead of --num-heads)"})
    attention_order: Optional[str] = field(default=None, metadata={"help": "ADM qkv layout: legacy ([q,k,v] per head) or new ([q|k|v]); default: the published one, else legacy"})
    image_size: Optional[int] = field(default=None, metadata={"help": "ADM input resolution, if not a published layout"})
    use_checkpoint: bool = field(default=False, metadata={"help": "ADM: activation checkpointing while fine-tuning (saves memory)"})
    num_classes: Optional[int] = field(default=None, metadata={"help": "real classes, if the label table has no null row"})
    data: Optional[str] = field(default=None, metadata={"help": "latents: fast-DiT folder (features/, labels/) or one .npy/.npz; default: the teacher's own ODE samples"})
    # samples of the teacher when no data is given
    pool_size: int = field(default=128, metadata={"help": "teacher ODE samples drawn for data-free profiling and distillation"})
    ode_steps: int = field(default=16, metadata={"help": "Heun steps per teacher sample"})
    # profile
    # The default follows the benchmarks (README, "Which split wins"): the published Dirichlet
    # monitor cut worse than uniform on both data sets; the denoiser's cut was the best on
    # Fashion-MNIST and level with uniform on digits.
    monitor: str = field(default="denoiser", metadata={"help": "monitor that drives the cuts: denoiser (Jacobian of E[x0|x_t]; the default, see the README's benchmarks), nonlinear, nonlinear_acceleration (beyond the pool's Gaussian fit), sensitivity (error of an untrained student pruned to budget/K); or dirichlet, acceleration (the method as published), path_acceleration"})
    monitors: List[str] = field(default_factory=lambda: ["denoiser", "dirichlet"], metadata={"help": "monitors to profile and report (comma separated; denoiser and dirichlet share one derivative); the report shows every one's cuts. The curve --monitor or --allocation mass:MONITOR reads is profiled too if left out"})
    grid: int = field(default=12, metadata={"help": "number of grid times between t_min and t_max"})
    t_min: float = field(default=0.02, metadata={"help": "first grid time (canonical, 0 = data)"})
    t_max: float = field(default=0.98, metadata={"help": "last grid time (canonical, 1 = noise)"})
    profile_batches: int = field(default=2, metadata={"help": "batches averaged per grid time"})
    profile_batch_size: int = field(default=16, metadata={"help": "samples per profiling batch"})
    derivatives: str = field(default="fd", metadata={"help": "how the monitors differentiate the model: fd (central differences: two plain forwards, about half jvp's cost, within 0.1%% of it for denoiser and dirichlet and 0.3%% for acceleration on a trained model; the default) or jvp (forward-mode autodiff, exact)"})
    # split and budget
    split: str = field(default="cbs", metadata={"help": "cbs (equidistribution of --monitor), uniform, snr (equal steps in log-SNR between t_min and t_max), or explicit (with --boundaries)"})
    boundaries: Optional[List[float]] = field(default=None, metadata={"help": "explicit inner boundaries, e.g. 0.4,0.7 (implies --split explicit)"})
    gamma: float = field(default=0.5, metadata={"help": "tempering exponent: the cuts equidistribute phi**gamma"})
    floor: float = field(default=0.0, metadata={"help": "uniform floor lambda in [0, 1): phi' = (1-lambda) phi/mean + lambda"})
    min_width: float = field(default=0.05, metadata={"help": "minimum segment width in canonical time"})
    allocation: str = field(default="auto", metadata={"help": "budget shares: mass (each segment's share of phi), mass:MONITOR (of another profiled curve, e.g. mass:sensitivity), equal, or auto (equal for --split uniform and snr, mass otherwise)"})
    budget: str = field(default="1x", metadata={"help": "total parameters of all experts: 1x, 2x (of the source) or a count like 300M"})
    # what an expert is
    experts: str = field(default="copies", metadata={"help": "copies (K separate networks, width-pruned to --budget) or lora (one shared base, the source at full width, plus one low-rank delta per segment: memory about 1x plus K deltas, the source's cost per step; trains on --data with --loss data or both)"})
    rank: int = field(default=16, metadata={"help": "--experts lora: rank of each segment's delta"})
    base_lr_scale: Optional[float] = field(default=None, metadata={"help": "--experts lora: the shared base's lr as a multiple of --lr (0 freezes the base; default 0.1: the deltas at 1e-3, the base at the source's final 1e-4)"})
    # pruning
    structure: str = field(default="width", metadata={"help": "what pruning removes: width (residual width, heads, MLP channels, alike in every block), blockwise (the same totals, each block keeping the heads and MLP channels that score highest on the expert's segment wherever they sit; SiT and DiT) or depth (whole blocks first, chosen on the expert's segment, then width for the rest of the budget; SiT and DiT)"})
    block_selector: str = field(default="recovery", metadata={"help": "--structure depth: recovery (a few candidate sets, each given a short low-rank recovery; the best recovered wins) or importance (greedy removal of the block whose absence changes the output least; cheaper, and worse in the Fashion-MNIST benchmark)"})
    prune: str = field(default="segment", metadata={"help": "unit selection: segment (activation-aware on the segment), magnitude or random"})
    calib_batches: int = field(default=4, metadata={"help": "calibration batches per expert for segment-aware pruning"})
    # fine-tuning: the defaults are the library's own (FinetuneSettings'), so one place says each
    steps: int = field(default=FinetuneSettings.steps, metadata={"help": "fine-tuning steps per expert (0: keep the pruned experts as they are)"})
    step_shares: str = field(default="equal", metadata={"help": "how the K x --steps expert steps are shared: equal (--steps each) or length (in proportion to each segment's length in t: about the steps one model trained on all of time gives that segment; --margin widens each segment a little)"})
    trunk_steps: int = field(default=0, metadata={"help": "steps of one shared student, pruned to the widest expert and trained on all of time, before it branches into the K experts, as eDiff-I's experts branch from one model: each expert then starts from it (pruned further to its own size if smaller) instead of from the source (0: every expert starts from the source)"})
    batch_size: int = field(default=FinetuneSettings.batch_size, metadata={"help": "fine-tuning batch size"})
    lr: Optional[float] = field(default=None, metadata={"help": "AdamW peak learning rate (default: 1e-4 for a full-width expert, 3e-4 for a pruned one; the README says why)"})
    lr_schedule: str = field(default=FinetuneSettings.lr_schedule, metadata={"help": "cosine (warm-up, then a cosine down to lr_floor x lr at the last step) or constant (after the warm-up)"})
    warmup_steps: Optional[int] = field(default=None, metadata={"help": "linear lr warm-up steps (default: 5%% of each run's steps; a given count applies to every run, the trunk's too, and is scaled to each expert's share under --step-shares length)"})
    lr_floor: float = field(default=FinetuneSettings.lr_floor, metadata={"help": "the cosine's final lr as a fraction of --lr"})
    weight_decay: float = field(default=FinetuneSettings.weight_decay, metadata={"help": "AdamW weight decay"})
    ema_decay: float = field(default=FinetuneSettings.ema_decay, metadata={"help": "EMA decay of the saved expert weights"})
    ema_warmup: Optional[bool] = field(default=None, metadata={"help": "ramp the EMA decay up from 0 so the start is forgotten fast (default: on for a pruned expert, off for a full-width one, whose EMA stays anchored to the source)"})
    grad_clip: float = field(default=FinetuneSettings.grad_clip, metadata={"help": "gradient norm clip (0 disables)"})
    label_dropout: Optional[float] = field(default=None, metadata={"help": "label dropout probability (default: the teacher's, 0.1 with a null row)"})
    loss: str = field(default=FinetuneSettings.loss, metadata={"help": "distill (data-free), data (needs --data) or both (distill_weight x distill + data_weight x data)"})
    distill_weight: float = field(default=FinetuneSettings.distill_weight, metadata={"help": "weight of the distillation term under --loss both"})
    data_weight: float = field(default=FinetuneSettings.data_weight, metadata={"help": "weight of the data term under --loss both"})
    feature_weight: float = field(default=FinetuneSettings.feature_weight, metadata={"help": "weight of block-feature distillation added to the loss: each block's output matched to the teacher's on the channels the student kept, outliers beyond feature_mask_sigma masked (TinyFusion's recipe; 0 = off)"})
    feature_mask_sigma: float = field(default=FinetuneSettings.feature_mask_sigma, metadata={"help": "feature distillation leaves out teacher activations more than this many standard deviations from their mean"})
    margin: float = field(default=FinetuneSettings.margin, metadata={"help": "overlap margin around each segment for training times"})
    checkpoint_every: int = field(default=FinetuneSettings.checkpoint_every, metadata={"help": "fine-tune checkpoint interval in steps"})
    bf16: bool = field(default=FinetuneSettings.bf16, metadata={"help": "bf16 autocast when fine-tuning on CUDA"})
    eval_samples: int = field(default=64, metadata={"help": "samples for the before/after error and seam measurements"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto"})
    seed: int = field(default=FinetuneSettings.seed, metadata={"help": "seed of every random draw"})

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


FIELDS = {f.name: f for f in fields(Recipe)}
CHOICES = {
    "split": ("cbs", "uniform", "snr", "explicit"),
    "monitor": ("dirichlet", "acceleration", "path_acceleration", "denoiser", "nonlinear", "nonlinear_acceleration",
                "sensitivity"),
    "prune": ("segment", "magnitude", "random"),
    "experts": ("copies", "lora"),
    "structure": ("width", "blockwise", "depth"),
    "step_shares": ("equal", "length"),
    "block_selector": ("recovery", "importance"),
    "derivatives": ("jvp", "fd"),
    "loss": ("distill", "data", "both"),
    "lr_schedule": ("cosine", "constant"),
    "allocation": ("auto", "mass", "equal", "mass:MONITOR"),  # checked by split.parse_allocation
    "family": None,  # checked against the family registry at load time
    "attention_order": ("legacy", "new"),
}
#: settings that do not change what is computed, so they may differ on --resume
RUN_ONLY = ("out", "workdir", "device", "checkpoint_every")
#: settings left out of a run's identity: how the source and the data are named (the source's
#: sha256 is the identity; the pool read from --data is pinned by its content when it is read) and
#: where the run's files go
NOT_IDENTITY = (*RUN_ONLY, "checkpoint", "data", "use_checkpoint")  # activation checkpointing saves memory only
#: the default a setting had when it was added, where today's differs: a work directory made before
#: the setting existed ran with that value, so a resumed run is compared against it
FIRST_DEFAULTS = {"derivatives": "jvp", "lr_schedule": "constant", "warmup_steps": 0, "ema_warmup": True,
                  "distill_weight": 1.0, "data_weight": 1.0}


def base_type(name: str):
    annotation = FIELDS[name].type
    text = str(annotation)
    if "List[float]" in text:
        return "floats"
    if "List[str]" in text:
        return "strs"
    for token, kind in (("int", int), ("float", float), ("bool", bool), ("str", str)):
        if token in text:
            return kind
    raise AssertionError(f"unhandled type for {name}: {text}")


def coerce(name: str, value: Any, origin: str) -> Any:
    """Check and convert one value; ``origin`` names where it came from for the error."""
    if name not in FIELDS:
        close = difflib.get_close_matches(name, FIELDS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(FIELDS)}"
        raise RecipeError(f"{origin}: unknown key '{name}'{hint}")
    if value is None:
        return None
    kind = base_type(name)
    bad = RecipeError(f"{origin}: '{name}' must be {_kind_name(kind)}, got {value!r}")
    if kind in ("floats", "strs"):
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise bad
        try:
            if kind == "floats":
                if any(isinstance(v, bool) for v in items):
                    raise bad
                return [float(v) for v in items]
            return [str(v).strip() for v in items if str(v).strip()]
        except (TypeError, ValueError):
            raise bad from None
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if name == "budget" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise bad
    if name == "allocation":
        try:
            parse_allocation(value)  # the monitor of mass:MONITOR is checked against the monitors in validate()
        except RecipeError as exc:
            raise RecipeError(str(exc) if origin == "--allocation" else f"{origin}: {exc}") from None
        return value
    choices = CHOICES.get(name)
    if choices and value not in choices:
        raise RecipeError(f"{origin}: '{name}' must be one of {', '.join(choices)}, got {value!r}")
    return value


def _kind_name(kind) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            "floats": "a list of numbers", "strs": "a list of names"}[kind]


def read_recipe_file(path) -> Dict[str, Any]:
    """Parse and validate a YAML recipe into a dict of its (coerced) values."""
    import yaml

    path = Path(path)
    if not path.is_file() and path.parent == Path("."):  # a bundled recipe by its name, from anywhere
        path = next((c for c in (RECIPES / path.name, RECIPES / f"{path.name}.yaml") if c.is_file()), path)
    if not path.is_file():
        bundled = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
        raise RecipeError(f"{path}: recipe not found; bundled recipes, usable by name: {bundled}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{path}: YAML syntax error{where}: {problem}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a text file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of key: value, got {type(data).__name__}")
    return {str(key): coerce(str(key), value, str(path)) for key, value in data.items()}


def bundled_recipe(stem: Optional[str], k: int) -> Optional[Path]:
    if not stem:
        return None
    candidate = RECIPES / f"{stem}_k{k}.yaml"
    return candidate if candidate.is_file() else None


def build_recipe(*layers: Dict[str, Any], origin: str = "settings") -> Recipe:
    """Merge layers of settings (later wins; None means unset) and validate the whole."""
    merged: Dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if value is not None:
                merged[key] = coerce(key, value, origin)
    recipe = Recipe(**merged)
    validate(recipe)
    return recipe


def profiled_monitors(r: Recipe) -> List[str]:
    """The monitors the profile stage measures: --monitors, then any curve the run reads that the list
    left out (--monitor's when it drives the cuts or the mass shares, mass:MONITOR's).

    Kept apart from ``r.monitors`` so that the recipe records what was asked for and the profile what
    was measured; a recipe that already lists them profiles exactly its list, as before.
    """
    kind, allocation_monitor = parse_allocation(r.allocation)
    needed = []
    if r.split == "cbs" or (kind == "mass" and allocation_monitor is None):
        needed.append(r.monitor)
    if allocation_monitor is not None:
        needed.append(allocation_monitor)
    monitors = list(r.monitors)
    for m in needed:
        if m not in monitors:
            monitors.append(m)
    return monitors


def inert_settings(r: Recipe) -> List[str]:
    """The settings that act on nothing under r's others: the weights that mix the two terms of
    --loss both, the block selector of a run that removes no blocks, the mask of a run without
    feature distillation. Validation refuses them away from their defaults, and the resume
    identity leaves them out, so that a run begun when they were accepted still resumes."""
    inert = []
    if r.loss != "both":
        inert += ["distill_weight", "data_weight"]
    if r.structure != "depth":
        inert.append("block_selector")
    if r.feature_weight == 0:
        inert.append("feature_mask_sigma")
    return inert


def validate(r: Recipe) -> None:
    """Refuse impossible requests before any heavy work starts."""
    def need(condition, message):
        if not condition:
            raise RecipeError(message)

    for name, f in FIELDS.items():
        value = getattr(r, name)
        if base_type(name) is float and value is not None:
            need(math.isfinite(value), f"{name}={value} must be a finite number")
        if base_type(name) == "floats" and value is not None:
            need(all(math.isfinite(v) for v in value), f"{name}={value} must hold finite numbers")
    need(r.k >= 1, f"k={r.k}: need at least one expert (--k 1 or more)")
    need(r.min_width > 0, f"min_width={r.min_width} must be positive (a segment needs training times)")
    need(r.k * r.min_width <= 1 + 1e-12,
         f"k={r.k} segments of min_width={r.min_width} do not fit in [0, 1]; lower --k or --min-width")
    need(r.steps >= 0, f"steps={r.steps} must be 0 (no fine-tuning: the pruned experts as they are) or more")
    need(r.trunk_steps >= 0, f"trunk_steps={r.trunk_steps} must be 0 (no shared trunk) or more")
    need(r.trunk_steps == 0 or r.k >= 2, f"--trunk-steps {r.trunk_steps} with --k 1: a trunk and one expert both learn "
                                         "all of time; give those steps to --steps instead")
    for name in ("batch_size", "grid", "profile_batches", "profile_batch_size", "pool_size", "ode_steps",
                 "calib_batches", "checkpoint_every", "eval_samples"):
        need(getattr(r, name) > 0, f"{name}={getattr(r, name)} must be positive")
    for name in ("num_heads", "num_head_channels", "image_size", "num_classes"):
        value = getattr(r, name, None)
        need(value is None or value >= (0 if name == "num_classes" else 1) or (name == "num_head_channels" and value == -1),
             f"{name}={value} must be a positive whole number")
    need(r.grid >= 2, f"grid={r.grid}: need at least 2 grid times")
    need(0.0 <= r.t_min < r.t_max <= 1.0, f"need 0 <= t_min < t_max <= 1, got t_min={r.t_min}, t_max={r.t_max}")
    need(r.gamma > 0, f"gamma={r.gamma} must be positive")
    need(0.0 <= r.floor < 1.0, f"floor={r.floor} must be in [0, 1)")
    need(r.lr is None or r.lr > 0, f"lr={r.lr} must be positive")
    need(r.warmup_steps is None or r.warmup_steps >= 0, f"warmup_steps={r.warmup_steps} must be 0 or more")
    need(0.0 <= r.lr_floor <= 1.0, f"lr_floor={r.lr_floor} must be in [0, 1] (a fraction of --lr)")
    need(r.distill_weight >= 0 and r.data_weight >= 0,
         f"distill_weight={r.distill_weight}, data_weight={r.data_weight}: the loss weights must be 0 or more")
    need(r.loss != "both" or r.distill_weight + r.data_weight > 0,
         "--loss both with distill_weight 0 and data_weight 0 trains on nothing; give one of them a weight")
    inert = inert_settings(r)
    acts_or_default = lambda *names: all(n not in inert or getattr(r, n) == getattr(Recipe, n) for n in names)  # noqa: E731
    # weights that the loss never reads would be recorded (and compared on --resume) as if they acted
    need(acts_or_default("distill_weight", "data_weight"),
         f"distill_weight={r.distill_weight}, data_weight={r.data_weight}: the weights mix the two terms of --loss both, "
         f"and --loss {r.loss} has one term; pass --loss both, or drop the weights")
    need(0.0 <= r.ema_decay < 1.0, f"ema_decay={r.ema_decay} must be in [0, 1)")
    need(r.grad_clip >= 0, f"grad_clip={r.grad_clip} must be >= 0")
    need(r.margin >= 0, f"margin={r.margin} must be >= 0")
    need(r.label_dropout is None or 0.0 <= r.label_dropout < 1.0, f"label_dropout={r.label_dropout} must be in [0, 1)")
    for m in r.monitors:
        need(m in CHOICES["monitor"], f"monitors: {m!r} is unknown; choose from {', '.join(CHOICES['monitor'])}")
    # A curve the cuts or the shares read need not be listed in --monitors: profiled_monitors adds it.
    _, allocation_monitor = parse_allocation(r.allocation)
    if allocation_monitor is not None:
        need(allocation_monitor in CHOICES["monitor"],
             f"--allocation mass:{allocation_monitor}: unknown monitor; choose from {', '.join(CHOICES['monitor'])}")
    if r.boundaries is not None:
        need(r.split in ("cbs", "explicit"), "--boundaries cannot be combined with --split uniform")
        r.split = "explicit"
        validate_boundaries(r.boundaries, r.k)
    need(r.split != "explicit" or r.boundaries is not None, "split 'explicit' needs --boundaries, e.g. --boundaries 0.4,0.7")
    need(r.loss == "distill" or r.data, f"loss {r.loss!r} needs real latents: pass --data")
    need(r.rank >= 1, f"rank={r.rank} must be 1 or more")
    need(r.feature_weight >= 0, f"feature_weight={r.feature_weight} must be 0 (off) or more")
    need(r.feature_mask_sigma > 0, f"feature_mask_sigma={r.feature_mask_sigma} must be positive")
    # like the loss weights above: a setting that acts on nothing would be recorded, and compared on --resume, as if it acted
    need(acts_or_default("block_selector"),
         f"--block-selector {r.block_selector} chooses the blocks that --structure depth removes, and --structure "
         f"{r.structure} removes none; pass --structure depth, or drop --block-selector")
    need(acts_or_default("feature_mask_sigma"),
         f"--feature-mask-sigma {r.feature_mask_sigma:g} masks the feature distillation that --feature-weight turns on, "
         "and it is 0 (off); pass --feature-weight W, or drop --feature-mask-sigma")
    need(r.base_lr_scale is None or r.base_lr_scale >= 0, f"base_lr_scale={r.base_lr_scale} must be 0 (a frozen base) or more")
    need(r.structure == "width" or r.experts == "copies",
         f"--structure {r.structure} prunes copies; --experts lora keeps the source whole: drop one of them")
    if r.experts == "lora":
        need(r.budget == "1x", f"budget={r.budget}: --experts lora keeps the source's width (the base plus small deltas); "
                               "drop --budget, or use --experts copies to prune to a budget")
        need(r.trunk_steps == 0, "--trunk-steps branches pruned copies from one trained student; --experts lora "
                                 "already shares one base: drop one of them")
        need(r.step_shares == "equal", "--step-shares length shares steps between separate experts; --experts lora "
                                       "trains every delta together on times drawn from all of t, which already gives "
                                       "each segment its length's share: drop --step-shares")
        need(r.steps == 0 or (r.loss != "distill" and not (r.loss == "both" and r.data_weight == 0)),
             "--experts lora trains its deltas on data: distilling a zero delta from the teacher has no gradient; "
             "pass --loss data (or both, with a data weight above 0) with --data LATENTS, or --steps 0 for the "
             "untrained routed model")
    else:
        for name in ("base_lr_scale",):
            need(getattr(r, name) is None, f"{name} applies to --experts lora only; drop it or pass --experts lora")
    parse_budget(r.budget, 1)


def resolve_recipe(user_layers: List[Dict[str, Any]], source_config_stem=None) -> Recipe:
    """The run's recipe: the bundled recipe of the source's architecture (if one ships for this K)
    under the user's layers of settings."""
    merged_user: Dict[str, Any] = {}
    for layer in user_layers:
        merged_user.update({k: v for k, v in layer.items() if v is not None})
    layers: List[Dict[str, Any]] = []
    bundled = bundled_recipe(source_config_stem, merged_user.get("k", Recipe.k))
    if bundled is not None:
        layer = read_recipe_file(bundled)
        if merged_user.get("experts") == "lora":
            # a bundled recipe's lr is chosen for whole experts, trained on from the source's
            # weights; shared-base deltas start at zero and have a default of their own
            # (experts.DELTA_LR, the base at BASE_LR_SCALE of it) that this lr would override
            layer.pop("lr", None)
        layers.append(layer)
    return build_recipe(*layers, merged_user)
