"""Train the bundled digits teacher: a small class-conditional SiT on scikit-learn's 8x8 digits.

    python3 benchmarks/train_digits_teacher.py            # ~15 min on one CPU core

Linear path, velocity loss (``SiTFamily.data_loss``, the loss the conversion's ``--loss data``
uses), label dropout 0.1 into a null row so guidance works, AdamW, EMA. Only the training split
(``cbs_convert.evaluation.metrics.load_digits_split``) is seen. Writes the EMA weights to
``cbs_convert/assets/digits_sit.safetensors`` with the training args (head count, path) as JSON in
its metadata: the width is unpublished, so the head count cannot be read from the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cbs_convert.families.sit import SiTFamily  # noqa: E402
from cbs_convert.families.transformer_net import initialize_for_training  # noqa: E402
from cbs_convert.stages.finetune import ema_update  # noqa: E402
from cbs_convert.bundled import ASSETS  # noqa: E402
from cbs_convert.evaluation.metrics import load_digits_split  # noqa: E402

CONFIG = dict(
    input_size=8, patch_size=2, in_channels=1, hidden_size=128, depth=4, num_heads=4, head_dim=32,
    mlp_hidden=512, num_classes=10, label_rows=11, class_dropout_prob=0.1, learn_sigma=False, path="linear",
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="1 avoids OpenMP stalls when the cores are shared")
    parser.add_argument("--out", type=Path, default=ASSETS / "digits_sit.safetensors")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    data = load_digits_split()
    x_all, y_all = data.train_x, data.train_y
    family = SiTFamily(CONFIG)
    model = SiTFamily.build(CONFIG)
    initialize_for_training(model)
    model.train()
    ema = SiTFamily.build(CONFIG)
    ema.load_state_dict(model.state_dict())
    ema.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)

    def lr_at(step):
        # Warmup protects the zero-initialised adaLN gates; the cosine tail lets the EMA settle.
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    print(f"SiT digits teacher: {family.param_count(CONFIG):,} parameters, {len(x_all)} training digits", flush=True)
    began = time.time()
    running = None
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        index = torch.randint(0, len(x_all), (args.batch_size,))
        x0, y = x_all[index], y_all[index]
        t = torch.rand(args.batch_size)
        loss = family.data_loss(model, x0, y, t, torch.randn_like(x0))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ema_update(ema, model, min(args.ema, (1 + step) / (10 + step)))
        value = float(loss.detach())
        running = value if running is None else 0.98 * running + 0.02 * value
        if (step + 1) % 500 == 0 or step + 1 == args.steps:
            print(f"step {step + 1}/{args.steps}  loss {running:.4f}  {time.time() - began:.0f}s", flush=True)

    state = {k: v.detach().clone().contiguous() for k, v in ema.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    # The head count, path and class count are not visible in the weights (the label table's last
    # row may or may not be a null class); the metadata carries them, so the file converts without
    # flags and without a pickle.
    described = {"model": "SiT-digits", "num_heads": CONFIG["num_heads"], "path_type": "Linear",
                 "num_classes": CONFIG["num_classes"], "class_dropout_prob": CONFIG["class_dropout_prob"]}
    save_file(state, str(args.out), metadata={"args": json.dumps(described)})
    minutes = (time.time() - began) / 60
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB); {minutes:.1f} min", flush=True)


if __name__ == "__main__":
    main()
