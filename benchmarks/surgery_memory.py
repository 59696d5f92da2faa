"""Memory and time of the surgery itself, against the floor of reading and writing the files.

    python3 benchmarks/surgery_memory.py              # a SiT-XL/2-shaped checkpoint (2.7 GB), K=2
    python3 benchmarks/surgery_memory.py --shape L    # SiT-L/2 shape
    python3 benchmarks/surgery_memory.py --quick      # SiT-S/2 shape, for the test suite

A random checkpoint of the published shape is written to a temporary folder. Two child processes
are measured, each in its own process so that its peak resident memory (getrusage maxrss) is its own:

* the floor: load the source file and write a file of the routed output's size, nothing else;
* the conversion: ``python -m cbs_convert SOURCE --k 2 --steps 0`` with the smallest settings (a
  uniform split, magnitude pruning, two teacher samples, one evaluation sample), so that what is
  measured is the surgery (load, slice, write), not profiling or training.

Printed: peak RSS of each against the source file's size, and wall time against the floor's.
Goals (issue 9): peak RSS at most 2x the file, wall time at most 3x the floor.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {  # depth, width, heads of the published SiT sizes (patch 2, 32x32x4 latents)
    "XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6),
}

FLOOR = """
import sys, torch
from safetensors.torch import load_file, save_file
source, out, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
tensors = load_file(source)
del tensors
save_file({"bytes": torch.zeros(size // 4, dtype=torch.float32)}, out)
"""


def write_source(path: Path, shape: str) -> int:
    import torch
    from safetensors.torch import save_file

    from cbs_convert.families import FAMILIES

    depth, width, heads = SHAPES[shape]
    config = dict(input_size=32, patch_size=2, in_channels=4, hidden_size=width, depth=depth, num_heads=heads,
                  head_dim=width // heads, mlp_hidden=4 * width, num_classes=1000, label_rows=1001,
                  class_dropout_prob=0.1, learn_sigma=True, path="linear")
    shapes = FAMILIES["sit"].expected_shapes(config)
    generator = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(s, generator=generator) * 0.02 for k, s in shapes.items()}
    args = {"model": f"SiT-{shape}/2", "num_heads": heads, "num_classes": 1000, "path_type": "Linear"}
    save_file(tensors, str(path), metadata={"args": json.dumps(args)})
    return sum(t.numel() for t in tensors.values())


def measured(argv, cwd) -> dict:
    """Run a child; its wall time and its own peak resident memory (kB from wait4's rusage)."""
    began = time.time()
    process = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=dict(os.environ, PYTHONPATH=str(ROOT)))
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.time() - began
    out, err = process.stdout.read().decode(), process.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(map(str, argv[:4]))} failed:\n{err[-2000:]}")
    return {"wall_s": wall, "peak_rss_bytes": usage.ru_maxrss * 1024, "stdout": out}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="XL")
    parser.add_argument("--quick", action="store_true", help="SiT-S/2 shape, for the test suite")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    shape = "S" if args.quick else args.shape
    with tempfile.TemporaryDirectory(prefix="cbs_surgery_") as tmp:
        tmp = Path(tmp)
        source = tmp / f"SiT-{shape}-2-random.safetensors"
        params = write_source(source, shape)
        file_bytes = source.stat().st_size
        out = tmp / "routed.safetensors"
        convert = measured([sys.executable, "-m", "cbs_convert", str(source), "--k", "2", "--steps", "0",
                            "--split", "uniform", "--monitors", "", "--prune", "magnitude", "--pool-size", "2",
                            "--ode-steps", "1", "--eval-samples", "1", "--device", "cpu", "--out", str(out),
                            "--quiet"], tmp)
        out_bytes = out.stat().st_size
        # where the time above the floor goes: the run's own stage timings
        stages = json.loads((tmp / "routed.report.json").read_text())["timings_s"]
        floor = measured([sys.executable, "-c", FLOOR, str(source), str(tmp / "floor.safetensors"), str(out_bytes)], tmp)
    result = {
        "shape": f"SiT-{shape}/2", "params": params, "source_bytes": file_bytes, "output_bytes": out_bytes,
        "floor": {k: v for k, v in floor.items() if k != "stdout"},
        "conversion": {k: v for k, v in convert.items() if k != "stdout"},
        "rss_vs_file": convert["peak_rss_bytes"] / file_bytes,
        "floor_rss_vs_file": floor["peak_rss_bytes"] / file_bytes,
        "wall_vs_floor": convert["wall_s"] / floor["wall_s"],
        "conversion_stage_s": {k: round(v, 2) for k, v in stages.items()},
    }
    print(f"SiT-{shape}/2-shaped random checkpoint: {params:,} parameters, {file_bytes / 1e9:.2f} GB; "
          f"routed output (K=2, 1x, no fine-tuning) {out_bytes / 1e9:.2f} GB")
    print(f"floor (load the file, write the output's size): {floor['wall_s']:.1f} s, peak RSS "
          f"{floor['peak_rss_bytes'] / 1e9:.2f} GB = {result['floor_rss_vs_file']:.2f}x the file")
    print(f"conversion: {convert['wall_s']:.1f} s, peak RSS {convert['peak_rss_bytes'] / 1e9:.2f} GB = "
          f"{result['rss_vs_file']:.2f}x the file (goal <= 2x); wall {result['wall_vs_floor']:.2f}x the floor (goal <= 3x)")
    print("conversion stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result["conversion_stage_s"].items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
