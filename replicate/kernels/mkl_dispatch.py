"""Work around a silent-precision race in the CPU math library that torch ships (oneMKL's VML).

ATen hands contiguous float unary ops (`sqrt`, `exp`, `log`, `tanh`, ...) to MKL VML, each intra-op
thread calling it on its own chunk, and VML picks each function's kernel on that function's first
call. When that first call runs on several threads at once, one thread can run a low-accuracy
kernel over its whole chunk, once (pytorch/pytorch#188792; oneMKL 2024.2). In this network that is
the LRN's `sqrt` (lrn.inverse_power), the process's first big one: in a few fresh processes in a
hundred, one thread's half of the first batch's LRN1 outputs comes out up to 2.8e-4 off (relative,
thousands of ulp), so two runs with the same seed differ from the first step on. With this module
imported, repeated fresh processes compute the same first step bit for bit (tests/kernels/).

Calling every such function once on a few numbers, which runs on one thread, settles the choice
before any op is big enough to be split across threads. `replicate/__init__.py` does it on import,
so every entry point (the CLI, tests, notebooks, torchrun processes) gets it; it costs about 10 ms
once per process (the kernel choices themselves), then nothing.
"""

from __future__ import annotations

import torch

# The float unary ops ATen sends to VML (aten/src/ATen/cpu/vml.h, IMPLEMENT_VML_MKL; the list
# varies a little between torch versions, and calling one that is not routed there is harmless).
VML_FUNCTIONS = (
    "abs", "acos", "asin", "atan", "cos", "erf", "erfc", "erfinv", "exp", "expm1", "log", "log10",
    "log1p", "log2", "sin", "sqrt", "tan", "tanh", "trunc",
)  # fmt: skip


def resolve_vml_dispatch() -> None:
    """One single-threaded first call of each VML-routed function, in float32 and float64."""
    for dtype in (torch.float32, torch.float64):
        numbers = torch.full((16,), 0.5, dtype=dtype)  # in every function's domain
        for name in VML_FUNCTIONS:
            getattr(torch, name)(numbers)
