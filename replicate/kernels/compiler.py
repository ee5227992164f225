"""torch.compile for the small functions the fast paths fuse (the LRN's, Winograd's transforms), and
a probe that names the compiler's failure before a run starts instead of at its first step."""

from __future__ import annotations

import torch

# How many shapes (and layouts, and training/evaluation variants) one `compiled_kernel` is built for
# before dynamo stops compiling it and runs the plain torch ops instead. Its default of 8 is reached
# in one `make bench` process (training, 10-crop and layer-bench shapes of the LRN), silently.
COMPILED_SHAPES = 64


def compiled_kernel(function):
    """torch.compile(function), built once per input shape and layout (dynamic=False: fixed sizes
    vectorise best), up to COMPILED_SHAPES builds. For small functions fused into one or two kernels
    each, not for a whole model (`replicate.speed.compiled`)."""
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
