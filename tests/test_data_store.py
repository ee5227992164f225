import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from replicate.data.device_decode import decode_batch
from replicate.data.imagenet import ImageRef, Split, image_folder
from replicate.data.sources import DataError
from replicate.data.store import ImageStore, StoreSpec, build_store, load_rgb
from tests.conftest import HANG_GUARD_S, encode, write_image_tree

ROOT = Path(__file__).resolve().parents[1]


def refs_for(tmp_path: Path, arrays: list[np.ndarray], fmt: str = "PNG", labels=None) -> Split:
    refs = []
    for i, pixels in enumerate(arrays):
        path = tmp_path / f"img{i:04d}.{fmt.lower()}"
        path.write_bytes(encode(pixels, fmt))
        refs.append(ImageRef(str(path), 0 if labels is None else labels[i], str(path)))
    return Split(refs, ["a"] if labels is None else sorted({f"c{label}" for label in labels}))


def test_shorter_side_to_256_then_the_central_crop():
    # A 512 x 300 (w x h) image whose red channel is its column index / 2: after scaling by
    # 256/300 the central 256 columns of the 437 are columns 90..346, i.e. source columns 106..405.
    columns = np.tile((np.arange(512) // 2).astype(np.uint8), (300, 1))
    pixels = np.stack([columns, np.zeros_like(columns), np.zeros_like(columns)], -1)
    out = load_rgb(encode(pixels, "PNG"), "wide.png", 256, draft=False)
    assert out.shape == (256, 256, 3)
    left_source, right_source = (90 + 0.5) * 300 / 256, (345 + 0.5) * 300 / 256
    assert abs(int(out[128, 0, 0]) - left_source / 2) <= 1.5
    assert abs(int(out[128, -1, 0]) - right_source / 2) <= 1.5


def position_coded(width: int, height: int) -> np.ndarray:
    """Every pixel's colour names its position: red the column, green the row (mod 256), blue which
    256-block of each."""
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack([cols % 256, rows % 256, (cols // 256) * 16 + rows // 256], -1).astype(np.uint8)


@pytest.mark.parametrize(
    "width, height, left, top",
    [(400, 256, 72, 0), (256, 400, 0, 72), (256, 256, 0, 0), (256, 259, 0, 1), (301, 256, 22, 0)],
)
def test_the_central_window_exactly_on_both_axes_at_256(width, height, left, top):
    """§2: an image whose shorter side is already 256 is only cropped: to the exact central window
    (offsets counted by hand, the odd pixel to the right or bottom), on either axis."""
    pixels = position_coded(width, height)
    out = load_rgb(encode(pixels, "PNG"), "coded.png", 256, draft=False)
    np.testing.assert_array_equal(out, pixels[top : top + 256, left : left + 256])


@pytest.mark.parametrize(
    "width, height, scaled, left, top", [(512, 600, (256, 300), 0, 22), (600, 517, (297, 256), 20, 0)]
)
def test_a_larger_image_is_scaled_to_256_then_cut_to_the_exact_central_window(
    width, height, scaled, left, top
):
    """The shorter side scaled to 256 (sizes and offsets counted by hand), then the central window
    of the scaled image, exactly, on either axis."""
    pixels = position_coded(width, height)
    out = load_rgb(encode(pixels, "PNG"), "coded.png", 256, draft=False)
    whole = np.asarray(Image.fromarray(pixels).resize(scaled, Image.BILINEAR))
    np.testing.assert_array_equal(out, whole[top : top + 256, left : left + 256])
    down, right = (1, 0) if scaled[1] > 256 else (0, 1)  # one pixel along the longer side: differs
    assert not np.array_equal(out, whole[top + down : top + down + 256, left + right : left + right + 256])


def test_greyscale_and_cmyk_are_converted_to_rgb(tmp_path):
    pixels = np.full((300, 300, 3), 120, np.uint8)
    grey = load_rgb(encode(pixels, "JPEG", mode="L"), "grey.jpg", 256, draft=True)
    cmyk = load_rgb(encode(pixels, "JPEG", mode="CMYK"), "cmyk.jpg", 256, draft=True)
    assert grey.shape == cmyk.shape == (256, 256, 3)
    assert abs(float(grey.mean()) - 120) < 2 and abs(float(cmyk.mean()) - 120) < 3


def test_raw_store_holds_exactly_the_preprocessed_pixels_and_labels(tmp_path):
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:300, 0:260]
    smooth = np.stack([rows * 0.8, cols * 0.9, (rows + cols) * 0.4], -1)  # photo-like, not noise
    arrays = [
        np.clip(smooth + 20 * i + rng.normal(0, 3, smooth.shape), 0, 255).astype(np.uint8) for i in range(6)
    ]
    split = refs_for(tmp_path, arrays, labels=[0, 0, 1, 1, 1, 0])
    store = ImageStore(build_store(split, tmp_path / "store", workers=1))
    assert len(store) == 6 and store.labels.tolist() == [0, 0, 1, 1, 1, 0]
    assert store.manifest["class_counts"] == {"c0": 3, "c1": 3}
    for i, ref in enumerate(split.refs):
        np.testing.assert_array_equal(store.images([i])[0].numpy(), load_rgb(ref.read(), ref.name, 256, True))
    jpeg = ImageStore(build_store(split, tmp_path / "jpeg", StoreSpec(format="jpeg"), workers=2))
    difference = (jpeg.images(range(6)).float() - store.images(range(6)).float()).abs().mean()
    assert 0 < difference < 3  # lossy (quality 95), but the same images


def test_mean_image_and_pca_recover_a_known_covariance(tmp_path):
    # Pixels drawn from N(mu, C) with a known C: the store's statistics must find mu, C and its eigenpairs.
    rng = np.random.default_rng(1)
    mu = np.array([120.0, 110.0, 90.0])
    factor = np.array([[30.0, 0, 0], [20.0, 15.0, 0], [10.0, 5.0, 8.0]])
    covariance = factor @ factor.T
    arrays = []
    for _ in range(8):
        values = mu + rng.standard_normal((256 * 256, 3)) @ factor.T
        arrays.append(np.clip(values, 0, 255).round().astype(np.uint8).reshape(256, 256, 3))
    split = refs_for(tmp_path, arrays)
    stats = ImageStore(build_store(split, tmp_path / "store", compute_stats=True, workers=1)).stats()
    np.testing.assert_allclose(stats["mean_image"], np.mean(arrays, axis=0), atol=1e-3)  # exact per pixel
    np.testing.assert_allclose(stats["covariance"], covariance, rtol=0.03, atol=3.0)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    np.testing.assert_allclose(stats["eigenvalues"], eigenvalues[::-1], rtol=0.03)
    for k in range(3):  # eigenvectors up to sign
        assert abs(abs(stats["eigenvectors"][:, k] @ eigenvectors[:, 2 - k]) - 1) < 0.01
    assert stats["eigenvalues"][0] > stats["eigenvalues"][1] > stats["eigenvalues"][2]


@pytest.mark.slow
def test_preprocessing_resumes_after_sigkill_with_the_same_result(tmp_path):
    write_image_tree(tmp_path / "data", "train", {"n01": 700, "n02": 700}, size=(320, 300))
    # The child stops itself where a kill hurts most: its progress saved, and a chunk written past it
    # (which a resume must drop). It says so with a file; the kill waits for that, not for a time.
    mark = tmp_path / "past-a-checkpoint"
    script = textwrap.dedent(f"""
        import pathlib, time
        from replicate.data import store
        from replicate.data.imagenet import image_folder
        saved = []
        checkpoint, append = store.StoreWriter.checkpoint, store.StoreWriter.append
        def checkpointed(self):
            checkpoint(self)
            saved.append(self.done)
        def appended(self, chunk, refs_done):
            append(self, chunk, refs_done)
            if saved and self.done > saved[-1]:
                pathlib.Path({str(mark)!r}).touch()
                time.sleep(600)
        store.StoreWriter.checkpoint, store.StoreWriter.append = checkpointed, appended
        store.build_store(image_folder({str(tmp_path / "data")!r}, "train"), {str(tmp_path / "killed")!r},
                          compute_stats=True, workers=1)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.DEVNULL)
    progress = tmp_path / "killed" / "progress.npz"
    deadline = time.time() + HANG_GUARD_S
    while not mark.is_file() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None and mark.is_file(), "the child ended before it was past a checkpoint"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    saved = int(np.load(progress)["done"])
    assert 0 < saved < 1400 and not (tmp_path / "killed" / "manifest.json").exists()
    split = image_folder(tmp_path / "data", "train")
    resumed = ImageStore(build_store(split, tmp_path / "killed", compute_stats=True, workers=1))
    whole = ImageStore(build_store(split, tmp_path / "whole", compute_stats=True, workers=2))
    for name in ("images.u8", "labels.i16"):
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    np.testing.assert_allclose(resumed.stats()["mean_image"], whole.stats()["mean_image"], rtol=1e-6)
    np.testing.assert_allclose(resumed.stats()["covariance"], whole.stats()["covariance"], rtol=1e-9)


def test_corrupt_and_truncated_images_stop_with_the_path_or_are_skipped_and_counted(tmp_path):
    write_image_tree(tmp_path, "train", {"n01": 3, "n02": 3}, size=(300, 300))
    good = (tmp_path / "train" / "n01" / "n01_1.JPEG").read_bytes()
    (tmp_path / "train" / "n01" / "n01_1.JPEG").write_bytes(good[: len(good) // 2])  # truncated
    (tmp_path / "train" / "n02" / "n02_0.JPEG").write_bytes(b"not an image at all")
    split = image_folder(tmp_path, "train")
    with pytest.raises(DataError, match=r"n01_1.JPEG: unreadable image .*skip_unreadable"):
        build_store(split, tmp_path / "strict", workers=1)
    store = ImageStore(build_store(split, tmp_path / "lenient", StoreSpec(skip_unreadable=True), workers=2))
    assert len(store) == 4 and len(store.manifest["skipped"]) == 2
    assert store.manifest["class_counts"] == {"n01": 2, "n02": 2}
    # Labels are never shifted: each stored image is the one its label says.
    kept = [ref for ref in split.refs if ref.name not in store.manifest["skipped"]]
    assert store.labels.tolist() == [ref.label for ref in kept]
    for i, ref in enumerate(kept):
        np.testing.assert_array_equal(store.images([i])[0].numpy(), load_rgb(ref.read(), ref.name, 256, True))


def test_unfinished_or_damaged_stores_are_named(tmp_path):
    split = refs_for(tmp_path, [np.zeros((256, 256, 3), np.uint8)] * 2)
    folder = build_store(split, tmp_path / "store", workers=1)
    with open(folder / "images.u8", "r+b") as file:
        file.truncate(1000)
    with pytest.raises(DataError, match="files do not match manifest.json"):
        ImageStore(folder)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "progress.npz").write_bytes(b"")
    with pytest.raises(DataError, match="unfinished"):
        ImageStore(tmp_path / "half")


def test_a_jpeg_store_decoded_on_the_device_gives_the_workers_pixels(tmp_path):
    """data.decode_on=device: the bytes `encoded` hands over decode (torchvision's decode_jpeg,
    here on the CPU: libjpeg-turbo, as PIL) to exactly the pixels `images` gives; a damaged image
    is named by its store index; a raw store has no bytes to hand over."""
    rows, cols = np.mgrid[0:300, 0:260]
    arrays = [
        np.stack([rows * 0.8, cols * 0.9 + 10 * i, (rows + cols) * 0.4], -1).astype(np.uint8)
        for i in range(5)
    ]
    split = refs_for(tmp_path, arrays)
    jpeg = ImageStore(build_store(split, tmp_path / "jpeg", StoreSpec(format="jpeg"), workers=1))
    encoded = jpeg.encoded([3, 0, 4])
    assert encoded["sizes"].sum() == len(encoded["jpeg"]) and encoded["indices"].tolist() == [3, 0, 4]
    decoded = decode_batch(encoded, "cpu")
    assert decoded.shape == (3, 256, 256, 3) and decoded.dtype == torch.uint8
    assert torch.equal(decoded, jpeg.images([3, 0, 4]))
    damaged = {**encoded, "jpeg": encoded["jpeg"].clone()}
    damaged["jpeg"][:400] = 0  # the first image's header and tables
    with pytest.raises(DataError, match=r"store images \[3, 0, 4\]: JPEG decoding on cpu failed"):
        decode_batch(damaged, "cpu")
    raw = ImageStore(build_store(split, tmp_path / "raw", workers=1))
    with pytest.raises(DataError, match="a raw store holds no JPEG bytes"):
        raw.encoded([0])


@pytest.mark.gpu
def test_nvjpeg_decodes_a_jpeg_store_within_a_few_levels_of_the_workers(tmp_path):
    rng = np.random.default_rng(2)
    rows, cols = np.mgrid[0:300, 0:260]
    smooth = np.stack([rows * 0.8, cols * 0.9, (rows + cols) * 0.4], -1)
    arrays = [np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8) for _ in range(4)]
    jpeg = ImageStore(
        build_store(refs_for(tmp_path, arrays), tmp_path / "jpeg", StoreSpec(format="jpeg"), workers=1)
    )
    decoded = decode_batch(jpeg.encoded(range(4)), "cuda")
    assert decoded.device.type == "cuda" and decoded.shape == (4, 256, 256, 3)
    difference = (decoded.cpu().float() - jpeg.images(range(4)).float()).abs()
    assert difference.mean() < 0.5 and difference.max() <= 8
