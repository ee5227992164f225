"""ImageNet-style sources: ImageFolder trees and the official ILSVRC archives (§2).

Every source yields `ImageRef`s: a label and where the encoded image bytes are (a file, or a byte
range inside an uncompressed tar: the official train archive is a tar of per-class tars, read in
place so that its 140 GB never need unpacking). Class index = position of the wnid in the sorted
list of the split's wnids, the standard ILSVRC order.
"""

from __future__ import annotations

import io
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from replicate.data.sources import IMAGENET_HELP, DataError, find_bundled

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}
WNID = re.compile(r"^n\d{8}$")

# The official file names per year (ILSVRC-2010 is the only year with public test labels).
ILSVRC_FILES = {
    2012: {
        "train": "ILSVRC2012_img_train.tar",
        "val": "ILSVRC2012_img_val.tar",
        "devkit": "ILSVRC2012_devkit_t12.tar.gz",
    },
    2010: {
        "train": "ILSVRC2010_images_train.tar",
        "val": "ILSVRC2010_images_val.tar",
        "test": "ILSVRC2010_images_test.tar",
        "devkit": "ILSVRC2010_devkit-1.0.tar.gz",
        "test_labels": "ILSVRC2010_test_ground_truth.txt",
    },
}


@dataclass(frozen=True)
class ImageRef:
    """One encoded image: `path` whole, or `size` bytes at `offset` inside it (a tar member)."""

    name: str  # what errors show: a path, or 'archive.tar::member'
    label: int
    path: str
    offset: int = 0
    size: int = -1

    def read(self) -> bytes:
        with open(self.path, "rb") as file:
            file.seek(self.offset)
            return file.read(self.size)


@dataclass
class Split:
    refs: list[ImageRef]
    classes: list[str]  # wnids (or folder names), in label order

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(self.classes, 0)
        for ref in self.refs:
            counts[self.classes[ref.label]] += 1
        return counts


def class_names(wnids: list[str], data_dir: str | Path | None = None) -> list[str]:
    """Human-readable names from ilsvrc2012-classes.tsv when it can be found, else the wnids."""
    table = find_bundled("ilsvrc2012-classes.tsv", data_dir)
    if table is None:
        return list(wnids)
    names = dict(line.split("\t", 1) for line in table.read_text().splitlines() if "\t" in line)
    return [names.get(wnid, wnid).strip() for wnid in wnids]


def image_folder(root: str | Path, split: str, classes: list[str] | None = None) -> Split:
    """`root/split/<class>/*.JPEG`. `classes` (e.g. the train split's) must match the folders."""
    folder = Path(root) / split
    if not folder.is_dir():
        raise DataError(f"{folder}: not found; expected an ImageFolder tree {folder}/<wnid>/*.JPEG")
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not class_dirs:
        hint = (
            " It holds images directly: sort them into class folders, or point at the official "
            "archives with the devkit."
            if loose
            else ""
        )
        raise DataError(f"{folder}: no class folders; expected {folder}/<wnid>/*.JPEG.{hint}")
    found = [p.name for p in class_dirs]
    if classes is not None and found != classes:
        missing = sorted(set(classes) - set(found))
        extra = sorted(set(found) - set(classes))
        detail = (
            f"missing class folder {folder / missing[0]}"
            if missing
            else f"unexpected class folder {folder / extra[0]}"
        )
        raise DataError(
            f"{folder}: {detail}; every split must have the same classes "
            f"(missing {len(missing)}, unexpected {len(extra)})"
        )
    refs = []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{class_dir}: empty class folder (no .JPEG/.jpg/.png files)")
        refs += [ImageRef(str(p), label, str(p)) for p in files]
    return Split(refs, found)


def require_ilsvrc_classes(split: Split, root: Path) -> None:
    """An ILSVRC-2012 tree must hold exactly the 1000 classes of ilsvrc2012-classes.tsv."""
    table = find_bundled("ilsvrc2012-classes.tsv")
    if table is None:
        return
    expected = [line.split("\t", 1)[0] for line in table.read_text().splitlines() if line.strip()]
    if split.classes != expected:
        unknown = sorted(set(split.classes) - set(expected))
        raise DataError(
            f"{root}: {len(split.classes)} class folders, expected the 1000 ILSVRC-2012 wnids"
            + (f" (not an ILSVRC-2012 class: {unknown[0]})" if unknown else "")
        )


def tar_members(path: Path, base: int = 0, fileobj: io.IOBase | None = None) -> list[tarfile.TarInfo]:
    """Regular members of an uncompressed tar, their `offset_data` made absolute by `base`."""
    try:
        with tarfile.open(path if fileobj is None else None, fileobj=fileobj, mode="r:") as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
    except tarfile.TarError as error:
        raise DataError(f"{path}: not a readable uncompressed tar ({error})") from None
    for member in members:
        member.offset_data += base
    return members


def is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def archive_train(path: Path) -> Split:
    """The official train archive: one tar per wnid, each of that class's JPEGs."""
    inner = [m for m in tar_members(path) if m.name.endswith(".tar")]
    if not inner:
        raise DataError(f"{path}: holds no per-class <wnid>.tar files; is it the train archive?")
    classes = sorted(Path(m.name).stem for m in inner)
    label_of = {wnid: i for i, wnid in enumerate(classes)}
    refs = []
    with open(path, "rb") as file:
        for member in sorted(inner, key=lambda m: m.name):
            wnid = Path(member.name).stem
            file.seek(member.offset_data)
            blob = io.BytesIO(file.read(member.size))
            images = sorted(
                (m for m in tar_members(path, member.offset_data, blob) if is_image(m.name)),
                key=lambda m: m.name,
            )
            if not images:
                raise DataError(f"{path}::{member.name}: empty class archive")
            refs += [
                ImageRef(f"{path}::{member.name}::{m.name}", label_of[wnid], str(path), m.offset_data, m.size)
                for m in images
            ]
    return Split(refs, classes)


def read_devkit(path: Path, year: int) -> tuple[dict[int, str], list[int]]:
    """(ILSVRC id -> wnid for the 1000 leaf classes, validation labels as ILSVRC ids) from a devkit."""
    from scipy.io import loadmat  # only the official-archive path needs scipy

    try:
        with tarfile.open(path) as tar:
            names = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            meta = names.get("meta.mat")
            truth = names.get(f"ILSVRC{year}_validation_ground_truth.txt")
            if meta is None or truth is None:
                raise DataError(
                    f"{path}: no data/meta.mat or ILSVRC{year}_validation_ground_truth.txt: "
                    f"not the ILSVRC-{year} devkit"
                )
            synsets = loadmat(io.BytesIO(tar.extractfile(meta).read()), squeeze_me=True)["synsets"]
            labels = [int(v) for v in tar.extractfile(truth).read().split()]
    except (tarfile.TarError, OSError, KeyError, ValueError) as error:
        raise DataError(f"{path}: cannot read the ILSVRC-{year} devkit ({error})") from None
    id_field = f"ILSVRC{year}_ID"
    if id_field not in synsets.dtype.names:
        raise DataError(f"{path}: meta.mat has no {id_field} field: a devkit of another year?")
    leaves = {int(s[id_field]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    return leaves, labels


def archive_flat(
    path: Path, ids: list[int], id_to_wnid: dict[int, str], classes: list[str], what: str
) -> Split:
    """A flat archive of images (val or test) labelled, in file-name order, by ILSVRC ids."""
    members = sorted((m for m in tar_members(path) if is_image(m.name)), key=lambda m: m.name)
    if len(members) != len(ids):
        raise DataError(
            f"{path}: {len(members)} images but {len(ids)} {what} labels: mismatched devkit "
            "or ground-truth file"
        )
    label_of = {wnid: i for i, wnid in enumerate(classes)}
    try:
        refs = [
            ImageRef(f"{path}::{m.name}", label_of[id_to_wnid[i]], str(path), m.offset_data, m.size)
            for m, i in zip(members, ids, strict=True)
        ]
    except KeyError as error:
        raise DataError(
            f"{what} label {error} is not one of the devkit's 1000 classes: mismatched devkit"
        ) from None
    return Split(refs, classes)


def ilsvrc_split(root: str | Path, split: str, year: int = 2012) -> Split:
    """ILSVRC-`year` `split` from the official archives in `root`, or from `root/<split>/<wnid>/`."""
    root = Path(root)
    files = ILSVRC_FILES[year]
    if (root / split).is_dir():
        train_classes = (
            image_folder(root, "train").classes if split != "train" and (root / "train").is_dir() else None
        )
        result = image_folder(root, split, train_classes)
        if year == 2012:
            require_ilsvrc_classes(result, root / split)
        return result
    if split not in files or not (root / files[split]).is_file():
        raise DataError(
            f"{root}: neither {split}/<wnid>/ folders nor {files.get(split, '?')}. {IMAGENET_HELP}"
        )
    if split == "train":
        return archive_train(root / files["train"])
    devkit = root / files["devkit"]
    if not devkit.is_file():
        raise DataError(f"{devkit}: not found; the {split} labels come from the devkit. {IMAGENET_HELP}")
    id_to_wnid, val_ids = read_devkit(devkit, year)
    classes = sorted(id_to_wnid.values())
    if split == "val":
        return archive_flat(root / files["val"], val_ids, id_to_wnid, classes, "validation")
    truth = root / files["test_labels"]
    if not truth.is_file():
        raise DataError(f"{truth}: not found; ILSVRC-2010 test labels are published as this file")
    test_ids = [int(v) for v in truth.read_text().split()]
    return archive_flat(root / files["test"], test_ids, id_to_wnid, classes, "test")
