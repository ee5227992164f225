"""Speed options of training and evaluation, each off by default where it changes the numerics.

The paper trained in fp32 (§5; the 2012 code had nothing else), so `precision: fp32` is the default
and means fp32 everywhere, convolutions too: PyTorch lets cuDNN use TF32 by default on Ampere and
later GPUs, which `fp32` turns off. `tf32` allows it for convolutions and matrix products; `bf16`
runs them under bf16 autocast (weights, optimiser and LRN stay fp32). `channels_last` and
`compile` (with `compile_mode: reduce-overhead`, CUDA graphs as well) leave the arithmetic as it is
up to summation order, as does the fused-column path
(`AlexNet.fused`), which is off by default because it measured slower (BENCHMARKS.md). Tests hold
each one equal to the reference path within its tolerance (tests/test_speed.py).

One option is about the process, not the arithmetic: `keep_freed_memory`, on for every
`python -m replicate` command (BENCHMARKS.md measures it).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from typing import Literal

import torch
from torch import nn

try:
    import resource
except ImportError:  # Windows
    resource = None

Precision = Literal["fp32", "tf32", "bf16"]
# torch.compile's modes; reduce-overhead also replays each step as a CUDA graph (one launch for the
# step's hundreds of kernels). max-autotune would time kernel variants at every start: not offered.
CompileMode = Literal["default", "reduce-overhead"]

KEEP_FREED_MEMORY = "ALEXNET_KEEP_FREED_MEMORY"  # set to 0 to leave the C library's allocator as it is
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's <malloc.h>


def keep_freed_memory() -> bool:
    """Make the C library's malloc keep freed memory for reuse instead of handing it back to the kernel.

    PyTorch's CPU tensors come straight from malloc. glibc serves every block above its mmap threshold
    (32 MiB at most) with a fresh mmap and unmaps it when freed, so every large activation of every
    training step is new memory that the kernel maps and zeroes page by page on first touch; on the
    2-core machine that was about 30% of this network's training step (BENCHMARKS.md). With mmap
    and trimming off, freed blocks return to the heap and the next step reuses them. The price: the
    process holds on to its peak memory until it exits. `ALEXNET_KEEP_FREED_MEMORY=0` turns it off;
    it does nothing where the C library has no `mallopt` (macOS, Windows). Returns whether it is on.
    """
    if os.environ.get(KEEP_FREED_MEMORY, "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, TypeError):  # no mallopt, or no C library to open by None
        return False
    # mallopt returns 1 on success; both must hold, or some blocks would still be unmapped
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1


def page_faults() -> int:
    """Minor page faults of this process so far (pages mapped on first touch), the cost that
    `keep_freed_memory` saves; 0 where the platform does not count them (Windows has no `resource`)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


def allocator_note(kept: bool) -> str:
    return (
        "freed memory kept for reuse"
        if kept
        else f"malloc as the C library sets it ({KEEP_FREED_MEMORY}=0 or no mallopt)"
    )


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


def speed_up(
    model: nn.Module, channels_last: bool, compile: bool, compile_mode: CompileMode = "default"
) -> nn.Module:
    """The model in channels-last layout (in place) and/or wrapped by torch.compile. The returned
    module shares the parameters: checkpoints are still written from the original one."""
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return torch.compile(model, mode=compile_mode) if compile else model


def begin_step(compile_mode: CompileMode) -> None:
    """Before each training forward under CUDA graphs: the previous step's outputs may be overwritten
    (torch.compiler.cudagraph_mark_step_begin)."""
    if compile_mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()


# How many shapes (and layouts, and training/evaluation variants) one `compiled_kernel` is built for
# before dynamo stops compiling it and runs the plain torch ops instead: its default of 8 was reached in
# one `make bench` process (training, 10-crop and layer-bench shapes of the LRN), silently.
COMPILED_SHAPES = 64


def compiled_kernel(function):
    """torch.compile(function), built once per input shape and layout (dynamic=False: fixed sizes
    vectorise best), up to COMPILED_SHAPES builds. For the small functions that this repo fuses into
    one or two kernels each (the LRN's, Winograd's transforms), not for a whole model (`speed_up`)."""
    compiled = torch.compile(function, dynamic=False)

    def call(*args):
        with torch._dynamo.config.patch(cache_size_limit=COMPILED_SHAPES):
            return compiled(*args)

    return call


def compile_failure(attempt) -> str | None:
    """None if `attempt()`, which builds something with torch.compile, runs; else the compiler's own
    error in one line ("InvalidCxxCompiler: No working C++ compiler found ..."), so that a run can
    name it before its first step."""
    from torch._dynamo.exc import TorchDynamoException

    try:
        attempt()
    except TorchDynamoException as error:
        cause = getattr(error, "inner_exception", None) or error
        first = next((line for line in str(cause).splitlines() if line.strip()), "")
        return f"{type(cause).__name__}: {first}"
    return None
