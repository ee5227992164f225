"""From a data config to DataLoaders: find the source, preprocess it once, batch it (§2, §4.1)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from replicate.config import ConfigError, NonNegativeInt, Positive, Range, Section
from replicate.data.device_decode import images_on
from replicate.data.imagenet import Split, class_names, ilsvrc_split, image_folder
from replicate.data.sources import (
    BUNDLED_SHA256,
    IMAGENET_HELP,
    OFFICIAL,
    DataError,
    bundled_or_download,
    cache_dir,
)
from replicate.data.store import ImageStore, StoreSpec, build_store, fingerprint
from replicate.data.transforms import Augment, AugmentConfig
from replicate.speed import default_freed_memory, release_freed_memory

# The bundled Imagenette subset: per class, 500 train and 150 val images.
IMAGENETTE_PER_CLASS = {"train": 500, "val": 150}


@dataclass
class DataConfig(Section):
    """Where the images come from, how they are stored, augmented and batched."""

    dataset: Literal["imagenette", "ilsvrc2012", "ilsvrc2010", "imagefolder"] = "imagenette"
    root: str | None = None  # DATA=: ILSVRC archives or an ImageFolder tree, or a folder of the bundled files
    cache_dir: str | None = (
        None  # extracted archives and stores; default $ALEXNET_CACHE or ~/.cache/alexnet-2012
    )
    train_split: str = "train"
    eval_split: str = "val"  # ilsvrc2010: "test" for Table 1
    limit_per_class: NonNegativeInt = 0  # >0: that many images per class, evenly spaced (quick runs, tests)
    store_format: Literal["raw", "jpeg"] = "raw"  # raw: exact, 192 KiB an image; jpeg: ~10x smaller
    jpeg_quality: Annotated[int, Range(1, 100)] = 95  # PIL's scale
    image_side: Positive = 256  # §2
    draft: bool = True  # JPEG draft mode when preprocessing large photos
    skip_unreadable: bool = False  # skip and count undecodable images instead of stopping
    batch_size: Positive = 128  # §5
    workers: NonNegativeInt = 2  # loader processes (0: in the training process)
    prefetch_factor: Positive = 4  # batches each worker prepares ahead
    pin_memory: bool = True  # page-locked batches for fast GPU copies (ignored without a GPU)
    persistent_workers: bool = True
    # Where training views are cut: workers (crop, flip, mean, colour noise in the loader
    # processes) or device (the workers send uint8 images and the random draws; the training
    # device does the pixel work: the same views, and far less CPU per image). auto: device when
    # training on a GPU (several times the images/s of the CPU workers: BENCHMARKS.md, "GPU"), else
    # workers (on a CPU the workers run beside the training process).
    augment_on: Literal["auto", "workers", "device"] = "auto"
    # Where a JPEG store is decoded: workers (PIL) or device (the workers send the compressed
    # bytes; the training device decodes the batch, with nvjpeg on a GPU). Needs
    # store_format=jpeg, and the views cut on the device too (augment_on device or auto).
    decode_on: Literal["workers", "device"] = "workers"
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.augment.crop_size > self.image_side:
            raise ConfigError(
                f"augment.crop_size = {self.augment.crop_size} is larger than image_side = {self.image_side}"
            )
        if self.decode_on == "device" and (self.store_format != "jpeg" or self.augment_on == "workers"):
            raise ConfigError(
                "decode_on=device decodes a JPEG store where the views are cut, so it needs "
                "store_format=jpeg and augment_on=device or auto (got store_format="
                f"{self.store_format}, augment_on={self.augment_on})"
            )


def even_subset(split: Split, per_class: int) -> Split:
    """`per_class` images of each class at even steps through its sorted list (deterministic)."""
    by_class: dict[int, list] = {}
    for ref in split.refs:
        by_class.setdefault(ref.label, []).append(ref)
    refs = []
    for label in sorted(by_class):
        members = by_class[label]
        take = min(per_class, len(members))
        refs += [members[i * len(members) // take] for i in range(take)]
    return Split(refs, split.classes)


@dataclass(frozen=True)
class Source:
    """Where a data set's images come from: the folder they were found or extracted in (None for the
    ILSVRC archives, read in place), and what a run record says of it (`label`, shown in tables)."""

    folder: Path | None
    record: dict[str, str]
    per_class: dict[str, int] | None = None  # per split, images per class to take (evenly spaced)


def locate_source(config: DataConfig) -> Source:
    """The configured data set's source, with the file and checksum it was verified against."""
    subset = {"subset": f"{config.limit_per_class} images per class"} if config.limit_per_class else {}
    if config.dataset == "imagenette":
        bundled_name, official = "imagenette-224-mini.tar", OFFICIAL["imagenette"]
        folder, bundled = bundled_or_download(bundled_name, "imagenette", config.root, config.cache_dir)
        per_class = IMAGENETTE_PER_CLASS
        counts = f"{per_class['train']} train / {per_class['val']} val per class"
        if bundled:
            record = {
                "label": "bundled Imagenette, 224 px",
                "file": bundled_name,
                "sha256": BUNDLED_SHA256[bundled_name],
            }
            return Source(folder, {**record, "images": counts, **subset})
        record = {
            "label": "official Imagenette, 320 px",
            "file": official.url.rsplit("/", 1)[-1],
            "md5": official.md5,
        }
        # the official archive: the bundled subset's counts, taken from it
        return Source(folder / "imagenette2-320", {**record, "images": counts, **subset}, per_class)
    if config.root is None:
        needs = IMAGENET_HELP if config.dataset.startswith("ilsvrc") else "holding train/ and val/"
        raise DataError(f"data.dataset={config.dataset} needs data.root (DATA=/path). {needs}")
    label = f"ILSVRC-{config.dataset[-4:]}" if config.dataset.startswith("ilsvrc") else "image folder"
    return Source(
        None if config.dataset.startswith("ilsvrc") else Path(config.root),
        {"label": label, "root": str(config.root), **subset},
    )


def source_split(
    config: DataConfig, split: str, classes: list[str] | None = None, source: Source | None = None
) -> Split:
    """The listing of `split` from the configured source (nothing decoded yet)."""
    source = source or locate_source(config)
    if config.dataset in ("ilsvrc2012", "ilsvrc2010"):
        result = ilsvrc_split(config.root, split, int(config.dataset[-4:]))
    else:
        result = image_folder(source.folder, split, classes)
        if source.per_class:
            result = even_subset(result, source.per_class.get(split, 10**9))
    if config.limit_per_class:
        result = even_subset(result, config.limit_per_class)
    return result


@dataclass
class Prepared:
    train: ImageStore
    eval: ImageStore
    stats: dict
    class_names: list[str]
    source: dict  # `Source.record` and the stores' folders: what a run record says produced its data


def prepare(config: DataConfig, workers: int | None = None) -> Prepared:
    """Preprocess the train and eval splits (once; resumable) and return their stores."""
    spec = StoreSpec(
        config.store_format, config.image_side, config.jpeg_quality, config.draft, config.skip_unreadable
    )
    root = cache_dir(config.cache_dir) / "stores"
    source = locate_source(config)
    train = source_split(config, config.train_split, source=source)
    evaluation = source_split(config, config.eval_split, train.classes, source)
    if evaluation.classes != train.classes:
        raise DataError(
            f"the {config.eval_split} split's classes differ from the train split's: mismatched files"
        )
    stores = []
    for name, split in ((config.train_split, train), (config.eval_split, evaluation)):
        folder = root / f"{config.dataset}-{name}-{fingerprint(split, spec)[:12]}"
        build_store(
            split,
            folder,
            spec,
            compute_stats=split is train,
            workers=workers,
            description=f"preprocess {config.dataset} {name}",
        )
        stores.append(ImageStore(folder))
    record = {**source.record, "stores": [store.folder.name for store in stores]}  # names hold fingerprints
    return Prepared(stores[0], stores[1], stores[0].stats(), class_names(train.classes, config.root), record)


class EpochBatches(Sampler):
    """Batches of (epoch, position, index): a seeded shuffle per epoch, resumable mid-epoch.

    With `world_size` > 1 each rank takes its slice of every global batch (DistributedDataParallel):
    the global batch, and so the augmentation of each image, is the same for any number of ranks.
    """

    def __init__(
        self,
        count: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size % world_size:
            raise ConfigError(f"data.batch_size {batch_size} is not divisible by {world_size} processes")
        self.count, self.batch_size, self.seed, self.shuffle = count, batch_size, seed, shuffle
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        full, rest = divmod(self.count, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0) - self.start_batch

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.count, generator=generator).tolist()
        else:
            order = list(range(self.count))
        local = self.batch_size // self.world_size
        for batch in range(self.start_batch, self.start_batch + len(self)):
            begin = batch * self.batch_size + self.rank * local
            positions = range(begin, min(begin + local, self.count))
            yield [(self.epoch, p, order[p]) for p in positions]


# What a training batch holds: views (train), uint8 images and draws (train_plan: augment_on=device),
# or JPEG bytes and draws (train_encoded: decode_on=device).
TRAINING_MODES = ("train", "train_plan", "train_encoded")


def training_mode(config: DataConfig, device: torch.device) -> str:
    """What the loader sends for training on `device` (TRAINING_MODES): the compressed bytes under
    decode_on=device (decoded where the views are cut); the uint8 images and their draws where the
    device cuts the views (augment_on=device, or auto on a GPU); else the views themselves."""
    if config.decode_on == "device":
        return "train_encoded"
    on_device = config.augment_on == "device" or (config.augment_on == "auto" and device.type == "cuda")
    return "train_plan" if on_device else "train"


class Batch(NamedTuple):
    """What the loader yields in every mode. `pixels` are the views themselves (evaluation; training
    views cut in the workers), or, with a `plan` (the batch's random draws, `Augment.plan`), the
    uint8 images or their JPEG bytes from which the training device cuts them."""

    pixels: torch.Tensor | dict[str, torch.Tensor]
    labels: torch.Tensor
    plan: dict[str, torch.Tensor] | None = None

    def views(
        self,
        augment: Augment,
        device: torch.device,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> torch.Tensor:
        """The views on `device` in `memory_format`, cut (and decoded) there first if need be."""
        views = (
            self.pixels
            if self.plan is None
            else augment.apply_plan(images_on(self.pixels, device), self.plan)
        )
        return views.to(device, non_blocking=True, memory_format=memory_format)


class StoreDataset(Dataset):
    """Batches from a store: `mode` train (one random view), centre, or ten_crop (B x 10 views).

    train_plan: the uint8 images with the batch's random draws, for `Augment.apply_plan` on the
    training device (`data.augment_on: device`). train_encoded: the same with the JPEG bytes in
    place of the images (`ImageStore.encoded`), decoded there too (`data.decode_on: device`)."""

    def __init__(self, store: ImageStore, augment: Augment, mode: str = "train") -> None:
        if mode not in TRAINING_MODES + ("centre", "ten_crop"):
            raise ValueError(f"mode {mode!r}: expected one of {TRAINING_MODES} or centre or ten_crop")
        self.store, self.augment, self.mode = store, augment, mode

    def __len__(self) -> int:
        return len(self.store)

    def __getitems__(self, keys: list[tuple[int, int, int]]) -> Batch:
        indices = [index for _, _, index in keys]
        if self.mode in ("train_plan", "train_encoded"):
            plan = self.augment.plan([(epoch, position) for epoch, position, _ in keys])
            pixels = (
                self.store.encoded(indices) if self.mode == "train_encoded" else self.store.images(indices)
            )
            return Batch(pixels, self.store.labels[indices], plan)
        images = self.store.images(indices)
        if self.mode == "train":
            views = self.augment.train(images, [(epoch, position) for epoch, position, _ in keys])
        else:
            views = getattr(self.augment, self.mode)(images)
        return Batch(views, self.store.labels[indices])

    def __getitem__(self, key: tuple[int, int, int]) -> Batch:
        return self.__getitems__([key])


def _whole_batch(batch):
    """The dataset already returns whole batches (its __getitems__). In a loader worker, the pages
    that making the batch freed go back to the kernel: see `speed.release_freed_memory`."""
    if get_worker_info() is not None:
        release_freed_memory()
    return batch


def _worker_init(_worker: int) -> None:
    torch.set_num_threads(1)  # workers do small ops; threads would only contend for the cores
    default_freed_memory()  # a worker's batches are freed back to the kernel, not kept


class _TrimmingLoader(DataLoader):
    """A DataLoader that gives the heap's free pages back before its workers fork (see
    `speed.release_freed_memory`)."""

    def _get_iterator(self):
        if self.num_workers > 0:
            release_freed_memory()
        return super()._get_iterator()


def make_loader(dataset: StoreDataset, sampler: EpochBatches, config: DataConfig) -> DataLoader:
    workers = config.workers
    return _TrimmingLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=_whole_batch,
        num_workers=workers,
        pin_memory=config.pin_memory and torch.cuda.is_available(),
        persistent_workers=config.persistent_workers and workers > 0,
        prefetch_factor=config.prefetch_factor if workers > 0 else None,
        worker_init_fn=_worker_init if workers > 0 else None,
        # Its own generator: creating an iterator must not draw from the global RNG (dropout's), or a
        # resumed run would see a different dropout stream than one never stopped.
        generator=torch.Generator().manual_seed(0),
    )
