"""Sampling time per step of each pruning structure at the same per-step FLOPs, measured on this CPU.

    python3 benchmarks/structure_speed.py                  # the Fashion-MNIST teacher at 0.5x: width, depth, blockwise
    python3 benchmarks/structure_speed.py --checkpoint MODEL.pt --batch 8 --threads 16
    python3 benchmarks/structure_speed.py --quick          # smoke run, seconds (the test suite runs it)

FLOPs do not say how fast a model samples: removing whole blocks launches fewer kernels, narrowing
every block keeps their number and makes each matmul smaller, and per-block widths leave ragged
shapes. Each structure is planned the way ``python -m cbs_convert`` plans it (K=1 at the budget, the
structure's own calibration, by a profile-only run); a model of the planned shape with random
weights, since weights' values do not change the time, then runs the sampler of ``python -m cbs_convert.sample``
(Heun, ``--sample-steps``) on one batch, timed ``--repeats`` times on ``--threads`` threads. The
table gives the median time per sampling step and its ratio to the teacher's, beside the ratio of
per-step FLOPs. Run it on an otherwise idle machine: other processes on the same cores inflate the
times unevenly.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cbs_convert import Conversion  # noqa: E402
from cbs_convert.sample import sample_ode  # noqa: E402
from cbs_convert.storage.loading import load_model  # noqa: E402

STRUCTURES = ("width", "depth", "blockwise")
RESULTS = ROOT / "benchmarks" / "results"
#: planning only: a small pool for the structure's calibration, no profile (K=1 has no cut to place)
PLAN = dict(k=1, split="uniform", monitors=[], pool_size=32, ode_steps=8, calib_batches=2)


def plan_student(checkpoint: str, structure: str, budget: str, out: Path):
    """(family, config) of the one expert a conversion at ``budget`` with ``structure`` would prune to:
    the conversion's own planning stages (a profile-only run), so blocks and widths are chosen as
    they would be."""
    planning = Conversion(dict(PLAN, checkpoint=checkpoint, budget=budget, structure=structure,
                               out=str(out / f"{structure}.safetensors")), preview=True)
    planning.run()
    return planning.source.family, planning.plan.configs[0]


def seconds_per_step(family, model, batch: int, sample_steps: int, repeats: int, seed: int = 0) -> list:
    shape = family.sample_shape(family.config)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((batch, *shape), generator=generator)
    classes = family.num_classes(family.config)
    labels = torch.randint(0, classes, (batch,), generator=generator) if classes else None
    times = []
    with torch.no_grad():
        sample_ode(family, model, noise.shape, labels, steps=2, noise=noise)  # warm-up: allocator, kernels
        for _ in range(repeats):
            began = time.perf_counter()
            sample_ode(family, model, noise.shape, labels, steps=sample_steps, noise=noise)
            times.append((time.perf_counter() - began) / sample_steps)
    return times


def describe(family, config) -> dict:
    return {"flops": family.forward_flops(config), "params": family.param_count(config),
            "layout": family.describe(config)}


def run(checkpoint: str, budget: str, structures, batch: int, sample_steps: int, repeats: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="structure_speed_") as tmp:
        family, teacher = load_model(checkpoint)
        # random weights of each planned shape: the values do not change the time a forward takes
        models = [("teacher", family.config, teacher.eval())]
        for structure in structures:
            student_family, config = plan_student(checkpoint, structure, budget, Path(tmp))
            models.append((structure, config, student_family.build(config).eval()))
        for name, config, model in models:
            row = {"name": name, **describe(family, config)}
            row["seconds_per_step"] = seconds_per_step(family, model, batch, sample_steps, repeats)
            rows.append(row)
    teacher = rows[0]
    for row in rows:
        row["median"] = statistics.median(row["seconds_per_step"])
        row["time_ratio"] = row["median"] / teacher["median"]
        row["flops_ratio"] = row["flops"] / teacher["flops"]
    return {"checkpoint": checkpoint, "budget": budget, "batch": batch, "sample_steps": sample_steps,
            "repeats": repeats, "threads": threads, "torch": torch.__version__, "rows": rows}


def markdown(result: dict) -> str:
    lines = [f"Sampling time per step at {result['budget']} per-step FLOPs: `{Path(result['checkpoint']).name}`, batch "
             f"{result['batch']}, Heun {result['sample_steps']} steps, {result['threads']} thread(s), median of "
             f"{result['repeats']} (torch {result['torch']}).", "",
             "| model | layout | parameters | per-step FLOPs vs teacher | ms per step (median, min–max) | time vs teacher |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        ms = [1e3 * s for s in row["seconds_per_step"]]
        lines.append(f"| {row['name']} | {row['layout']} | {row['params']:,} | {row['flops_ratio']:.2f} | "
                     f"{1e3 * row['median']:.1f} ({min(ms):.1f}–{max(ms):.1f}) | {row['time_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="default: the bundled Fashion-MNIST SiT (quick: the digits SiT)")
    parser.add_argument("--budget", default="0.5x", help="each student's parameters, as --budget of a K=1 conversion")
    parser.add_argument("--structures", default=",".join(STRUCTURES))
    parser.add_argument("--batch", type=int, default=None, help="samples per sampling batch (default 250; quick 8)")
    parser.add_argument("--sample-steps", type=int, default=None, help="Heun steps (default 8; quick 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per model (default 5; quick 1)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="smoke run: the digits teacher, tiny batch")
    parser.add_argument("--out", default=None, help="results stem (default benchmarks/results/structure_speed; quick: none)")
    args = parser.parse_args(argv)
    structures = [s.strip() for s in args.structures.split(",") if s.strip()]
    unknown = [s for s in structures if s not in STRUCTURES]
    if unknown:
        parser.error(f"unknown structures {unknown}; choose from {', '.join(STRUCTURES)}")
    checkpoint = args.checkpoint or str(ROOT / "cbs_convert" / "assets" / f"{'digits' if args.quick else 'fmnist'}_sit.safetensors")
    result = run(checkpoint, args.budget, structures, args.batch or (8 if args.quick else 250),
                 args.sample_steps or (2 if args.quick else 8), args.repeats or (1 if args.quick else 5), args.threads)
    text = markdown(result)
    print(text)
    stem = Path(args.out) if args.out else (None if args.quick else RESULTS / "structure_speed")
    if stem is not None:
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
        stem.with_suffix(".md").write_text(text)
    return result


if __name__ == "__main__":
    main()
