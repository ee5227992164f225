"""`python -m replicate bench-winograd`: could fewer multiplies take the faithful net to 1.2x torchvision's?

`make bench` finds every convolution already running near this CPU's multiply-add rate, so what is
left is doing fewer multiplies. PyTorch's CPU convolutions ask oneDNN for its direct algorithm; a
Winograd convolution (`replicate/kernels/winograd.py`) does fewer. This probe times it against the direct
convolution on the inputs the stride-1 layers (conv2-conv5) get in one column of the net's forward
pass, alternating: the forward alone, and forward + backward (the gradients of input, weights and
bias, as a training step needs them). Each is timed whole and as its batched matrix products alone,
the bound that free transforms would reach, for two tile sizes per layer: the one the network
takes under `speed.conv_algorithm=winograd` (`winograd.NETWORK_TILES`) and another (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from replicate.bench import records as bench_records
from replicate.bench.arguments import whole_number
from replicate.bench.layers import matrix_layers_at_work, timed
from replicate.kernels.winograd import WinogradConv, channels_last_view, conv_algorithm_unavailable_reason
from replicate.model import AlexNet

# F(m, r) tried per kernel size: the network's (`winograd.NETWORK_TILES`) and another: for 3 x 3 kernels
# F(4x4, 3x3), which does more products per output, for 5 x 5 ones F(2x2, 5x5), which rounds less.
TILES = {3: (5, 4), 5: (3, 2)}


def stride_one_layers(batch: int) -> dict[str, tuple[nn.Conv2d, torch.Tensor]]:
    """Column A's conv2-conv5 with the inputs they get in the net's forward pass."""
    torch.manual_seed(0)
    images = torch.rand(batch, 3, 224, 224) * 255 - 128  # paper-scale pixels, as `bench` uses
    layers = {}
    for name, layer, inputs, *_ in matrix_layers_at_work(AlexNet(), images, "fp32"):
        if isinstance(layer, nn.Conv2d) and layer.stride == (1, 1) and name not in layers:
            layers[name] = (layer, inputs.detach())
    return layers


def relative_error(output: torch.Tensor, exact: torch.Tensor) -> float:
    return ((output.double() - exact).abs().max() / exact.abs().max()).item()


def _alternate(contenders: dict, repeats: int, device: torch.device) -> dict[str, dict]:
    """Milliseconds of each contender, taking turns; the first round warms up (and compiles)."""
    times = {who: [] for who in contenders}
    for repeat in range(repeats + 1):
        for who, work in contenders.items():
            elapsed = timed(work, device)
            if repeat:
                times[who].append(elapsed * 1000)
    return {who: {"ms": ms} for who, ms in times.items()}


def _forward_contenders(layer: nn.Conv2d, inputs: torch.Tensor, convs: dict[str, WinogradConv]) -> dict:
    """The layer itself in the net's layout; each Winograd forward on channels-last input (the
    conversion not timed) and its one batched product."""
    nhwc = channels_last_view(inputs)
    contenders = {"direct": partial(layer, inputs)}
    for tile, conv in convs.items():
        kernels = conv.kernel_transform(layer.weight)  # once per weight update in training
        transformed = conv.input_transform(nhwc, *conv.tiles(*inputs.shape[-2:]))
        contenders[tile] = partial(conv.forward_nhwc, nhwc, kernels, layer.bias)
        contenders[f"{tile} products"] = partial(
            torch.bmm, transformed.view(conv.n**2, -1, layer.in_channels), kernels
        )
    return contenders


def _gradients(conv, x: torch.Tensor, layer: nn.Conv2d, upstream: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The gradients of input, weights and bias of conv(x, weight, bias) for this output gradient."""
    return torch.autograd.grad(conv(x, layer.weight, layer.bias), (x, layer.weight, layer.bias), upstream)


def _direct(layer: nn.Conv2d):
    """oneDNN's direct convolution with the layer's padding, called as conv(x, weight, bias)."""
    return partial(F.conv2d, padding=layer.padding)


def _gradient_errors(grads: tuple[torch.Tensor, ...], exact: tuple[torch.Tensor, ...]) -> list[float]:
    """The input and weight gradients' largest errors against their float64 values."""
    return [relative_error(g, e) for g, e in zip(grads[:2], exact, strict=True)]


def _batched_products(pairs: tuple[tuple[torch.Tensor, torch.Tensor], ...]) -> list[torch.Tensor]:
    return [torch.bmm(*pair) for pair in pairs]


def _training_contenders(
    layer: nn.Conv2d, x: torch.Tensor, upstream: torch.Tensor, convs: dict[str, WinogradConv]
) -> dict:
    """Forward + backward: the layer (oneDNN's direct passes) and each Winograd convolution (its
    autograd function, NCHW in and out as in the net), and the latter's three batched products
    alone: the forward's, the weight gradient's and the input gradient's."""
    contenders = {"direct": partial(_gradients, _direct(layer), x, layer, upstream)}
    with torch.no_grad():
        for tile, conv in convs.items():
            contenders[tile] = partial(_gradients, conv, x, layer, upstream)
            frequencies, tiles = conv.n**2, conv.tiles(*x.shape[-2:])
            transformed = conv.input_transform(channels_last_view(x), *tiles).view(
                frequencies, -1, x.shape[1]
            )
            grad = channels_last_view(upstream)
            grad_products = conv.output_transform_adjoint(grad, *tiles).view(
                frequencies, -1, upstream.shape[1]
            )
            back = conv.data_gradient
            grad_transformed = back.input_transform(grad, *back.tiles(*x.shape[-2:]))
            products = (
                (transformed, conv.kernel_transform(layer.weight)),
                (transformed.transpose(1, 2), grad_products),
                (
                    grad_transformed.view(frequencies, -1, upstream.shape[1]),
                    back.kernel_transform(layer.weight.flip(2, 3).transpose(0, 1)),
                ),
            )
            contenders[f"{tile} products"] = partial(_batched_products, products)
    return contenders


def run(batch: int, repeats: int, compiled: bool = True) -> dict:
    """Per layer and tile size, forward alone and forward + backward: milliseconds of the direct
    convolution, the Winograd one and its batched products alone, alternating; then each one's
    largest errors against the convolution in float64, relative to the largest value. The errors
    come after all the timing: made first, the float64 copies leave the heap in a state in which the
    direct convolutions run far slower than in a fresh process."""
    layers = stride_one_layers(batch)
    results: dict[str, dict] = {}
    convs: dict[str, dict[str, WinogradConv]] = {}
    upstreams: dict[str, torch.Tensor] = {}
    for name, (layer, inputs) in layers.items():
        size = layer.kernel_size[0]
        convs[name] = {
            f"F({m},{size})": WinogradConv(m, size, layer.padding[0], compiled) for m in TILES[size]
        }
        upstreams[name] = torch.randn(inputs.shape[0], layer.out_channels, *inputs.shape[-2:])
        x = inputs.clone().requires_grad_(True)
        with torch.no_grad():
            forward = _alternate(_forward_contenders(layer, inputs, convs[name]), repeats, inputs.device)
        training = _alternate(
            _training_contenders(layer, x, upstreams[name], convs[name]), repeats, inputs.device
        )
        results[name] = {
            "shape": [layer.in_channels, layer.out_channels, inputs.shape[-1], size],
            "forward": forward,
            "training": training,
        }
    for name, (layer, inputs) in layers.items():
        _record_errors(layer, inputs, upstreams[name], convs[name], results[name])
    return {
        "batch": batch,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        **bench_records.origin(),
        "layers": results,
    }


def _record_errors(
    layer: nn.Conv2d,
    inputs: torch.Tensor,
    upstream: torch.Tensor,
    convs: dict[str, WinogradConv],
    entry: dict,
) -> None:
    """Each contender's largest errors against float64, into its entry: the output of the forward,
    the input and weight gradients of forward + backward."""
    x64 = inputs.double().requires_grad_(True)
    w64, b64 = layer.weight.double(), layer.bias.double()
    exact = _direct(layer)(x64, w64, b64)
    exact_grads = torch.autograd.grad(exact, (x64, w64), upstream.double())
    x = inputs.clone().requires_grad_(True)
    with torch.no_grad():
        entry["forward"]["direct"]["error"] = relative_error(layer(inputs), exact)
    grads = _gradients(_direct(layer), x, layer, upstream)
    entry["training"]["direct"]["gradient_errors"] = _gradient_errors(grads, exact_grads)
    for tile, conv in convs.items():
        with torch.no_grad():
            out = conv.forward_nhwc(
                channels_last_view(inputs), conv.kernel_transform(layer.weight), layer.bias
            )
        entry["forward"][tile]["error"] = relative_error(out.permute(0, 3, 1, 2), exact)
        entry["training"][tile]["gradient_errors"] = _gradient_errors(
            _gradients(conv, x, layer, upstream), exact_grads
        )


def _section(lines: list[str], result: dict, part: str, title: str) -> None:
    lines.append(title)
    best: dict[str, list[float]] = {"direct": [], "winograd": [], "products": []}
    for name, entry in result["layers"].items():
        c_in, c_out, side, k = entry["shape"]
        timings = entry[part]
        direct = statistics.median(timings["direct"]["ms"])
        lines.append(
            f"  {name} ({c_in} -> {c_out}, {side} x {side}, {k} x {k}): direct median {direct:.1f} ms, "
            f"{_error_text(timings['direct'])}"
        )
        tiled = {}
        for tile in (key for key in timings if key.startswith("F(") and not key.endswith("products")):
            whole, products = (statistics.median(timings[key]["ms"]) for key in (tile, f"{tile} products"))
            tiled[tile] = (whole, products)
            lines.append(
                f"    {tile}: median {whole:.1f} ms (direct/winograd {direct / whole:.2f}), batched products "
                f"alone {products:.1f} ms (direct/products {direct / products:.2f}), "
                f"{_error_text(timings[tile])}"
            )
        whole, products = min(tiled.values())
        best["direct"].append(direct)
        best["winograd"].append(whole)
        best["products"].append(products)
    direct, whole, products = (sum(best[key]) for key in ("direct", "winograd", "products"))
    lines.append(
        f"  all {len(best['direct'])} layers, the faster tile each: direct {direct:.1f} ms, winograd "
        f"{whole:.1f} ms (direct/winograd {direct / whole:.2f}); with free transforms (products alone) "
        f"{products:.1f} ms (direct/products {direct / products:.2f})"
    )


def _error_text(timing: dict) -> str:
    if "error" in timing:
        return f"max error {timing['error']:.1e}"
    input_error, weight_error = timing["gradient_errors"]
    return f"max error of the input gradient {input_error:.1e}, of the weight gradient {weight_error:.1e}"


def report(result: dict) -> str:
    lines = [
        f"Winograd against direct convolution, one column, batch {result['batch']}; "
        f"torch {result['torch']}; threads {result['threads']}",
        bench_records.origin_line(result),
    ]
    _section(lines, result, "forward", "forward only (Winograd on channels-last input):")
    _section(
        lines,
        result,
        "training",
        "forward + backward (gradients of input, weights and bias; NCHW in and out):",
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m replicate bench-winograd",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--batch", type=whole_number(1), default=128)
    parser.add_argument("--repeats", type=whole_number(1), default=5)
    parser.add_argument("--json", type=Path, help="also write the timings here")
    parser.add_argument("--smoke", action="store_true", help="seconds-long run for CI: no meaningful timing")
    args = parser.parse_args(argv)
    bench_records.check_json_option(parser, args.json)
    if args.smoke:  # the transforms not compiled (minutes of building for seconds of running)
        result = run(2, 1, compiled=False)
    else:
        why_not = conv_algorithm_unavailable_reason("winograd", [torch.device("cpu")])
        if why_not:
            parser.error(why_not)
        result = run(args.batch, args.repeats)
    print(report(result) + (" (smoke: transforms not compiled, timings meaningless)" if args.smoke else ""))
    if args.json:
        bench_records.write(args.json, result)
    return 0
