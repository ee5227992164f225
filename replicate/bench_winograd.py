"""`python -m replicate bench-winograd`: could fewer multiplies take the faithful net to 1.2x torchvision's?

`make bench` finds every convolution already running near this CPU's multiply-add rate, so what is
left is doing fewer multiplies. PyTorch's CPU convolutions ask oneDNN for its direct algorithm; a
Winograd convolution F(m x m, r x r) (Lavin & Gray 2016) computes each m x m block of outputs with
(m + r - 1)^2 multiplies per input-output channel pair instead of m^2 r^2. This probe times one,
built from torch ops, against the direct convolution on the inputs the stride-1 layers (conv2-conv5)
get in one column of the net's forward pass: the whole Winograd forward (its input and output
transforms fused by torch.compile, its per-frequency products as one batched matrix product), and
the batched products alone, the bound that free transforms would reach. It is a measurement, not
a fast path: the network never uses it (it changes the arithmetic, and as built here it falls short
of what 1.2x would need; BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import statistics
from fractions import Fraction
from functools import partial
from math import gcd, lcm
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from replicate import bench_records
from replicate.bench_layers import matrix_layers_at_work, timed
from replicate.lrn import compiled_unavailable_reason
from replicate.model import AlexNet

Matrix = list[list[Fraction]]
# The interpolation points of Toom-Cook, in the order that keeps the transforms' numbers small;
# the point at infinity is always added.
POINTS = (Fraction(0), Fraction(1), Fraction(-1), Fraction(2), Fraction(-2), Fraction(1, 2), Fraction(-1, 2))
# F(m, r) tried per kernel size: the larger tile does fewer multiplies, the smaller is more exact.
TILES = {3: (4, 2), 5: (3, 2)}


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

    at = [list(col) for col in zip(*evaluation(m), strict=True)]
    g = evaluation(r)
    bt = [list(col) for col in zip(*_inverse(evaluation(n)), strict=True)]
    for j in range(n):
        scale = Fraction(lcm(*(v.denominator for v in bt[j])), gcd(*(v.numerator for v in bt[j] if v != 0)))
        bt[j] = [v * scale for v in bt[j]]
        g[j] = [v / scale for v in g[j]]
    return at, g, bt


def _combine(matrix: Matrix, terms: list[torch.Tensor]) -> list[torch.Tensor]:
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


class WinogradConv:
    """Forward-only F(m x m, r x r) convolution, stride 1, zero padding `padding`, channels-last
    input (N, H, W, C) and output (N, H, W, K); the transforms fused by torch.compile if `compiled`,
    else run as the same torch ops one by one (the same numbers, slower)."""

    def __init__(self, m: int, r: int, padding: int, compiled: bool = True) -> None:
        self.m, self.r, self.n, self.padding = m, r, m + r - 1, padding
        self.at, g, self.bt = winograd_matrices(m, r)
        g_matrix = torch.tensor([[float(v) for v in row] for row in g], dtype=torch.float64)
        self.gg = torch.kron(g_matrix, g_matrix)  # (n^2, r^2): the kernel transform G g G^T, flattened
        self.input_transform, self.output_transform = self._input_transform, self._output_transform
        if compiled:
            self.input_transform = torch.compile(self._input_transform, dynamic=False)
            self.output_transform = torch.compile(self._output_transform, dynamic=False)

    def _input_transform(self, x: torch.Tensor, tiles_h: int, tiles_w: int) -> torch.Tensor:
        """B^T d B for every (n x n) input tile, tiles m apart: (n^2, N, tiles_h, tiles_w, C)."""
        m, n, height, width = self.m, self.n, x.shape[1], x.shape[2]
        after_h = m * tiles_h + self.r - 1 - self.padding - height
        after_w = m * tiles_w + self.r - 1 - self.padding - width
        padded = F.pad(x, (0, 0, self.padding, after_w, self.padding, after_h))
        d = [
            [padded[:, i : i + m * tiles_h : m, j : j + m * tiles_w : m] for j in range(n)] for i in range(n)
        ]
        columns = [_combine(self.bt, [d[i][j] for i in range(n)]) for j in range(n)]  # (B^T d)[a][j]
        return torch.stack([v for a in range(n) for v in _combine(self.bt, [c[a] for c in columns])])

    def _output_transform(
        self, products: torch.Tensor, bias: torch.Tensor, height: int, width: int
    ) -> torch.Tensor:
        """A^T M A per tile, the tiles put back in place, cropped, plus the bias."""
        m, n = self.m, self.n
        _, batch, tiles_h, tiles_w, kernels = products.shape
        products = products.view(n, n, batch, tiles_h, tiles_w, kernels)
        columns = [_combine(self.at, [products[i, j] for i in range(n)]) for j in range(n)]
        tiles = torch.stack([torch.stack(_combine(self.at, [c[a] for c in columns])) for a in range(m)])
        out = tiles.permute(2, 3, 0, 4, 1, 5).reshape(batch, m * tiles_h, m * tiles_w, kernels)
        return out[:, :height, :width] + bias

    def kernel_transform(self, weight: torch.Tensor) -> torch.Tensor:
        """G g G^T for every kernel, in float64 then rounded: (n^2, C, K)."""
        kernels, channels = weight.shape[:2]
        flat = weight.double().reshape(kernels, channels, self.r**2).permute(2, 1, 0).reshape(self.r**2, -1)
        return (self.gg @ flat).to(weight.dtype).view(self.n**2, channels, kernels)

    def tiles(self, height: int, width: int) -> tuple[int, int]:
        return -(-height // self.m), -(-width // self.m)

    def __call__(self, x: torch.Tensor, kernels: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """`kernels` from `kernel_transform`, made once per weight update, as a training step would."""
        batch, height, width, channels = x.shape
        tiles_h, tiles_w = self.tiles(height, width)
        transformed = self.input_transform(x, tiles_h, tiles_w).view(self.n**2, -1, channels)
        products = torch.bmm(transformed, kernels).view(self.n**2, batch, tiles_h, tiles_w, -1)
        return self.output_transform(products, bias, height, width)


def stride_one_layers(batch: int) -> dict[str, tuple[nn.Conv2d, torch.Tensor]]:
    """Column A's conv2-conv5 with the inputs they get in the net's forward pass."""
    torch.manual_seed(0)
    images = torch.rand(batch, 3, 224, 224) * 255 - 128  # paper-scale pixels, as `bench` uses
    layers = {}
    for name, layer, inputs, *_ in matrix_layers_at_work(AlexNet(), images, "fp32"):
        if isinstance(layer, nn.Conv2d) and layer.stride == (1, 1) and name not in layers:
            layers[name] = (layer, inputs.detach())
    return layers


def relative_error(output: torch.Tensor, exact: torch.Tensor) -> float:
    return ((output.double() - exact).abs().max() / exact.abs().max()).item()


def run(batch: int, repeats: int, compiled: bool = True) -> dict:
    """Per layer and tile size: forward milliseconds of the direct convolution (the layer itself, in
    the net's layout), the Winograd one and its batched products alone, alternating; then each one's
    largest error against the convolution in float64, relative to the largest output. The errors
    come after all the timing: made first, the float64 copies left the heap in a state in which the
    direct convolutions ran far slower than in a fresh process, and the comparison was unfair."""
    layers = stride_one_layers(batch)
    results: dict[str, dict] = {}
    convs: dict[str, list[tuple[str, WinogradConv, torch.Tensor]]] = {}
    with torch.no_grad():
        for name, (layer, inputs) in layers.items():
            size = layer.kernel_size[0]
            results[name] = {"shape": [layer.in_channels, layer.out_channels, inputs.shape[-1], size]}
            nhwc = inputs.permute(0, 2, 3, 1).contiguous()  # not timed: conversions cost extra
            contenders = {"direct": partial(layer, inputs)}
            convs[name] = []
            for m in TILES[size]:
                conv = WinogradConv(m, size, layer.padding[0], compiled)
                kernels = conv.kernel_transform(layer.weight)  # once per weight update in training
                transformed = conv.input_transform(nhwc, *conv.tiles(*inputs.shape[-2:]))
                tile = f"F({m},{size})"
                contenders[tile] = partial(conv, nhwc, kernels, layer.bias)
                contenders[f"{tile} products"] = partial(
                    torch.bmm, transformed.view(conv.n**2, -1, layer.in_channels), kernels
                )
                convs[name].append((tile, conv, kernels))
            times = {who: [] for who in contenders}
            for repeat in range(repeats + 1):  # the first round warms up (and compiles)
                for who, forward in contenders.items():
                    elapsed = timed(forward, inputs.device)
                    if repeat:
                        times[who].append(elapsed * 1000)
            results[name].update({who: {"ms": ms} for who, ms in times.items()})
        for name, (layer, inputs) in layers.items():
            exact = F.conv2d(
                inputs.double(), layer.weight.double(), layer.bias.double(), padding=layer.padding
            )
            results[name]["direct"]["error"] = relative_error(layer(inputs), exact)
            nhwc = inputs.permute(0, 2, 3, 1).contiguous()
            for tile, conv, kernels in convs[name]:
                out = conv(nhwc, kernels, layer.bias).permute(0, 3, 1, 2)
                results[name][tile]["error"] = relative_error(out, exact)
    return {"batch": batch, "torch": torch.__version__, "threads": torch.get_num_threads(), "layers": results}


def report(result: dict) -> str:
    lines = [
        f"Winograd against direct convolution, forward only, one column, batch {result['batch']}; "
        f"torch {result['torch']}; threads {result['threads']}"
    ]
    best: dict[str, list[float]] = {"direct": [], "winograd": [], "products": []}
    for name, entry in result["layers"].items():
        c_in, c_out, side, k = entry["shape"]
        direct = statistics.median(entry["direct"]["ms"])
        lines.append(
            f"  {name} ({c_in} -> {c_out}, {side} x {side}, {k} x {k}): direct median {direct:.1f} ms, "
            f"max error {entry['direct']['error']:.1e}"
        )
        tiled = {}
        for tile in (key for key in entry if key.startswith("F(") and not key.endswith("products")):
            whole, products = (statistics.median(entry[key]["ms"]) for key in (tile, f"{tile} products"))
            tiled[tile] = (whole, products)
            lines.append(
                f"    {tile}: median {whole:.1f} ms (direct/winograd {direct / whole:.2f}), batched products "
                f"alone {products:.1f} ms (direct/products {direct / products:.2f}), max error "
                f"{entry[tile]['error']:.1e}"
            )
        whole, products = min(tiled.values())
        best["direct"].append(direct)
        best["winograd"].append(whole)
        best["products"].append(products)
    direct, whole, products = (sum(best[key]) for key in ("direct", "winograd", "products"))
    lines.append(
        f"  all {len(best['direct'])} layers, the faster tile each: direct {direct:.1f} ms, winograd "
        f"{whole:.1f} ms (direct/winograd {direct / whole:.2f}); with free transforms (products alone) "
        f"{products:.1f} ms "
        f"(direct/products {direct / products:.2f})"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m replicate bench-winograd",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the timings here")
    parser.add_argument("--smoke", action="store_true", help="seconds-long run for CI: no meaningful timing")
    args = parser.parse_args(argv)
    bench_records.check_json_option(parser, args.json)
    if args.smoke:  # the transforms not compiled (minutes of building for seconds of running)
        result = run(2, 1, compiled=False)
    else:
        why_not = compiled_unavailable_reason([torch.device("cpu")])
        if why_not:
            parser.error(f"its transforms are built by torch.compile, which fails here: {why_not}")
        result = run(args.batch, args.repeats)
    print(report(result) + (" (smoke: transforms not compiled, timings meaningless)" if args.smoke else ""))
    if args.json:
        bench_records.write(args.json, result)
    return 0
