"""Wall time and peak memory of the default CLI conversion of a tiny SiT and a tiny DiT on CPU.

    python benchmarks/tiny_conversion.py

Builds the same tiny models as the tests (width 32, depth 2, 8x8x4 latents, 10 classes), saves
each as a training dict, runs ``python -m cbs_convert tiny.pt --k 2`` with default settings in a
fresh process, and prints wall time, the child's peak resident memory and each expert's relative
error against the teacher before and after fine-tuning (from the written report).
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from helpers import save_training_dict, tiny_model  # noqa: E402


def main():
    rows = []
    for name in ("sit", "dit"):
        with tempfile.TemporaryDirectory() as tmp:
            family, model = tiny_model(name)
            source = Path(tmp) / f"tiny_{name}.pt"
            save_training_dict(source, model, num_heads=4, model_name=f"{name.upper()}-tiny/2")
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            began = time.time()
            result = subprocess.run([sys.executable, "-m", "cbs_convert", source.name, "--k", "2", "--quiet"],
                                    cwd=tmp, env=env, capture_output=True, text=True)
            wall = time.time() - began
            if result.returncode:
                raise SystemExit(result.stderr)
            peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            report = json.loads((Path(tmp) / f"tiny_{name}-cbs-k2.report.json").read_text())
            experts = report["evaluation"]["experts"]
            rows.append((name, wall, peak_mb, report["split"]["boundaries"], experts, report["timings_s"]))
    print("| family | wall s | peak RSS MB | boundaries | expert params | rel. error before -> after |")
    print("|---|---|---|---|---|---|")
    for name, wall, peak, bounds, experts, _ in rows:
        errors = "; ".join(f"{e['error_before']:.3f} -> {e['error_after']:.3f}" for e in experts)
        params = ", ".join(f"{e['params']:,}" for e in experts)
        print(f"| {name} | {wall:.1f} | {peak:.0f} | {', '.join(f'{b:.3f}' for b in bounds)} | {params} | {errors} |")


if __name__ == "__main__":
    main()
