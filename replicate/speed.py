"""Speed options of training and evaluation, each off by default where it changes the numerics.

The paper trained in fp32 (§5; the 2012 code had nothing else), so `precision: fp32` is the default
and means fp32 everywhere, convolutions too: PyTorch lets cuDNN use TF32 by default on Ampere and
later GPUs, which `fp32` turns off. `tf32` allows it for convolutions and matrix products; `bf16`
runs them under bf16 autocast (weights, optimiser and LRN stay fp32). `channels_last` and
`compile` leave the arithmetic as it is up to summation order, as does the fused-column path
(`AlexNet.fused`), which is off by default because it measured slower (BENCHMARKS.md). Tests hold
each one equal to the reference path within its tolerance (tests/test_speed.py).
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
from torch import nn

Precision = Literal["fp32", "tf32", "bf16"]


def set_precision(precision: Precision) -> None:
    """TF32 on for `tf32` only; `fp32` turns off cuDNN's default TF32 convolutions."""
    allow = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    """bf16 autocast for `bf16`, nothing otherwise."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def speed_up(model: nn.Module, channels_last: bool, compile: bool) -> nn.Module:
    """The model in channels-last layout (in place) and/or wrapped by torch.compile. The returned
    module shares the parameters: checkpoints are still written from the original one."""
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return torch.compile(model) if compile else model
