"""The exact LRN of §3.3 as two fused Triton kernels for CUDA (`speed.lrn_kernel=triton`).

`lrn.ResponseNorm` on a GPU runs its window sum as five shifted adds and its backward as a chain of
element-wise kernels: each reads and writes whole activation maps (`bench --profile`; BENCHMARKS.md,
"GPU"). Here the forward is one kernel (read the maps, write the output and the denominator) and
the backward one more (read maps, denominator and gradient, write the input gradient). Each program
walks the channels of one image's block of positions, so the window's neighbours it reads come from
its own recent loads.

Same rule and closed-form backward as `lrn._ResponseNormFunction`, summed in the same order; tests
hold the two equal (tests/kernels/test_lrn_triton.py: in Triton's interpreter on the CPU, compiled on a GPU
where one is present, and compiled ahead of time for an H100 everywhere). Inputs: fp32, contiguous,
the maps in dim -3 (N x C x H x W, or N x G x C x H x W with one column per G). Triton
is imported only when a kernel is first needed.
"""

from __future__ import annotations

import contextlib
import importlib

import torch

BLOCK = 256  # positions per program: contiguous in NCHW, so the loads coalesce


def unavailable_reason(devices: list[torch.device]) -> str | None:
    """Why the kernels cannot run on `devices`, or None when they can."""
    elsewhere = [str(d) for d in devices if d.type != "cuda"]
    if elsewhere:
        return f"the fused kernels run on CUDA devices, and this run is on {', '.join(elsewhere)}"
    try:
        import triton  # noqa: F401  (torch's Linux CUDA wheels depend on it)
    except ImportError:
        return "the triton package is not installed"
    return None


def setting_conflict(compile: bool, channels_last: bool) -> str | None:
    """Why the kernels would not run under these speed settings (`lrn.ResponseNorm` would quietly
    take the torch path), or None."""
    if not (compile or channels_last):
        return None
    return (
        "takes NCHW maps outside torch.compile, which fuses the LRN itself: set compile=false and "
        f"channels_last=false (got compile={compile}, channels_last={channels_last})"
    )


def _kernels():
    """The kernels' module, imported on first use: importing it imports triton."""
    return importlib.import_module("replicate.kernels.lrn_triton_kernels")


def _launch(kernel, maps: torch.Tensor, tensors: tuple, scalars: tuple, **constants) -> None:
    """kernel(*tensors, channels, positions, *scalars) over a grid of (images x columns, blocks of
    positions), the maps being dim -3 and the positions the last two; on the maps' own GPU (Triton
    launches on the current one, and under model_parallel a column lives on another)."""
    if not maps.numel():
        return
    channels, positions = maps.shape[-3], maps.shape[-2] * maps.shape[-1]
    grid = (maps.numel() // (channels * positions), -(-positions // BLOCK))
    with torch.cuda.device(maps.device) if maps.is_cuda else contextlib.nullcontext():
        # No fused multiply-adds: each product rounded, as in the torch path's separate kernels.
        kernel[grid](
            *tensors, channels, positions, *scalars, **constants, BLOCK=BLOCK, enable_fp_fusion=False
        )


def _check(maps: torch.Tensor, size: int) -> None:
    if maps.dtype != torch.float32 or not maps.is_contiguous() or size % 2 == 0:
        raise ValueError(
            f"the fused LRN takes contiguous fp32 maps and an odd size; got {maps.dtype}, "
            f"contiguous {maps.is_contiguous()}, size {size}"
        )


def _forward(maps, size: int, alpha: float, beta: float, k: float, keep: bool):
    _check(maps, size)
    out = torch.empty_like(maps)
    denominator = torch.empty_like(maps) if keep else out  # not written unless kept
    _launch(
        _kernels().forward, maps, (maps, out, denominator), (alpha, beta, k),
        SIZE=size, THREE_QUARTERS=beta == 0.75, KEEP=keep,
    )  # fmt: skip
    return out, denominator


class _FusedResponseNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, maps, size: int, alpha: float, beta: float, k: float):
        out, denominator = _forward(maps, size, alpha, beta, k, keep=True)
        ctx.save_for_backward(maps, denominator)
        ctx.size, ctx.alpha, ctx.beta = size, alpha, beta
        return out

    @staticmethod
    def backward(ctx, grad):
        maps, denominator = ctx.saved_tensors
        result = torch.empty_like(maps)
        _launch(
            _kernels().backward, maps, (maps, denominator, grad.contiguous(), result), (ctx.alpha, ctx.beta),
            SIZE=ctx.size, THREE_QUARTERS=ctx.beta == 0.75,
        )  # fmt: skip
        return result, None, None, None, None


def fused_response_norm(maps: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
    """b = a / (k + alpha * sum of a^2 over `size` adjacent maps) ** beta, in one kernel (and one for
    the gradient). Without autograd (evaluation) the denominator is not kept."""
    if torch.is_grad_enabled() and maps.requires_grad:
        return _FusedResponseNorm.apply(maps, size, alpha, beta, k)
    return _forward(maps, size, alpha, beta, k, keep=False)[0]


def triton_response_norm(
    maps: torch.Tensor, rule: tuple[int, float, float, float], rectify: bool
) -> torch.Tensor | None:
    """`ResponseNorm`'s fast path under `lrn_kernel=triton` (`lrn.FastPath`): contiguous maps on a GPU
    (the ReLU stays a module of its own under this kernel, so `rectify` is never set here)."""
    if rectify or not (maps.is_cuda and maps.is_contiguous()):
        return None
    return fused_response_norm(maps, *rule)
