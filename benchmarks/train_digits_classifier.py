"""Train the digits classifier behind ``cbs_convert.evaluation.metrics`` (about a minute on one CPU core).

    python3 benchmarks/train_digits_classifier.py

Trained on the training split only, with small random shifts and pixel noise so that its features
stay meaningful on slightly imperfect generated digits; prints the held-out accuracy and writes
``cbs_convert/assets/digits_classifier.safetensors``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cbs_convert.bundled import DIGITS_CLASSIFIER  # noqa: E402
from cbs_convert.evaluation.metrics import DigitsClassifier, load_digits_split  # noqa: E402


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # Shift by up to one pixel (zero padding is -1, the background) and add a little noise.
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx, dy = torch.randint(0, 3, (2,), generator=generator).tolist()
    shifted = padded[:, :, dy:dy + 8, dx:dx + 8]
    return shifted + 0.1 * torch.randn(x.shape, generator=generator)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DIGITS_CLASSIFIER)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    data = load_digits_split()
    model = DigitsClassifier()
    steps_per_epoch = (len(data.train_x) + args.batch_size - 1) // args.batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.epochs * steps_per_epoch)
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(data.train_x), generator=generator)
        for batch in order.split(args.batch_size):
            loss = F.cross_entropy(model(augment(data.train_x[batch], generator)), data.train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        train_acc = (model(data.train_x).argmax(1) == data.train_y).float().mean().item()
        test_acc = (model(data.test_x).argmax(1) == data.test_y).float().mean().item()
    print(f"train accuracy {train_acc:.4f}, held-out accuracy {test_acc:.4f} ({len(data.test_x)} digits)")
    from safetensors.torch import save_file

    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out),
              metadata={"held_out_accuracy": f"{test_acc:.4f}", "train_accuracy": f"{train_acc:.4f}"})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
