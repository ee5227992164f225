"""`make bench`: training-step and 10-crop images/s of this repo's two-column net vs torchvision's AlexNet.

Both networks run on the same device, in this one process, alternating, several repeats; each
figure is forward + backward + optimiser step on one batch (training) or a 10-view forward pass
(evaluation). torchvision's `alexnet` is the single-column "one weird trick" net (no LRN, 64-192-
384-256-256 kernels): about the same multiply-adds, printed below, so the ratio measures cost of
fidelity, not of work.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import alexnet

from replicate.model import AlexNet
from replicate.optim import OptimConfig, paper_optimizer


def multiply_adds(model: nn.Module, side: int = 224) -> int:
    """Multiply-adds of one forward pass of a 3 x side x side image (conv and linear layers)."""
    total = 0

    def count(module: nn.Module, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total += output.numel() * per_output
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, side, side))
    for hook in hooks:
        hook.remove()
    return total


def timed(function, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def contenders(device: torch.device, channels_last: bool) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    models = {"torchvision alexnet": alexnet(num_classes=1000), "replicate AlexNet": AlexNet(1000)}
    for model in models.values():
        model.to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
    return models


def run(device: torch.device, batch: int, repeats: int, steps: int, channels_last: bool) -> dict:
    models = contenders(device, channels_last)
    optimizers = {name: paper_optimizer(model, OptimConfig()) for name, model in models.items()}
    memory = torch.channels_last if channels_last else torch.contiguous_format
    images = (torch.rand(batch, 3, 224, 224, device=device) * 255 - 128).contiguous(memory_format=memory)
    views = (torch.rand(max(batch // 10, 1), 10, 3, 224, 224, device=device) * 255 - 128).flatten(0, 1)
    views = views.contiguous(memory_format=memory)
    labels = torch.randint(0, 1000, (batch,), device=device)

    def train_steps(name: str) -> None:
        model, optimizer = models[name].train(), optimizers[name]
        for _ in range(steps):
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def evaluate_views(name: str) -> None:
        with torch.no_grad():
            for _ in range(steps):
                models[name].eval()(views).softmax(-1)

    rates: dict[str, dict[str, list[float]]] = {
        "train": {n: [] for n in models},
        "ten_crop": {n: [] for n in models},
    }
    for name in models:  # warm-up: allocator, kernels, first-touch
        train_steps(name)
        evaluate_views(name)
    for _ in range(repeats):
        for name in models:
            rates["train"][name].append(steps * batch / timed(lambda n=name: train_steps(n), device))
            rates["ten_crop"][name].append(
                steps * len(views) / 10 / timed(lambda n=name: evaluate_views(n), device)
            )
    return {
        "device": str(device),
        "batch": batch,
        "channels_last": channels_last,
        "rates": rates,
        "macs": {
            name: multiply_adds(model.cpu().float())
            for name, model in contenders(torch.device("cpu"), False).items()
        },
    }


def report(result: dict) -> str:
    lines = [
        f"device: {result['device']}; batch {result['batch']}; channels_last {result['channels_last']}; "
        f"torch {torch.__version__}; threads {torch.get_num_threads()}"
    ]
    for name, macs in result["macs"].items():
        lines.append(f"{name}: {macs / 1e9:.3f} G multiply-adds per 224x224 image")
    mine, theirs = "replicate AlexNet", "torchvision alexnet"
    for phase, unit in (("train", "training images/s (fwd+bwd+step)"), ("ten_crop", "10-crop images/s")):
        rates = result["rates"][phase]
        for name, values in rates.items():
            lines.append(
                f"{phase:>8} {name:<20} {unit}: min {min(values):.1f} / median "
                f"{statistics.median(values):.1f} / max {max(values):.1f}"
            )
        ratios = [a / b for a, b in zip(rates[mine], rates[theirs], strict=True)]
        lines.append(
            f"{phase:>8} ratio replicate/torchvision: min {min(ratios):.2f} / median "
            f"{statistics.median(ratios):.2f} / max {max(ratios):.2f}  (target >= 1.2)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m replicate bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="steps per timed repeat")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="seconds-long run for CI: no meaningful timing")
    args = parser.parse_args(argv)
    if args.smoke:
        result = run(torch.device("cpu"), batch=2, repeats=1, steps=1, channels_last=False)
    else:
        result = run(torch.device(args.device), args.batch, args.repeats, args.steps, args.channels_last)
    print(report(result))
    return 0
