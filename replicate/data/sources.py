"""Where data files come from, in order: `data.root`, $ALEXNET_DATA, a data mirror folder beside the
checkout if there is one, else the official download.

Archives are verified by checksum and extracted into a cache directory ($ALEXNET_CACHE, else
~/.cache/alexnet-2012); the folders they are found in are only ever read.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# A mirror of the project's data files beside the checkout (shared/data next to it), used when present.
MIRROR_DIR = REPO_ROOT.parent / "shared" / "data"


class DataError(RuntimeError):
    """Data that is missing, corrupt or laid out wrongly; the message names the path."""


@dataclass(frozen=True)
class Download:
    url: str
    md5: str  # the checksum the publisher gives


# The project's bundled data files (their SHA256SUMS in the mirror) and the official archive a user
# without them gets.
BUNDLED_SHA256 = {
    "imagenette-224-mini.tar": "464627c5bef8442181e531d5541294de3096ed24345b243209db03a53b49bce3",
    "imagenet-samples-200.tar": "41b11b30e0c087974b53a50116b94807121624f7808dbc081bcf4e868abb13b7",
    "cifar-10-jpeg.tar.gz": "04ef62a077dad2f8bcb72ac8e674362403612762a4a3cf7c3bbe0e17d611e6d7",
    "cifar-10-subset-python.tar.gz": "23e1a55233feb0192e28ccb78f552fc551f039b2fdd307272cac20300f6fe0a3",
    "ilsvrc2012-classes.tsv": "c106702a21c2efe941d3002bed05d7231fdeea34e37f6a1b058678a2e0911c51",
}
# Written out rather than read off torchvision.datasets, whose import costs every command seconds;
# tests/test_data_sources.py checks them against torchvision's.
OFFICIAL = {
    # fastai's Imagenette v2, 320 px shorter side, as torchvision.datasets.Imagenette fetches it.
    "imagenette": Download(
        "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-320.tgz", "3df6f0d01a2c9592104656642f5e78a3"
    ),
    # The original CIFAR-10 python batches (exact pixels), as torchvision.datasets.CIFAR10 fetches them.
    "cifar10": Download(
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"
    ),
}
IMAGENET_HELP = (
    "ImageNet cannot be downloaded automatically: register at https://image-net.org, download "
    "ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz into one "
    "folder (or unpack them into train/<wnid>/ and val/<wnid>/), then run with DATA=/that/folder."
)


def cache_dir(explicit: str | Path | None = None) -> Path:
    """Where extracted archives, downloads and preprocessed stores go."""
    path = Path(explicit or os.environ.get("ALEXNET_CACHE") or Path.home() / ".cache" / "alexnet-2012")
    path.mkdir(parents=True, exist_ok=True)
    return path


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def search_dirs(explicit: str | Path | None = None) -> list[Path]:
    """The folders searched for data files, in order: `explicit` (data.root), $ALEXNET_DATA, the
    mirror beside the checkout."""
    dirs = []
    if explicit is not None:
        if not Path(explicit).is_dir():
            raise DataError(f"data folder not found: {explicit}")
        dirs.append(Path(explicit))
    env = os.environ.get("ALEXNET_DATA")
    if env:
        if not Path(env).is_dir():
            raise DataError(f"$ALEXNET_DATA names a folder that does not exist: {env}")
        dirs.append(Path(env))
    if MIRROR_DIR.is_dir():
        dirs.append(MIRROR_DIR)
    return dirs


def find_bundled(name: str, explicit: str | Path | None = None) -> Path | None:
    """The first copy of bundled file `name` in `search_dirs`, checksum verified; None if absent."""
    for folder in search_dirs(explicit):
        path = folder / name
        if path.is_file():
            actual = file_digest(path)
            if actual != BUNDLED_SHA256[name]:
                raise DataError(
                    f"{path}: sha256 {actual} does not match the expected "
                    f"{BUNDLED_SHA256[name]}; the file is corrupt or a different version"
                )
            return path
    return None


def download(source: Download, destination: Path) -> Path:
    """Fetch `source` to `destination` with torchvision's downloader, kept only if its md5 matches."""
    from torchvision.datasets.utils import download_url

    if destination.is_file() and file_digest(destination, "md5") == source.md5:
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        download_url(source.url, str(destination.parent), destination.name, source.md5)
    except (OSError, RuntimeError, ValueError) as error:  # no network, HTTP errors, a bad checksum
        actual = file_digest(destination, "md5") if destination.is_file() else None
        destination.unlink(missing_ok=True)
        if actual is not None and actual != source.md5:
            raise DataError(
                f"download of {source.url}: md5 {actual} does not match the published {source.md5}"
            ) from None
        raise DataError(f"download of {source.url} failed: {error}") from None
    return destination


def safe_extract(archive: Path, destination: Path) -> Path:
    """Extract `archive` into `destination`, refusing members that would land outside it.

    Extracts into a temporary sibling first and renames it into place, so a killed extraction
    never leaves a half-filled folder that looks complete.
    """
    if (destination / ".complete").is_file():
        return destination
    staging = destination.with_name(destination.name + ".extracting")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                target = (staging / member.name).resolve()
                if (
                    not target.is_relative_to(staging.resolve())
                    or member.issym()
                    or member.islnk()
                    or member.isdev()
                ):
                    raise DataError(f"{archive}: refusing unsafe member {member.name!r}")
            tar.extractall(staging, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    except (tarfile.TarError, EOFError, OSError) as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise DataError(f"{archive}: cannot extract ({error}); the archive is corrupt or truncated") from None
    except BaseException:  # a refused member, Ctrl-C: no half-filled folder either
        shutil.rmtree(staging, ignore_errors=True)
        raise
    (staging / ".complete").write_text(str(archive) + "\n")
    shutil.rmtree(destination, ignore_errors=True)
    staging.replace(destination)
    return destination


def bundled_or_download(
    bundled_name: str, official: str, explicit: str | Path | None = None, cache: str | Path | None = None
) -> tuple[Path, bool]:
    """The extracted folder of the bundled archive; else of the official archive, taken from the
    search folders if a copy is there and downloaded otherwise (md5-verified either way).

    Returns (folder, is_bundled).
    """
    cache = cache_dir(cache)
    archive = find_bundled(bundled_name, explicit) if bundled_name in BUNDLED_SHA256 else None
    if archive is not None:
        return safe_extract(archive, cache / "extracted" / bundled_name.split(".")[0]), True
    source = OFFICIAL[official]
    name = source.url.rsplit("/", 1)[-1]
    copies = [folder / name for folder in search_dirs(explicit) if (folder / name).is_file()]
    if copies:
        archive = copies[0]
        if file_digest(archive, "md5") != source.md5:
            raise DataError(
                f"{archive}: md5 does not match the published {source.md5}; corrupt or another version"
            )
    else:
        try:
            archive = download(source, cache / "downloads" / name)
        except DataError as error:
            raise DataError(nowhere([bundled_name, name], explicit, str(error))) from None
    return safe_extract(archive, cache / "extracted" / name.split(".")[0]), False


def nowhere(names: list[str], explicit: str | Path | None, download_error: str) -> str:
    """The message when no copy of any of `names` is reachable: every place looked, and how to
    point the project at a local copy."""
    env = os.environ.get("ALEXNET_DATA")
    looked = [
        f"data.root: {explicit}" if explicit is not None else "data.root: not set",
        f"$ALEXNET_DATA: {env}" if env else "$ALEXNET_DATA: not set",
        f"the mirror beside the checkout: {MIRROR_DIR}" + ("" if MIRROR_DIR.is_dir() else " (absent)"),
        f"the official download: {download_error}",
    ]
    return (
        f"no copy of {' or '.join(names)} could be found. Looked in:\n  - "
        + "\n  - ".join(looked)
        + "\nPut one in a folder and point the project at it: data.root=/that/folder "
        "(make ... DATA=/that/folder) or ALEXNET_DATA=/that/folder"
    )
