"""Triton kernels of the fused LRN (`lrn_triton`); imported only when one is first needed, since
importing this module imports triton. Triton resolves a kernel's helpers among the module's globals,
so they live here at top level."""

import triton
import triton.language as tl


@triton.jit
def inverse_power(denominator, beta, THREE_QUARTERS: tl.constexpr):
    # denominator ** -beta; for the paper's 0.75 as rsqrt * sqrt(rsqrt), as lrn._inverse_power
    if THREE_QUARTERS:
        root = tl.rsqrt(denominator)
        return tl.sqrt(root) * root
    else:
        return tl.exp2(-beta * tl.log2(denominator))


@triton.jit
def denominator_at(maps, c, C, P, mask, alpha, k, SIZE: tl.constexpr, BLOCK: tl.constexpr):
    # k + alpha * sum of squares over maps c - SIZE//2 .. c + (SIZE-1)//2, clipped at 0 and C-1
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(SIZE):
        neighbour = c - SIZE // 2 + j + tl.zeros([BLOCK], tl.int32)  # a block: Triton's interpreter
        inside = mask & (neighbour >= 0) & (neighbour < C)
        value = tl.load(maps + neighbour * P, mask=inside, other=0.0)
        total += value * value
    return total * alpha + k


@triton.jit
def forward(
    maps_ptr, out_ptr, den_ptr, C, P, alpha, beta, k,
    SIZE: tl.constexpr, THREE_QUARTERS: tl.constexpr, KEEP: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    position = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = position < P
    start = tl.program_id(0).to(tl.int64) * C * P + position  # this image's (and column's) maps
    for c in range(0, C):
        denominator = denominator_at(maps_ptr + start, c, C, P, mask, alpha, k, SIZE, BLOCK)
        here = start + c * P
        value = tl.load(maps_ptr + here, mask=mask, other=0.0)
        tl.store(out_ptr + here, value * inverse_power(denominator, beta, THREE_QUARTERS), mask=mask)
        if KEEP:  # for the backward
            tl.store(den_ptr + here, denominator, mask=mask)


@triton.jit
def backward(
    maps_ptr, den_ptr, grad_ptr, out_ptr, C, P, alpha, beta,
    SIZE: tl.constexpr, THREE_QUARTERS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # dL/da_i = g_i s_i^-beta - 2 alpha beta a_i sum_{j in window(i)} g_j a_j s_j^-beta / s_j
    position = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = position < P
    start = tl.program_id(0).to(tl.int64) * C * P + position
    for c in range(0, C):
        correction = tl.zeros([BLOCK], dtype=tl.float32)
        for j in tl.static_range(SIZE):  # an odd window is symmetric: the j whose window holds c
            neighbour = c - SIZE // 2 + j + tl.zeros([BLOCK], tl.int32)  # a block, as the interpreter needs
            inside = mask & (neighbour >= 0) & (neighbour < C)
            at = start + neighbour * P
            grad = tl.load(grad_ptr + at, mask=inside, other=0.0)
            value = tl.load(maps_ptr + at, mask=inside, other=0.0)
            denominator = tl.load(den_ptr + at, mask=inside, other=1.0)
            scaled = grad * inverse_power(denominator, beta, THREE_QUARTERS)
            correction += scaled * value / denominator
        here = start + c * P
        grad = tl.load(grad_ptr + here, mask=mask, other=0.0)
        value = tl.load(maps_ptr + here, mask=mask, other=0.0)
        denominator = tl.load(den_ptr + here, mask=mask, other=1.0)
        scaled = grad * inverse_power(denominator, beta, THREE_QUARTERS)
        tl.store(out_ptr + here, scaled - 2.0 * alpha * beta * value * correction, mask=mask)
