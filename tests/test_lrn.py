import pytest
import torch
from torch import nn

from replicate.lrn import ResponseNorm, response_norm
from tests.conftest import response_norm_on


def lrn_by_loop(maps: torch.Tensor, n: int, alpha: float, beta: float, k: float) -> torch.Tensor:
    """§3.3 written out: b[i] = a[i] / (k + alpha * sum_{j=max(0,i-n/2)}^{min(N-1,i+n/2)} a[j]^2)^beta."""
    maps = maps.double()
    out = torch.empty_like(maps)
    count = maps.shape[1]
    for i in range(count):
        total = torch.zeros_like(maps[:, 0])
        for j in range(max(0, i - n // 2), min(count - 1, i + n // 2) + 1):
            total += maps[:, j] ** 2
        out[:, i] = maps[:, i] / (k + alpha * total) ** beta
    return out


def assert_same_function(
    out, expected, inputs, value_tol=(None, None), grad_tol=(None, None), expected_inputs=None
):
    """`out` equals `expected`, and so do their gradients for one random upstream gradient: of
    `inputs`, and for `expected` of `expected_inputs` where it was computed from a copy.
    Tolerances are (rtol, atol); (None, None) is assert_close's default for the dtype. Returns the
    gradient of `inputs`."""
    torch.testing.assert_close(out, expected, rtol=value_tol[0], atol=value_tol[1])
    upstream = torch.randn_like(expected)
    grad = torch.autograd.grad(out, inputs, upstream)[0]
    wrt = inputs if expected_inputs is None else expected_inputs
    expected_grad = torch.autograd.grad(expected, wrt, upstream)[0]
    torch.testing.assert_close(grad, expected_grad, rtol=grad_tol[0], atol=grad_tol[1])
    return grad


@pytest.fixture
def maps() -> torch.Tensor:
    # Large activations, so that alpha * sum(a^2) is comparable with k and the test has teeth.
    return torch.rand(2, 48, 5, 5, generator=torch.Generator().manual_seed(1)) * 200


def test_paper_rule_matches_formula_including_edge_maps(maps):
    out = response_norm("paper")(maps).double()
    expected = lrn_by_loop(maps, n=5, alpha=1e-4, beta=0.75, k=2.0)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # The edge maps sum over fewer neighbours (3 at maps 0 and 47): checked explicitly.
    for edge in (0, 1, 46, 47):
        torch.testing.assert_close(out[:, edge], expected[:, edge], rtol=1e-5, atol=1e-6)
    assert (out - maps).abs().max() > 1.0, "normalisation must actually change the maps"


def test_code2012_rule_divides_alpha_by_n(maps):
    out = response_norm("code2012", k=2.0)(maps).double()
    torch.testing.assert_close(out, lrn_by_loop(maps, 5, 1e-4 / 5, 0.75, 2.0), rtol=1e-5, atol=1e-6)
    out_k1 = response_norm("code2012", k=1.0)(maps).double()
    torch.testing.assert_close(out_k1, lrn_by_loop(maps, 5, 1e-4 / 5, 0.75, 1.0), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, response_norm("paper")(maps).double())


def test_torch_local_response_norm_needs_alpha_times_n(maps):
    # nn.LocalResponseNorm averages the squares, i.e. divides alpha by n: the paper's rule is alpha=5e-4.
    torch.testing.assert_close(
        nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)(maps),
        ResponseNorm(5, 1e-4, 0.75, 2.0)(maps),
    )


def test_off_is_identity(maps):
    assert torch.equal(response_norm("off")(maps), maps)


def test_unknown_rule_is_an_error():
    with pytest.raises(ValueError, match="unknown LRN rule 'papr'"):
        response_norm("papr")


def test_gradient_matches_loop_formula(maps):
    maps = maps[:, :8].double().requires_grad_()
    (ResponseNorm()(maps) ** 2).sum().backward()
    expected = maps.detach().clone().requires_grad_()
    (lrn_by_loop(expected, 5, 1e-4, 0.75, 2.0) ** 2).sum().backward()
    torch.testing.assert_close(maps.grad, expected.grad)


@pytest.mark.parametrize("beta", [0.75, 0.6])
def test_fast_path_equals_torch_reference_in_value_and_gradient(beta):
    from replicate.lrn import reference_response_norm

    maps = (torch.randn(3, 13, 6, 6, dtype=torch.float64) * 60).requires_grad_()
    fast = ResponseNorm(5, 1e-4, beta, 2.0)(maps)
    reference = reference_response_norm(maps, 5, 1e-4, beta, 2.0)
    torch.testing.assert_close(fast, reference)
    upstream = torch.randn_like(fast)
    (fast_grad,) = torch.autograd.grad(fast, maps, upstream)
    (reference_grad,) = torch.autograd.grad(reference, maps, upstream)
    torch.testing.assert_close(fast_grad, reference_grad)
    assert torch.autograd.gradcheck(
        lambda m: ResponseNorm(5, 1e-4, beta, 2.0)(m), (maps[:1, :7, :2, :2].detach().requires_grad_(),)
    )


def test_fast_path_in_float32_matches_the_reference():
    from replicate.lrn import reference_response_norm

    maps = (torch.rand(4, 48, 9, 9) * 150).requires_grad_()
    fast, reference = ResponseNorm()(maps), reference_response_norm(maps, 5, 1e-4, 0.75, 2.0)
    assert_same_function(fast, reference, maps, (1e-5, 1e-5), (1e-4, 1e-6))


def window_sum_by_shifts(values: torch.Tensor, size: int) -> torch.Tensor:
    """The clipped window sum of §3.3 as `size` shifted slices of the zero-padded maps."""
    count = values.shape[-3]
    padded = torch.nn.functional.pad(values, (0, 0, 0, 0, size // 2, (size - 1) // 2))
    return sum(padded.narrow(-3, offset, count) for offset in range(size))


@pytest.mark.parametrize("size", [5, 3, 4])
@pytest.mark.parametrize(
    "layout", ["contiguous", "channels_last", "columns_view", "columns_view_channels_last"]
)
def test_cpu_window_sum_as_a_banded_product_equals_the_shifted_sums(size, layout):
    from replicate.lrn import window_sum

    values = torch.randn(2, 12, 5, 7, dtype=torch.float64)
    if "channels_last" in layout:
        values = values.contiguous(memory_format=torch.channels_last)
    if "columns_view" in layout:  # the fused path's (N, 2, C/2, H, W) view of both columns' maps
        values = values.unflatten(1, (2, 6))
    expected = window_sum_by_shifts(values, size)
    torch.testing.assert_close(window_sum(values, size), expected)
    torch.testing.assert_close(window_sum(values, size, 1e-4), expected * 1e-4)
    if "columns_view" in layout:  # no column's window reaches into the other column
        torch.testing.assert_close(window_sum(values, size)[:, 1], window_sum_by_shifts(values[:, 1], size))


def test_cpu_window_sum_stays_in_float32_under_bf16_autocast():
    from replicate.lrn import window_sum

    values = torch.rand(2, 48, 6, 6) * 200
    with torch.autocast("cpu", dtype=torch.bfloat16):
        summed = window_sum(values * values, 5, 1e-4)
    assert summed.dtype == torch.float32
    torch.testing.assert_close(summed, window_sum_by_shifts(values * values, 5) * 1e-4)


@pytest.mark.parametrize(
    ("layout", "device"),
    [
        ("contiguous", "cpu"),
        ("channels_last", "cpu"),
        ("channels_last, many maps", "cpu"),  # _window_sum_innermost
        ("columns_view", "cpu"),
        ("columns_view, channels_last, many maps", "cpu"),  # the fused path with Winograd's layout
        pytest.param("contiguous", "cuda", marks=pytest.mark.gpu),
    ],
)
def test_compiled_kernel_equals_the_torch_path_in_value_and_gradient(layout, device):
    """`speed.lrn_kernel=compiled`: the same rule and closed-form backward, fused by torch.compile."""
    from replicate.lrn import INNERMOST_MAPS_JOINED

    groups = 2 if layout.startswith("columns_view") else 1  # the fused path: each column its own maps
    per_column = INNERMOST_MAPS_JOINED + 8 if "many maps" in layout else 24 // groups
    maps = (
        torch.rand(3, groups * per_column, 7, 9, generator=torch.Generator().manual_seed(2)).to(device) * 150
    )
    if "channels_last" in layout:
        maps = maps.contiguous(memory_format=torch.channels_last)
    maps.requires_grad_()
    expected = ResponseNorm()(maps, groups)
    compiled = response_norm_on("compiled")(maps, groups)
    assert_same_function(compiled, expected, maps, (1e-6, 1e-6), (1e-5, 1e-7))


def test_compiled_window_sum_of_many_channels_last_maps_equals_the_shifted_sum():
    """`_window_sum_innermost`, the clipped windows at both ends included, for odd and even sizes."""
    from replicate.lrn import INNERMOST_MAPS_JOINED, window_sum

    values = torch.rand(2, INNERMOST_MAPS_JOINED + 3, 3, 4, generator=torch.Generator().manual_seed(5))
    values = values.contiguous(memory_format=torch.channels_last)
    for size in (5, 4, 1):
        summed = torch.compile(window_sum, dynamic=False)(values, size, 0.5)
        torch.testing.assert_close(summed, window_sum_by_shifts(values, size) * 0.5)


def test_compiled_kernel_on_the_cpu_hands_the_pooling_channels_last_maps():
    """Its output is written channels-last (what `MaxPool` works in on the CPU), its input gradient
    in the input's own layout; a channels-last input keeps channels-last both ways."""
    for layout in (torch.contiguous_format, torch.channels_last):
        maps = (torch.rand(2, 6, 5, 4) * 100).contiguous(memory_format=layout).requires_grad_()
        out = response_norm_on("compiled")(maps)
        assert out.is_contiguous(memory_format=torch.channels_last)
        (grad,) = torch.autograd.grad(out, maps, torch.randn_like(out))
        assert grad.is_contiguous(memory_format=layout)


def test_compiled_kernel_stays_compiled_beyond_dynamo_s_eight_shapes():
    """Dynamo builds a function for 8 input shapes by default, then silently runs its torch ops one by
    one; one `make bench` process reached that. The LRN's kernels allow COMPILED_SHAPES."""
    from torch._dynamo.utils import counters

    norm = response_norm_on("compiled")
    built = counters["stats"]["unique_graphs"]
    for width in range(20, 30):  # shapes no other test gives it
        norm(torch.rand(2, 7, 3, width))
    assert counters["stats"]["unique_graphs"] - built == 10


def test_compiled_kernel_follows_the_formula_for_any_beta():
    """In float64, against §3.3 written out: the general power, not only beta = 0.75's roots."""
    maps = (torch.rand(2, 9, 3, 4, dtype=torch.float64) * 200).requires_grad_()
    out = response_norm_on("compiled", 5, 1e-4, 0.6, 2.0)(maps)
    copy = maps.detach().clone().requires_grad_()
    assert_same_function(out, lrn_by_loop(copy, 5, 1e-4, 0.6, 2.0), maps, expected_inputs=copy)


@pytest.mark.parametrize("kernel", ["compiled", "torch"])
def test_an_lrn_that_rectifies_its_input_equals_relu_then_lrn(kernel):
    """`use_lrn_kernel(model, "compiled")` moves the ReLU before an LRN into it (`rectify`): the same
    function and gradient, zero where the input is not positive, as the ReLU's own backward."""
    inputs = (torch.randn(3, 16, 6, 7, generator=torch.Generator().manual_seed(3)) * 100).requires_grad_()
    expected = ResponseNorm()(torch.relu(inputs))
    norm = response_norm_on(kernel)
    norm.rectify = True
    grad = assert_same_function(norm(inputs), expected, inputs, (1e-6, 1e-6), (1e-5, 1e-7))
    assert (grad[inputs <= 0] == 0).all() and (grad[inputs > 0] != 0).all()


def test_an_even_window_that_rectifies_its_input_equals_relu_then_lrn():
    """An even window takes torch's implementation (no closed-form backward): the ReLU still runs."""
    inputs = torch.randn(2, 8, 3, 3, generator=torch.Generator().manual_seed(4)) * 100
    norm = response_norm_on("compiled", 4, 1e-4, 0.75, 2.0)
    norm.rectify = True
    torch.testing.assert_close(norm(inputs), ResponseNorm(4, 1e-4, 0.75, 2.0)(torch.relu(inputs)))
