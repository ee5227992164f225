import pickle
import tarfile

import numpy as np
import pytest

from replicate.cifar.data import load_cifar10, read_python_batches
from replicate.data.sources import MIRROR_DIR, DataError
from tests.conftest import needs_mirror


@pytest.fixture(scope="module")
def exact_test_batch(tmp_path_factory):
    folder = tmp_path_factory.mktemp("subset")
    with tarfile.open(MIRROR_DIR / "cifar-10-subset-python.tar.gz") as tar:
        tar.extractall(folder, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return read_python_batches(folder / "cifar-10-batches-py", ["test_batch"], complete=False)


@needs_mirror
@pytest.mark.slow
def test_bundled_jpeg_cifar10_has_every_image_in_the_original_order(exact_test_batch):
    train = load_cifar10("train")
    test = load_cifar10("test")
    assert train.images.shape == (50_000, 32, 32, 3) and test.images.shape == (10_000, 32, 32, 3)
    assert (
        np.bincount(train.labels).tolist() == [5000] * 10 and np.bincount(test.labels).tolist() == [1000] * 10
    )
    assert train.labels[:3].tolist() == [6, 9, 9]  # data_batch_1 starts frog, truck, truck
    assert train.description == "JPEG-compressed CIFAR-10"
    exact_images, exact_labels = exact_test_batch
    assert np.array_equal(test.labels[:1017], exact_labels)
    error = test.images[:1017].astype(float) - exact_images.astype(float)
    psnr = 10 * np.log10(255**2 / (error**2).mean(axis=(1, 2, 3)))
    assert psnr.min() >= 23 and 29 < psnr.mean() < 32  # the README's figures: lossy, but the same images


@needs_mirror
def test_exact_subset_swaps_in_the_original_pixels(exact_test_batch):
    test = load_cifar10("test", exact_subset=True)
    exact_images, _ = exact_test_batch
    assert np.array_equal(test.images[:1017], exact_images)
    assert not np.array_equal(test.images[1017:1100], load_cifar10("test").images[:83])
    assert "exact pixels of the first 1017 images" in test.description


def write_batches(folder, per_batch: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, per_batch).tolist(),
            "batch_label": name,
        }
        with open(folder / name, "wb") as file:
            pickle.dump(batch, file)


def test_a_torchvision_cifar10_folder_is_accepted(tmp_path):
    write_batches(tmp_path / "cifar-10-batches-py", 10_000)
    test = load_cifar10("test", data_dir=tmp_path)
    assert test.images.shape == (10_000, 32, 32, 3) and test.description == "CIFAR-10 (exact pixels)"
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as file:
        raw = pickle.load(file)
    # CHW rows -> HWC images.
    assert np.array_equal(test.images[7], raw["data"][7].reshape(3, 32, 32).transpose(1, 2, 0))


def test_an_incomplete_cifar10_folder_is_named(tmp_path):
    write_batches(tmp_path / "cifar-10-batches-py", 1017)
    with pytest.raises(DataError, match="test_batch: 1017 images, expected 10000"):
        load_cifar10("test", data_dir=tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"garbage")
    with pytest.raises(DataError, match="test_batch: not a CIFAR-10 python batch"):
        load_cifar10("test", data_dir=tmp_path)
    with pytest.raises(DataError, match="split 'val'"):
        load_cifar10("val")
