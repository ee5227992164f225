import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from replicate.config import ConfigError
from replicate.data.imagenet import ImageRef, Split
from replicate.data.loader import DataConfig, EpochBatches, StoreDataset, make_loader, training_mode
from replicate.data.store import ImageStore, StoreSpec, build_store
from replicate.data.transforms import Augment, AugmentConfig, crop_offsets
from tests.conftest import HANG_GUARD_S, encode

ROOT = Path(__file__).resolve().parents[1]

SIDE, CROP = 256, 224


def position_images(count: int = 1) -> torch.Tensor:
    """uint8 B x 256 x 256 x 3 whose red is the row, green the column, blue the image index."""
    rows, cols = torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij")
    return torch.stack([torch.stack([rows, cols, torch.full_like(rows, i)], -1) for i in range(count)]).to(
        torch.uint8
    )


def zero_stats(mean: float = 0.0) -> dict:
    return {
        "mean_image": np.full((SIDE, SIDE, 3), mean, np.float32),
        "eigenvalues": np.array([300.0, 30.0, 3.0]),
        "eigenvectors": np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0],
    }


def no_noise(**changes) -> AugmentConfig:
    return AugmentConfig(colour_noise="off", **changes)


def test_ten_crop_views_are_the_four_corners_the_centre_and_their_mirrors():
    views = Augment(no_noise(), zero_stats()).ten_crop(position_images(2))
    assert views.shape == (2, 10, 3, CROP, CROP)
    expected = [(0, 0), (0, 32), (32, 0), (32, 32), (16, 16)]  # (top, left); the 2012 code's five
    assert crop_offsets(SIDE, CROP) == expected
    for k, (top, left) in enumerate(expected):
        view = views[1, k]
        assert (view[0, 0, 0].item(), view[1, 0, 0].item()) == (top, left)  # red = row, green = column
        assert (view[0, -1, -1].item(), view[1, -1, -1].item()) == (top + CROP - 1, left + CROP - 1)
        mirror = views[1, 5 + k]
        assert torch.equal(mirror, view.flip(-1))
        assert mirror[1, 0, 0].item() == left + CROP - 1  # the mirror's first column is the patch's last
    assert torch.all(views[1, :, 2] == 1)  # blue: every view comes from image 1


def test_centre_crop_is_offset_16():
    view = Augment(no_noise(), zero_stats()).centre(position_images())[0]
    assert (view[0, 0, 0].item(), view[1, 0, 0].item()) == (16, 16)


def test_mean_image_is_subtracted_at_the_crops_position_or_its_centre():
    stats = zero_stats()
    stats["mean_image"] = position_images()[0].numpy().astype(np.float32)  # mean = the image itself
    same = Augment(no_noise(), stats).ten_crop(position_images())
    assert torch.all(same == 0)  # every view minus the mean at its own position (mirrored too)
    centre = Augment(no_noise(mean_crop="centre"), stats).ten_crop(position_images())
    assert torch.all(centre[0, 4] == 0)  # the centre view minus the centre crop of the mean
    assert centre[0, 0, 0, 0, 0].item() == -16  # top-left view: row 0 minus the mean's row 16
    # A mirror under `centre`: the reflected patch minus the (unreflected) centre crop of the mean.
    image = position_images()[0].permute(2, 0, 1).float()
    assert torch.equal(centre[0, 5], image[:, :224, :224].flip(-1) - image[:, 16:240, 16:240])


@pytest.mark.slow
def test_random_crops_cover_all_offsets_and_flip_half_the_time():
    augment = Augment(no_noise(), zero_stats())
    views = augment.train(position_images(400), [(0, p) for p in range(400)])
    tops, lefts = views[:, 0, 0, 0], views[:, 1, 0, 0]
    flipped = views[:, 1, 0, 0] > views[:, 1, 0, -1]
    lefts = torch.where(flipped, views[:, 1, 0, -1], lefts)
    # §4.1's factor of 2048 = 32 x 32 x 2: offsets 0..31 on each axis.
    assert tops.min() == 0 and tops.max() == 31 and lefts.min() == 0 and lefts.max() == 31
    assert 0.4 < flipped.float().mean() < 0.6


def test_the_2012_code_shares_one_crop_per_chunk_of_32_images():
    augment = Augment(no_noise(crop_chunk=32), zero_stats())
    views = augment.train(position_images(64), [(0, p) for p in range(64)])
    corners = views[:, :2, 0, 0]
    assert torch.all(corners[:32] == corners[0]) and torch.all(corners[32:] == corners[32])
    assert not torch.equal(corners[0], corners[32])


def test_no_crop_no_flip_gives_the_centre_patch():
    augment = Augment(no_noise(random_crop=False, flip=False), zero_stats())
    views = augment.train(position_images(20), [(0, p) for p in range(20)])
    assert torch.equal(views, augment.centre(position_images(20)))


@pytest.mark.slow
def test_paper_colour_noise_is_a_per_image_constant_with_alpha_std_0_1():
    stats = zero_stats()
    augment = Augment(AugmentConfig(random_crop=False, flip=False), stats)
    images = torch.full((1000, SIDE, SIDE, 3), 100, dtype=torch.uint8)
    shifts = augment.train(images, [(3, p) for p in range(1000)]) - 100
    per_image = shifts[:, :, 0, 0]
    corners = shifts[:, :, [0, 0, -1, -1, 100], [0, -1, 0, -1, 50]]
    assert torch.allclose(corners, per_image[:, :, None].expand_as(corners), atol=1e-4)  # every pixel alike
    # Undo [p1 p2 p3][a1 l1, a2 l2, a3 l3]^T / 255 to recover the alphas.
    alphas = (per_image.double().numpy() @ stats["eigenvectors"]) * 255 / stats["eigenvalues"]
    assert np.all(np.abs(alphas.mean(0)) < 0.01)
    np.testing.assert_allclose(alphas.std(0), 0.1, rtol=0.08)  # ~3 standard errors at n = 1000
    assert abs(np.corrcoef(alphas[:, 0], alphas[:, 1])[0, 1]) < 0.1


@pytest.mark.slow
def test_code2012_colour_noise_uses_sqrt_eigenvalues_and_divides_by_1_1():
    stats = zero_stats()
    augment = Augment(AugmentConfig(random_crop=False, flip=False, colour_noise="code2012"), stats)
    images = torch.full((2000, SIDE, SIDE, 3), 110, dtype=torch.uint8)
    out = augment.train(images, [(0, p) for p in range(2000)])[:, :, 0, 0].double().numpy()
    noise = out * 1.1 - 110  # (x + V(z sqrt(l)) 0.1) / 1.1
    z = (noise @ stats["eigenvectors"]) / (np.sqrt(stats["eigenvalues"]) * 0.1)
    np.testing.assert_allclose(z.std(0), 1.0, rtol=0.06)


def test_the_same_keys_give_the_same_views_and_epochs_differ():
    augment = Augment(AugmentConfig(), zero_stats())
    images = position_images(8)
    first = augment.train(images, [(0, p) for p in range(8)])
    assert torch.equal(first, augment.train(images, [(0, p) for p in range(8)]))
    assert not torch.equal(first, augment.train(images, [(1, p) for p in range(8)]))


def test_bad_augment_options_are_errors():
    with pytest.raises(ConfigError, match="colour_noise = 'pca'"):
        AugmentConfig(colour_noise="pca")
    with pytest.raises(ConfigError, match="crop_chunk = 0 must be >= 1"):
        AugmentConfig(crop_chunk=0)


def test_loader_batches_do_not_depend_on_the_number_of_workers(tmp_path):
    rng = np.random.default_rng(0)
    refs = []
    for i in range(24):
        path = tmp_path / f"{i}.png"
        path.write_bytes(encode(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), "PNG"))
        refs.append(ImageRef(str(path), i % 3, str(path)))
    store = ImageStore(
        build_store(Split(refs, ["a", "b", "c"]), tmp_path / "store", StoreSpec(), True, workers=1)
    )
    augment = Augment(AugmentConfig(), store.stats(), seed=5)
    batches = {}
    for workers in (0, 2):
        sampler = EpochBatches(len(store), 8, seed=5)
        sampler.set_epoch(2)
        loader = make_loader(StoreDataset(store, augment), sampler, DataConfig(workers=workers, batch_size=8))
        batches[workers] = list(loader)
    assert len(batches[0]) == 3
    for one, two in zip(batches[0], batches[2], strict=True):
        assert (
            one.plan is None and torch.equal(one.pixels, two.pixels) and torch.equal(one.labels, two.labels)
        )
    assert sorted(torch.cat([b.labels for b in batches[0]]).tolist()) == sorted(store.labels.tolist())


def test_every_training_view_carries_the_label_of_its_own_image(tmp_path):
    """Through the store and the real loader (two worker processes, training views: random crops,
    flips, PCA noise, the mean image subtracted): each class's images are one flat colour, far apart,
    so a view's colour names the class of the image it was cut from, which must be its label."""
    colours = {0: (40, 200, 90), 1: (200, 40, 160), 2: (120, 120, 20)}
    rng = np.random.default_rng(0)
    refs = []
    for i, label in enumerate(rng.permutation([0, 1, 2] * 8)):
        pixels = np.clip(np.array(colours[label]) + rng.integers(-8, 9, (256, 256, 3)), 0, 255)
        path = tmp_path / f"{i}.png"
        path.write_bytes(encode(pixels.astype(np.uint8), "PNG"))
        refs.append(ImageRef(str(path), int(label), str(path)))
    store = ImageStore(
        build_store(Split(refs, ["a", "b", "c"]), tmp_path / "store", StoreSpec(), True, workers=1)
    )
    augment = Augment(AugmentConfig(), store.stats(), seed=3)
    mean_colour = torch.as_tensor(store.stats()["mean_image"]).float().mean((0, 1))
    palette = torch.tensor(list(colours.values()), dtype=torch.float32)
    sampler = EpochBatches(len(store), 5, seed=3)
    sampler.set_epoch(1)
    seen = []
    for batch in make_loader(StoreDataset(store, augment), sampler, DataConfig(workers=2, batch_size=5)):
        colour = batch.pixels.mean((2, 3)) + mean_colour  # each view's mean RGB, mean image added back
        named = torch.cdist(colour, palette).argmin(1)
        assert torch.equal(named, batch.labels.long()), (named, batch.labels)
        seen += batch.labels.tolist()
    assert sorted(seen) == sorted(store.labels.tolist())


def test_epoch_batches_shuffle_per_epoch_resume_mid_epoch_and_split_across_ranks():
    sampler = EpochBatches(10, 4, seed=1)
    epoch0 = [[index for _, _, index in batch] for batch in sampler]
    assert sorted(sum(epoch0, [])) == list(range(10)) and [len(b) for b in epoch0] == [4, 4, 2]
    sampler.set_epoch(1)
    assert [[i for _, _, i in b] for b in sampler] != epoch0
    sampler.set_epoch(0, start_batch=1)
    assert [[i for _, _, i in b] for b in sampler] == epoch0[1:]
    halves = [EpochBatches(10, 4, seed=1, rank=r, world_size=2) for r in (0, 1)]
    for whole, first, second in zip(EpochBatches(10, 4, seed=1), *halves, strict=True):
        assert first + second == whole  # each rank takes its slice of the same global batch


def test_a_global_batch_that_does_not_split_across_processes_is_a_named_error():
    with pytest.raises(ConfigError, match="data.batch_size 128 is not divisible by 3 processes"):
        EpochBatches(100, 128, world_size=3)


def random_images_and_stats(count: int) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """`count` random uint8 256 x 256 images and store statistics (a random mean image, an
    orthonormal eigenbasis) for testing the training views."""
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (count, 256, 256, 3), dtype=np.uint8))
    stats = {
        "mean_image": rng.uniform(0, 255, (256, 256, 3)),
        "eigenvalues": np.array([0.2, 0.02, 0.005]),
        "eigenvectors": np.linalg.qr(rng.normal(size=(3, 3)))[0],
    }
    return images, stats


@pytest.mark.parametrize(
    "variant", [{}, {"mean_crop": "centre", "colour_noise": "code2012", "crop_chunk": 4}]
)
def test_a_planned_batch_cut_later_equals_the_batch_cut_at_once(variant):
    """The loader's train_plan mode (uint8 images + draws) and apply_plan give train()'s views."""
    images, stats = random_images_and_stats(6)
    augment = Augment(AugmentConfig(**variant), stats, seed=3)
    keys = [(1, p) for p in range(6)]
    plan = augment.plan(keys)
    assert (
        plan["offsets"].shape == (6, 2)
        and plan["flips"].dtype == torch.bool
        and plan["shifts"].shape == (6, 3)
    )
    assert torch.equal(augment.apply_plan(images, plan), augment.train(images, keys))
    # the GPU's one-gather path, run here on the CPU: the same numbers as the per-image slices
    assert torch.equal(
        augment.apply_plan(images, plan, gather=True), augment.apply_plan(images, plan, gather=False)
    )
    # one image at a time, by hand: crop, reflect, minus the mean, plus the shift
    mean = torch.as_tensor(stats["mean_image"], dtype=torch.float32).permute(2, 0, 1)
    for row, ((top, left), flip, shift) in enumerate(
        zip(plan["offsets"].tolist(), plan["flips"], plan["shifts"], strict=True)
    ):
        pixels = images[row, top : top + 224, left : left + 224].permute(2, 0, 1).float()
        m = mean[:, top : top + 224, left : left + 224] if not variant else mean[:, 16:240, 16:240]
        view = (pixels.flip(-1) - (m.flip(-1) if not variant else m)) if flip else pixels - m
        view = view + shift[:, None, None]
        if variant:
            view = view / 1.1
        torch.testing.assert_close(augment.apply_plan(images, plan)[row], view)


def test_views_are_cut_on_a_gpu_and_in_the_workers_on_a_cpu_by_default():
    """data.augment_on=auto picks where, by the training device; the views are the same either way
    (test_train, and on a GPU test_speed)."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)  # only the type is read: no GPU needed
    assert training_mode(DataConfig(), cpu) == "train" and training_mode(DataConfig(), gpu) == "train_plan"
    assert training_mode(DataConfig(augment_on="workers"), gpu) == "train"
    assert training_mode(DataConfig(augment_on="device"), cpu) == "train_plan"
    jpeg = DataConfig(store_format="jpeg", decode_on="device")  # decoded where the views are cut
    assert training_mode(jpeg, cpu) == training_mode(jpeg, gpu) == "train_encoded"
    with pytest.raises(ConfigError, match="needs store_format=jpeg and augment_on=device or auto"):
        DataConfig(store_format="jpeg", decode_on="device", augment_on="workers")


LOADER_MEMORY = """
import torch
from replicate import speed
from replicate.data.loader import DataConfig, EpochBatches, make_loader

def private_mb():
    with open("/proc/self/smaps_rollup") as rollup:
        return sum(int(line.split()[1]) for line in rollup if line.startswith("Private_")) // 1024

class Probe(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitems__(self, keys):
        held = private_mb()  # what the worker holds of its own, from the batches before
        batch = torch.ones(2**29 // 4)  # a 512 MB batch, made and freed
        del batch
        return held

print(speed.keep_freed_memory())  # as every command does
kept = torch.ones(2**30 // 4)  # 1 GB touched, then freed: kept in the heap
del kept
sampler = EpochBatches(4, 1, shuffle=False)
print(max(make_loader(Probe(), sampler, DataConfig(workers=1, batch_size=1, persistent_workers=False))))
"""


@pytest.mark.skipif(
    not Path("/proc/self/smaps_rollup").is_file(), reason="reads Linux's /proc/self/smaps_rollup"
)
def test_a_loader_worker_keeps_neither_the_training_processs_freed_heap_nor_its_own_batches():
    """A process that keeps its freed memory (speed.keep_freed_memory) forks its loader workers: a
    worker that reused the inherited free blocks would copy each page it touched, and one that kept
    its freed batches would hold them; either holds the 512 MB batches it made after returning them.
    (Beside a trained network, two 10-crop evaluation workers would so need over 24 GB.)"""
    done = subprocess.run(
        [sys.executable, "-c", LOADER_MEMORY], cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert done.returncode == 0, done.stderr
    kept, private_mb = done.stdout.split()
    if kept != "True":
        pytest.skip("no glibc mallopt: the C library's allocator is left as it is")
    assert int(private_mb) < 256, f"the worker holds {private_mb} MB of its own after its 512 MB batch"
