"""Per-layer timings for `make bench`: where a training step's time goes, layer by layer.

`layer_times`: this repo's LRN and max-pooling against torch's own, on one column's maps.
`matrix_layer_times`: every convolution and fully-connected layer of torchvision's net and of ours
(per-column path), each at the input it gets in its network's forward pass. Those layers hold all
the multiply-adds, which the two networks share to within 1.4%; their sum set against a whole step
says how much of the step is that shared arithmetic and how much is the rest (LRN, pooling,
activations, dropout, the optimiser).
"""

from __future__ import annotations

import time
from functools import partial

import torch
from torch import nn

from replicate.lrn import ResponseNorm, reference_response_norm
from replicate.pool import MaxPool
from replicate.speed import Precision, autocast, memory_format, use_lrn_kernel


def timed(function, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _forward_backward(layer, inputs: torch.Tensor, upstream: torch.Tensor, params: tuple = ()) -> None:
    wrt = ((inputs,) if inputs.requires_grad else ()) + params
    torch.autograd.grad(layer(inputs), wrt, upstream)


def layer_times(
    device: torch.device, batch: int, repeats: int, channels_last: bool, lrn_kernel: str = "torch"
) -> dict:
    """Forward + backward milliseconds of one column's LRN layers (§3.3) and max-pooling layers
    (§3.4), ours against torch's own, alternating: `ResponseNorm` (its own autograd function) vs
    `F.local_response_norm` computing the same rule, and `MaxPool` (channels-last inside on the
    CPU) vs `nn.MaxPool2d`; also the LRN on the kernel the networks run (`lrn_kernel`, resolved):
    torch.compile's fused kernels, or on a GPU the hand-written Triton ones (`lrn_triton`)."""
    norm = ResponseNorm()
    pairs = {
        "lrn": {
            "ours": norm,
            "torch F.local_response_norm": partial(
                reference_response_norm, size=norm.size, alpha=norm.alpha, beta=norm.beta, k=norm.k
            ),
        },
        "pool": {"ours": MaxPool(3, 2), "torch nn.MaxPool2d": nn.MaxPool2d(3, 2)},
    }
    if lrn_kernel == "compiled" or (lrn_kernel == "triton" and not channels_last):  # Triton's: NCHW maps
        pairs["lrn"][f"ours ({lrn_kernel})"] = ResponseNorm()
        use_lrn_kernel(pairs["lrn"][f"ours ({lrn_kernel})"], lrn_kernel)
    shapes = {  # one column's maps where each layer reads them (a 224 x 224 input)
        "lrn": {"lrn1": (48, 55), "lrn2": (128, 27)},
        "pool": {"pool1": (48, 55), "pool2": (128, 27), "pool5": (128, 13)},
    }
    times: dict[str, dict[str, dict[str, list[float]]]] = {}
    for kind, layers in pairs.items():
        times[kind] = {}
        for name, (maps, side) in shapes[kind].items():
            inputs = torch.rand(batch, maps, side, side, device=device) * 100
            inputs = inputs.contiguous(memory_format=memory_format(channels_last)).requires_grad_()
            upstream = torch.randn_like(layers["ours"](inputs.detach()))
            measured = times[kind][f"{name} ({maps} x {side} x {side})"] = {who: [] for who in layers}
            for repeat in range(repeats + 1):  # the first round warms up
                for who, layer in layers.items():
                    elapsed = timed(partial(_forward_backward, layer, inputs, upstream), device)
                    if repeat:
                        measured[who].append(elapsed * 1000)
    return times


def layer_multiply_adds(layer: nn.Conv2d | nn.Linear, output: torch.Tensor) -> int:
    """Of one forward pass of `layer` that produced `output` (the whole batch)."""
    if isinstance(layer, nn.Conv2d):
        return (
            output.numel() * layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
        )
    return output.numel() * layer.in_features


def paper_layer_names(model: nn.Module) -> dict[nn.Module, str]:
    """conv1 ... fc8 for each Conv2d and Linear: ours by `named_layers` (both columns' halves share a
    name), any other net by order (its i-th convolution conv{i}, its j-th linear layer fc{5 + j})."""
    if hasattr(model, "named_layers"):
        return {layer: name for name, layer in model.named_layers()}
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return {
        **{layer: f"conv{i}" for i, layer in enumerate(convs, 1)},
        **{layer: f"fc{5 + j}" for j, layer in enumerate(linears, 1)},
    }


def matrix_layers_at_work(model: nn.Module, images: torch.Tensor, precision: Precision) -> list[tuple]:
    """(paper name, layer, its input, an upstream gradient, multiply-adds of its forward + backward)
    for every Conv2d and Linear of `model`, captured from one training-mode forward pass of `images`."""
    captured: list[tuple] = []
    names = paper_layer_names(model)

    def capture(layer: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        work = layer_multiply_adds(layer, output)
        # backward: the weight gradient always, the input gradient where the input needs one (not conv1)
        work *= 3 if inputs[0].requires_grad else 2
        upstream = torch.randn_like(output)
        grad = inputs[0].requires_grad
        captured.append((names[layer], layer, inputs[0].detach().requires_grad_(grad), upstream, work))

    hooks = [layer.register_forward_hook(capture) for layer in names]
    try:  # with autograd on, so that each input says whether its layer's backward needs its gradient
        with autocast(images.device, precision):
            model.train()(images)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def matrix_layer_times(
    models: dict[str, nn.Module], images: torch.Tensor, repeats: int, precision: Precision
) -> dict[str, dict]:
    """Each contender's convolution and fully-connected layers, forward + backward (weight gradients,
    and input gradients where its forward needs them), one layer at a time, eager, in the memory
    format and precision of its forward pass: summed milliseconds per repeat, contenders alternating,
    and the multiply-adds that work is; the same per paper layer (`layers`, ours summing its columns)."""
    at_work = {name: matrix_layers_at_work(model, images, precision) for name, model in models.items()}
    times: dict[str, dict] = {}
    for name, layers in at_work.items():
        per_layer = {paper: {"ms": [], "multiply_adds": 0} for paper, *_ in layers}
        for paper, *_, work in layers:
            per_layer[paper]["multiply_adds"] += work
        times[name] = {"ms": [], "multiply_adds": sum(work for *_, work in layers), "layers": per_layer}
    for repeat in range(repeats + 1):  # the first round warms up
        for name, layers in at_work.items():
            spent = dict.fromkeys(times[name]["layers"], 0.0)
            for paper, layer, inputs, upstream, _ in layers:
                params = tuple(p for p in layer.parameters() if p.requires_grad)
                with autocast(images.device, precision):
                    spent[paper] += timed(
                        partial(_forward_backward, layer, inputs, upstream, params), images.device
                    )
            if repeat:
                times[name]["ms"].append(sum(spent.values()) * 1000)
                for paper, seconds in spent.items():
                    times[name]["layers"][paper]["ms"].append(seconds * 1000)
    return times
