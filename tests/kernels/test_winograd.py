"""The Winograd convolution (replicate/kernels/winograd.py) that `bench-winograd` times computes the
convolution and its gradients."""

import json
import random
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from replicate.bench.records import processor
from replicate.bench.winograd import TILES
from replicate.kernels.winograd import (
    TWO_PASS_INPUT_TRANSFORM,
    WinogradConv,
    channels_last_view,
    winograd_matrices,
)
from tests.conftest import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("m", "r"), [(2, 3), (4, 3), (5, 3), (6, 3), (2, 5), (3, 5), (4, 5)])
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
    ("m", "r", "padding", "side"),
    [(5, 3, 1, 13), (4, 3, 1, 13), (2, 3, 1, 6), (4, 5, 2, 27), (3, 5, 2, 27), (2, 5, 2, 9)],
)
def test_winograd_convolution_equals_conv2d(m, r, padding, side):
    # sides that are not multiples of m: the last tiles run past the maps into zeros and are cropped
    torch.manual_seed(0)
    images = torch.randn(3, 7, side, side, dtype=torch.float64)
    weight, bias = torch.randn(5, 7, r, r, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    conv = WinogradConv(m, r, padding, compiled=False)
    out = conv.forward_nhwc(channels_last_view(images), conv.kernel_transform(weight), bias)
    exact = F.conv2d(images, weight, bias, padding=padding)
    torch.testing.assert_close(out.permute(0, 3, 1, 2), exact, rtol=1e-10, atol=1e-10)


def _gradients(conv, images, weight, bias, upstream):
    leaves = [t.detach().clone().requires_grad_(True) for t in (images, weight, bias)]
    out = conv(*leaves)
    return (out, *torch.autograd.grad(out, leaves, upstream))


@pytest.mark.parametrize(
    ("m", "r", "padding", "side"),
    # "same" layers as in the net, where the input gradient reuses the convolution itself, and
    # unpadded or over-padded ones, where it is a second convolution padded r - 1 - padding
    [
        (5, 3, 1, 13),
        (4, 3, 1, 13),
        (2, 3, 1, 6),
        (4, 5, 2, 27),
        (3, 5, 2, 27),
        (2, 3, 0, 9),
        (2, 3, 2, 7),
        (4, 5, 0, 12),
    ],
)
def test_winograd_gradients_equal_conv2d(m, r, padding, side):
    torch.manual_seed(1)
    images = torch.randn(2, 6, side, side, dtype=torch.float64)
    weight, bias = torch.randn(4, 6, r, r, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    side_out = side + 2 * padding - r + 1
    upstream = torch.randn(2, 4, side_out, side_out, dtype=torch.float64)
    ours = _gradients(WinogradConv(m, r, padding, compiled=False), images, weight, bias, upstream)
    exact = _gradients(lambda x, w, b: F.conv2d(x, w, b, padding=padding), images, weight, bias, upstream)
    for what, got, expected in zip(("output", "input", "weight", "bias"), ours, exact, strict=True):
        assert got.shape == expected.shape, what
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9, msg=what)


@pytest.mark.parametrize(("m", "r", "padding"), [(4, 5, 2), (5, 3, 1), (3, 5, 2), (4, 3, 1)])
def test_the_two_pass_input_transform_equals_the_one_pass_one(m, r, padding):
    # the net's tiles, 7 x 7 (both), and others: rows, then columns, as two kernels (TWO_PASS_INPUT_TRANSFORM)
    conv = WinogradConv(m, r, padding, compiled=False)
    assert conv.n >= TWO_PASS_INPUT_TRANSFORM
    x = channels_last_view(torch.randn(2, 5, 11, 11))
    tiles = conv.tiles(11, 11)
    torch.testing.assert_close(
        conv.input_transform(x, *tiles), conv._input_transform(x, *tiles), rtol=0, atol=0
    )


def test_the_transforms_read_the_exact_matrices_as_floats():
    """torch.compile would trace Fraction arithmetic through fractions.py, op by op, in every new
    process; the transforms get each exact entry rounded once to a float instead."""
    at, _, bt = winograd_matrices(5, 3)
    conv = WinogradConv(5, 3, 1, compiled=False)
    for floats, exact in ((conv.at, at), (conv.bt, bt), (conv.a, [list(c) for c in zip(*at, strict=True)])):
        assert all(type(value) is float for row in floats for value in row)
        assert floats == [[float(value) for value in row] for row in exact]


@pytest.mark.slow
def test_compiled_transforms_compute_the_same_in_float32():
    # what the net runs: F(5x5, 3x3) on conv3-like maps, the transforms built by torch.compile,
    # forward and forward + backward
    torch.manual_seed(0)
    images, weight, bias = torch.randn(2, 16, 13, 13), torch.randn(8, 16, 3, 3), torch.randn(8)
    nhwc = channels_last_view(images)
    eager, compiled = WinogradConv(5, 3, 1, compiled=False), WinogradConv(5, 3, 1)
    out = compiled.forward_nhwc(nhwc, compiled.kernel_transform(weight), bias)
    expected = eager.forward_nhwc(nhwc, eager.kernel_transform(weight), bias)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    exact = F.conv2d(images.double(), weight.double(), bias.double(), padding=1)
    torch.testing.assert_close(out.permute(0, 3, 1, 2).double(), exact, rtol=1e-4, atol=1e-4)
    upstream = torch.randn(2, 8, 13, 13)
    got = _gradients(compiled, images, weight, bias, upstream)
    for what, value, reference in zip(
        ("output", "input", "weight", "bias"),
        got,
        _gradients(eager, images, weight, bias, upstream),
        strict=True,
    ):
        torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-4, msg=what)


def test_a_layer_that_rectifies_equals_the_convolution_then_a_relu():
    """`use_winograd` moves the ReLU after a layer into its output transform: the same values, and the
    ReLU's gradient (zero where the output is not positive) before the convolution's."""
    conv = WinogradConv(4, 3, 1, compiled=False)
    images = torch.randn(2, 5, 9, 9, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    out = conv(images, weight, bias, rectify=True)
    expected = torch.relu(F.conv2d(images, weight, bias, padding=1))
    torch.testing.assert_close(out, expected)
    assert (out == 0).any() and (out > 0).any()
    upstream = torch.randn_like(out)
    got = torch.autograd.grad(out, (images, weight, bias), upstream)
    for value, reference in zip(
        got, torch.autograd.grad(expected, (images, weight, bias), upstream), strict=True
    ):
        torch.testing.assert_close(value, reference)


def test_two_layers_reading_one_tensor_transform_it_once():
    """Both columns' conv3 share a `WinogradConv` and read the same concatenated maps: the second
    forward reuses the first's transformed input; a modified or another tensor is transformed anew."""
    conv = WinogradConv(4, 3, 1, compiled=False)
    transforms = []
    conv.input_transform = lambda *args, inner=conv.input_transform: transforms.append(1) or inner(*args)
    images = torch.randn(2, 6, 13, 13, dtype=torch.float64, requires_grad=True)
    weights = [torch.randn(4, 6, 3, 3, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    outs = [conv(images, weight, None) for weight in weights]
    assert len(transforms) == 1
    for out, weight in zip(outs, weights, strict=True):
        torch.testing.assert_close(out, F.conv2d(images, weight, padding=1))
    # the backward still gets every gradient, the shared transformed input read by both
    upstream = [torch.randn_like(out) for out in outs]
    got = torch.autograd.grad(outs, [images, *weights], upstream)
    copy = images.detach().requires_grad_()
    direct = [F.conv2d(copy, weight, padding=1) for weight in weights]
    for value, expected in zip(got, torch.autograd.grad(direct, [copy, *weights], upstream), strict=True):
        torch.testing.assert_close(value, expected)
    transforms.clear()  # the backward transformed the two output gradients (the input's gradients)
    other = images.detach().clone()
    kept = conv(other, weights[0], None)  # in training its transform is kept for the backward
    other.mul_(2)  # in place: a new version of the same tensor
    torch.testing.assert_close(conv(other, weights[0], None), F.conv2d(other, weights[0], padding=1))
    assert len(transforms) == 2  # the modified tensor was transformed anew ...
    # ... while the first output's backward still reads the transform of the input as it was
    (weight_grad,) = torch.autograd.grad(kept.sum(), weights[0])
    unchanged = (other / 2).requires_grad_(False)
    (expected,) = torch.autograd.grad(F.conv2d(unchanged, weights[0], padding=1).sum(), weights[0])
    torch.testing.assert_close(weight_grad, expected)


@pytest.mark.slow
def test_bench_winograd_smoke_mode_runs(tmp_path):
    saved_at = tmp_path / "winograd.json"
    result = subprocess.run(
        [sys.executable, "-m", "replicate", "bench-winograd", "--smoke", "--json", str(saved_at)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert result.returncode == 0, result.stderr
    forward, training = result.stdout.split("forward + backward (gradients of input, weights and bias")
    assert "forward only" in forward
    for line in (
        "conv2 (48 -> 128, 27 x 27, 5 x 5): direct median",
        "conv3 (256 -> 192, 13 x 13, 3 x 3): direct median",
        "conv5 (192 -> 128, 13 x 13, 3 x 3): direct median",
        "F(3,5): median",
        "F(5,3): median",
        "F(4,3): median",
        "all 4 layers, the faster tile each: direct",
    ):
        assert line in forward and line in training
    assert "max error of the input gradient" in training
    record = json.loads(saved_at.read_text())
    assert list(record["layers"]) == ["conv2", "conv3", "conv4", "conv5"]
    assert record["processor"] == processor() and f"processor: {processor()}" in result.stdout
    for entry in record["layers"].values():  # the net's own activations, float32
        forward, training = entry["forward"], entry["training"]
        tiles = [f"F({m},{entry['shape'][3]})" for m in TILES[entry["shape"][3]]]
        assert set(forward) == set(training) == {"direct", *tiles, *(f"{tile} products" for tile in tiles)}
        assert forward["direct"]["error"] < 1e-5 and max(training["direct"]["gradient_errors"]) < 1e-5
        for tile in (key for key in forward if key.startswith("F(") and "products" not in key):
            assert forward[tile]["error"] < 1e-4
            assert (
                len(training[tile]["gradient_errors"]) == 2 and max(training[tile]["gradient_errors"]) < 1e-4
            )
            assert len(training[tile]["ms"]) == len(training["direct"]["ms"]) == 1
