"""CIFAR-10 for the §3.1 (Figure 1) and §3.3 experiments, as uint8 arrays in the original order.

Sources, in order: a torchvision `CIFAR10` folder (`cifar-10-batches-py/`, exact pixels) under an
explicit path; the bundled JPEG copy of all 60,000 images (lossy: results must say "JPEG-compressed
CIFAR-10"), optionally with the exact pixels of the bundled 10% subset swapped in; the official
download. Decoded arrays are cached as .npz so later loads take a fraction of a second.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from replicate.data.sources import DataError, bundled_or_download, cache_dir, find_bundled

TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCHES = ["test_batch"]
PER_BATCH = 10_000
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class Cifar10:
    images: np.ndarray  # N x 32 x 32 x 3 uint8, HWC
    labels: np.ndarray  # N int64
    description: str  # says which pixels these are: results must repeat it


def read_python_batches(
    folder: Path, batches: list[str], complete: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """The CIFAR-10 python format: pickled dicts with `data` (N x 3072 CHW rows) and `labels`."""
    images, labels = [], []
    for name in batches:
        path = folder / name
        if not path.is_file():
            raise DataError(
                f"{path}: missing; a CIFAR-10 python folder holds {', '.join(TRAIN_BATCHES + TEST_BATCHES)}"
            )
        try:
            with open(path, "rb") as file:
                batch = pickle.load(file, encoding="latin1")
            data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as error:
            raise DataError(f"{path}: not a CIFAR-10 python batch ({error})") from None
        if complete and len(data) != PER_BATCH:
            raise DataError(
                f"{path}: {len(data)} images, expected {PER_BATCH}: an incomplete copy "
                "(the bundled 10% subset?)"
            )
        images.append(data)
        labels.append(np.asarray(batch["labels"], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def read_jpeg_archive(archive: Path, batches: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Decode the bundled JPEG copy in the original batch order (order.tsv), without unpacking."""
    wanted: dict[str, tuple[int, int]] = {}
    images = np.empty((PER_BATCH * len(batches), 32, 32, 3), np.uint8)
    labels = np.empty(PER_BATCH * len(batches), np.int64)
    try:
        with tarfile.open(archive) as tar:
            for member in tar:
                if member.name.endswith("order.tsv"):
                    rows = tar.extractfile(member).read().decode().splitlines()[1:]
                    for row in rows:
                        batch, index, label, path = row.split("\t")
                        if batch in batches:
                            position = batches.index(batch) * PER_BATCH + int(index)
                            wanted[path] = (position, int(label))
                elif member.isfile() and member.name.endswith(".jpg"):
                    if not wanted:
                        raise DataError(f"{archive}: order.tsv must come before the images")
                    relative = member.name.split("/", 1)[1]
                    if relative in wanted:  # the other split's images are skipped
                        position, label = wanted[relative]
                        image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                        images[position], labels[position] = np.asarray(image), label
    except (tarfile.TarError, OSError, EOFError) as error:
        raise DataError(f"{archive}: cannot read ({error})") from None
    if len(wanted) != len(images):
        raise DataError(
            f"{archive}: order.tsv lists {len(wanted)} images of {batches}, expected {len(images)}"
        )
    return images, labels


def load_cifar10(
    split: str = "train",
    data_dir: str | Path | None = None,
    cache: str | Path | None = None,
    exact_subset: bool = False,
) -> Cifar10:
    """CIFAR-10 `split` ('train': 50,000; 'test': 10,000) in the original python-batch order.

    exact_subset: with the JPEG copy, replace the first 1,017 images of each batch by their exact
    pixels from the bundled python subset.
    """
    if split not in ("train", "test"):
        raise DataError(f"CIFAR-10 split {split!r}: expected 'train' or 'test'")
    batches = TRAIN_BATCHES if split == "train" else TEST_BATCHES
    if data_dir is not None and (Path(data_dir) / "cifar-10-batches-py").is_dir():
        images, labels = read_python_batches(Path(data_dir) / "cifar-10-batches-py", batches)
        return Cifar10(images, labels, "CIFAR-10 (exact pixels)")
    archive = find_bundled("cifar-10-jpeg.tar.gz", data_dir)
    if archive is None:
        folder, _ = bundled_or_download("cifar-10-python.tar.gz", "cifar10", data_dir, cache)
        images, labels = read_python_batches(folder / "cifar-10-batches-py", batches)
        return Cifar10(images, labels, "CIFAR-10 (exact pixels)")
    cached = cache_dir(cache) / "cifar10" / f"jpeg-{split}.npz"
    if cached.is_file():
        with np.load(cached) as stored:
            images, labels = stored["images"], stored["labels"]
    else:
        images, labels = read_jpeg_archive(archive, batches)
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_name(cached.stem + ".partial.npz")
        np.savez(partial, images=images, labels=labels)
        partial.replace(cached)
    description = "JPEG-compressed CIFAR-10"
    if exact_subset:
        images = images.copy()
        folder, _ = bundled_or_download("cifar-10-subset-python.tar.gz", "cifar10", data_dir, cache)
        for i, batch in enumerate(batches):
            exact, exact_labels = read_python_batches(folder / "cifar-10-batches-py", [batch], complete=False)
            if not np.array_equal(exact_labels, labels[i * PER_BATCH : i * PER_BATCH + len(exact)]):
                raise DataError(f"{folder}/{batch}: labels disagree with the JPEG copy's order.tsv")
            images[i * PER_BATCH : i * PER_BATCH + len(exact)] = exact
        description += f" with the exact pixels of the first {len(exact)} images of each batch"
    return Cifar10(images, labels, description)


def first_images(cifar: Cifar10, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` images (0: all) in batch order as float N x 3 x 32 x 32 on the 0-255
    scale, and their labels (int64)."""
    count = count or len(cifar.labels)
    images = torch.from_numpy(cifar.images[:count]).permute(0, 3, 1, 2).float()
    return images, torch.from_numpy(cifar.labels[:count]).long()
