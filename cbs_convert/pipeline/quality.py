"""Whether a finished conversion is good enough: the sample-quality check of a bundled teacher's
conversion, and the verdicts, each with its measurement, where the experts are short of training."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from cbs_convert.errors import UserError
from cbs_convert.evaluation.metrics import bundled_dataset, paired_sample_quality
from cbs_convert.pipeline.steps import Source, silent
from cbs_convert.storage.routed_file import load as load_routed

#: samples per model for the sample-quality check of a bundled teacher's conversion
QUALITY_SAMPLES = 500
#: a loss still falling this much (relative) over the last 40% of training: the expert is clearly short of
#: training (a distillation loss keeps creeping down for long; the default 600 steps leave ~10% on the
#: bundled digits teacher, within 20% of its FD)
STILL_IMPROVING = 0.15
#: a routed model whose FD is this much above its teacher's (relative) is clearly under-trained
CLEARLY_WORSE_FD = 0.25


def sample_quality(source: Source, routed_file: Path, say: Callable[[str], None] = silent) -> Optional[Dict[str, Any]]:
    """For a bundled teacher (whose data and classifier ship with the package): FD and class
    match of the routed model against the teacher, on the same noise and labels; None for any
    other source."""
    dataset = bundled_dataset(source.checkpoint.sha256)
    if dataset is None:
        return None
    say(f"scoring {QUALITY_SAMPLES} samples of the routed model and of the teacher ({dataset.name} classifier)")
    try:
        routed = load_routed(routed_file, device=source.device)
        return paired_sample_quality(source.family, source.teacher, routed, dataset, QUALITY_SAMPLES, device=source.device)
    except UserError as exc:  # e.g. the dataset's reference images are not installed
        return {"dataset": dataset.name, "skipped": str(exc)}


def late_improvement(losses: List[float]) -> Optional[float]:
    """How much the loss fell from the 20% of steps before the last 20% to the last 20% (relative);
    None for a run too short to tell. Minibatch noise averages out over each fifth."""
    fifth = len(losses) // 5
    if fifth < 4:
        return None
    earlier, last = float(np.mean(losses[-2 * fifth:-fifth])), float(np.mean(losses[-fifth:]))
    return 1 - last / earlier if earlier > 0 else None


def undertraining_verdicts(report: Dict[str, Any]) -> List[str]:
    """Warnings where the experts are measurably short of training, each with its measurement."""
    verdicts = []
    steps = report["finetune"]["settings"]["steps"]
    for k, expert in enumerate(report["finetune"]["experts"]):
        drop = expert.get("late_improvement")
        if drop is not None and drop > STILL_IMPROVING:
            ran = expert.get("steps_run") or steps  # its own count: --step-shares may give it more or fewer
            verdicts.append(f"expert {k} was still improving when fine-tuning stopped: its loss fell {drop:.0%} over the "
                            f"last 40% of its {ran} steps; more --steps would help")
    quality = report.get("sample_quality") or {}
    if "delta_fd" in quality and quality["delta_fd"] > CLEARLY_WORSE_FD * quality["teacher"]["fd"]:
        verdicts.append(f"the routed model samples clearly worse than its teacher: FD {quality['converted']['fd']:.2f} "
                        f"against {quality['teacher']['fd']:.2f} on the same {quality['samples']} noises (ΔFD "
                        f"{quality['delta_fd']:+.2f}); the experts are under-trained at --steps {steps}, more steps would help")
    return verdicts
