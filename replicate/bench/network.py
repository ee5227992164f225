"""`make bench`: training-step and 10-crop images/s of this repo's two-column net vs torchvision's AlexNet.

Both networks run on the same device, in this one process, alternating, several repeats; each
figure is forward + backward + optimiser step on one batch (training) or a 10-view forward pass
(evaluation). torchvision's `alexnet` is the single-column "one weird trick" net (no LRN, 64-192-
384-256-256 kernels): about the same multiply-adds, printed below, so the ratio measures cost of
fidelity, not of work. It also times this repo's LRN against torch's `F.local_response_norm` and
its max-pooling against `nn.MaxPool2d` on one column's maps, times each net's conv and fc layers
alone against its whole step (`bench.layers`), and reports the allocator setting
(`speed.keep_freed_memory`).
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace
from pathlib import Path
from typing import get_args

import torch
import torch.nn.functional as F
from torch import nn

from replicate import devices
from replicate.bench import records as bench_records
from replicate.bench.arguments import whole_number
from replicate.bench.layers import layer_multiply_adds, layer_times, matrix_layer_times, timed
from replicate.bench.records import FUSED, PER_COLUMN, TORCHVISION
from replicate.config import ConfigError
from replicate.kernels.winograd import ConvAlgorithm
from replicate.model import ModelConfig
from replicate.optim import OptimConfig, paper_optimizer
from replicate.speed import (
    CompileMode,
    LRNKernel,
    Precision,
    SpeedConfig,
    allocator_note,
    autocast,
    begin_step,
    build_network,
    compiled,
    keep_freed_memory,
    memory_format,
    page_faults,
)

# `run`'s warm-up: rounds until QUIET_ROUNDS in a row each map at most QUIET_PAGE_FAULTS new pages
# (16 MiB), WARM_UP_ROUNDS_MAX rounds at most. One quiet round is not enough: the Winograd net's steps
# can map new pages again in the round after a quiet one.
QUIET_ROUNDS, QUIET_PAGE_FAULTS, WARM_UP_ROUNDS_MAX = 2, 4096, 8


def multiply_adds(model: nn.Module, side: int = 224) -> int:
    """Multiply-adds of one forward pass of a 3 x side x side image (conv and linear layers).

    Counted on AlexNet's per-column path, whose modules the hooks see; the fused path does the
    same multiply-adds (its grouped convolutions are the columns' convolutions side by side)."""
    total = 0
    fused = getattr(model, "fused", None)
    if fused is not None:
        model.fused = False

    def count(module: nn.Module, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        total += layer_multiply_adds(module, output)  # the batch is one image

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, side, side))
    for hook in hooks:
        hook.remove()
    if fused is not None:
        model.fused = fused
    return total


def contenders(device: torch.device, speed: SpeedConfig) -> dict[str, tuple[nn.Module, nn.Module]]:
    """name -> (module, what to call: the same module, or its compiled wrapper). This repo's nets are
    built by `build_network`, as training builds them; torchvision's takes the layout and compile."""
    from torchvision.models import alexnet  # here, not on import: seconds for every CLI command

    torch.manual_seed(0)
    fused = replace(speed, fused_columns=True, conv_algorithm="direct")  # it calls F.conv2d itself
    models = {
        TORCHVISION: alexnet(num_classes=1000).to(device, memory_format=memory_format(speed.channels_last)),
        FUSED: build_network(ModelConfig(), fused, [device]),
        PER_COLUMN: build_network(ModelConfig(), replace(speed, fused_columns=False), [device]),
    }
    return {name: (model, compiled(model, speed)) for name, model in models.items()}


def run(
    device: torch.device, batch: int, repeats: int, steps: int, options: SpeedConfig, profile: bool = False
) -> dict:
    torch.backends.cudnn.benchmark = True  # each contender gets cuDNN's fastest algorithms for its shapes
    models = contenders(device, options)
    optimizers = {name: paper_optimizer(model, OptimConfig()) for name, (model, _) in models.items()}
    memory = memory_format(options.channels_last)
    # Paper-scale inputs (0-255 minus a mean), fresh random values, never zeros.
    images = (torch.rand(batch, 3, 224, 224, device=device) * 255 - 128).contiguous(memory_format=memory)
    views = (torch.rand(max(batch // 10, 1), 10, 3, 224, 224, device=device) * 255 - 128).flatten(0, 1)
    views = views.contiguous(memory_format=memory)
    labels = torch.randint(0, 1000, (batch,), device=device)

    def train_steps(name: str) -> None:
        (model, network), optimizer = models[name], optimizers[name]
        model.train()
        for _ in range(steps):
            begin_step(options.compile_mode)
            with autocast(device, options.precision):
                logits = network(images)
            loss = F.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def evaluate_views(name: str) -> None:
        model, network = models[name]
        model.eval()
        with torch.no_grad(), autocast(device, options.precision):
            for _ in range(steps):
                network(views).float().softmax(-1)

    rates: dict[str, dict[str, list[float]]] = {
        "train": {n: [] for n in models},
        "ten_crop": {n: [] for n in models},
    }
    # Warm-up (allocator, kernels, compilation, first touch of memory): rounds of every contender's
    # training steps and 10-crop passes, until the heap has room for all their large blocks. Before
    # that a step can map fresh pages, whose first touch is slow (on a small VM very slow). The timed
    # repeats' own page faults are recorded, so a record shows whether they still did.
    warm_up_rounds = quiet_rounds = 0
    while warm_up_rounds < WARM_UP_ROUNDS_MAX and quiet_rounds < QUIET_ROUNDS:
        before = page_faults()
        for name in models:
            train_steps(name)
            evaluate_views(name)
        warm_up_rounds += 1
        quiet_rounds = quiet_rounds + 1 if page_faults() - before <= QUIET_PAGE_FAULTS else 0
    faults_in_repeats = 0
    for _ in range(repeats):
        for name in models:
            before = page_faults()
            rates["train"][name].append(steps * batch / timed(lambda n=name: train_steps(n), device))
            rates["ten_crop"][name].append(
                steps * len(views) / 10 / timed(lambda n=name: evaluate_views(n), device)
            )
            faults_in_repeats += page_faults() - before
    if profile:  # where one training step's time goes, per contender
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        for name in models:
            with torch.profiler.profile(activities=activities) as profiler:
                train_steps(name)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            print(f"--- profile: {name}, {steps} training step(s) ---")
            print(profiler.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=60))
    return {
        **layer_times(device, batch, repeats, options.channels_last, options.lrn_kernel),
        # the fused path's convolutions are no modules of their own (F.conv2d on the columns' weights)
        "matrix_layers": matrix_layer_times(
            {name: models[name][0] for name in (TORCHVISION, PER_COLUMN)}, images, repeats, options.precision
        ),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        **bench_records.origin(),
        "batch": batch,
        "options": str(options),
        "torch": f"{torch.__version__}; threads {torch.get_num_threads()}",
        "rates": rates,
        "warm_up": {"rounds": warm_up_rounds, "page_faults_in_timed_repeats": faults_in_repeats},
        "macs": {  # the fused and per-column paths do the same multiply-adds
            ("replicate AlexNet" if name == FUSED else name): multiply_adds(model.cpu().float())
            for name, (model, _) in contenders(torch.device("cpu"), SpeedConfig()).items()
            if name != PER_COLUMN
        },
    }


def report(result: dict, saved: bool = False) -> str:
    versions = (
        result.get("torch", "?") if saved else f"{torch.__version__}; threads {torch.get_num_threads()}"
    )
    lines = [f"device: {result['device']}; batch {result['batch']}; {result['options']}; torch {versions}"]
    lines.append(bench_records.origin_line(result))
    lines.append(f"allocator: {result.get('allocator', 'not recorded')}")
    if "warm_up" in result:  # the H100 records name no warm-up (two fixed rounds)
        warm_up = result["warm_up"]
        lines.append(
            f"warm-up: {warm_up['rounds']} round(s); page faults during the timed repeats: "
            f"{warm_up['page_faults_in_timed_repeats']}"
        )
    for name, macs in result["macs"].items():
        lines.append(f"{name}: {macs / 1e9:.3f} G multiply-adds per 224x224 image")
    for phase, unit in (("train", "training images/s (fwd+bwd+step)"), ("ten_crop", "10-crop images/s")):
        rates = result["rates"][phase]
        for name, values in rates.items():
            lines.append(
                f"{phase:>8} {name:<22} {unit}: min {min(values):.1f} / median "
                f"{statistics.median(values):.1f} / max {max(values):.1f}"
            )
        for mine in (FUSED, PER_COLUMN):
            ratios = [a / b for a, b in zip(rates[mine], rates[TORCHVISION], strict=True)]
            lines.append(
                f"{phase:>8} ratio {mine}/torchvision: min {min(ratios):.2f} / median "
                f"{statistics.median(ratios):.2f} / max {max(ratios):.2f}  (target >= 1.2)"
            )
    for kind in ("lrn", "pool"):  # the H100 records have neither
        for layer, times in result.get(kind, {}).items():
            reference = next(name for name in times if name.startswith("torch"))
            # ours, and ours on the networks' kernel (compiled, triton), each against torch's
            for mine in (name for name in times if name != reference):
                speedups = [b / a for a, b in zip(times[mine], times[reference], strict=True)]
                medians = {
                    name: f"median {statistics.median(times[name]):.1f} ms" for name in (mine, reference)
                }
                lines.append(
                    f"    {layer}, one column, fwd+bwd: {mine} {medians[mine]}, "
                    f"{reference} {medians[reference]}; "
                    f"torch/{mine} min {min(speedups):.2f} / median {statistics.median(speedups):.2f} / max "
                    f"{max(speedups):.2f}"
                )
    lines += _matrix_layer_lines(result)
    return "\n".join(lines)


def _matrix_layer_lines(result: dict) -> list[str]:
    """Each contender's conv + fc layers against its whole training step (the H100 records have no
    such timings)."""
    matrix = result.get("matrix_layers", {})
    if not matrix:
        return []
    step_ms = {
        name: 1000 * result["batch"] / statistics.median(v) for name, v in result["rates"]["train"].items()
    }
    lines = [
        "conv + fc layers, fwd+bwd, each layer alone (eager), on its input in the contender's forward pass:"
    ]
    for name, record in matrix.items():
        times = record["ms"]
        median = statistics.median(times)
        lines.append(
            f"   {name:<22} min {min(times):.1f} / median {median:.1f} / max {max(times):.1f} ms "
            f"({record['multiply_adds'] / median / 1e6:.1f} G multiply-adds/s) of a "
            f"{step_ms[name]:.1f} ms training step: {step_ms[name] - median:.1f} ms for all else"
        )
    lines.append(
        f"   1.2x torchvision's median training rate is a step of {step_ms[TORCHVISION] / 1.2:.1f} ms"
    )
    if all("layers" in record for record in matrix.values()):
        lines.append("   per layer, median ms (G multiply-adds/s), replicate's columns summed:")
        lines.append("     layer " + "".join(f"{name:>26}" for name in matrix))
        for layer in matrix[TORCHVISION]["layers"]:
            cells = []
            for record in matrix.values():
                timing = record["layers"][layer]
                median = statistics.median(timing["ms"])
                cells.append(f"{median:.1f} ({timing['multiply_adds'] / median / 1e6:.1f})")
            lines.append(f"     {layer:<6}" + "".join(f"{cell:>26}" for cell in cells))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m replicate bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default=devices.AUTO, help="auto (default): the first GPU, else the CPU")
    parser.add_argument("--batch", type=whole_number(1), default=128)
    parser.add_argument("--repeats", type=whole_number(1), default=5)
    parser.add_argument("--steps", type=whole_number(1), default=2, help="steps per timed repeat")
    parser.add_argument("--precision", choices=get_args(Precision), default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument(
        "--compile",
        nargs="?",
        const="default",
        choices=get_args(CompileMode),
        help="torch.compile every contender, in this mode (reduce-overhead: CUDA graphs too)",
    )
    parser.add_argument(
        "--lrn-kernel",
        choices=get_args(LRNKernel),
        default="auto",
        help="replicate's LRN layers: torch ops, torch.compile's fused kernels, or Triton ones (CUDA); "
        "auto (default): as training takes them (the compiled kernels on the CPU, torch ops on a GPU)",
    )
    parser.add_argument(
        "--conv-algorithm",
        choices=get_args(ConvAlgorithm),
        default="auto",
        help="replicate's stride-1 convolutions: the backend's (direct on the CPU), or Winograd (CPU); "
        "auto (default): as training takes them (Winograd on the CPU, the backend's on a GPU)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="also print a profile of each contender's step"
    )
    parser.add_argument("--json", type=Path, help="also write the raw rates here")
    parser.add_argument(
        "--report", type=Path, nargs="+", help="print saved --json records instead of measuring"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="seconds-long run (CI): batch 2, one repeat of one step, with the device and options given; "
        "no meaningful timing",
    )
    args = parser.parse_args(argv)
    if args.report:
        try:
            records = [
                bench_records.read(path, parser.prog, bench_records.BENCH_REPORT_KEYS) for path in args.report
            ]
        except bench_records.RecordError as error:
            parser.error(str(error))
        print("\n\n".join(report(record, saved=True) for record in records))
        return 0
    bench_records.check_json_option(parser, args.json)
    try:
        device = devices.resolve(args.device, "--device")
    except ConfigError as error:
        parser.error(str(error))
    try:
        options = SpeedConfig(
            args.precision,
            args.channels_last,
            bool(args.compile),
            args.compile or "default",
            lrn_kernel=args.lrn_kernel,
            conv_algorithm=args.conv_algorithm,
        ).resolved([device])
        why_not = options.unavailable_reason([device], flags=True)
    except ConfigError as error:
        parser.error(str(error))
    if why_not:
        parser.error(why_not)
    kept = keep_freed_memory()  # as every `python -m replicate` command does; applies to all contenders
    batch, repeats, steps = (2, 1, 1) if args.smoke else (args.batch, args.repeats, args.steps)
    result = run(device, batch, repeats, steps, options, args.profile)
    if args.smoke:
        result["options"] += " (smoke: timings meaningless)"
    result["allocator"] = allocator_note(kept)
    print(report(result))
    if args.json:
        bench_records.write(args.json, result)
    return 0
