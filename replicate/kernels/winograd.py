"""Winograd convolution F(m x m, r x r) (Lavin & Gray 2016) from torch ops: stride 1, forward and backward.

A convolution layer computes each m x m block of outputs with m^2 r^2 multiplies per input-output
channel pair; Winograd's algorithm does it with (m + r - 1)^2, at the price of input, kernel and
output transforms (adds and a few scalings) and of a different rounding. The per-frequency products
become one batched matrix product; the transforms are fused by torch.compile. `bench-winograd` times
it against oneDNN's direct convolutions layer by layer; `use_winograd` puts it into the network
(`speed.conv_algorithm=winograd`, the CPU's default under `auto`: the same convolution, rounded
differently, as cuDNN's Winograd and FFT algorithms are on a GPU; paper/fidelity.md, BENCHMARKS.md).
"""

from __future__ import annotations

import weakref
from fractions import Fraction
from math import gcd, lcm
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from replicate.kernels.compiler import compile_failure, compiled_kernel

# `speed.conv_algorithm`: direct leaves every convolution to the backend (oneDNN's direct algorithm on
# the CPU, cuDNN's choice on a GPU); winograd runs the stride-1 ones by `WinogradConv` (CPU only);
# auto: winograd where it can run, else direct (`speed.SpeedConfig.resolved`).
ConvAlgorithm = Literal["auto", "direct", "winograd"]
Matrix = list[list[Fraction]]
# The tile m of F(m x m, r x r) that `use_winograd` gives a layer with r x r kernels. F(5x5, 3x3) on
# conv3-conv5's 13 x 13 maps: three tiles a side, 49 products per 25 outputs (15 x 15 computed for
# 13 x 13); F(4x4, 3x3) does about 30% more products per output, transforms as many more numbers and
# takes longer (`bench-winograd` times both). F(3x3, 5x5) on conv2's 27 x 27, which it tiles exactly:
# F(4x4, 5x5) is a little faster there, but in the net (tests/test_speed.py) it puts conv1's and
# conv2's weight gradients 4e-3 off (relative norm), against 1e-5 with F(3x3, 5x5). The tiles round
# further from the exact result than the direct convolution does (errors around 1e-5 of the largest
# input gradient, against a few 1e-7; paper/fidelity.md).
NETWORK_TILES = {3: 5, 5: 3}
# From this tile size n on, the input transform runs as two kernels, B^T over the rows and then B over
# the columns, with the rows' result in memory between them: on large tiles faster than the one
# kernel torch.compile fuses, on 4 x 4 tiles slower (`python -m replicate bench-winograd` times it).
TWO_PASS_INPUT_TRANSFORM = 6
# The interpolation points of Toom-Cook, in the order that keeps the transforms' numbers small;
# the point at infinity is always added.
POINTS = (Fraction(0), Fraction(1), Fraction(-1), Fraction(2), Fraction(-2), Fraction(1, 2), Fraction(-1, 2))


def _inverse(matrix: Matrix) -> Matrix:
    """Gauss-Jordan in exact fractions."""
    n = len(matrix)
    rows = [row[:] + [Fraction(int(i == j)) for j in range(n)] for i, row in enumerate(matrix)]
    for col in range(n):
        pivot = next(r for r in range(col, n) if rows[r][col] != 0)
        rows[col], rows[pivot] = rows[pivot], rows[col]
        rows[col] = [value / rows[col][col] for value in rows[col]]
        for r in range(n):
            if r != col and rows[r][col] != 0:
                factor = rows[r][col]
                rows[r] = [a - factor * b for a, b in zip(rows[r], rows[col], strict=True)]
    return [row[n:] for row in rows]


def _transpose(matrix: Matrix) -> Matrix:
    return [list(column) for column in zip(*matrix, strict=True)]


def winograd_matrices(m: int, r: int) -> tuple[Matrix, Matrix, Matrix]:
    """A^T (m x n), G (n x r), B^T (n x n), n = m + r - 1, with y = A^T [(G g) * (B^T d)] the
    correlation y_i = sum_k d_(i+k) g_k that a convolution layer computes.

    Toom-Cook multiplies polynomials by evaluating them at n points (here n - 1 finite ones and
    infinity) and interpolating: s = C [(E_r g) * (E_m h)], E the evaluation matrices, C the inverse
    of the n-point one. The correlation is the transpose of that product in h, so A^T = E_m^T,
    G = E_r, B^T = C^T. Each row of B^T is scaled to small integers, its row of G by the inverse.
    """
    n = m + r - 1
    if n - 1 > len(POINTS):
        raise ValueError(f"F({m}, {r}) needs {n - 1} finite points; {len(POINTS)} are listed")
    points = POINTS[: n - 1]

    def evaluation(size: int) -> Matrix:
        return [[p**i for i in range(size)] for p in points] + [[Fraction(0)] * (size - 1) + [Fraction(1)]]

    at = _transpose(evaluation(m))
    g = evaluation(r)
    bt = _transpose(_inverse(evaluation(n)))
    for j in range(n):
        scale = Fraction(lcm(*(v.denominator for v in bt[j])), gcd(*(v.numerator for v in bt[j] if v != 0)))
        bt[j] = [v * scale for v in bt[j]]
        g[j] = [v / scale for v in g[j]]
    return at, g, bt


def _floats(matrix: Matrix) -> list[list[float]]:
    return [[float(value) for value in row] for row in matrix]


def _combine(matrix: list[list[float]], terms: list[torch.Tensor]) -> list[torch.Tensor]:
    """matrix @ terms, one tensor per row, skipping zeros (so torch.compile sees only the adds)."""
    rows = []
    for row in matrix:
        total = None
        for coefficient, term in zip(row, terms, strict=True):
            if coefficient != 0:
                part = term if coefficient == 1 else -term if coefficient == -1 else term * float(coefficient)
                total = part if total is None else total + part
        rows.append(total)
    return rows


def _sandwich(matrix: list[list[float]], terms: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """matrix @ T @ matrix^T for a square grid of tensors T, row-major, as a flat list."""
    columns = [_combine(matrix, [row[j] for row in terms]) for j in range(len(terms[0]))]
    return [
        value for a in range(len(matrix)) for value in _combine(matrix, [column[a] for column in columns])
    ]


def channels_last_view(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) images as an (N, H, W, C) contiguous tensor, copied only if not channels-last already."""
    return images.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)


class WinogradConv:
    """F(m x m, r x r) convolution, stride 1, zero padding `padding`; the transforms fused by
    torch.compile if `compiled`, else run as the same torch ops one by one (the same numbers, slower).

    `forward_nhwc(x, kernels, bias)` is the forward alone, channels-last in and out, the kernels
    transformed beforehand (`kernel_transform`, once per weight update). Calling the object,
    `conv(x, weight, bias)`, is a training step's convolution: (N, C, H, W) in and out, differentiable
    in all three (`_WinogradFunction`)."""

    def __init__(self, m: int, r: int, padding: int, compiled: bool = True, _transposes=None) -> None:
        self.m, self.r, self.n, self.padding = m, r, m + r - 1, padding
        at, g, bt = winograd_matrices(m, r)
        # The transforms see floats, each its fraction's rounding: torch.compile would trace a comparison
        # or product of Fractions through fractions.py, op by op, in every new process.
        self.at, self.bt, self.a = _floats(at), _floats(bt), _floats(_transpose(at))
        g_matrix = torch.tensor(_floats(g), dtype=torch.float64)
        self.gg = torch.kron(g_matrix, g_matrix)  # (n^2, r^2): the kernel transform G g G^T, flattened
        build = compiled_kernel if compiled else (lambda f: f)
        if self.n >= TWO_PASS_INPUT_TRANSFORM:
            rows, columns = build(self._input_rows), build(self._input_columns)
            self.input_transform = lambda x, tiles_h, tiles_w: columns(rows(x, tiles_h, tiles_w), tiles_w)
        else:
            self.input_transform = build(self._input_transform)
        self.output_transform = build(self._output_transform)
        self.output_transform_adjoint = build(self._output_transform_adjoint)
        # (input, its version, its transform) of the last training forward, held weakly: both columns'
        # conv3 read the very same tensor, the concatenation of their conv2 maps (`AlexNet._exchange`).
        self._last_input: tuple | None = None
        # The input gradient of a stride-1 convolution is the convolution of the output gradient with
        # the kernels flipped and transposed, zero-padded by r - 1 - padding: for a "same" layer
        # (conv2-conv5) the very same convolution.
        if _transposes is not None:
            self.data_gradient = _transposes
        elif r - 1 - padding == padding:
            self.data_gradient = self
        else:
            self.data_gradient = WinogradConv(m, r, r - 1 - padding, compiled, _transposes=self)

    def tiles(self, height: int, width: int) -> tuple[int, int]:
        """How many m x m output tiles cover a height x width output."""
        return -(-height // self.m), -(-width // self.m)

    def _padded(self, x: torch.Tensor, tiles_h: int, tiles_w: int) -> torch.Tensor:
        """The (N, H, W, C) input zero-padded by `padding`, and after it to whole tiles."""
        after_h = self.m * tiles_h + self.r - 1 - self.padding - x.shape[1]
        after_w = self.m * tiles_w + self.r - 1 - self.padding - x.shape[2]
        return F.pad(x, (0, 0, self.padding, after_w, self.padding, after_h))

    def _input_transform(self, x: torch.Tensor, tiles_h: int, tiles_w: int) -> torch.Tensor:
        """B^T d B for every (n x n) input tile, tiles m apart: (n^2, N, tiles_h, tiles_w, C)."""
        m, n, padded = self.m, self.n, self._padded(x, tiles_h, tiles_w)
        d = [
            [padded[:, i : i + m * tiles_h : m, j : j + m * tiles_w : m] for j in range(n)] for i in range(n)
        ]
        return torch.stack(_sandwich(self.bt, d))

    def _input_rows(self, x: torch.Tensor, tiles_h: int, tiles_w: int) -> torch.Tensor:
        """B^T over the rows of every tile row: (n, N, tiles_h, padded width, C)."""
        m, n, padded = self.m, self.n, self._padded(x, tiles_h, tiles_w)
        return torch.stack(_combine(self.bt, [padded[:, i : i + m * tiles_h : m] for i in range(n)]))

    def _input_columns(self, rows: torch.Tensor, tiles_w: int) -> torch.Tensor:
        """Then B over the columns: `_input_transform`'s result, in two passes."""
        m, n = self.m, self.n
        columns = [rows[:, :, :, j : j + m * tiles_w : m] for j in range(n)]
        out = torch.stack(_combine(self.bt, columns), 1)  # (n, n, N, tiles_h, tiles_w, C)
        return out.view(n * n, *out.shape[2:])

    def _output_transform(
        self,
        products: torch.Tensor,
        bias: torch.Tensor | None,
        height: int,
        width: int,
        rectify: bool = False,
    ) -> torch.Tensor:
        """A^T M A per tile, the tiles put back in place, cropped, plus the bias, through a ReLU if
        `rectify`: (N, H, W, K)."""
        m, n = self.m, self.n
        _, batch, tiles_h, tiles_w, kernels = products.shape
        products = products.view(n, n, batch, tiles_h, tiles_w, kernels)
        tiles = torch.stack(_sandwich(self.at, [[products[i, j] for j in range(n)] for i in range(n)]))
        out = tiles.view(m, m, batch, tiles_h, tiles_w, kernels).permute(2, 3, 0, 4, 1, 5)
        out = out.reshape(batch, m * tiles_h, m * tiles_w, kernels)[:, :height, :width]
        out = out if bias is None else out + bias
        return out.relu() if rectify else out

    def _output_transform_adjoint(self, grad: torch.Tensor, tiles_h: int, tiles_w: int) -> torch.Tensor:
        """The gradient of `output_transform` in its products: A dY A^T per m x m tile of the output
        gradient (N, H, W, K), zero-padded to whole tiles: (n^2, N, tiles_h, tiles_w, K)."""
        m, batch, height, width, kernels = self.m, *grad.shape
        padded = F.pad(grad, (0, 0, 0, m * tiles_w - width, 0, m * tiles_h - height))
        tiles = padded.view(batch, tiles_h, m, tiles_w, m, kernels)
        return torch.stack(_sandwich(self.a, [[tiles[:, :, a, :, b] for b in range(m)] for a in range(m)]))

    def kernel_transform(self, weight: torch.Tensor) -> torch.Tensor:
        """G g G^T for every kernel, in the weight's dtype: (n^2, C, K). In float64, rounded after, the
        layers' largest errors are of the same order (about 1e-5 of the largest output) and a training
        step on the CPU slightly longer (paper/fidelity.md)."""
        kernels, channels = weight.shape[:2]
        flat = weight.reshape(kernels, channels, self.r**2).permute(2, 1, 0).reshape(self.r**2, -1)
        return (self.gg.to(weight.dtype) @ flat).view(self.n**2, channels, kernels)

    def kernel_transform_adjoint(self, grad: torch.Tensor) -> torch.Tensor:
        """The gradient of `kernel_transform` in the weight: from (n^2, C, K) to (K, C, r, r)."""
        channels, kernels = grad.shape[1:]
        flat = self.gg.T.to(grad.dtype) @ grad.reshape(self.n**2, -1)
        return flat.view(self.r, self.r, channels, kernels).permute(3, 2, 0, 1)

    def _forward(
        self,
        x: torch.Tensor,
        kernels: torch.Tensor,
        bias: torch.Tensor | None,
        transformed: torch.Tensor | None = None,
        rectify: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The output (N, H', W', K), through a ReLU if `rectify`, and the transformed input
        (n^2, N, tiles_h, tiles_w, C), which is computed unless given."""
        batch, height, width, channels = x.shape
        out_h, out_w = height + 2 * self.padding - self.r + 1, width + 2 * self.padding - self.r + 1
        tiles_h, tiles_w = self.tiles(out_h, out_w)
        if transformed is None:
            transformed = self.input_transform(x, tiles_h, tiles_w)
        products = torch.bmm(transformed.view(self.n**2, -1, channels), kernels)
        products = products.view(self.n**2, batch, tiles_h, tiles_w, -1)
        return self.output_transform(products, bias, out_h, out_w, rectify), transformed

    def forward_nhwc(self, x: torch.Tensor, kernels: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self._forward(x, kernels, bias)[0]

    def transformed_input(self, x: torch.Tensor) -> torch.Tensor | None:
        """The input transform of the last training forward if `x` is that forward's very input, not
        modified since, and the transform is still alive (saved for the backward); else None."""
        if self._last_input is None:
            return None
        source, version, transformed = self._last_input
        return transformed() if source() is x and version == x._version else None

    def remember_input(self, x: torch.Tensor, transformed: torch.Tensor) -> None:
        self._last_input = (weakref.ref(x), x._version, weakref.ref(transformed))

    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rectify: bool = False
    ) -> torch.Tensor:
        return _WinogradFunction.apply(x, weight, bias, self, rectify)


class _WinogradFunction(torch.autograd.Function):
    """The forward transforms its input once for layers that share the `WinogradConv` and read the
    same tensor (both columns' conv3). The three gradients by Winograd as well. The weights': the
    products' gradient per frequency (`output_transform_adjoint`) times the saved transformed input,
    one batched matrix product, then `kernel_transform_adjoint`. The input's: a Winograd convolution
    of the output gradient (above)."""

    @staticmethod
    def forward(ctx, x, weight, bias, conv: WinogradConv, rectify: bool):
        kernels, reused = conv.kernel_transform(weight), conv.transformed_input(x)
        out, transformed = conv._forward(channels_last_view(x), kernels, bias, reused, rectify)
        conv.remember_input(x, transformed)
        # Channels-last strides, not copied to NCHW: the net's max-pooling works in channels-last
        # anyway, and with the copy the step measured slower (BENCHMARKS.md).
        out = out.permute(0, 3, 1, 2)
        ctx.save_for_backward(weight, transformed, out if rectify else None)
        ctx.conv = conv
        return out

    @staticmethod
    def backward(ctx, grad):
        weight, transformed, rectified = ctx.saved_tensors
        conv: WinogradConv = ctx.conv
        if rectified is not None:  # the ReLU's own backward, on its output
            grad = torch.ops.aten.threshold_backward(grad, rectified, 0)
        grad_nhwc = channels_last_view(grad)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            back = conv.data_gradient
            flipped = back.kernel_transform(weight.flip(2, 3).transpose(0, 1))
            grad_x = back.forward_nhwc(grad_nhwc, flipped, None).permute(0, 3, 1, 2)
        if ctx.needs_input_grad[1]:
            grad_products = conv.output_transform_adjoint(grad_nhwc, *transformed.shape[2:4])
            frequencies, channels = conv.n**2, transformed.shape[-1]
            grad_kernels = torch.bmm(
                transformed.view(frequencies, -1, channels).transpose(1, 2),
                grad_products.view(frequencies, -1, grad.shape[1]),
            )
            grad_weight = conv.kernel_transform_adjoint(grad_kernels)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias, None, None


class WinogradConv2d(nn.Conv2d):
    """An `nn.Conv2d` that computes by Winograd: the same weight and bias parameters (so the optimiser,
    checkpoints and initialisation see no difference), another algorithm."""

    def __init__(self, conv: nn.Conv2d, winograd: WinogradConv) -> None:
        super().__init__(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            padding=conv.padding,
            bias=conv.bias is not None,
            device="meta",
        )
        self.weight, self.bias = conv.weight, conv.bias
        self.winograd = winograd
        self.rectify = False  # True: the ReLU after it runs in its output transform (`use_winograd`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.winograd(x, self.weight, self.bias, self.rectify)

    def extra_repr(self) -> str:
        rectify = ", rectifies its output" if self.rectify else ""
        return super().extra_repr() + f", winograd=F({self.winograd.m}, {self.winograd.r}){rectify}"


def winograd_applies(conv: nn.Module) -> bool:
    """Stride 1, one group, no dilation, square kernels of a size in NETWORK_TILES, same padding both ways."""
    return (
        type(conv) is nn.Conv2d
        and conv.stride == (1, 1)
        and conv.groups == 1
        and conv.dilation == (1, 1)
        and conv.kernel_size[0] == conv.kernel_size[1] in NETWORK_TILES
        and isinstance(conv.padding, tuple)
        and conv.padding[0] == conv.padding[1]
        and conv.padding_mode == "zeros"
    )


def conv_algorithm_unavailable_reason(algorithm: ConvAlgorithm, devices: list[torch.device]) -> str | None:
    """Why `algorithm` cannot run on `devices`, or None. Winograd is for the CPU (on a GPU cuDNN
    already chooses among its own algorithms, Winograd among them), and its transforms need
    torch.compile, so a C++ compiler: tried once before a run starts."""
    if algorithm != "winograd":
        return None
    gpus = [str(device) for device in devices if device.type != "cpu"]
    if gpus:
        return f"it runs on the CPU only, not on {gpus[0]}"
    conv = WinogradConv(2, 3, 1)
    why = compile_failure(
        lambda: conv.forward_nhwc(torch.ones(1, 2, 2, 1), conv.kernel_transform(torch.ones(1, 1, 3, 3)), None)
    )
    return f"torch.compile could not build its transforms ({why})" if why else None


def use_winograd(model: nn.Module, compiled: bool = True) -> list[str]:
    """Swap every convolution module of `model` that Winograd applies to (in the net: conv2-conv5 of
    each column) for a `WinogradConv2d`, and return their names. Layers of one shape share one
    `WinogradConv`, and so its compiled transforms. The fused-column path (`AlexNet.fused`) calls
    F.conv2d on the columns' weights itself, so it stays direct.

    A ReLU right after a swapped layer (in an `nn.Sequential`) moves into its output transform, which
    saves a pass over the maps: the ReLU's place holds an `nn.Identity`. (Before an LRN whose compiled
    kernel took the ReLU already, `speed.use_lrn_kernel`, the place holds an `nn.Identity` already.)"""
    shared: dict[tuple[int, int, int], WinogradConv] = {}
    swapped = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if not winograd_applies(child):
                continue
            size = child.kernel_size[0]
            key = (NETWORK_TILES[size], size, child.padding[0])
            if key not in shared:
                shared[key] = WinogradConv(*key, compiled)
            setattr(parent, name, WinogradConv2d(child, shared[key]))
            swapped.append(f"{parent_name}.{name}" if parent_name else name)
        if isinstance(parent, nn.Sequential):
            for index in range(len(parent) - 1):
                if isinstance(parent[index], WinogradConv2d) and isinstance(parent[index + 1], nn.ReLU):
                    parent[index].rectify, parent[index + 1] = True, nn.Identity()
    return swapped
