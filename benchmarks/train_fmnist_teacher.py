"""Train the Fashion-MNIST teacher: a small, capacity-limited class-conditional SiT.

    apt-get install dataset-fashion-mnist                 # the data, once
    python3 benchmarks/train_fmnist_teacher.py            # about 50 min on one CPU core; resumable

The tool's own SiT (``cbs_convert.families.sit``), linear path, velocity loss
(``SiTFamily.data_loss``, what ``--loss data`` uses), patch 4 on the 28x28 images (49 tokens),
width 96, depth 4, 6 heads of 16, label dropout 0.1 into a null row so guidance works, AdamW,
EMA, 10,000 steps of 128. Small on purpose: the benchmark needs a teacher whose quality depends on
its width, so that where the width goes (which time segment, which expert) shows in the samples. It
also keeps the benchmark affordable: 48 MFLOP per forward, so 5,000 samples of 31 Heun calls take
about 2.5 min on one core. One thread by default: on shared cores two threads stalled at OpenMP
barriers and ran several times slower than one.

Only the 60,000 training images are seen. Every ``--save-every`` steps the whole training state
(model, EMA, optimizer, data RNG) is written next to the output, so an interrupted run continues
where it stopped when started again with the same command. The EMA weights go to
``cbs_convert/assets/fmnist_sit.safetensors`` with the args (head count, path, classes) as JSON in
the ``args`` metadata, which the tool reads like a checkpoint's saved args.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cbs_convert.evaluation.datasets import load_fashion_mnist  # noqa: E402
from cbs_convert.errors import UserError  # noqa: E402
from cbs_convert.families.sit import SiTFamily  # noqa: E402
from cbs_convert.families.transformer_net import initialize_for_training  # noqa: E402
from cbs_convert.storage.files import atomic_write  # noqa: E402
from cbs_convert.stages.finetune import ema_update  # noqa: E402
from cbs_convert.bundled import ASSETS  # noqa: E402


def config_for(width: int, depth: int, head_dim: int) -> dict:
    return dict(
        input_size=28, patch_size=4, in_channels=1, hidden_size=width, depth=depth, num_heads=width // head_dim,
        head_dim=head_dim, mlp_hidden=4 * width, num_classes=10, label_rows=11, class_dropout_prob=0.1,
        learn_sigma=False, path="linear",
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--ema", type=float, default=0.9995)
    parser.add_argument("--width", type=int, default=96, help="residual width (48 trains the half-width control)")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="1 avoids OpenMP stalls when the cores are shared")
    parser.add_argument("--save-every", type=int, default=500, help="steps between resumable training states")
    parser.add_argument("--out", type=Path, default=ASSETS / "fmnist_sit.safetensors")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # The zero-initialised adaLN gates and the EMA's tiny early updates produce subnormal floats,
    # which x86 CPUs compute many times slower; flushing them to zero changes nothing measurable.
    torch.set_flush_denormal(True)
    config = config_for(args.width, args.depth, args.head_dim)
    state_path = args.out.with_name(args.out.name + ".train-state.pt")

    try:
        data = load_fashion_mnist()
    except UserError as exc:
        raise SystemExit(str(exc)) from None
    x_all, y_all = data.train_x, data.train_y
    family = SiTFamily(config)
    torch.manual_seed(args.seed)
    model = SiTFamily.build(config)
    initialize_for_training(model)
    model.train()
    ema = SiTFamily.build(config)
    ema.load_state_dict(model.state_dict())
    ema.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    start, elapsed = 0, 0.0
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        if state["config"] != config or state["steps"] != args.steps:
            raise SystemExit(f"{state_path} belongs to another run (config or --steps differ); delete it to start over")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start, elapsed = state["step"], state["elapsed"]
        print(f"resuming at step {start} ({elapsed / 60:.1f} min already spent)", flush=True)

    def lr_at(step):
        # Warmup protects the zero-initialised adaLN gates; the cosine tail lets the EMA settle.
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def save_state(step):
        state = {"config": config, "steps": args.steps, "step": step, "elapsed": elapsed + time.time() - began,
                 "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                 "generator": generator.get_state(), "torch_rng": torch.get_rng_state()}
        atomic_write(state_path, lambda tmp: torch.save(state, tmp))

    print(f"SiT Fashion-MNIST teacher: {family.describe(config)}; {family.param_count(config):,} parameters, "
          f"{family.forward_flops(config) / 1e6:.1f} MFLOP per forward; {len(x_all):,} training images", flush=True)
    began = time.time()
    running = None
    for step in range(start, args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        index = torch.randint(0, len(x_all), (args.batch_size,), generator=generator)
        x0, y = x_all[index], y_all[index]
        t = torch.rand(args.batch_size, generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        loss = family.data_loss(model, x0, y, t, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ema_update(ema, model, min(args.ema, (1 + step) / (10 + step)))
        value = float(loss.detach())
        running = value if running is None else 0.98 * running + 0.02 * value
        if (step + 1) % 250 == 0 or step + 1 == args.steps:
            spent = elapsed + time.time() - began
            print(f"step {step + 1}/{args.steps}  loss {running:.4f}  {spent / 60:.1f} min", flush=True)
        if (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            save_state(step + 1)

    weights = {k: v.detach().clone().contiguous() for k, v in ema.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    minutes = (elapsed + time.time() - began) / 60
    # The head count, path and class count are not visible in the weights (the label table's last
    # row may or may not be a null class); the metadata carries them, so the file converts without
    # flags and without a pickle.
    described = {"model": "SiT-fmnist", "num_heads": config["num_heads"], "path_type": "Linear",
                 "num_classes": config["num_classes"], "class_dropout_prob": config["class_dropout_prob"]}
    training = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "ema": args.ema,
                "seed": args.seed, "minutes": round(minutes, 1), "threads": args.threads}
    atomic_write(args.out, lambda tmp: save_file(weights, tmp, metadata={"args": json.dumps(described),
                                                                          "training": json.dumps(training)}))
    if state_path.exists():
        os.remove(state_path)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB); {minutes:.1f} min of training", flush=True)


if __name__ == "__main__":
    main()
