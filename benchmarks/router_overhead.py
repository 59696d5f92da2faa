"""What routing costs: a routed model against its bare expert, when one expert owns the whole batch
(every step of a sampler).

    python3 benchmarks/router_overhead.py                 # SiT-S/2 shape, batch 32, CPU or CUDA
    python3 benchmarks/router_overhead.py --quick         # a tiny SiT, for the test suite

Two random experts of the shape are routed at t = 0.5; the batch sits at t = 0.25, all in expert 0's
segment. Forward passes of the bare expert and of the routed model alternate, after warm-up, and
the ratio of their median times is printed (goal, issue 9: at most 1.02).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cbs_convert.families import FAMILIES  # noqa: E402
from cbs_convert.models.routed import RoutedModel  # noqa: E402

SHAPES = {"S": (12, 384, 6, 32), "B": (12, 768, 12, 32), "tiny": (2, 64, 4, 8)}  # depth, width, heads, latent size


def build(shape: str, device):
    depth, width, heads, size = SHAPES[shape]
    config = dict(input_size=size, patch_size=2, in_channels=4, hidden_size=width, depth=depth, num_heads=heads,
                  head_dim=width // heads, mlp_hidden=4 * width, num_classes=1000, label_rows=1001,
                  class_dropout_prob=0.1, learn_sigma=True, path="linear")
    family = FAMILIES["sit"](config)
    experts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        experts.append(family.build(config).to(device).eval())
    return family, experts, RoutedModel(family, experts, [0.0, 0.5, 1.0]).to(device).eval()


def timed(call, sync) -> float:
    began = time.perf_counter()
    call()
    sync()
    return time.perf_counter() - began


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="S")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny SiT, batch 8, 5 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.shape, args.batch, args.repeats = "tiny", 8, 5
    device = torch.device(args.device)
    family, experts, routed = build(args.shape, device)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, *family.sample_shape(family.config), generator=generator).to(device)
    y = torch.randint(0, 1000, (args.batch,), generator=generator).to(device)
    t = family.native_time(torch.full((args.batch,), 0.25)).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    bare, through_router = [], []
    with torch.inference_mode():
        assert torch.equal(routed(x, t, y), experts[0](x, t, y))
        for _ in range(2):  # warm-up
            experts[0](x, t, y), routed(x, t, y)
        for _ in range(args.repeats):
            bare.append(timed(lambda: experts[0](x, t, y), sync))
            through_router.append(timed(lambda: routed(x, t, y), sync))
    ratio = statistics.median(through_router) / statistics.median(bare)
    print(f"SiT-{args.shape}/2-shaped experts, batch {args.batch}, {device}: bare expert "
          f"{statistics.median(bare) * 1e3:.2f} ms, routed {statistics.median(through_router) * 1e3:.2f} ms "
          f"(medians of {args.repeats}); router overhead {ratio:.3f}x (goal <= 1.02x)")
    return {"ratio": ratio, "bare_s": statistics.median(bare), "routed_s": statistics.median(through_router)}


if __name__ == "__main__":
    main()
