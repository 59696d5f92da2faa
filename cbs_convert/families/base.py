"""What the pipeline may know about a model family, and nothing more.

A family owns an architecture and a time convention. Everything outside ``families/`` speaks the
canonical convention: ``t`` in [0, 1], ``t = 1`` pure noise, ``t = 0`` data, the forward process
``x_t = alpha(t) * x0 + sigma(t) * eps`` and the probability-flow velocity ``v = dx_t/dt``.
A family translates at its border: native time in and out, native prediction to canonical velocity.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from cbs_convert.errors import CheckpointError

#: No tensor dimension of a real model comes near 2^31; a larger width only makes the closed-form
#: counts overflow floats (``info`` divides them) or ask for impossible memory.
MAX_SIZE = 2**31 - 1
#: An image side is not always in the tensors (ADM's is not), and the sampler allocates noise of
#: that side: a side beyond this is a multi-gigabyte sample, which no released diffusion model works at.
MAX_IMAGE_SIZE = 16384


@dataclass(frozen=True)
class UnitGroup:
    """A set of prunable units whose kept indices are chosen together.

    ``consumers`` name the ``nn.Linear`` (or 1x1-equivalent) modules that read these units on their
    input side; importance is measured there. ``unit_width`` channels form one unit (a head is
    ``head_dim`` channels). ``keep`` is how many units the target config retains.
    """

    name: str
    size: int
    keep: int
    consumers: Tuple[str, ...]
    unit_width: int = 1


@dataclass(frozen=True)
class WidthKnob:
    """One width of the config that the budget allocator may shrink."""

    name: str
    full: int
    minimum: int
    multiple: int = 1


class Family:
    """Interface every model family implements.

    An instance is bound to the source model's config, which also fixes the time convention (SiT
    path, beta schedule). Architecture methods take a config argument because pruning produces
    many configs of one family; time methods use the bound one, since all experts share it.
    """

    name: str = ""
    #: name of the native time argument of ``forward`` (for documentation and the report)
    native_time_name: str = "t"
    #: range of the data, when the model works on bounded pixels (samplers clip predictions to it)
    data_range: Optional[Tuple[float, float]] = None

    def __init__(self, config: Dict[str, Any]):
        self.config = config

    # -- architecture -------------------------------------------------------------------------
    @classmethod
    def matches(cls, state_dict: Dict[str, torch.Tensor]) -> bool:
        raise NotImplementedError

    @classmethod
    def config_from_state_dict(
        cls, state_dict: Dict[str, torch.Tensor], hints: Dict[str, Any]
    ) -> Tuple[Dict[str, Any], List[str]]:
        """Read the architecture from tensor shapes; ``hints`` carry flags and checkpoint args."""
        raise NotImplementedError

    @classmethod
    def build(cls, config: Dict[str, Any]) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def expected_shapes(cls, config: Dict[str, Any]) -> Dict[str, Tuple[int, ...]]:
        raise NotImplementedError

    @classmethod
    def instantiate(cls, config: Dict[str, Any], state_dict: Dict[str, torch.Tensor]) -> nn.Module:
        """The model of ``config`` holding exactly ``state_dict`` (strict), in eval mode.

        Built on the meta device and filled by assignment: no random init of hundreds of millions
        of weights, and no second copy in memory. The module then shares storage with
        ``state_dict``; pass clones if both will change.
        """
        with torch.device("meta"):
            model = cls.build(config)
        model.load_state_dict(state_dict, strict=True, assign=True)
        if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
            # a buffer made in __init__ and not saved: fall back to a real build
            model = cls.build(config)
            model.load_state_dict(state_dict, strict=True)
        return model.eval()

    #: the layers of the network that carry a time segment's low-rank delta in shared-base experts,
    #: as suffixes of module names (each family names its own attention, MLP and modulation layers)
    delta_layers: Tuple[str, ...] = ()

    def carries_delta(self, module_name: str) -> bool:
        return any(module_name == s or module_name.endswith("." + s) for s in self.delta_layers)

    #: the dimension of a block's output that holds its channels
    feature_channel_dim: int = 1

    def feature_taps(self, config: Dict[str, Any]) -> List[str]:
        """The modules whose outputs a pruned student matches to its teacher's under feature
        distillation: the network's blocks, in order."""
        raise NotImplementedError

    def block_unit_groups(self, config: Dict[str, Any]) -> Dict[str, List[str]]:
        """For each width knob that may differ from block to block, the ``unit_groups`` name of every
        block's units, in block order; empty where every block shares one width (the pipeline then
        refuses ``--structure blockwise`` by name)."""
        return {}

    def with_block_widths(self, config: Dict[str, Any], widths: Dict[str, List[int]]) -> Dict[str, Any]:
        """``config`` with one width per block for each knob of ``widths`` (a knob's list, block order)."""
        raise NotImplementedError

    def per_block_widths(self, config: Dict[str, Any]) -> Dict[str, List[int]]:
        """The knobs whose width differs from block to block in ``config``, each with its list; empty
        for a network whose blocks share every width (every source of the official code)."""
        return {}

    def removable_blocks(self, config: Dict[str, Any]) -> List[str]:
        """The blocks depth pruning may remove whole, in order; empty where the family has none
        (the pipeline then refuses ``--structure depth`` by name)."""
        return []

    def with_depth(self, config: Dict[str, Any], depth: int) -> Dict[str, Any]:
        """``config`` holding ``depth`` of its removable blocks."""
        raise NotImplementedError

    def keep_blocks(self, state_dict: Dict[str, torch.Tensor], config: Dict[str, Any], kept: Sequence[int]
                    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
        """The state dict and config of the network holding only the removable blocks ``kept``
        (indices into ``removable_blocks``, in order)."""
        raise NotImplementedError

    def feature_channels(self, kept: Dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        """Which of the teacher's block-output channels a student pruned with ``kept`` (the
        surgery's kept units) still has, in its order; None when pruning keeps them all."""
        return None

    def param_count(self, config: Dict[str, Any]) -> int:
        raise NotImplementedError

    def forward_flops(self, config: Dict[str, Any]) -> int:
        """Multiply-adds times two of one forward pass for one sample."""
        raise NotImplementedError

    def recipe_name(self, config: Dict[str, Any]) -> Optional[str]:
        """Stem of the bundled recipe for a published architecture (``sit_xl_2``), else None."""
        return None

    def describe(self, config: Dict[str, Any]) -> str:
        return self.name

    def saved_args(self, config: Dict[str, Any]) -> Dict[str, Any]:
        """What a plain checkpoint of ``config`` must say beside its tensors (safetensors ``args``
        metadata) for ``detect`` to read it back exactly: the settings shapes do not show."""
        raise NotImplementedError

    def nonofficial_numerics(self, config: Dict[str, Any]) -> Dict[str, Any]:
        """Where ``config`` computes differently from the family's official code (a diffusers
        source's numerics): a bare state dict loses these, so the official loader would build
        another function from it."""
        return {}

    def sample_shape(self, config: Dict[str, Any]) -> Tuple[int, ...]:
        raise NotImplementedError

    #: what ``python -m cbs_convert.sample`` uses unless told: the reference scripts' choice
    default_sampler = "ode"

    def data_space(self, config: Dict[str, Any]) -> str:
        """``"pixels"`` (images in [-1, 1]) or ``"latents"`` (an autoencoder's, to be decoded)."""
        return "pixels"

    def num_classes(self, config: Dict[str, Any]) -> int:
        """Number of real classes; 0 for an unconditional model."""
        raise NotImplementedError

    def null_label(self, config: Dict[str, Any]) -> Optional[int]:
        """Label that selects the unconditional branch, or None without one."""
        raise NotImplementedError

    # -- time and prediction --------------------------------------------------------------------
    def schedule(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """alpha(t), sigma(t) of the forward process in canonical time; differentiable in t."""
        raise NotImplementedError

    def log_snr(self, t) -> "np.ndarray":
        """log(alpha^2 / sigma^2) at canonical times ``t`` (an array of floats), in float64; +inf
        where sigma is 0 and -inf where alpha is 0. What the snr split rule spaces equally."""
        times = torch.as_tensor(np.asarray(t, dtype=np.float64))
        alpha, sigma = self.schedule(times)
        with np.errstate(divide="ignore"):
            return 2 * (np.log(np.abs(alpha.double().numpy())) - np.log(np.abs(sigma.double().numpy())))

    def native_time(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def canonical_time(self, native: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def velocity_from_native(
        self, native_out: torch.Tensor, x: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError

    def velocity(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor]):
        """Canonical velocity dx/dt of ``model`` at canonical time ``t`` (shape [B])."""
        out = model(x, self.native_time(t), y)
        return self.velocity_from_native(out, x, t)

    def data_loss(
        self, model: nn.Module, x0: torch.Tensor, y, t: torch.Tensor, noise: torch.Tensor, teacher_out=None,
        prediction=None,
    ) -> torch.Tensor:
        """The family's own training loss on data ``x0`` at canonical times ``t`` (mean).

        ``teacher_out`` is the teacher's native output on the same x_t, for output channels the data
        cannot supervise (a learned variance). ``prediction``, when given, is ``model``'s native
        output on x_t = alpha(t) x0 + sigma(t) noise, already computed by the caller."""
        raise NotImplementedError

    def guided_forward(self, forward: Callable, x, native_t, y, cfg_scale: float):
        """Classifier-free guidance the way the family's reference code does it."""
        raise NotImplementedError

    # -- surgery --------------------------------------------------------------------------------
    def width_knobs(self, config: Dict[str, Any]) -> List[WidthKnob]:
        """Knobs the allocator may shrink, coarsest first; the last one is used to fine-tune."""
        raise NotImplementedError

    def with_widths(self, config: Dict[str, Any], widths: Dict[str, int]) -> Dict[str, Any]:
        raise NotImplementedError

    def unit_groups(self, source: Dict[str, Any], target: Dict[str, Any]) -> List[UnitGroup]:
        raise NotImplementedError

    def slice_state_dict(
        self,
        state_dict: Dict[str, torch.Tensor],
        source: Dict[str, Any],
        kept: Dict[str, torch.Tensor],
    ) -> Dict[str, torch.Tensor]:
        """Keep only the listed units of every group; returns a state dict for the target config."""
        raise NotImplementedError

    # -- stored configs and diffusers ---------------------------------------------------------
    #: the entries of a config that pruning may shrink; every other entry of an expert's config is
    #: its source's own
    pruned_keys: Tuple[str, ...] = ()
    #: how a model runs, not what it computes: an expert's config may differ from its source's here
    runtime_keys: Tuple[str, ...] = ("use_checkpoint", "dropout")
    #: the module that translates to and from this family's counterpart among diffusers' model
    #: classes (``diffusers_dit``, ``diffusers_unet``), or None where diffusers has none
    diffusers_counterpart = None

    def diffusers_refusal(self, what: str) -> str:
        """Why ``what``, a model of this family, cannot be written as a diffusers folder."""
        return f"{what}: a {self.name} model has no diffusers counterpart"

    @classmethod
    def check_config(cls, check, config: Dict[str, Any], field: str) -> None:
        """Types, ranges and required keys of a stored config of this family. ``check`` is the
        schema's checker of one file: its ``get``, ``integer``, ... raise that file's refusal."""
        raise NotImplementedError

    @classmethod
    def check_structure(cls, check, config: Dict[str, Any], shapes, field: str, what: str) -> None:
        """Block counts and the base width of ``config`` against tensor ``shapes``, from the key
        names alone: nothing that grows with a claimed depth may run before this passes."""
        raise NotImplementedError

    def check_args(self, check, config: Dict[str, Any], args: Dict[str, Any]) -> None:
        """Refuse saved ``args`` beside ``config`` that say more than ``saved_args`` and contradict it."""

    def attention_context(self):
        """Context under which forward-mode autodiff works for this family's models."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)


# ---------------------------------------------------------------------------------------------
# Helpers the families' own conversions share.


def broadcast_to(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], *([1] * (x.dim() - 1)))


def schedule_and_derivative(schedule, t: torch.Tensor):
    """alpha, sigma and their t-derivatives, by forward-mode AD so any schedule works.

    Forward-mode duals nest correctly inside an outer ``torch.func.jvp`` in t, which is what the
    acceleration monitor needs.
    """
    t = t.contiguous()  # an expanded view cannot carry a forward-mode tangent
    ones = torch.ones_like(t)
    (alpha, sigma), (d_alpha, d_sigma) = torch.func.jvp(schedule, (t,), (ones,))
    return alpha, sigma, d_alpha, d_sigma


def setting(hints: Dict[str, Any], name: str) -> Tuple[Any, Optional[str]]:
    """A setting the weights do not show: the user's flag first, then the checkpoint's saved args.

    Returns (value, origin) with origin "given", "checkpoint args", or "model config" when the args are
    a config that defines the network (a diffusers config, a bundled teacher's args), not a claim about it;
    or (None, None)."""
    if hints.get(name) is not None:
        return hints[name], "given"
    if hints.get(f"args_{name}") is not None:
        return hints[f"args_{name}"], "model config" if hints.get("args_define_the_model") else "checkpoint args"
    return None, None


def block_indices(keys: Iterable[str], section: str) -> set:
    """The indices of the blocks ``section.N.`` that ``keys`` name."""
    pattern = re.compile(rf"{re.escape(section)}\.(\d+)\.")
    return {int(m.group(1)) for key in keys if (m := pattern.match(key))}


def rademacher(shape, generator: Optional[torch.Generator], device, dtype=torch.float32) -> torch.Tensor:
    bits = torch.randint(0, 2, shape, generator=generator, device="cpu")
    return (bits.to(dtype) * 2 - 1).to(device)


def check_keys(
    state_dict: Dict[str, torch.Tensor], expected: Dict[str, Sequence[int]], what: str
) -> None:
    """Refuse a state dict that does not match ``expected`` exactly, naming the first offenders."""
    missing = [k for k in expected if k not in state_dict]
    extra = [k for k in state_dict if k not in expected]
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} (expected {tuple(expected[k])})"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else ""))
    if extra:
        problems.append(f"unexpected keys {', '.join(extra[:3])}" + (" ..." if len(extra) > 3 else ""))
    if wrong:
        problems.append(f"wrong shapes {', '.join(wrong[:3])}" + (" ..." if len(wrong) > 3 else ""))
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))
