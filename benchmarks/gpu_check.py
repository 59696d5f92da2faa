"""One command for whoever has a GPU: the real-scale path end to end, with its numbers.

    python3 benchmarks/gpu_check.py                  # CUDA: SiT-XL/2 shape, K=2, bf16 (minutes on one H100)
    python3 benchmarks/gpu_check.py --quick          # a tiny SiT on whatever device there is (the test suite)
    python3 benchmarks/gpu_check.py --size small     # a CPU-sized SiT (a slow test)

It runs, on one device:

1. a K=2 conversion of a random SiT-XL/2-shaped checkpoint (data-free, bf16 autocast for the
   students, a few hundred fine-tuning steps per expert), and reports the profile's seconds, each
   expert's fine-tuning steps/s and peak CUDA memory, and the routed model's relative error against
   the teacher on each segment before and after fine-tuning;
2. ``finetune_overhead``: the tool's fine-tuning loop against a bare PyTorch loop (ratio of steps/s);
3. ``router_overhead``: the routed model against its bare expert, SiT-S/2 shape, batch 32;
4. the data-parallel path: one expert trained through a process group of one (DDP), against the same
   training without it: steps/s of each and the relative distance of the weights;
5. the EMA update, fused over every tensor, against lerp tensor by tensor: equal weights, and the
   time of each.

Everything printed is also written as JSON (``--json``, default ``benchmarks/results/gpu_check_<device>.json``).
A random teacher is no denoiser, so the errors say that the path works, not how good a real
conversion gets.
"""

from __future__ import annotations

import argparse
import copy
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

import cbs_convert  # noqa: E402
from cbs_convert.families import FAMILIES  # noqa: E402
from cbs_convert.stages.finetune import FinetuneSettings, finetune_expert  # noqa: E402

# depth, width, heads, latent size; conversion steps per expert; finetune_overhead shape
SIZES = {
    "xl": dict(shape=(28, 1152, 16, 32), steps=300, pool=256, overhead="XL", router="S", ddp_steps=50),
    "small": dict(shape=(4, 192, 3, 16), steps=60, pool=64, overhead="small", router="S", ddp_steps=20),
    "tiny": dict(shape=(2, 64, 4, 8), steps=10, pool=16, overhead="tiny", router="tiny", ddp_steps=6),
}


def sit_config(depth, width, heads, size):
    return dict(input_size=size, patch_size=2, in_channels=4, hidden_size=width, depth=depth, num_heads=heads,
                head_dim=width // heads, mlp_hidden=4 * width, num_classes=1000, label_rows=1001,
                class_dropout_prob=0.1, learn_sigma=True, path="linear")


def conversion(size: dict, device: str, tmp: Path) -> dict:
    config = sit_config(*size["shape"])
    family = FAMILIES["sit"](config)
    torch.manual_seed(0)
    source = tmp / "SiT-shaped.pt"
    torch.save({"ema": family.build(config).state_dict(), "args": {"num_heads": config["num_heads"]}}, source)
    began = time.time()
    result = cbs_convert.convert(
        source, k=2, out=str(tmp / "routed.safetensors"), device=device, bf16=True, steps=size["steps"],
        pool_size=size["pool"], batch_size=32, grid=8, profile_batches=2, profile_batch_size=16, calib_batches=2,
        eval_samples=32, ode_steps=8, progress=False,
    )
    wall = time.time() - began
    report = result.report
    experts = []
    for evaluated, trained in zip(report["evaluation"]["experts"], report["finetune"]["experts"]):
        seconds, steps = trained.get("seconds"), trained.get("steps_run")
        experts.append({
            "segment": evaluated["segment"], "params": evaluated["params"],
            "steps_per_s": steps / seconds if seconds else None,
            "peak_cuda_gb": trained["peak_cuda_bytes"] / 1e9 if trained.get("peak_cuda_bytes") else None,
            "error_before": evaluated["error_before"], "error_after": evaluated["error_after"],
        })
    return {"architecture": report["source"]["architecture"], "source_params": report["source"]["params"],
            "wall_s": wall, "stage_s": report["timings_s"], "profile_s": report["timings_s"].get("profile"),
            "experts": experts}


def data_parallel_path(size: dict, device: torch.device) -> dict:
    """One expert through a DDP group of one, and without: the same weights, and what DDP costs."""
    import torch.distributed as dist

    config = sit_config(*size["shape"])
    family = FAMILIES["sit"](config)
    torch.manual_seed(0)
    teacher = family.build(config).to(device).eval().requires_grad_(False)
    student_config = dict(config, mlp_hidden=2 * config["hidden_size"])
    torch.manual_seed(1)
    student = family.build(student_config).to(device)
    x0 = torch.randn(128, *family.sample_shape(config), device=device)
    y = torch.randint(0, 1000, (128,), device=device)
    settings = FinetuneSettings(steps=size["ddp_steps"], batch_size=16, bf16=True)
    with socket.socket() as probe:  # a free port for the one-process group
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)
    try:
        plain = finetune_expert(family, teacher, copy.deepcopy(student), (0.0, 0.5), x0, y, settings, progress=False)
        grouped = finetune_expert(family, teacher, copy.deepcopy(student), (0.0, 0.5), x0, y, settings, progress=False,
                                  group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()
    a = torch.cat([p.detach().double().flatten() for p in plain.model.parameters()])
    b = torch.cat([p.detach().double().flatten() for p in grouped.model.parameters()])
    return {"steps": settings.steps, "plain_steps_per_s": settings.steps / plain.seconds,
            "ddp_steps_per_s": settings.steps / grouped.seconds, "weights_rel_distance": float((a - b).norm() / a.norm())}


def ema_path(size: dict, device: torch.device, updates: int = 20) -> dict:
    """The fused EMA update against lerp tensor by tensor, on the model of this size: equal weights,
    and the seconds per update of each (``synchronize`` around each timing on CUDA)."""
    from cbs_convert.stages.finetune import ema_update

    config = sit_config(*size["shape"])
    family = FAMILIES["sit"](config)
    torch.manual_seed(0)
    model = family.build(config).to(device)
    fused, looped = copy.deepcopy(model).requires_grad_(False), copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    seconds = {}
    for name, update in (("fused", lambda: ema_update(fused, model, 0.9999)),
                         ("per_tensor", lambda: [e.lerp_(p, 1 - 0.9999) for e, p in zip(looped.parameters(), model.parameters())])):
        with torch.no_grad():
            update()  # the first call pays for any lazy initialisation
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.time()
        with torch.no_grad():
            for _ in range(updates):
                update()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds[name] = (time.time() - began) / updates
    equal = all(torch.equal(a, b) for a, b in zip(fused.parameters(), looped.parameters()))
    return {"tensors": len(list(model.parameters())), "fused_s": seconds["fused"], "per_tensor_s": seconds["per_tensor"],
            "speedup": seconds["per_tensor"] / seconds["fused"], "bitwise_equal": equal}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="default: xl on CUDA, small on CPU")
    parser.add_argument("--quick", action="store_true", help="the tiny size, for the test suite")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    size_name = "tiny" if args.quick else args.size or ("xl" if args.device.startswith("cuda") else "small")
    size = SIZES[size_name]
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"gpu_check: {size_name} SiT shape on {name} (torch {torch.__version__})", flush=True)
    began = time.time()
    result = {"device": name, "size": size_name, "torch": torch.__version__}

    with tempfile.TemporaryDirectory() as tmp:
        result["conversion"] = conv = conversion(size, args.device, Path(tmp))
    print(f"conversion: {conv['architecture']}, {conv['wall_s']:.0f} s in all, profile {conv['profile_s']:.1f} s", flush=True)
    for k, e in enumerate(conv["experts"]):
        memory = f", peak CUDA memory {e['peak_cuda_gb']:.1f} GB" if e["peak_cuda_gb"] else ""
        rate = f"{e['steps_per_s']:.2f} steps/s" if e["steps_per_s"] else "not trained"
        print(f"  expert {k} [{e['segment'][0]:.3f}, {e['segment'][1]:.3f}]: {e['params']:,} params, {rate}{memory}, "
              f"rel. error against the teacher {e['error_before']:.4f} -> {e['error_after']:.4f}", flush=True)

    import finetune_overhead
    import router_overhead

    overhead_args = ["--shape", size["overhead"], "--device", args.device] + (["--quick"] if args.quick else ["--steps", "10", "--repeats", "3"])
    result["finetune_overhead"] = finetune_overhead.main(overhead_args)
    result["router_overhead"] = router_overhead.main(["--shape", size["router"], "--device", args.device]
                                                     + (["--quick"] if args.quick else []))
    result["data_parallel"] = ddp = data_parallel_path(size, device)
    print(f"data-parallel path (DDP, 1 process): {ddp['ddp_steps_per_s']:.2f} steps/s against "
          f"{ddp['plain_steps_per_s']:.2f} without; weights {ddp['weights_rel_distance']:.1e} apart", flush=True)
    result["ema"] = ema = ema_path(size, device)
    print(f"EMA update over {ema['tensors']} tensors: fused {ema['fused_s'] * 1e3:.2f} ms against "
          f"{ema['per_tensor_s'] * 1e3:.2f} ms tensor by tensor ({ema['speedup']:.1f}x); "
          f"{'bit-identical' if ema['bitwise_equal'] else 'NOT bit-identical'}", flush=True)
    result["wall_s"] = time.time() - began
    print(f"gpu_check: done in {result['wall_s']:.0f} s", flush=True)
    out = args.json or (None if args.quick else ROOT / "benchmarks" / "results" / f"gpu_check_{name.replace(' ', '_')}.json")
    if out is not None:
        out.write_text(json.dumps(result, indent=1, default=float) + "\n")
        print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
