import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from replicate.data.sources import MIRROR_DIR

# Every wait on a subprocess or a file it writes is a guard against a hang, never a timing test: far
# above the slowest honest run on a 2-core CPU that another job keeps busy, with an empty compile cache.
HANG_GUARD_S = 1800
# The plain torch paths, for the end-to-end runs whose subject is not speed (training, resuming,
# sweeps, DDP): the default fast paths on a CPU build their kernels with torch.compile in every new
# process, minutes of a busy CI machine; tests/test_speed.py runs them end to end on their own.
PLAIN_PATHS = ["speed.lrn_kernel=torch", "speed.conv_algorithm=direct"]
# The bundled data: a test that prepares it skips in a checkout without the mirror beside it.
needs_mirror = pytest.mark.skipif(not MIRROR_DIR.is_dir(), reason="needs the data mirror beside the checkout")
ROOT = Path(__file__).resolve().parents[1]


def python_m(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m <args>` from the repository root, to its end; its output captured."""
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        env={**os.environ, **(env or {})},
    )


def pytest_configure(config):
    """Under pytest-xdist, each worker's torch takes its share of the cores, and the runs it starts in
    subprocesses inherit that share through OMP_NUM_THREADS. Each process would otherwise start a
    thread per core: with two workers busy at once on a 2-core CPU that is four threads on two cores,
    spinning against each other, and a network's step takes far longer than with one thread each."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """A test marked `gpu` needs one (`make gpu-evidence` selects them with -m gpu): skipped without."""
    if not torch.cuda.is_available():
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(pytest.mark.skip(reason="needs a GPU"))


@pytest.fixture
def images() -> torch.Tensor:
    """Two 224x224 crops on the paper's pixel scale (0-255 minus a mean: roughly +-128)."""
    generator = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 224, 224, generator=generator) * 255 - 128


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """Every test extracts and preprocesses into its own cache, never ~/.cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv("ALEXNET_CACHE", str(tmp_path_factory.mktemp("cache")))
    patch.delenv("ALEXNET_DATA", raising=False)
    yield
    patch.undo()


def encode(pixels: np.ndarray, fmt: str = "JPEG", mode: str | None = None, **options) -> bytes:
    image = Image.fromarray(pixels)
    if mode:
        image = image.convert(mode)
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def write_image_tree(root: Path, split: str, per_class: dict[str, int], size=(40, 30), seed=0) -> None:
    """root/split/<wnid>/<wnid>_<i>.JPEG, random pixels."""
    rng = np.random.default_rng(seed)
    for wnid, count in per_class.items():
        folder = root / split / wnid
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            (folder / f"{wnid}_{i}.JPEG").write_bytes(encode(pixels))


def response_norm_on(kernel: str, *rule) -> torch.nn.Module:
    """A `ResponseNorm(*rule)` running on `kernel` (torch, compiled, triton), as training sets it."""
    from replicate.lrn import ResponseNorm
    from replicate.speed import use_lrn_kernel

    norm = ResponseNorm(*rule)
    use_lrn_kernel(norm, kernel)
    return norm
