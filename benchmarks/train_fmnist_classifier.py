"""Train the Fashion-MNIST feature classifier behind ``cbs_convert.evaluation.metrics`` (a few minutes on one core).

    python3 benchmarks/train_fmnist_classifier.py

Trained on the 60,000 training images only, with small random shifts, horizontal flips (garments
are mirror-symmetric, the classes do not change) and pixel noise, so that its features stay
meaningful on slightly imperfect generated images. Prints the test accuracy (the 10,000 images that
FD is measured against) and writes ``cbs_convert/assets/fmnist_classifier.safetensors`` with it in
the metadata.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cbs_convert.evaluation.datasets import load_fashion_mnist  # noqa: E402
from cbs_convert.errors import UserError  # noqa: E402
from cbs_convert.bundled import FMNIST_CLASSIFIER  # noqa: E402
from cbs_convert.evaluation.metrics import FashionClassifier  # noqa: E402

SHIFT = 2


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    side = x.shape[-1]
    padded = F.pad(x, (SHIFT,) * 4, value=-1.0)  # -1 is the background
    dx, dy = torch.randint(0, 2 * SHIFT + 1, (2,), generator=generator).tolist()
    shifted = padded[:, :, dy:dy + side, dx:dx + side]
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    shifted = torch.where(flip[:, None, None, None], shifted.flip(-1), shifted)
    return shifted + 0.1 * torch.randn(x.shape, generator=generator)


@torch.no_grad()
def accuracy(model, x, y) -> float:
    predicted = torch.cat([model(chunk).argmax(1) for chunk in x.split(1000)])
    return float((predicted == y).float().mean())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=FMNIST_CLASSIFIER)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    try:
        data = load_fashion_mnist()
    except UserError as exc:
        raise SystemExit(str(exc)) from None

    model = FashionClassifier()
    steps_per_epoch = (len(data.train_x) + args.batch_size - 1) // args.batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.epochs * steps_per_epoch)
    began = time.time()
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
        print(f"epoch {epoch + 1}/{args.epochs}: test accuracy {accuracy(model, data.test_x, data.test_y):.4f} "
              f"({(time.time() - began) / 60:.1f} min)", flush=True)
    train_acc = accuracy(model, data.train_x, data.train_y)
    test_acc = accuracy(model, data.test_x, data.test_y)
    print(f"train accuracy {train_acc:.4f}, test accuracy {test_acc:.4f} ({len(data.test_x)} images)")
    from safetensors.torch import save_file

    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out),
              metadata={"test_accuracy": f"{test_acc:.4f}", "train_accuracy": f"{train_acc:.4f}"})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
