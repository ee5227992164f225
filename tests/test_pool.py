"""replicate.pool.MaxPool: the same outputs, indices and gradients as nn.MaxPool2d (§3.4)."""

import pytest
import torch
import torch.nn.functional as F

from replicate.pool import MaxPool


@pytest.mark.parametrize("kernel, stride", [(3, 2), (2, 2)])  # §3.4 overlapping; the ablation's z = s = 2
@pytest.mark.parametrize("side", [55, 27, 13, 12])
@pytest.mark.parametrize("channels_last", [False, True])
def test_max_pool_equals_torch_in_value_gradient_and_layout(kernel, stride, side, channels_last):
    torch.manual_seed(side)
    # Coarse values after a ReLU: many windows hold tied maxima (zeros and repeats), where the
    # first maximum must win in both layouts or the gradient lands on another pixel.
    maps = (torch.randn(3, 8, side, side) * 2).round().relu()
    if channels_last:
        maps = maps.contiguous(memory_format=torch.channels_last)
    ours_in, torch_in = maps.clone().requires_grad_(), maps.clone().requires_grad_()
    ours, expected = MaxPool(kernel, stride)(ours_in), F.max_pool2d(torch_in, kernel, stride)
    assert torch.equal(ours, expected)
    assert ours.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    grad = torch.randn_like(expected)
    ours.backward(grad)
    expected.backward(grad)
    assert torch.equal(ours_in.grad, torch_in.grad)
    assert ours_in.grad.stride() == maps.stride()  # the gradient in the input's own layout


def test_max_pool_without_gradients_and_in_bf16():
    maps = torch.randn(2, 96, 55, 55).relu()
    with torch.no_grad():
        assert torch.equal(MaxPool(3, 2)(maps), F.max_pool2d(maps, 3, 2))
    half = maps.bfloat16()
    assert torch.equal(MaxPool(3, 2)(half), F.max_pool2d(half, 3, 2))
    assert "kernel_size=3, stride=2" in repr(MaxPool(3, 2))
