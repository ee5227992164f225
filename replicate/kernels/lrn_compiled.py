"""The LRN of §3.3 with its forward and closed-form backward each fused into one kernel by
torch.compile (`speed.lrn_kernel=compiled`): a C++ loop nest on the CPU, Triton on a GPU. The same
rule and backward as `lrn._ResponseNormFunction`; tests hold the two equal (tests/test_lrn.py)."""

from __future__ import annotations

from functools import cache

import torch

from replicate.kernels.compiler import compile_failure, compiled_kernel
from replicate.lrn import inverse_power, window_sum


def _normalise(
    inputs: torch.Tensor, size: int, alpha: float, beta: float, k: float, rectify: bool, channels_last: bool
):
    """b and s^-beta, for torch.compile to fuse into one kernel; `rectify`: the maps are relu(inputs);
    `channels_last`: b is written in that layout, whatever the input's."""
    maps = inputs.relu() if rectify else inputs
    scale = inverse_power(window_sum(maps * maps, size, alpha) + k, beta)
    out = maps * scale
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out, scale


def _normalise_backward(
    grad, inputs, scale, size: int, alpha: float, beta: float, k: float, rectify: bool, contiguous: bool
):
    """The closed form of `_ResponseNormFunction.backward`, the denominator recomputed from the maps
    (one tensor less to keep; the fused kernel reads the maps anyway), then the ReLU's if `rectify`;
    `contiguous`: the gradient is written in the (N, C, H, W) layout, whatever the incoming one's."""
    maps = inputs.relu() if rectify else inputs
    denominator = window_sum(maps * maps, size, alpha) + k
    grad_scaled = grad * scale
    correction = window_sum(grad_scaled * maps / denominator, size)
    grad_maps = grad_scaled - (2 * alpha * beta) * maps * correction
    grad_maps = torch.where(inputs > 0, grad_maps, 0.0) if rectify else grad_maps  # as threshold_backward
    return grad_maps.contiguous() if contiguous else grad_maps


@cache
def _compiled(function):
    """`compiled_kernel(function)`, built on first use (importing this module starts no compiler)."""
    return compiled_kernel(function)


def compiled_unavailable_reason(devices: list[torch.device]) -> str | None:
    """Why torch.compile cannot build the LRN's kernels on `devices` (no C++ compiler on the CPU, say),
    or None: tries it once per device on a few numbers, so that a run fails before its first step."""
    for device in devices:
        # a fixed probe: trying the compiler draws nothing from the global RNG (weights, dropout)
        maps = torch.linspace(-1, 1, 20, device=device).view(1, 5, 2, 2).requires_grad_()
        why = compile_failure(
            lambda maps=maps: torch.autograd.grad(
                _CompiledResponseNormFunction.apply(maps, 5, 1e-4, 0.75, 2.0, True).sum(), maps
            )
        )
        if why:
            return f"torch.compile could not build the LRN's kernels on {device} ({why})"
    return None


class _CompiledResponseNormFunction(torch.autograd.Function):
    """`_ResponseNormFunction` with forward and backward each compiled into one fused kernel, the ReLU
    before it inside them if `rectify`; keeps its input and s^-beta for backward (two tensors, not
    three).

    On the CPU the output of (N, C, H, W) maps is channels-last: the max-pooling after every LRN of
    the net works in that layout there (`replicate/pool.py`), and the layout change written by this
    kernel saves the pooling's copy of the maps, forward and backward (BENCHMARKS.md). The input's
    gradient comes back in the input's own layout."""

    @staticmethod
    def forward(ctx, inputs, size: int, alpha: float, beta: float, k: float, rectify: bool):
        channels_last = inputs.device.type == "cpu" and inputs.dim() == 4
        out, scale = _compiled(_normalise)(inputs, size, alpha, beta, k, rectify, channels_last)
        ctx.save_for_backward(inputs, scale)
        ctx.rule = (size, alpha, beta, k, rectify)
        ctx.contiguous = channels_last and inputs.is_contiguous()
        return out

    @staticmethod
    def backward(ctx, grad):
        inputs, scale = ctx.saved_tensors
        grad_inputs = _compiled(_normalise_backward)(grad, inputs, scale, *ctx.rule, ctx.contiguous)
        return grad_inputs, None, None, None, None, None


def compiled_response_norm(
    maps: torch.Tensor, rule: tuple[int, float, float, float], rectify: bool
) -> torch.Tensor:
    """`ResponseNorm`'s fast path under `lrn_kernel=compiled` (`lrn.FastPath`): applies everywhere."""
    return _CompiledResponseNormFunction.apply(maps, *rule, rectify)
