"""`make bench-data`: training-pipeline images/s, this repo's vs a plain torchvision pipeline.

Both read the same full-size ImageNet photos (the bundled imagenet-samples-200) with the same
number of workers and batch size, in this one process, alternating, several repeats:
  baseline: ImageFolder + PIL + Resize(256) + RandomCrop(224) + flip + ToTensor + Normalize,
            decoding and resizing every full-size JPEG every epoch;
  ours:     the paper's trick (§2): preprocess once to 256x256, then each epoch only reads the store
            and applies crop + flip + PCA colour noise + mean subtraction (§4.1).
The one-time preprocessing rate is reported separately. `--steady N` also times the training
loader in its steady state (the store read N times per epoch), with the views cut by the workers
and with them cut on the training device (`data.augment_on: device`; the GPU when there is one).
The JPEG store is also timed decoded on the training device (`data.decode_on: device`: nvjpeg on
a GPU), the workers sending only its compressed bytes.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from replicate.bench import records as bench_records
from replicate.bench.arguments import whole_number
from replicate.data.imagenet import image_folder
from replicate.data.loader import DataConfig, EpochBatches, StoreDataset, make_loader
from replicate.data.sources import DataError, find_bundled
from replicate.data.store import ImageStore, StoreSpec, build_store
from replicate.data.transforms import Augment, AugmentConfig

ILSVRC2012_TRAIN = 1_281_167


def photo_tree(workdir: Path, limit: int) -> Path:
    """The bundled full-size photos as an ImageFolder tree, one class per photo."""
    archive = find_bundled("imagenet-samples-200.tar")
    if archive is None:
        raise DataError(
            "bench-data needs imagenet-samples-200.tar in $ALEXNET_DATA or the data mirror beside the "
            "checkout"
        )
    root = workdir / "photos"
    with tarfile.open(archive) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)[:limit]
        for member in members:
            wnid = Path(member.name).name.split("_")[0]
            (root / "train" / wnid).mkdir(parents=True, exist_ok=True)
            (root / "train" / wnid / Path(member.name).name).write_bytes(tar.extractfile(member).read())
    return root


def epoch_rate(loader, count: int) -> float:
    start = time.perf_counter()
    seen = sum(len(batch[1]) for batch in loader)  # the labels, in torchvision's (images, labels) and a Batch
    assert seen == count, f"an epoch saw {seen} images, expected {count}"
    return count / (time.perf_counter() - start)


class RepeatedStore:
    """A store read `times` over as one long epoch: a steady-state loader rate (many batches per
    worker) from a few hundred photos. The pixels then sit in the page cache: disk reads are not
    in the figure (ILSVRC-2012's raw store is 252 GB; see BENCHMARKS.md)."""

    def __init__(self, store: ImageStore, times: int) -> None:
        self.store, self.times = store, times
        self.labels = store.labels.repeat(times)

    def __len__(self) -> int:
        return len(self.store) * self.times

    def images(self, indices) -> torch.Tensor:
        return self.store.images([i % len(self.store) for i in indices])

    def encoded(self, indices) -> dict[str, torch.Tensor]:
        return self.store.encoded([i % len(self.store) for i in indices])


def steady_rate(
    store: ImageStore,
    augment: Augment,
    config: DataConfig,
    times: int,
    repeats: int,
    device: torch.device | None = None,
) -> list[float]:
    """images/s of the training loader over `times` passes of the store per timed epoch. With a
    `device`, the workers send uint8 images (a JPEG store: its compressed bytes) and the draws, and
    the views are cut there (`data.augment_on: device`; `data.decode_on: device`), in the time."""
    repeated = RepeatedStore(store, times)
    sampler = EpochBatches(len(repeated), config.batch_size, seed=0)
    if device is None:
        mode = "train"
    else:
        mode = "train_encoded" if store.spec.format == "jpeg" else "train_plan"
    loader = make_loader(StoreDataset(repeated, augment, mode), sampler, config)

    def epoch() -> float:
        start, seen = time.perf_counter(), 0
        for batch in loader:
            if device is not None:
                batch.views(augment, device)
            seen += len(batch.labels)
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        assert seen == len(repeated), f"an epoch saw {seen} images, expected {len(repeated)}"
        return seen / (time.perf_counter() - start)

    epoch()  # warm-up: worker start
    rates = []
    for repeat in range(repeats):
        sampler.set_epoch(repeat + 1)
        rates.append(epoch())
    return rates


def run(workers: int, repeats: int, epochs: int, limit: int, batch_size: int, steady: int = 0) -> dict:
    from torchvision import datasets  # here, not on import: seconds for every CLI command
    from torchvision import transforms as T

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        root = photo_tree(workdir, limit)
        split = image_folder(root, "train")
        count = len(split.refs)
        start = time.perf_counter()
        store = ImageStore(
            build_store(
                split,
                workdir / "store",
                StoreSpec(),
                compute_stats=True,
                workers=workers,
                description="preprocess (one-time)",
            )
        )
        preprocess_rate = count / (time.perf_counter() - start)
        jpeg = ImageStore(
            build_store(
                split,
                workdir / "jpeg",
                StoreSpec(format="jpeg"),
                workers=workers,
                description="preprocess (jpeg store)",
            )
        )

        baseline = datasets.ImageFolder(
            str(root / "train"),
            T.Compose(
                [
                    T.Resize(256),
                    T.RandomCrop(224),
                    T.RandomHorizontalFlip(),
                    T.ToTensor(),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
                ]
            ),
        )
        baseline_loader = DataLoader(
            baseline, batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=workers > 0
        )
        config = DataConfig(workers=workers, batch_size=batch_size)
        sampler = EpochBatches(count, batch_size, seed=0)
        augment = Augment(AugmentConfig(), store.stats())
        loaders = {
            "baseline": baseline_loader,
            "ours": make_loader(StoreDataset(store, augment), sampler, config),
            "ours_jpeg": make_loader(StoreDataset(jpeg, augment), sampler, config),
        }
        rates: dict[str, list[float]] = {name: [] for name in loaders}
        for loader in loaders.values():
            epoch_rate(loader, count)  # warm-up: worker start, caches
        for repeat in range(repeats):
            for name, loader in loaders.items():
                total = 0.0
                for epoch in range(epochs):
                    sampler.set_epoch(repeat * epochs + epoch)
                    total += count / epoch_rate(loader, count)
                rates[name].append(epochs * count / total)
        jpeg_bytes = jpeg.manifest["bytes"] / count
        if steady:
            rates["steady_raw"] = steady_rate(store, augment, config, steady, repeats)
            rates["steady_jpeg"] = steady_rate(jpeg, augment, config, steady, repeats)
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            rates["steady_raw_device"] = steady_rate(store, augment, config, steady, repeats, device)
            rates["steady_jpeg_device"] = steady_rate(jpeg, augment, config, steady, repeats, device)
            rates["augment_device"] = [str(device)]
        shutil.rmtree(workdir / "store")
    ratios = {
        name: [o / b for o, b in zip(rates[name], rates["baseline"], strict=True)]
        for name in ("ours", "ours_jpeg")
    }
    return {
        "images": count,
        "workers": workers,
        "batch_size": batch_size,
        "preprocess_rate": preprocess_rate,
        "jpeg_bytes": jpeg_bytes,
        **rates,
        "ratios": ratios,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "steady": steady,
        **bench_records.origin(),
    }


def report(result: dict) -> str:
    def spread(values: list[float]) -> str:
        return f"min {min(values):.0f} / median {statistics.median(values):.0f} / max {max(values):.0f}"

    def ratio(values: list[float]) -> str:
        return f"min {min(values):.2f} / median {statistics.median(values):.2f} / max {max(values):.2f}"

    raw_bytes = 256 * 256 * 3
    steady = (
        [
            f"steady state, the store read {result['steady']} times per epoch: raw "
            f"{spread(result['steady_raw'])} / jpeg {spread(result['steady_jpeg'])} images/s",
            f"steady state, raw store, views cut on {result['augment_device'][0]} (data.augment_on=device): "
            f"{spread(result['steady_raw_device'])} images/s",
        ]
        if result.get("steady_raw")
        else []
    )
    if result.get("steady_jpeg_device"):
        steady.append(
            f"steady state, jpeg store decoded and views cut on {result['augment_device'][0]} "
            f"(data.decode_on=device): {spread(result['steady_jpeg_device'])} images/s"
        )
    if result.get("gpu_jpeg"):  # records from before decode_on=device: a decode-and-crop loop alone
        steady.append(
            f"jpeg store decoded on the GPU ({result['gpu']}, nvjpeg) + crop/flip/mean: "
            f"{spread(result['gpu_jpeg'])} images/s"
        )
    return "\n".join(
        [
            f"images: {result['images']} full-size ImageNet photos; workers: {result['workers']}; "
            f"batch: {result['batch_size']}; torch {torch.__version__}",
            bench_records.origin_line(result),
            f"one-time preprocessing to 256x256: {result['preprocess_rate']:.0f} images/s",
            f"baseline (torchvision ImageFolder + PIL + Resize(256) ...): "
            f"{spread(result['baseline'])} images/s",
            f"ours, raw store (256x256 + crop/flip/PCA/mean): {spread(result['ours'])} images/s",
            f"ours, jpeg store (q95, decoded each epoch): {spread(result['ours_jpeg'])} images/s",
            f"ratio ours/baseline, raw store: {ratio(result['ratios']['ours'])}  (target >= 3)",
            f"ratio ours/baseline, jpeg store: {ratio(result['ratios']['ours_jpeg'])}",
            f"store size per image: raw {raw_bytes:,} B; jpeg {result['jpeg_bytes']:,.0f} B (measured) -> "
            f"ILSVRC-2012 train (1,281,167 images): raw {raw_bytes * ILSVRC2012_TRAIN / 1e9:.0f} GB, "
            f"jpeg {result['jpeg_bytes'] * ILSVRC2012_TRAIN / 1e9:.0f} GB",
            *steady,
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m replicate bench-data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workers", type=whole_number(0), default=2)
    parser.add_argument("--repeats", type=whole_number(1), default=5)
    parser.add_argument("--epochs", type=whole_number(1), default=3, help="epochs over the photos per repeat")
    parser.add_argument("--batch-size", type=whole_number(1), default=50)
    parser.add_argument(
        "--steady",
        type=whole_number(0),
        default=0,
        help="also time the loader over the store read this many times per epoch",
    )
    parser.add_argument("--json", type=Path, help="also write the raw rates here")
    parser.add_argument("--smoke", action="store_true", help="seconds-long run for CI: no meaningful timing")
    args = parser.parse_args(argv)
    bench_records.check_json_option(parser, args.json)
    if args.smoke:
        result = run(workers=0, repeats=1, epochs=1, limit=8, batch_size=4, steady=2)
    else:
        result = run(args.workers, args.repeats, args.epochs, 200, args.batch_size, args.steady)
    print(report(result))
    if args.json:
        bench_records.write(args.json, result)
    return 0
