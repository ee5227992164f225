"""Max-pooling (§3.4: overlapping, z = 3, s = 2; or the non-overlapping z = s = 2 of the ablation).

The same function as `nn.MaxPool2d`, computed in the channels-last layout on the CPU: PyTorch's CPU
kernel vectorises over the channels there and runs one output at a time in NCHW, which is slower
in forward + backward on the three pooling layers' maps, even counting the two layout conversions
(`python -m replicate bench`'s pool lines; BENCHMARKS.md, "The network"). Each window's first
maximum (row-major) is taken in both layouts, so the outputs and the indices, and so the gradients,
are identical (tested).
"""

from __future__ import annotations

import torch
from torch import nn

CHANNELS_LAST = torch.channels_last


class _ChannelsLastMaxPool(torch.autograd.Function):
    """max_pool2d on a channels-last copy; output and gradient in the input's own layout."""

    @staticmethod
    def forward(ctx, maps, kernel: int, stride: int):
        was_nchw = not maps.is_contiguous(memory_format=CHANNELS_LAST)
        maps = maps.contiguous(memory_format=CHANNELS_LAST)
        pooled, indices = torch.ops.aten.max_pool2d_with_indices(maps, [kernel] * 2, [stride] * 2)
        ctx.save_for_backward(maps, indices)
        ctx.kernel, ctx.stride, ctx.was_nchw = kernel, stride, was_nchw
        return pooled.contiguous() if was_nchw else pooled

    @staticmethod
    def backward(ctx, grad):
        maps, indices = ctx.saved_tensors
        window, step = [ctx.kernel] * 2, [ctx.stride] * 2
        grad_maps = torch.ops.aten.max_pool2d_with_indices_backward(
            grad.contiguous(memory_format=CHANNELS_LAST), maps, window, step, [0, 0], [1, 1], False, indices
        )
        return grad_maps.contiguous() if ctx.was_nchw else grad_maps, None, None


class MaxPool(nn.MaxPool2d):
    """`nn.MaxPool2d(kernel, stride)`, channels-last inside on the CPU (see the module docstring)."""

    def __init__(self, kernel: int, stride: int) -> None:
        super().__init__(kernel, stride)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        if maps.device.type == "cpu" and maps.dim() == 4:
            return _ChannelsLastMaxPool.apply(maps, self.kernel_size, self.stride)
        return super().forward(maps)  # cuDNN pools NCHW well: no layout change
