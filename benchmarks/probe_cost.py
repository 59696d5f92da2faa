"""What a profile probe costs against a plain forward pass of the same model and batch.

    python3 benchmarks/probe_cost.py                 # SiT-S/2 shape, batch 16, CPU or CUDA
    python3 benchmarks/probe_cost.py --quick         # a tiny SiT, for the test suite
    python3 benchmarks/probe_cost.py --agreement cbs_convert/assets/fmnist_sit.safetensors
                                                     # also: the profile by jvp and by fd on a trained model

Timed, alternating after a warm-up, medians: a forward pass under no_grad (the model's own
attention kernel), then ``per_sample_monitors`` for one Dirichlet probe (a jvp in x), the default
pair (Dirichlet and acceleration: two jvps), and every monitor at once (jvps shared where they
measure the same direction); then the same with ``derivatives="fd"`` (central differences, two
plain forwards per direction). Printed as ratios to the forward pass (goal, issue 9: a Dirichlet
probe at most 3x). ``--agreement`` profiles a trained checkpoint both ways on the same samples and
probes and prints how far the fd curve is from the jvp one, against the curve's standard error.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cbs_convert.families import FAMILIES  # noqa: E402
from cbs_convert.stages.gaussian import GaussianFit  # noqa: E402
from cbs_convert.stages.profile import MONITORS, per_sample_monitors  # noqa: E402

SHAPES = {"S": (12, 384, 6, 32), "B": (12, 768, 12, 32), "tiny": (2, 64, 4, 8)}  # depth, width, heads, latent size


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="S")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny SiT, batch 4, 2 repeats")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--agreement", type=Path, help="a trained checkpoint to profile by jvp and by fd")
    args = parser.parse_args(argv)
    if args.quick:
        args.shape, args.batch, args.repeats = "tiny", 4, 2
    device = torch.device(args.device)
    depth, width, heads, size = SHAPES[args.shape]
    config = dict(input_size=size, patch_size=2, in_channels=4, hidden_size=width, depth=depth, num_heads=heads,
                  head_dim=width // heads, mlp_hidden=4 * width, num_classes=1000, label_rows=1001,
                  class_dropout_prob=0.1, learn_sigma=True, path="linear")
    family = FAMILIES["sit"](config)
    torch.manual_seed(0)
    model = family.build(config).to(device).eval().requires_grad_(False)
    # a second model for the sensitivity monitor: any student of the same interface will do here
    student = family.build(dict(config, hidden_size=width // 2, num_heads=max(1, heads // 2),
                                head_dim=(width // 2) // max(1, heads // 2), mlp_hidden=2 * width)).to(device).eval()
    x = torch.randn(args.batch, 4, size, size, device=device)
    t = torch.full((args.batch,), 0.5, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    gaussian = GaussianFit.from_pool(torch.randn(256, 4, size, size, device=device), max_rank=64)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def forward():
        with torch.no_grad():
            family.velocity(model, x, t, y)

    def probe(monitors, derivatives="jvp"):
        return lambda: per_sample_monitors(family, model, x, t, y, monitors, torch.Generator().manual_seed(0),
                                           gaussian, student, derivatives)

    calls = {"forward": forward}
    for derivatives in ("jvp", "fd"):
        calls[f"dirichlet ({derivatives})"] = probe(["dirichlet"], derivatives)
        calls[f"dirichlet+acceleration ({derivatives})"] = probe(["dirichlet", "acceleration"], derivatives)
        calls[f"all monitors ({derivatives})"] = probe(list(MONITORS), derivatives)
    for call in calls.values():  # warm-up
        call()
    sync()

    def timed(call):
        sync()
        began = time.perf_counter()
        call()
        sync()
        return time.perf_counter() - began

    # Each probe is timed right after a forward pass of its own, and the ratio taken per pair: on a
    # shared machine the speed drifts, and a pair sees the same drift.
    times = {name: [] for name in calls}
    ratios = {name: [] for name in calls if name != "forward"}
    for _ in range(args.repeats):
        for name, call in calls.items():
            if name == "forward":
                continue
            forward_s = timed(forward)
            probe_s = timed(call)
            times["forward"].append(forward_s)
            times[name].append(probe_s)
            ratios[name].append(probe_s / forward_s)
    medians = {name: statistics.median(v) for name, v in times.items()}
    result = {
        "shape": args.shape, "batch": args.batch, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "median_s": medians,
        "vs_forward": {name: statistics.median(v) for name, v in ratios.items()},
        "vs_forward_range": {name: [min(v), max(v)] for name, v in ratios.items()},
        "monitors": list(MONITORS),
    }
    print(f"SiT-{args.shape}/2-shaped model, batch {args.batch}, {result['device_name']}: forward "
          f"{medians['forward'] * 1e3:.1f} ms (median); each probe against the forward timed just before it, "
          f"median of {args.repeats} pairs (range)")
    for name in ratios:
        goal = " (goal <= 3x)" if name.startswith("dirichlet (") else ""
        low, high = result["vs_forward_range"][name]
        print(f"  {name}: {medians[name] * 1e3:.1f} ms, {result['vs_forward'][name]:.2f}x the forward "
              f"({low:.2f} to {high:.2f}){goal}")
    if args.agreement:
        result["agreement"] = agreement(args.agreement, device)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


AGREEMENT_MONITORS = ["denoiser", "dirichlet", "acceleration"]


def agreement(checkpoint: Path, device) -> dict:
    """The default monitors' curves (and acceleration's) of a trained model by jvp and by fd: same pool, probes."""
    from cbs_convert.storage.loading import load_model
    from cbs_convert.stages.profile import profile_model
    from cbs_convert.sample import sample_ode

    family, model = load_model(checkpoint, device=device)
    model.eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(64) % family.num_classes(family.config)
    noise = torch.randn((64, *family.sample_shape(family.config)), generator=generator).to(device)
    pool = sample_ode(family, model, tuple(noise.shape), labels.to(device), steps=16, noise=noise)
    grid = torch.linspace(0.02, 0.98, 12).tolist()
    curves, seconds = {}, {}
    for derivatives in ("jvp", "fd"):
        began = time.perf_counter()
        curves[derivatives] = profile_model(family, model, pool, labels.to(device), grid, AGREEMENT_MONITORS,
                                            batches=2, batch_size=32, seed=0, derivatives=derivatives)
        seconds[derivatives] = time.perf_counter() - began
    out = {"checkpoint": str(checkpoint), "grid": grid, "seconds": seconds}
    print(f"{checkpoint.name}: profile of 12 times x 64 samples, {', '.join(AGREEMENT_MONITORS)}: jvp "
          f"{seconds['jvp']:.1f} s, fd {seconds['fd']:.1f} s ({seconds['fd'] / seconds['jvp']:.2f}x)")
    for monitor in AGREEMENT_MONITORS:
        exact = torch.tensor(curves["jvp"].mean[monitor])
        fd = torch.tensor(curves["fd"].mean[monitor])
        stderr = torch.tensor(curves["jvp"].stderr[monitor])
        relative = ((fd - exact).abs() / exact.abs()).max().item()
        in_stderr = ((fd - exact).abs() / stderr.clamp_min(1e-30)).max().item()
        out[monitor] = {"jvp": exact.tolist(), "fd": fd.tolist(), "max_relative_difference": relative,
                        "max_difference_in_stderr": in_stderr}
        print(f"  {monitor}: fd against jvp at most {relative:.2e} relative, {in_stderr:.3f} standard errors")
    return out


if __name__ == "__main__":
    main()
