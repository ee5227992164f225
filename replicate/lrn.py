"""Local response normalisation (§3.3), applied per column.

The paper's formula, with N maps and the sum clipped at the first and last map:

    b[i] = a[i] / (k + alpha * sum_{j=max(0, i-n/2)}^{min(N-1, i+n/2)} a[j]^2) ** beta

`alpha` here is always the coefficient of one squared activation, as printed in the paper.
`torch.nn.functional.local_response_norm` instead multiplies alpha by the *mean* of the n squares,
i.e. it divides alpha by n, so the paper's rule is `local_response_norm(a, n, alpha * n, beta, k)`
(`reference_response_norm`). `ResponseNorm` computes the same rule with its own autograd function,
cheaper in time and memory (BENCHMARKS.md); tests hold it equal to the reference and to the formula.
The fast paths of `replicate/kernels/` (`speed.lrn_kernel`: compiled, triton) compute the same rule
behind the same module (`speed.use_lrn_kernel`).
The original 2012 code divides its configured `scale` by `size` the same way (layer.py, cmrnorm),
which is why the two rules below differ by a factor n in alpha.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

LRNRule = Literal["paper", "code2012", "off"]
# (maps, (size, alpha, beta, k), rectify) -> the normalised maps, or None where the path does not apply
FastPath = Callable[[torch.Tensor, tuple[int, float, float, float], bool], "torch.Tensor | None"]

# §3.3: "k = 2, n = 5, alpha = 10^-4, and beta = 0.75".
PAPER_SIZE = 5
PAPER_ALPHA = 1e-4
PAPER_BETA = 0.75
PAPER_K = 2.0
# From this many maps on, channels-last maps under torch.compile on the CPU take
# `_window_sum_innermost`: faster on lrn2's 128 maps, slower on lrn1's 48 (44 inner maps are no whole
# number of 16-float vectors); `bench --channels-last --lrn-kernel compiled` times both layers.
INNERMOST_MAPS_JOINED = 64


def window_sum(values: torch.Tensor, size: int, weight: float = 1.0) -> torch.Tensor:
    """weight x the sum over `size` adjacent maps (dim -3: C of N x C x H x W, or of N x G x C x H x W),
    clipped at the first and last map, as §3.3 sums.

    On the CPU in eager mode it is one matrix product with a banded C x C matrix of 0 and `weight`,
    which reads the maps once instead of `size` times (`make bench` times the LRN; BENCHMARKS.md).
    Elsewhere it stays `size` shifted adds: on a GPU a matrix product would follow the TF32 setting,
    and torch.compile fuses the adds into the loop around them (for many channels-last maps on the
    CPU, without padding them: `_window_sum_innermost`).
    """
    count = values.shape[-3]
    if values.device.type == "cpu" and not torch.compiler.is_compiling():
        band = torch.ones(count, count, dtype=values.dtype).triu_(-(size // 2)).tril_((size - 1) // 2)
        with torch.autocast("cpu", enabled=False):  # the sum of squares stays in the maps' precision
            if values.stride(-3) == 1:  # channels-last: the maps are the innermost dimension
                return (values.movedim(-3, -1) @ band.mul_(weight).T).movedim(-1, -3)
            # band[i, j] = weight for i - size//2 <= j <= i + (size-1)//2: row i sums map i's window
            return (band.mul_(weight) @ values.flatten(-2)).view(values.shape)
    # here the CPU's maps are being compiled
    if values.device.type == "cpu" and values.stride(-3) == 1 and count >= INNERMOST_MAPS_JOINED:
        return _window_sum_innermost(values, size, weight)
    padded = F.pad(values, (0, 0, 0, 0, size // 2, (size - 1) // 2))
    total = padded.narrow(-3, 0, count).clone()
    for offset in range(1, size):
        total += padded.narrow(-3, offset, count)
    return total.mul_(weight) if weight != 1.0 else total


def _window_sum_innermost(values: torch.Tensor, size: int, weight: float) -> torch.Tensor:
    """`window_sum` of channels-last maps under torch.compile on the CPU. Padding the innermost
    dimension makes the C++ kernel mask every one of the `size` loads by its index; here the windows
    that lie wholly inside the maps are `size` shifted adds with no padding, the (size - 1) clipped ones
    at the two ends are summed apart, and a cat joins them."""
    maps = values.movedim(-3, -1)
    count, before, after = maps.shape[-1], size // 2, (size - 1) // 2
    inner = count - size + 1  # the maps from `before` to count - 1 - `after`: whole windows
    total = maps[..., :inner]
    for offset in range(1, size):
        total = total + maps[..., offset : offset + inner]
    first = [maps[..., : i + after + 1].sum(-1, keepdim=True) for i in range(before)]
    last = [maps[..., i - before :].sum(-1, keepdim=True) for i in range(count - after, count)]
    total = torch.cat([*first, total, *last], -1)
    return (total * weight if weight != 1.0 else total).movedim(-1, -3)


def inverse_power(denominator: torch.Tensor, beta: float) -> torch.Tensor:
    """denominator ** -beta; for the paper's beta = 0.75 as rsqrt(d) * sqrt(rsqrt(d)), which avoids
    the exp/log of a general power."""
    if beta == 0.75:
        root = denominator.rsqrt()
        return root.sqrt().mul_(root)
    return denominator.pow(-beta)


class _ResponseNormFunction(torch.autograd.Function):
    """b = a * s^-beta with s = k + alpha * sum a^2; backward in closed form:

    dL/da_i = g_i s_i^-beta - 2 alpha beta a_i sum_{j: i in window(j)} g_j b_j / s_j
    (an odd window is symmetric, so the j whose window holds i form i's own window).
    It keeps three tensors for backward instead of the pad/pool/pow chain autograd would keep.
    """

    @staticmethod
    def forward(ctx, maps, size: int, alpha: float, beta: float, k: float):
        denominator = window_sum(maps * maps, size, alpha).add_(k)
        scale = inverse_power(denominator, beta)
        ctx.save_for_backward(maps, denominator, scale)
        ctx.size, ctx.alpha, ctx.beta = size, alpha, beta
        return maps * scale

    @staticmethod
    def backward(ctx, grad):
        maps, denominator, scale = ctx.saved_tensors
        grad_scaled = grad * scale
        through = (grad_scaled * maps).div_(denominator)  # g_j b_j / s_j
        correction = window_sum(through, ctx.size)
        return grad_scaled.addcmul_(maps, correction, value=-2 * ctx.alpha * ctx.beta), None, None, None, None


def reference_response_norm(
    maps: torch.Tensor, size: int, alpha: float, beta: float, k: float
) -> torch.Tensor:
    """The same rule through torch's implementation (alpha per squared map: torch divides by size)."""
    return F.local_response_norm(maps, size, alpha * size, beta, k)


class ResponseNorm(nn.Module):
    """b = a / (k + alpha * sum of a^2 over `size` adjacent maps) ** beta, across the maps given.

    Give it one column's maps only: the original code normalised each GPU's maps separately
    (cmrnorm declared per GPU in the layer cfgs), so maps of the other column never enter the sum.
    """

    def __init__(
        self,
        size: int = PAPER_SIZE,
        alpha: float = PAPER_ALPHA,
        beta: float = PAPER_BETA,
        k: float = PAPER_K,
    ) -> None:
        super().__init__()
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k
        # A fast path of the same rule (`speed.use_lrn_kernel`): called as fast_path(maps, rule, rectify),
        # it returns the output, or None where it does not apply (then the torch path runs). Inside a
        # compiled model it is not called: that compile fuses the torch path itself.
        self.kernel: str = "torch"
        self.fast_path: FastPath | None = None
        self.rectify = False  # True: the ReLU before it runs here (`use_lrn_kernel`), on its input

    def forward(self, maps: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """`groups` > 1: the maps are that many columns side by side (N x G*C x H x W); each is
        normalised over its own C maps, through a (N, G, C, H, W) view (no copy, any layout)."""
        if self.size % 2 == 0:  # the closed-form backward assumes a symmetric window
            columns = (maps.relu() if self.rectify else maps).chunk(groups, dim=1)
            parts = [reference_response_norm(m, self.size, self.alpha, self.beta, self.k) for m in columns]
            return torch.cat(parts, dim=1)
        low = maps.dtype in (torch.float16, torch.bfloat16)  # under autocast: sum the squares in fp32
        view = maps.float() if low else maps
        if groups > 1:
            view = view.unflatten(1, (groups, -1))
        rule = (self.size, self.alpha, self.beta, self.k)
        out = None
        if self.fast_path is not None and not torch.compiler.is_compiling():
            out = self.fast_path(view, rule, self.rectify)
        if out is None:
            out = _ResponseNormFunction.apply(view.relu() if self.rectify else view, *rule)
        out = out.flatten(1, 2) if groups > 1 else out
        return out.to(maps.dtype) if low else out

    def extra_repr(self) -> str:
        kernel = f", kernel={self.kernel}" if self.kernel != "torch" else ""
        kernel += ", rectifies its input" if self.rectify else ""
        return (
            f"size={self.size}, alpha={self.alpha:g} (per squared map), beta={self.beta}, k={self.k}{kernel}"
        )


class SpatialResponseNorm(nn.Module):
    """The 2012 code's `rnorm` layer that config #145 puts after LRN2 (not in the paper):
    b = a / (k + scale / size^2 * sum of a^2 over the size x size neighbourhood in the same map)^pow,
    the neighbourhood clipped at the image border (original: layer.py, ResponseNormLayerParser, which
    divides `scale` by size^2 as cmrnorm divides by size). #145: size 5, scale 0.001, pow 0.75; k is
    not set there, so the layer's own 1 (INFERRED: paper/fidelity.md)."""

    def __init__(self, size: int = 5, scale: float = 0.001, power: float = 0.75, k: float = 1.0) -> None:
        super().__init__()
        self.size, self.scale, self.power, self.k = size, scale, power, k

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        # avg_pool2d counting the zero padding is the neighbourhood's sum / size^2: clipped at the border
        mean = F.avg_pool2d(maps * maps, self.size, 1, self.size // 2, count_include_pad=True)
        return maps * (self.k + self.scale * mean).pow(-self.power)

    def extra_repr(self) -> str:
        size = f"{self.size}x{self.size}"
        return f"size={size}, scale={self.scale:g} / {self.size**2}, pow={self.power}, k={self.k}"


def response_norm(rule: LRNRule, k: float = PAPER_K) -> nn.Module:
    """The normalisation a layer gets under `rule`.

    paper:    alpha = 1e-4 per squared activation, as §3.3 prints it.
    code2012: the original code's rule, alpha = scale / size = 1e-4 / 5 (layer.py); its default
              k (`minDiv`) is 1, config #145 (the paper's net) sets 2.
    off:      no normalisation (the §3.3 ablation).
    """
    if rule == "paper":
        return ResponseNorm(PAPER_SIZE, PAPER_ALPHA, PAPER_BETA, k)
    if rule == "code2012":
        return ResponseNorm(PAPER_SIZE, PAPER_ALPHA / PAPER_SIZE, PAPER_BETA, k)
    if rule == "off":
        return nn.Identity()
    raise ValueError(f"unknown LRN rule {rule!r}: expected 'paper', 'code2012' or 'off'")
