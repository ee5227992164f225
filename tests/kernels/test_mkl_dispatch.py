import subprocess
import sys
from pathlib import Path

from replicate.kernels.mkl_dispatch import VML_FUNCTIONS
from tests.conftest import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[2]
GRAIN = 32768  # ATen's at::internal::GRAIN_SIZE: an elementwise op on fewer numbers runs on one thread


def test_importing_the_package_first_calls_every_vml_function_on_one_thread():
    # A fresh interpreter with torch's functions spied on: `import replicate` calls each of them,
    # in float32 and float64, on too few numbers to be split across threads.
    script = f"""
import torch
calls = []
for name in {VML_FUNCTIONS!r}:
    def spy(numbers, *args, _name=name, _real=getattr(torch, name), **kwargs):
        calls.append((_name, str(numbers.dtype), numbers.numel()))
        return _real(numbers, *args, **kwargs)
    setattr(torch, name, spy)
import replicate
print(sorted({{(name, dtype) for name, dtype, _ in calls}}))
print(max((numel for *_, numel in calls), default=0))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert result.returncode == 0, result.stderr
    called, largest = result.stdout.splitlines()
    expected = sorted((name, dtype) for name in VML_FUNCTIONS for dtype in ("torch.float32", "torch.float64"))
    assert called == str(expected)
    assert int(largest) < GRAIN
