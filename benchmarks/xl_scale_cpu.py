"""A SiT-XL/2-sized conversion end to end on CPU, with minimal sample counts.

    python benchmarks/xl_scale_cpu.py [--family sit|dit] [--k 2]
    python benchmarks/xl_scale_cpu.py --quick     # the S/2 shape, for the test suite

It checks that the full-size path works (key layout, strict loads, allocation within 1% at 675M
parameters, the routed file, load and a forward) and measures time per stage and peak memory.
Weights are random (nothing can be downloaded here), so the errors it prints say nothing about
quality; the quality claims are measured on the digits teacher. On a GPU run the bundled recipe.
"""

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cbs_convert  # noqa: E402
from cbs_convert.families import FAMILIES  # noqa: E402

# the monitor and derivatives its README numbers were measured with (since then the defaults are the
# denoiser monitor, which costs the same one derivative, and fd, which costs about half)
MINIMAL = dict(pool_size=2, ode_steps=1, grid=2, profile_batches=1, profile_batch_size=1, monitors=["dirichlet"],
               monitor="dirichlet", derivatives="jvp", calib_batches=1, batch_size=1, steps=2, eval_samples=2,
               checkpoint_every=1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", default="sit", choices=["sit", "dit"])
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="SiT-S/2 shape (33M parameters) instead of XL")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    depth, width, heads = (12, 384, 6) if args.quick else (28, 1152, 16)
    config = dict(input_size=32, patch_size=2, in_channels=4, hidden_size=width, depth=depth, num_heads=heads,
                  head_dim=width // heads, mlp_hidden=4 * width, num_classes=1000, label_rows=1001,
                  class_dropout_prob=0.1, learn_sigma=True)
    config.update({"path": "linear"} if args.family == "sit" else {"beta_schedule": "linear", "diffusion_steps": 1000})
    family = FAMILIES[args.family](config)
    with tempfile.TemporaryDirectory() as tmp:
        began = time.time()
        model = family.build(config)
        source = Path(tmp) / f"{args.family.upper()}-{'S' if args.quick else 'XL'}-2-256.pt"
        torch.save(model.state_dict(), source)
        del model
        build_s = time.time() - began
        began = time.time()
        result = cbs_convert.convert(source, k=args.k, out=str(Path(tmp) / "routed.safetensors"), progress=False,
                                     **MINIMAL)
        convert_s = time.time() - began
        began = time.time()
        routed = cbs_convert.load(result.output)
        x = torch.randn(2, 4, 32, 32)
        t = family.native_time(torch.tensor([0.2, 0.8]))
        with torch.no_grad():
            out = routed(x, t, torch.tensor([1, 2]))
        load_s = time.time() - began
        size_gb = result.output.stat().st_size / 1e9
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
    report = result.report
    result = {
        "architecture": report["source"]["architecture"],
        "source_params": report["source"]["params"],
        "experts": [{k: e[k] for k in ("segment", "target_params", "params", "params_vs_target", "flops_vs_source",
                                       "widths")} for e in report["evaluation"]["experts"]],
        "stage_seconds": {k: round(v, 1) for k, v in report["timings_s"].items()},
        "build_and_save_source_s": round(build_s, 1),
        "convert_s": round(convert_s, 1),
        "load_and_forward_s": round(load_s, 1),
        "routed_file_gb": round(size_gb, 2),
        "peak_rss_gb": round(peak_gb, 1),
        "output_shape": list(out.shape),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
