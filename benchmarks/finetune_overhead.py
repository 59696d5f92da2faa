"""What the fine-tuning loop costs beyond the training itself: ``finetune_expert`` against a bare
PyTorch loop that does the same work.

    python3 benchmarks/finetune_overhead.py                 # SiT-S/2 shape, batch 32 (meant for a GPU)
    python3 benchmarks/finetune_overhead.py --shape small   # a CPU-sized SiT
    python3 benchmarks/finetune_overhead.py --quick         # a tiny SiT, for the test suite

Both train a pruned-width student against the same teacher with AdamW, the same learning rate,
gradient clipping, an MSE loss on the teacher's float32 velocity targets and an EMA update after
every step. The bare loop draws its batches on the device with the global generator and keeps the
loss on the device; ``finetune_expert`` draws them on the host from a per-step generator (so that a
run is the same on any device and resumes exactly) and reads each loss back for its log. The two
alternate, after a warm-up, and the ratio of their median steps per second is printed (goal,
issue 9: at least 0.95).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cbs_convert.families import FAMILIES  # noqa: E402
from cbs_convert.stages.finetune import FinetuneSettings, ema_update, finetune_expert  # noqa: E402

# depth, width, heads, latent size, latent channels
SHAPES = {"XL": (28, 1152, 16, 32, 4), "S": (12, 384, 6, 32, 4), "small": (4, 192, 3, 16, 4), "tiny": (2, 64, 4, 8, 4)}


def build(shape: str, device):
    depth, width, heads, size, channels = SHAPES[shape]
    config = dict(input_size=size, patch_size=2, in_channels=channels, hidden_size=width, depth=depth,
                  num_heads=heads, head_dim=width // heads, mlp_hidden=4 * width, num_classes=1000, label_rows=1001,
                  class_dropout_prob=0.1, learn_sigma=True, path="linear")
    family = FAMILIES["sit"](config)
    torch.manual_seed(0)
    teacher = family.build(config).to(device).eval().requires_grad_(False)
    # the student is an expert at half the residual width: what fine-tuning trains in practice
    student_config = dict(config, hidden_size=width // 2, num_heads=max(1, heads // 2), mlp_hidden=2 * width)
    student_config["head_dim"] = student_config["hidden_size"] // student_config["num_heads"]
    torch.manual_seed(1)
    student = family.build(student_config).to(device)
    return family, teacher, student


def bare_loop(family, teacher, student, x0_pool, labels_pool, settings: FinetuneSettings, segment):
    """The same training written as plainly as possible: what a user's own loop would cost."""
    device = x0_pool.device
    student = student.train()
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    lo, hi = segment
    for step in range(settings.steps):
        index = torch.randint(0, x0_pool.shape[0], (settings.batch_size,), device=device)
        x0, y = x0_pool[index], labels_pool[index]
        t = lo + (hi - lo) * torch.rand(settings.batch_size, device=device)
        noise = torch.randn_like(x0)
        alpha, sigma = family.schedule(t)
        x_t = alpha.view(-1, 1, 1, 1) * x0 + sigma.view(-1, 1, 1, 1) * noise
        native_t = family.native_time(t)
        with torch.no_grad():
            target = teacher(x_t, native_t, y).float()
        loss = F.mse_loss(student(x_t, native_t, y).float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, settings.grad_clip)
        optimizer.step()
        ema_update(ema, student, min(settings.ema_decay, (1 + step) / (10 + step)))
    return ema


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="S")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each, alternating")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny SiT, batch 8, 5 steps, 2 repeats")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    if args.quick:
        args.shape, args.batch, args.steps, args.repeats = "tiny", 8, 5, 2
    device = torch.device(args.device)
    if device.type == "cuda":
        # the same fast paths for both: TF32 matmuls
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    family, teacher, student0 = build(args.shape, device)
    depth, width, heads, size, channels = SHAPES[args.shape]
    x0_pool = torch.randn(512, channels, size, size, device=device)
    labels_pool = torch.randint(0, 1000, (512,), device=device)
    segment = (0.0, 0.5)
    # bf16 off for both: autocast is the same kernel choice in each and is not what is compared here
    settings = FinetuneSettings(steps=args.steps, batch_size=args.batch, lr=1e-4, grad_clip=1.0, bf16=False,
                                label_dropout=0.0, margin=0.0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run_tool():
        finetune_expert(family, teacher, copy.deepcopy(student0), segment, x0_pool, labels_pool, settings, progress=False)

    def run_bare():
        bare_loop(family, teacher, copy.deepcopy(student0), x0_pool, labels_pool, settings, segment)

    for call in (run_tool, run_bare):  # warm-up: allocator, kernels, autotuning
        call()
    sync()
    times = {"tool": [], "bare": []}
    for repeat in range(args.repeats):
        # which goes first alternates, so that a drift in the machine's speed hits both alike
        order = (("tool", run_tool), ("bare", run_bare))
        for name, call in (order if repeat % 2 == 0 else order[::-1]):
            sync()
            began = time.perf_counter()
            call()
            sync()
            times[name].append(time.perf_counter() - began)
    tool_rate = args.steps / statistics.median(times["tool"])
    bare_rate = args.steps / statistics.median(times["bare"])
    result = {
        "shape": args.shape, "batch": args.batch, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "steps_per_run": args.steps, "repeats": args.repeats,
        "tool_steps_per_s": tool_rate, "bare_steps_per_s": bare_rate, "ratio": tool_rate / bare_rate,
        # each repeat's own ratio: its range is the measurement's spread
        "paired_ratios": [b / t for t, b in zip(times["tool"], times["bare"])],
    }
    print(f"SiT {args.shape} shape, student at half width, batch {args.batch}, {result['device_name']}: "
          f"finetune_expert {tool_rate:.2f} steps/s, bare loop {bare_rate:.2f} steps/s (medians of {args.repeats} runs "
          f"of {args.steps} steps); ratio {result['ratio']:.3f} (goal >= 0.95), per repeat "
          f"{min(result['paired_ratios']):.3f} to {max(result['paired_ratios']):.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
