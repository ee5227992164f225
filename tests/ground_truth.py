"""The ground truth of every test that a fast path "computes the same function" as the reference
path: the reference network in float64 on the CPU, taking the same discrete decisions as the path
under test.

Max-pooling sends each window's gradient to its winner. Where two values of a window differ only in
their last bits, any change in the order of fp32 sums (another kernel, another layout, another
processor, the reference path's own summation) can pick the other one, and the gradient of every
layer below takes another route: the fp32 reference path itself differs from float64 by 5.6e-3 in
conv1's weight gradient on a batch of 10 random images, on one processor and not on another. Such
a switch is not an error of either path, and comparing two fp32 paths through it fails on some
processors. So the float64 network here pools with the winners that the path under test picked from
its own fp32 maps (recorded by forward hooks) and computes everything else in float64: what remains
is rounding, under 3e-6 for every fp32 path and under 3e-5 for Winograd (measured on batches of 10),
whatever the processor. (A ReLU input within rounding of 0 also switches, but only through one unit:
it moves no gradient measurably.)

A test then requires the fast path's error, for the logits and for every parameter's gradient, to be
at most TOLERANCE or FACTOR times the fp32 reference path's own error, whichever is larger
(`assert_same_function`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from replicate.model import AlexNet
from replicate.speed import autocast

# A fast path's relative error against the float64 ground truth may be this large whatever the
# reference's (fp32 rounding: measured <= 3e-5, Winograd's transforms being the least exact) ...
TOLERANCE = 1e-4
# ... or this many times the fp32 reference path's own error, where that is larger.
FACTOR = 10


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """The norm of the difference over the norm of `b` (in float64)."""
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return ((a - b).norm() / b.norm()).item()


def step(model: nn.Module, network, images, labels, precision="fp32", seed=2):
    """Logits and every parameter's gradient after one forward and backward pass of `network` (which
    runs `model`'s parameters: `model` itself, a compiled or re-laid-out view of it)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks on every path (they are drawn in fp32)
    with autocast(images.device, precision):
        logits = network(images)
    F.cross_entropy(logits.float(), labels).backward()
    return logits.float(), {n: p.grad.float() for n, p in model.named_parameters()}


@contextmanager
def pooling_inputs(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """The maps each max-pooling layer of `model` received, by module name, while inside."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_hook(
            lambda _, args, __, name=name: seen.__setitem__(name, args[0].detach().float().cpu())
        )
        for name, module in model.named_modules()
        if isinstance(module, nn.MaxPool2d)  # replicate.pool.MaxPool is one
    ]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


class PoolAt(nn.Module):
    """Max-pooling whose winners are given: each window's output is its value at `winners`."""

    def __init__(self, winners: torch.Tensor) -> None:
        super().__init__()
        self.winners = winners

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return maps.flatten(2).gather(2, self.winners.flatten(2)).view(self.winners.shape)


def winners(
    reference: nn.Module, pooled: dict[str, torch.Tensor], fused: bool = False
) -> dict[str, torch.Tensor]:
    """Each of `reference`'s max-pooling layers' winners, as a path whose pools saw `pooled` chose
    them. A path with `fused` columns pools both columns' maps in column 0's modules: each column's
    half of the channels is its own (replicate/kernels/fused_columns.py)."""
    chosen = {}
    for name, module in reference.named_modules():
        if not isinstance(module, nn.MaxPool2d):
            continue
        if fused and name.startswith("columns."):
            column = int(name.split(".")[1])
            maps = pooled["columns.0." + name.split(".", 2)[2]].chunk(2, dim=1)[column]
        else:
            maps = pooled[name]
        _, chosen[name] = F.max_pool2d(
            maps.contiguous(), module.kernel_size, module.stride, return_indices=True
        )
    return chosen


def float64_with_winners(reference: nn.Module, chosen: dict[str, torch.Tensor]) -> nn.Module:
    """A float64 copy of `reference` on the CPU whose max-pooling layers take the `chosen` winners."""
    exact = copy.deepcopy(reference).cpu().double()
    if isinstance(exact, AlexNet):
        exact.fused = False  # the per-column modules: the winners are per column
    for name, indices in chosen.items():
        parent, _, child = name.rpartition(".")
        exact.get_submodule(parent)._modules[child] = PoolAt(indices)
    return exact


@dataclass
class Errors:
    """Relative errors against the float64 ground truth: the logits, and each parameter's gradient."""

    logits: float
    grads: dict[str, float]
    truth: tuple  # (the winners, (the float64 logits, gradients)): reused by a path choosing the same


def errors_against_float64(
    reference: nn.Module, model: nn.Module, network, images, labels, precision="fp32", truth=None
) -> Errors:
    """`network`'s errors (running `model`'s parameters, on any device, at `precision`) against
    `reference`'s function in float64 taking the pooling winners `network` chose. `truth`: an
    earlier result whose winners, when they are the same, spare computing it again."""
    with pooling_inputs(model) as pooled:
        logits, grads = step(model, network, images, labels, precision)
    fused = isinstance(model, AlexNet) and model.fuses_columns()
    chosen = winners(reference, pooled, fused)
    if truth is not None and same_winners(chosen, truth[0]):
        exact_logits, exact_grads = truth[1]
    else:
        exact = float64_with_winners(reference, chosen)
        exact_logits, exact_grads = step(exact, exact, images.cpu().double(), labels.cpu())
    return Errors(
        relative(logits, exact_logits),
        {name: relative(grad, exact_grads[name]) for name, grad in grads.items()},
        (chosen, (exact_logits, exact_grads)),
    )


def same_winners(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def assert_same_function(reference: nn.Module, model: nn.Module, network, images, labels) -> Errors:
    """`network` (running `model`'s parameters, which equal `reference`'s) computes `reference`'s
    function: its error against the float64 ground truth is at most TOLERANCE, or FACTOR times the
    fp32 reference path's own error, for the logits and for every parameter's gradient (computed
    only where the fast path's is above TOLERANCE)."""
    fast = errors_against_float64(reference, model, network, images, labels)
    if max(fast.logits, *fast.grads.values()) <= TOLERANCE:
        return fast
    own = errors_against_float64(reference, reference, reference, images, labels, truth=fast.truth)
    assert fast.logits <= max(TOLERANCE, FACTOR * own.logits), ("logits", fast.logits, own.logits)
    assert fast.grads.keys() == own.grads.keys()
    for name, error in fast.grads.items():
        assert error <= max(TOLERANCE, FACTOR * own.grads[name]), (name, error, own.grads[name])
    return fast
