"""The fused Triton LRN (`speed.lrn_kernel=triton`) against the torch path and §3.3's formula.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (the same kernel code, executed
with NumPy); with one they also run compiled, on the GPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from replicate.config import ConfigError
from replicate.data.sources import MIRROR_DIR
from replicate.kernels.lrn_triton import fused_response_norm, unavailable_reason
from replicate.lrn import ResponseNorm, _ResponseNormFunction, reference_response_norm
from replicate.speed import SpeedConfig
from tests.conftest import HANG_GUARD_S, response_norm_on
from tests.test_lrn import lrn_by_loop
from tests.test_train import train

ROOT = Path(__file__).resolve().parents[2]


def both_paths(maps: torch.Tensor, size: int, alpha: float, beta: float, k: float):
    """(output, input gradient) of the fused kernels and of the torch path, for one upstream gradient."""
    fused_in = maps.detach().clone().requires_grad_()
    torch_in = maps.detach().clone().requires_grad_()
    fused = fused_response_norm(fused_in, size, alpha, beta, k)
    reference = _ResponseNormFunction.apply(torch_in, size, alpha, beta, k)
    upstream = torch.randn(maps.shape, generator=torch.Generator().manual_seed(3)).to(maps.device)
    (fused_grad,) = torch.autograd.grad(fused, fused_in, upstream)
    (reference_grad,) = torch.autograd.grad(reference, torch_in, upstream)
    return (fused, fused_grad), (reference, reference_grad)


# (shape, alpha, beta, k): one column's maps; two columns side by side as ResponseNorm views them
# (N x G x C x H x W, each normalised over its own 11 maps); a general beta (the exp2/log2 power);
# the 2012 code's alpha / n with k = 1; positions more than one block of 256 and not a multiple of it
CASES = [
    ((2, 48, 9, 9), 1e-4, 0.75, 2.0),
    ((2, 2, 11, 5, 7), 1e-4, 0.75, 2.0),
    ((3, 6, 4, 4), 1e-4, 0.6, 2.0),
    ((1, 7, 19, 17), 2e-5, 0.75, 1.0),
]


def check_against_the_torch_path(device: str) -> None:
    """Every case, forward and backward, and the refusals; on `device`."""
    for shape, alpha, beta, k in CASES:
        # Activations up to 100, as after conv1's ReLU: alpha * sum(a^2) is then comparable with k.
        maps = (torch.rand(shape, generator=torch.Generator().manual_seed(1)) * 100).to(device)
        (fused, fused_grad), (reference, reference_grad) = both_paths(maps, 5, alpha, beta, k)
        torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused_grad, reference_grad, rtol=1e-4, atol=1e-6)
        assert (fused - maps).abs().max() > 1.0, "normalisation must actually change the maps"
        if len(shape) == 4:  # and both against §3.3 written out, edge maps included
            expected = lrn_by_loop(maps.cpu(), 5, alpha, beta, k)
            torch.testing.assert_close(fused.cpu().double(), expected, rtol=1e-5, atol=1e-5)
        with torch.no_grad():  # evaluation: the same kernel, no denominator kept
            assert torch.equal(fused_response_norm(maps, 5, alpha, beta, k), fused.detach())
    maps = (torch.rand(2, 9, 3, 5, generator=torch.Generator().manual_seed(2)) * 100).to(device)
    (fused, fused_grad), (_, reference_grad) = both_paths(maps, 3, 1e-3, 0.75, 2.0)  # another size
    torch.testing.assert_close(fused, reference_response_norm(maps, 3, 1e-3, 0.75, 2.0))
    torch.testing.assert_close(fused_grad, reference_grad, rtol=1e-4, atol=1e-6)
    for wrong, match in (
        (maps.to(memory_format=torch.channels_last), "contiguous fp32 maps and an odd size"),
        (maps.double(), "fp32"),
    ):
        with pytest.raises(ValueError, match=match):
            fused_response_norm(wrong, 5, 1e-4, 0.75, 2.0)
    with pytest.raises(ValueError, match="odd size"):
        fused_response_norm(maps, 4, 1e-4, 0.75, 2.0)


@pytest.mark.slow
def test_fused_kernels_equal_the_torch_path_in_the_interpreter():
    """Triton's interpreter runs the kernels on CPU tensors. It must be on before triton is first
    imported (triton's own jit'd helpers, tl.zeros among them, are defined then), so it runs in a
    process of its own."""
    pytest.importorskip("triton")
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from tests.kernels.test_lrn_triton import *; check_against_the_torch_path('cpu')",
        ],
        cwd=ROOT,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert done.returncode == 0, done.stderr[-4000:]


def test_fused_kernels_compile_for_an_h100():
    """Ahead of time, without a GPU: Triton's compiler down to sm_90 machine code (ptxas), which
    catches what its interpreter lets through (types, unsupported constructs)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from replicate.kernels import lrn_triton_kernels as kernels

    pointers = {"maps_ptr", "out_ptr", "den_ptr", "grad_ptr"}
    scalars = {"C": "i32", "P": "i32", "alpha": "fp32", "beta": "fp32", "k": "fp32"}
    for kernel in (kernels.forward, kernels.backward):
        for three_quarters in (True, False):
            constants = {"SIZE": 5, "THREE_QUARTERS": three_quarters, "KEEP": True, "BLOCK": 256}
            constants = {name: v for name, v in constants.items() if name in kernel.arg_names}
            signature = {
                name: "*fp32" if name in pointers else scalars.get(name, "constexpr")
                for name in kernel.arg_names
            }
            source = ASTSource(kernel, signature, constexprs=constants)
            compiled = triton.compile(
                source, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False}
            )
            assert ".target sm_90" in compiled.asm["ptx"] and compiled.asm["cubin"]


@pytest.mark.slow
def test_lrn_kernel_settings_that_cannot_work_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="lrn_kernel=triton takes NCHW maps outside torch.compile"):
        SpeedConfig(lrn_kernel="triton", compile=True)
    with pytest.raises(ConfigError, match="channels_last=True"):
        SpeedConfig(lrn_kernel="triton", channels_last=True)
    with pytest.raises(ConfigError, match="compile_mode=reduce-overhead needs compile=true"):
        SpeedConfig(compile_mode="reduce-overhead")
    assert "cpu" in unavailable_reason([torch.device("cpu")])
    if not MIRROR_DIR.is_dir():
        pytest.skip("the training run needs the data mirror beside the checkout")
    if not torch.cuda.is_available():  # a CPU run asking for the GPU kernels stops, saying why
        code, _, err = train(tmp_path, "train.max_steps=1", "speed.lrn_kernel=triton")
        assert code != 0
        assert "speed.lrn_kernel=triton: the fused kernels run on CUDA devices, and this run is on cpu" in err


@pytest.mark.gpu
def test_fused_kernels_equal_the_torch_path_on_the_gpu():
    check_against_the_torch_path("cuda")


@pytest.mark.gpu
def test_response_norm_uses_the_fused_kernels_on_the_gpu(monkeypatch):
    import replicate.kernels.lrn_triton as lrn_triton

    calls = []
    monkeypatch.setattr(
        lrn_triton, "fused_response_norm", lambda *a: calls.append(a) or fused_response_norm(*a)
    )
    maps = torch.rand(4, 96, 27, 27, device="cuda") * 100
    norm = response_norm_on("triton")
    torch.testing.assert_close(norm(maps, groups=2), ResponseNorm()(maps, groups=2), rtol=1e-5, atol=1e-5)
    assert len(calls) == 1 and calls[0][0].shape == (4, 2, 48, 27, 27)
