"""The Winograd probe of `bench-winograd` (replicate/bench_winograd.py) computes the convolution."""

import json
import random
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from replicate.bench_winograd import WinogradConv, winograd_matrices

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("m", "r"), [(2, 3), (4, 3), (6, 3), (2, 5), (3, 5)])
def test_matrices_compute_the_correlation_exactly(m, r):
    at, g, bt = winograd_matrices(m, r)
    n = m + r - 1
    assert (len(at), len(at[0]), len(g), len(g[0]), len(bt), len(bt[0])) == (m, n, n, r, n, n)
    rng = random.Random(m * 10 + r)
    for _ in range(5):
        d = [Fraction(rng.randint(-9, 9)) for _ in range(n)]
        k = [Fraction(rng.randint(-9, 9)) for _ in range(r)]
        transformed = [
            sum(gr * kv for gr, kv in zip(g_row, k, strict=True))
            * sum(br * dv for br, dv in zip(b_row, d, strict=True))
            for g_row, b_row in zip(g, bt, strict=True)
        ]
        y = [sum(a * t for a, t in zip(row, transformed, strict=True)) for row in at]
        assert y == [sum(d[i + j] * k[j] for j in range(r)) for i in range(m)]  # exact, in fractions


@pytest.mark.parametrize(
    ("m", "r", "padding", "side"), [(4, 3, 1, 13), (2, 3, 1, 6), (3, 5, 2, 27), (2, 5, 2, 9)]
)
def test_winograd_convolution_equals_conv2d(m, r, padding, side):
    # sides that are not multiples of m: the last tiles run past the maps into zeros and are cropped
    torch.manual_seed(0)
    images = torch.randn(3, 7, side, side, dtype=torch.float64)
    weight, bias = torch.randn(5, 7, r, r, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    conv = WinogradConv(m, r, padding, compiled=False)
    out = conv(images.permute(0, 2, 3, 1).contiguous(), conv.kernel_transform(weight), bias)
    exact = F.conv2d(images, weight, bias, padding=padding)
    torch.testing.assert_close(out.permute(0, 3, 1, 2), exact, rtol=1e-10, atol=1e-10)


def test_compiled_transforms_compute_the_same_in_float32():
    # what the probe times: F(4x4, 3x3) on conv3-like maps, the transforms built by torch.compile
    torch.manual_seed(0)
    images, weight, bias = torch.randn(2, 16, 13, 13), torch.randn(8, 16, 3, 3), torch.randn(8)
    nhwc = images.permute(0, 2, 3, 1).contiguous()
    eager, compiled = WinogradConv(4, 3, 1, compiled=False), WinogradConv(4, 3, 1)
    out = compiled(nhwc, compiled.kernel_transform(weight), bias)
    torch.testing.assert_close(out, eager(nhwc, eager.kernel_transform(weight), bias), rtol=1e-5, atol=1e-5)
    exact = F.conv2d(images.double(), weight.double(), bias.double(), padding=1)
    torch.testing.assert_close(out.permute(0, 3, 1, 2).double(), exact, rtol=1e-4, atol=1e-4)


def test_bench_winograd_smoke_mode_runs(tmp_path):
    saved_at = tmp_path / "winograd.json"
    result = subprocess.run(
        [sys.executable, "-m", "replicate", "bench-winograd", "--smoke", "--json", str(saved_at)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    for line in (
        "conv2 (48 -> 128, 27 x 27, 5 x 5): direct median",
        "conv3 (256 -> 192, 13 x 13, 3 x 3): direct median",
        "conv5 (192 -> 128, 13 x 13, 3 x 3): direct median",
        "F(3,5): median",
        "F(4,3): median",
        "all 4 layers, the faster tile each: direct",
    ):
        assert line in result.stdout
    record = json.loads(saved_at.read_text())
    assert list(record["layers"]) == ["conv2", "conv3", "conv4", "conv5"]
    for entry in record["layers"].values():  # the net's own activations, float32
        assert entry["direct"]["error"] < 1e-5
        assert all(
            entry[tile]["error"] < 1e-4 for tile in entry if tile.startswith("F(") and "products" not in tile
        )
