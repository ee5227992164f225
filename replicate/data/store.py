"""The paper's one-time preprocessing (§2) into a store that makes an epoch cheap to read.

§2: "we down-sampled the images to a fixed resolution of 256 x 256 ... rescaled the image such
that the shorter side was of length 256, and then cropped out the central 256 x 256 patch".

A store is a folder of append-only files, so a killed run resumes where it stopped:
  images.u8    (format raw)  N x 256 x 256 x 3 uint8: exact, 196,608 bytes an image
  images.jpg   (format jpeg) the 256x256 images re-encoded (quality 95 by default), with
  offsets.i64                where each starts: about a tenth of raw (measured: BENCHMARKS.md)
  labels.i16   N class indices
  progress.npz written atomically after each chunk: how far it got, and the running sums
               behind the mean image and the RGB covariance (§4.1), so those resume too
  manifest.json written last: counts per class, skipped files, format; its presence means done
  stats.npz    the mean image and the RGB eigenvalues/eigenvectors (training stores)
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from replicate.data.imagenet import ImageRef, Split
from replicate.data.sources import DataError

CHUNK = 64  # images per work item; progress is saved after every few chunks
VERSION = 1


@dataclass(frozen=True)
class StoreSpec:
    format: str = "raw"  # raw | jpeg
    side: int = 256  # §2
    jpeg_quality: int = 95
    draft: bool = True  # let libjpeg decode at a reduced scale when the image is far larger
    skip_unreadable: bool = False  # skip (and count) undecodable files instead of stopping


def load_rgb(data: bytes, name: str, side: int, draft: bool) -> np.ndarray:
    """Decode, convert to RGB (greyscale and CMYK too), shorter side -> `side`, central crop."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's warnings about odd EXIF data
        image = Image.open(io.BytesIO(data))
        if draft and image.format == "JPEG":
            # Decode at 1/2, 1/4 or 1/8 scale while both sides stay >= the target (PIL's draft mode).
            scale = side / min(image.size)
            image.draft(
                "RGB", (max(side, round(image.width * scale)), max(side, round(image.height * scale)))
            )
        image = image.convert("RGB")  # also forces the full decode: truncated files fail here
    width, height = image.size
    scale = side / min(width, height)
    size = (max(side, round(width * scale)), max(side, round(height * scale)))
    image = image.resize(size, Image.BILINEAR)
    left, top = (size[0] - side) // 2, (size[1] - side) // 2
    return np.asarray(image.crop((left, top, left + side, top + side)))


@dataclass
class Chunk:
    payloads: list[bytes]
    labels: list[int]
    skipped: list[str]
    pixel_sum_image: np.ndarray  # float64 side x side x 3
    pixel_sum: np.ndarray  # float64 3
    pixel_outer: np.ndarray  # float64 3x3: sum of x x^T over pixels


def process_chunk(args: tuple[list[ImageRef], StoreSpec]) -> Chunk:
    refs, spec = args
    chunk = Chunk([], [], [], np.zeros((spec.side, spec.side, 3)), np.zeros(3), np.zeros((3, 3)))
    for ref in refs:
        try:
            pixels = load_rgb(ref.read(), ref.name, spec.side, spec.draft)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            if not spec.skip_unreadable:
                raise DataError(
                    f"{ref.name}: unreadable image ({error}); set data.skip_unreadable=true "
                    "to skip and count such files"
                ) from None
            chunk.skipped.append(ref.name)
            continue
        if spec.format == "jpeg":
            out = io.BytesIO()
            Image.fromarray(pixels).save(out, "JPEG", quality=spec.jpeg_quality)
            chunk.payloads.append(out.getvalue())
        else:
            chunk.payloads.append(pixels.tobytes())
        chunk.labels.append(ref.label)
        flat = pixels.reshape(-1, 3).astype(np.float64)
        chunk.pixel_sum_image += pixels
        chunk.pixel_sum += flat.sum(0)
        chunk.pixel_outer += flat.T @ flat
    return chunk


def fingerprint(split: Split, spec: StoreSpec) -> str:
    """Identifies the source list, the files' contents as the file system dates and sizes them, and the
    settings: a resume never mixes two different runs, and an image replaced in place (same name)
    makes another store instead of reusing the old one."""
    digest = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode())
    stamps: dict[str, str] = {}  # an archive's members share one file
    for ref in split.refs:
        if ref.path not in stamps:
            try:
                stat = os.stat(ref.path)
                stamps[ref.path] = f"{stat.st_size}\t{stat.st_mtime_ns}"
            except OSError:
                stamps[ref.path] = "unreadable"  # reading it fails later, naming it
        digest.update(f"{ref.name}\t{ref.label}\t{ref.offset}\t{ref.size}\t{stamps[ref.path]}\n".encode())
    return digest.hexdigest()


def _atomic_savez(path: Path, **arrays) -> None:
    partial = path.with_name(path.stem + ".partial.npz")
    np.savez(partial, **arrays)
    partial.replace(path)


def _atomic_write(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


class StoreWriter:
    """Appends processed chunks and checkpoints its progress (resumable)."""

    def __init__(self, folder: Path, split: Split, spec: StoreSpec) -> None:
        self.folder, self.split, self.spec = folder, split, spec
        self.fingerprint = fingerprint(split, spec)
        self.images = folder / ("images.jpg" if spec.format == "jpeg" else "images.u8")
        self.done = self.written = self.bytes = 0
        self.skipped: list[str] = []
        side = spec.side
        self.sums = {"sum_image": np.zeros((side, side, 3)), "sum": np.zeros(3), "outer": np.zeros((3, 3))}
        folder.mkdir(parents=True, exist_ok=True)
        progress = folder / "progress.npz"
        if progress.is_file():
            self._resume(progress)
        else:
            for name in (self.images.name, "offsets.i64", "labels.i16"):
                (folder / name).write_bytes(b"")

    def _resume(self, progress: Path) -> None:
        with np.load(progress) as saved:
            if str(saved["fingerprint"]) != self.fingerprint:
                raise DataError(
                    f"{self.folder}: a store from a different source or settings is in the way; "
                    "delete it or use another cache directory"
                )
            self.done, self.written, self.bytes = (int(saved[k]) for k in ("done", "written", "bytes"))
            self.skipped = json.loads(str(saved["skipped"]))
            self.sums = {k: saved[k].copy() for k in self.sums}
        # Drop whatever was appended after the last checkpoint.
        sizes = {
            self.images.name: self.bytes,
            "offsets.i64": 8 * self.written,
            "labels.i16": 2 * self.written,
        }
        for name, size in sizes.items():
            with open(self.folder / name, "r+b") as file:
                file.truncate(size)

    def append(self, chunk: Chunk, refs_done: int) -> None:
        offsets = self.bytes + np.cumsum([0] + [len(p) for p in chunk.payloads[:-1]], dtype=np.int64)
        with open(self.images, "ab") as images:
            for payload in chunk.payloads:
                images.write(payload)
        with open(self.folder / "offsets.i64", "ab") as file:
            file.write(offsets.astype(np.int64).tobytes() if chunk.payloads else b"")
        with open(self.folder / "labels.i16", "ab") as file:
            file.write(np.asarray(chunk.labels, np.int16).tobytes())
        self.bytes += sum(len(p) for p in chunk.payloads)
        self.written += len(chunk.payloads)
        self.done += refs_done
        self.skipped += chunk.skipped
        self.sums["sum_image"] += chunk.pixel_sum_image
        self.sums["sum"] += chunk.pixel_sum
        self.sums["outer"] += chunk.pixel_outer

    def checkpoint(self) -> None:
        _atomic_savez(
            self.folder / "progress.npz",
            fingerprint=self.fingerprint,
            done=self.done,
            written=self.written,
            bytes=self.bytes,
            skipped=json.dumps(self.skipped),
            **self.sums,
        )

    def finish(self, compute_stats: bool) -> None:
        labels = np.fromfile(self.folder / "labels.i16", np.int16)
        counts = np.bincount(labels, minlength=len(self.split.classes)) if len(labels) else np.zeros(0)
        expected = self.split.counts()
        skipped_by_class = dict.fromkeys(self.split.classes, 0)
        skipped = set(self.skipped)
        for ref in self.split.refs:
            if ref.name in skipped:
                skipped_by_class[self.split.classes[ref.label]] += 1
        for index, wnid in enumerate(self.split.classes):
            if int(counts[index]) != expected[wnid] - skipped_by_class[wnid]:
                raise DataError(
                    f"{self.folder}: class {wnid} has {int(counts[index])} images, expected "
                    f"{expected[wnid] - skipped_by_class[wnid]}: the store is inconsistent; delete it"
                )
        if compute_stats:
            pixels = self.written * self.spec.side * self.spec.side
            mean_rgb = self.sums["sum"] / pixels
            covariance = self.sums["outer"] / pixels - np.outer(mean_rgb, mean_rgb)
            eigenvalues, eigenvectors = np.linalg.eigh(covariance)
            order = np.argsort(eigenvalues)[::-1]
            _atomic_savez(
                self.folder / "stats.npz",
                mean_image=(self.sums["sum_image"] / self.written).astype(np.float32),
                eigenvalues=eigenvalues[order],
                eigenvectors=eigenvectors[:, order],
                covariance=covariance,
                pixels=pixels,
            )
        manifest = {
            "version": VERSION,
            "spec": asdict(self.spec),
            "count": self.written,
            "classes": self.split.classes,
            "class_counts": dict(zip(self.split.classes, counts.tolist(), strict=True)),
            "skipped": self.skipped,
            "source_count": len(self.split.refs),
            "bytes": self.bytes,
            "stats": compute_stats,
            "fingerprint": self.fingerprint,
        }
        _atomic_write(self.folder / "manifest.json", json.dumps(manifest, indent=1))
        (self.folder / "progress.npz").unlink()


def _chunks(
    refs: Sequence[ImageRef], start: int, spec: StoreSpec
) -> Iterator[tuple[list[ImageRef], StoreSpec]]:
    for begin in range(start, len(refs), CHUNK):
        yield list(refs[begin : begin + CHUNK]), spec


def build_store(
    split: Split,
    folder: str | Path,
    spec: StoreSpec = StoreSpec(),
    compute_stats: bool = False,
    workers: int | None = None,
    description: str = "preprocess",
) -> Path:
    """Preprocess `split` into `folder` (resuming a killed run); returns the folder."""
    folder = Path(folder)
    if (folder / "manifest.json").is_file():
        ImageStore(folder)  # verifies it
        return folder
    if not split.refs:
        raise DataError(f"{folder}: nothing to preprocess (no images in the source)")
    writer = StoreWriter(folder, split, spec)
    workers = workers or os.cpu_count() or 1
    work = _chunks(split.refs, writer.done, spec)
    with tqdm(total=len(split.refs), initial=writer.done, unit="img", desc=description) as bar:
        if workers == 1:
            results = map(process_chunk, work)
            pool = None
        else:
            pool = multiprocessing.get_context("fork").Pool(workers)
            results = pool.imap(process_chunk, work)
        try:
            for i, chunk in enumerate(results):
                refs_done = min(CHUNK, len(split.refs) - writer.done)
                writer.append(chunk, refs_done)
                bar.update(refs_done)
                if i % 8 == 7:
                    writer.checkpoint()
        finally:
            # Also on an error or Ctrl-C: the counters only move after a whole chunk is appended.
            writer.checkpoint()
            if pool is not None:
                pool.terminate()
    writer.finish(compute_stats)
    if writer.skipped:
        print(f"{folder}: skipped {len(writer.skipped)} unreadable file(s), listed in manifest.json")
    return folder


class ImageStore:
    """Read side of a finished store: `len(store)`, `store.labels`, `store.images(indices)`."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        manifest_path = self.folder / "manifest.json"
        if not manifest_path.is_file():
            state = (
                "unfinished (run the preparation again to resume)"
                if (self.folder / "progress.npz").is_file()
                else "not a preprocessed store"
            )
            raise DataError(f"{self.folder}: {state}")
        self.manifest = json.loads(manifest_path.read_text())
        self.spec = StoreSpec(**self.manifest["spec"])
        self.count = self.manifest["count"]
        self.classes: list[str] = self.manifest["classes"]
        self.labels = torch.from_numpy(np.fromfile(self.folder / "labels.i16", np.int16).astype(np.int64))
        side = self.spec.side
        images = self.folder / ("images.jpg" if self.spec.format == "jpeg" else "images.u8")
        expected = self.manifest["bytes"]
        if (
            len(self.labels) != self.count
            or not images.is_file()
            or images.stat().st_size != expected
            or (self.spec.format == "raw" and expected != self.count * side * side * 3)
        ):
            raise DataError(
                f"{self.folder}: files do not match manifest.json (truncated or modified); delete the "
                "folder and prepare the data again"
            )
        self._images_path = images
        self._pixels: np.ndarray | None = None  # opened lazily, per process (memmaps do not pickle)
        if self.spec.format == "jpeg":
            self.offsets = np.append(np.fromfile(self.folder / "offsets.i64", np.int64), expected)

    def __len__(self) -> int:
        return self.count

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pixels": None}

    def _open(self) -> np.ndarray:
        if self._pixels is None:
            self._pixels = np.memmap(self._images_path, np.uint8, "r")
        return self._pixels

    def images(self, indices: Sequence[int]) -> torch.Tensor:
        """uint8 images, B x side x side x 3 (HWC, RGB)."""
        data, side = self._open(), self.spec.side
        if self.spec.format == "raw":
            frames = data.reshape(self.count, side, side, 3)
            return torch.from_numpy(np.stack([frames[i] for i in indices]))
        out = np.empty((len(indices), side, side, 3), dtype=np.uint8)
        for row, i in enumerate(indices):
            encoded = io.BytesIO(data[self.offsets[i] : self.offsets[i + 1]].tobytes())
            out[row] = np.asarray(Image.open(encoded).convert("RGB"))
        return torch.from_numpy(out)

    def encoded(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """A JPEG store's compressed images, undecoded, for decoding on the training device
        (`data.decode_on: device`): their bytes end to end in one uint8 tensor (one buffer to pass
        between processes, not one per image), each one's size, and the store indices."""
        if self.spec.format != "jpeg":
            raise DataError(f"{self.folder}: a {self.spec.format} store holds no JPEG bytes")
        data = self._open()
        ranges = [(int(self.offsets[i]), int(self.offsets[i + 1])) for i in indices]
        joined = (
            np.concatenate([data[begin:end] for begin, end in ranges]) if ranges else np.zeros(0, np.uint8)
        )
        return {
            "jpeg": torch.from_numpy(joined),
            "sizes": torch.tensor([end - begin for begin, end in ranges], dtype=torch.long),
            "indices": torch.tensor(list(indices), dtype=torch.long),
        }

    def stats(self) -> dict[str, np.ndarray]:
        """The mean image (0-255) and RGB eigenvalues/eigenvectors of a training store (§4.1)."""
        path = self.folder / "stats.npz"
        if not path.is_file():
            raise DataError(f"{path}: missing; statistics are computed from the training split only")
        with np.load(path) as stats:
            return {key: stats[key] for key in stats.files}
