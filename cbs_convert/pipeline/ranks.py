"""Which processes train which expert under torchrun, each process's device, and the few
collective calls the stages make (joining the group, barriers, gathering shares).

With W processes and K experts:

* W <= K: experts take turns; process r trains the experts k with k % W == r, alone.
* W > K: W must be a multiple of K. Expert k is trained by the G = W / K consecutive ranks
  k·G ... k·G + G − 1, data-parallel on a process group of their own: each step's global batch is
  drawn exactly as one process would draw it, and each rank of the group takes an equal slice of
  it, so W processes reach the weights one process would (within float rounding).

Anything else is refused before any work, with the launch that would work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Dict, List

import torch
import torch.distributed as dist

from cbs_convert.errors import RecipeError, UserError


@dataclass(frozen=True)
class RankLayout:
    world_size: int
    experts: List[List[int]]  # the ranks that train each expert, the first of them its writer

    def experts_of(self, rank: int) -> List[int]:
        return [k for k, ranks in enumerate(self.experts) if rank in ranks]

    def writer_of(self, k: int) -> int:
        return self.experts[k][0]

    @property
    def group_size(self) -> int:
        return len(self.experts[0])

    def to_dict(self):
        return {"world_size": self.world_size, "experts": [list(r) for r in self.experts]}


def plan_ranks(world_size: int, k: int, batch_size: int, trained: str = "one expert") -> RankLayout:
    """Which ranks train each of ``k`` models (``trained`` names one of them in a refusal)."""
    if world_size < 1 or k < 1:
        raise ValueError(f"need at least one process and one expert, got {world_size} and {k}")
    if world_size <= k:
        return RankLayout(world_size, [[expert % world_size] for expert in range(k)])
    if world_size % k:
        fits = k * (world_size // k)
        raise RecipeError(
            f"{world_size} processes cannot be shared evenly by {k} experts: launch a multiple of {k} "
            f"(torchrun --nproc_per_node {fits}, or {fits + k}) or at most {k}"
        )
    group = world_size // k
    if batch_size % group:
        raise RecipeError(
            f"--batch-size {batch_size} is the global batch of {trained} and must split evenly over the "
            f"{group} processes that train it: use a multiple of {group}, e.g. {group * max(1, round(batch_size / group))}"
        )
    return RankLayout(world_size, [list(range(expert * group, (expert + 1) * group)) for expert in range(k)])


def resolve_device(name: str) -> torch.device:
    """``auto``: this process's own GPU under torchrun (LOCAL_RANK), else the CPU; or a named device."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        # under torchrun each process takes its own GPU, not all of them cuda:0
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    if name == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1 and torch.cuda.is_available():
        return resolve_device("auto")  # under torchrun, "cuda" is this rank's own GPU, as for auto
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RecipeError(f"device {name!r} is not a device name; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


def distributed():
    """(rank, world size), joining torchrun's process group when launched by it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        # The other ranks wait at a barrier while rank 0 samples, profiles and prunes: at XL size that
        # takes longer than the default 10 minutes after which NCCL would abort the job.
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(hours=6))
    return dist.get_rank(), dist.get_world_size()


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def from_rank0(compute: Callable[[], Any], rank: int, world: int) -> Any:
    """``compute()`` run on rank 0 alone, its value on every rank: for what each rank could compute
    but must not compute differently (a fitted schedule: GPUs need not agree to the last bit). A
    refusal on rank 0 is raised on every rank, so that none waits on a value that never comes."""
    if world <= 1:
        return compute()
    box: List[Any] = [None]
    failure = None
    if rank == 0:
        try:
            box = [("value", compute())]
        except UserError as exc:
            failure, box = exc, [("refused", (type(exc), str(exc)))]
        except BaseException as exc:
            failure, box = exc, [("failed", f"rank 0 failed: {type(exc).__name__}: {exc}")]
    dist.broadcast_object_list(box, src=0)
    if failure is not None:
        raise failure
    kind, payload = box[0]
    if kind == "refused":
        error_type, message = payload
        raise error_type(message)
    if kind == "failed":
        raise RuntimeError(payload)
    return payload


def gather(share: Dict[Any, Any], world: int) -> Dict[Any, Any]:
    """Every rank's share of a dict of results, merged, on every rank."""
    if world <= 1:
        return share
    shares: List[Dict[Any, Any]] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(shares, share)
    return {key: value for each in shares for key, value in each.items()}


def expert_groups(layout: RankLayout) -> Dict[int, Any]:
    """A process group per expert trained by several ranks (created on every rank, in one order)."""
    if layout.group_size <= 1:
        return {}
    return {k: dist.new_group(ranks) for k, ranks in enumerate(layout.experts)}


def leave(world: int) -> None:
    """Leave torchrun's process group once the ranks' shared work is done."""
    if world > 1:
        dist.destroy_process_group()
