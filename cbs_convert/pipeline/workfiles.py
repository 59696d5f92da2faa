"""What a run keeps in its work directory: every file's name, the format of the small records the
ranks hand each other there, and what is left once the routed file is written."""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Dict, List

import torch
from safetensors.torch import load_file

from cbs_convert.storage.routed_file import save_safetensors_atomic
from cbs_convert.storage.workdir import MARKER, WorkDir

POOL = "pool.safetensors"
PROFILE = "profile.json"
#: the curve the ``profile`` sampling schedule places steps by, stored in the routed file
STEP_PROFILE = "step_profile.json"
SPLIT = "split.json"
#: the one training run of shared-base experts (--experts lora): the base and every delta together
SHARED_WEIGHTS, SHARED_STATE, SHARED_LOG = SHARED_FILES = (
    "finetune/shared.safetensors", "finetune/shared.state.pt", "finetune/shared.log.json")
#: the shared student of --trunk-steps: as pruned (weights, record, block choice), then as trained
TRUNK_PRUNED, TRUNK_KEPT, TRUNK_BLOCKS, TRUNK_WEIGHTS, TRUNK_STATE, TRUNK_LOG = TRUNK_FILES = (
    "trunk/pruned.safetensors", "trunk/pruned.kept.json", "trunk/pruned.blocks.json",
    "trunk/trained.safetensors", "trunk/trained.state.pt", "trunk/trained.log.json")
#: what a finished run keeps of its work directory: small, and what the report and a later
#: --resume of the profile and split need. The weights and optimizer states go (GBs at XL size).
KEPT_AFTER_SUCCESS = (POOL, PROFILE, STEP_PROFILE, SPLIT, "pruned/*.kept.json", "pruned/*.blocks.json", "finetune/*.log.json",
                      TRUNK_KEPT, TRUNK_BLOCKS, TRUNK_LOG)


def pruned_file(k: int, kind: str) -> str:
    """Expert k's file of ``kind`` as pruned: safetensors, kept.json, blocks.json or measured.safetensors."""
    return f"pruned/expert_{k}.{kind}"


def trained_file(k: int, kind: str) -> str:
    """Expert k's file of ``kind`` from fine-tuning: safetensors, state.pt, log.json or measured.safetensors."""
    return f"finetune/expert_{k}.{kind}"


def final_file(k: int, trained: bool) -> str:
    """Where expert k's final weights are: fine-tuned, or as pruned when it is not trained."""
    return trained_file(k, "safetensors") if trained else pruned_file(k, "safetensors")


def work_files(k: int) -> List[str]:
    """Every file a run of ``k`` experts may write into its work directory (the marker's list)."""
    names = [MARKER, POOL, PROFILE, STEP_PROFILE, SPLIT]
    for e in range(k):
        names += [pruned_file(e, kind) for kind in ("safetensors", "kept.json", "blocks.json", "measured.safetensors")]
        names += [trained_file(e, kind) for kind in ("safetensors", "state.pt", "log.json", "measured.safetensors")]
    return names + list(SHARED_FILES) + list(TRUNK_FILES)


def save_measurement(path: Path, measured: Dict[str, Any]) -> None:
    """An expert's measurement (``experts.measure``), written by the rank that made it for rank 0."""
    tensors = {"error": torch.tensor([measured["error"]], dtype=torch.float64)}
    tensors.update({f"edge_{j}": v.detach().float().cpu().contiguous() for j, v in measured["edges"].items()})
    save_safetensors_atomic(tensors, path)


def load_measurement(path: Path) -> Dict[str, Any]:
    tensors = load_file(str(path))
    return {"error": float(tensors.pop("error")[0]),
            "edges": {int(name.split("_")[1]): value for name, value in tensors.items()}}


def tidy(work: WorkDir, k: int, keep_all: bool) -> Dict[str, Any]:
    """Once the routed file is written, drop the weights and optimizer states from the work dir
    (all of it stays with ``keep_all``); returns the report's account of what is left."""
    listed = work_files(k)
    present = [n for n in listed if (work.root / n).is_file()]
    heavy = [n for n in present if n != MARKER and not any(fnmatch(n, pattern) for pattern in KEPT_AFTER_SUCCESS)]
    kept = [n for n in present if n not in heavy]
    summary = {"path": str(work.root), "kept": kept, "kept_bytes": work.size_of(kept),
               "removable": heavy, "removable_bytes": work.size_of(heavy), "removed": not keep_all}
    if not keep_all:
        work.remove(heavy)
    return summary
