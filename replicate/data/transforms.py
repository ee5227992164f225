"""Training augmentation and test-time views (§4.1), on batches of 256x256 uint8 images.

Pixels stay on the paper's scale: 0-255 minus the mean image (§2), never [0, 1] or per-channel
normalisation: §5's initialisation (biases of 1, weights of std 0.01) assumes it.

Each image's random draws come from a generator keyed by (seed, epoch, position in the epoch),
so an epoch is the same whatever the number of loader workers or processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from replicate.config import NonNegative, Positive, Section


@dataclass
class AugmentConfig(Section):
    """The §4.1 pipeline; the paper's rule is each default, the 2012 code's an option."""

    crop_size: Positive = 224  # §4.1: 224 x 224 patches of the 256 x 256 images
    random_crop: bool = True  # §4.1; false: the centre patch (the no-crop/flip ablation)
    flip: bool = True  # §4.1: horizontal reflection with probability 0.5
    crop_chunk: Positive = 1  # images sharing one crop and flip (the 2012 code, convdata.py: 32)
    colour_noise: Literal["paper", "code2012", "off"] = "paper"  # §4.1 PCA colour augmentation
    colour_noise_std: NonNegative = 0.1  # §4.1: alpha_i ~ N(0, 0.1)
    # §2 "mean activity ... from each pixel": the mean image at the crop's own position; the 2012
    # code subtracts the mean's centre crop from every view (convdata.py, data_mean_crop).
    mean_crop: Literal["same_position", "centre"] = "same_position"


def image_rng(seed: int, epoch: int, position: int, stream: int) -> np.random.Generator:
    """The generator of one image's draws (stream 0: crop and flip; 1: colour noise)."""
    return np.random.default_rng([seed, epoch, position, stream])


def colour_noise(
    eigenvalues: np.ndarray, eigenvectors: np.ndarray, rng: np.random.Generator, config: AugmentConfig
) -> np.ndarray:
    """The RGB shift added to every pixel of one image (§4.1).

    paper: [p1 p2 p3][a1 l1, a2 l2, a3 l3]^T with a_i ~ N(0, 0.1). The formula depends on the unit
    of the eigenvalues l_i (intensity squared); the paper does not give it. We take l_i of pixel
    values in [0, 1] and scale the shift back to 0-255, i.e. l_i(0-255) / 255: on the 0-255 scale
    itself, the first term would have a standard deviation of ~1250 levels (l_1 ~ 12,500),
    which cannot be what was run; on [0, 1] it is ~5.5 levels and reproduces the widely used
    ImageNet eigenvalues (0.2175, 0.0188, 0.0045). INFERRED: paper/fidelity.md.
    code2012 (convdata.py, ColorNoiseMakerThread): V (z * sqrt(l)) * 0.1, z ~ N(0, 1), on 0-255.
    """
    if config.colour_noise == "paper":
        alpha = rng.normal(0.0, config.colour_noise_std, 3)
        return eigenvectors @ (alpha * eigenvalues / 255.0)
    z = rng.normal(0.0, 1.0, 3)
    return eigenvectors @ (z * np.sqrt(eigenvalues)) * config.colour_noise_std


def crop_offsets(side: int, crop: int) -> list[tuple[int, int]]:
    """(top, left) of the 10-crop views' five patches: four corners and the centre (§4.1).

    The 2012 code (convdata.py, __trim_borders) uses the same five: (0,0), (0,32), (32,0),
    (32,32), (16,16) for 256 -> 224.
    """
    far, middle = side - crop, (side - crop) // 2
    return [(0, 0), (0, far), (far, 0), (far, far), (middle, middle)]


class Augment:
    """Turns uint8 B x S x S x 3 images into float B x 3 x C x C network inputs."""

    def __init__(self, config: AugmentConfig, stats: dict[str, np.ndarray], seed: int = 0) -> None:
        self.config, self.seed = config, seed
        self.mean = torch.as_tensor(stats["mean_image"], dtype=torch.float32).permute(2, 0, 1)  # 3 x S x S
        self.eigenvalues = np.asarray(stats["eigenvalues"], dtype=np.float64)
        self.eigenvectors = np.asarray(stats["eigenvectors"], dtype=np.float64)
        self.side = self.mean.shape[-1]
        self.crop = config.crop_size
        self._means: dict[torch.device, torch.Tensor] = {}  # the mean image on each device used

    def _patch(self, images: torch.Tensor, top: int, left: int) -> torch.Tensor:
        """B x 3 x C x C floats cut at (top, left), minus the mean image (§2).

        Cropping the uint8 pixels before converting them keeps the float work to the crop.
        same_position: the mean at the patch's own position; centre: the mean's centre crop
        (the 2012 code, convdata.py data_mean_crop).
        """
        if self.config.mean_crop == "centre":
            top_mean = left_mean = (self.side - self.crop) // 2
        else:
            top_mean, left_mean = top, left
        pixels = images[:, top : top + self.crop, left : left + self.crop].permute(0, 3, 1, 2).float()
        return pixels - self.mean[:, top_mean : top_mean + self.crop, left_mean : left_mean + self.crop]

    def _mirror(self, views: torch.Tensor) -> torch.Tensor:
        """Horizontal reflection; under `centre` the mean is not reflected with the image (2012 code)."""
        if self.config.mean_crop == "same_position":
            return views.flip(-1)
        middle = (self.side - self.crop) // 2
        mean = self.mean[:, middle : middle + self.crop, middle : middle + self.crop]
        return (views + mean).flip(-1) - mean

    def train(self, images: torch.Tensor, keys: list[tuple[int, int]]) -> torch.Tensor:
        """One random view per image; `keys` are (epoch, position in the epoch)."""
        return self.apply_plan(images, self.plan(keys))

    def plan(self, keys: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """Every random draw of a training batch, made on the CPU: crop offsets, flips and colour
        shifts per image. Cheap; `apply_plan` does the pixel work, in a loader worker or on the
        training device (`data.augment_on`), with the same result."""
        config = self.config
        span = self.side - self.crop
        offsets, flips = [], []
        for epoch, position in keys:
            rng = image_rng(self.seed, epoch, position // config.crop_chunk, 0)
            # §4.1: "a factor of 2048" = 32 x 32 offsets x 2 reflections, so offsets 0..31.
            top, left = rng.integers(0, span, 2) if config.random_crop else (span // 2, span // 2)
            offsets.append((int(top), int(left)))
            flips.append(bool(config.flip and rng.random() < 0.5))
        if config.colour_noise != "off":
            shifts = np.stack(
                [
                    colour_noise(
                        self.eigenvalues, self.eigenvectors, image_rng(self.seed, epoch, position, 1), config
                    )
                    for epoch, position in keys
                ]
            )
        else:
            shifts = np.zeros((len(keys), 3))
        return {
            "offsets": torch.tensor(offsets, dtype=torch.long).reshape(-1, 2),
            "flips": torch.tensor(flips, dtype=torch.bool),
            "shifts": torch.as_tensor(shifts, dtype=torch.float32),
        }

    def apply_plan(
        self, images: torch.Tensor, plan: dict[str, torch.Tensor], gather: bool | None = None
    ) -> torch.Tensor:
        """B x 3 x C x C views of uint8 B x S x S x 3 images, on the images' device: the crop at
        each image's offsets (read right to left when flipped), minus the mean image (§2), plus
        the colour shift (§4.1). On a GPU one gather cuts the whole batch; on the CPU slices per
        image are faster (`gather` forces either). Both do the same arithmetic, so the views are
        identical (tested)."""
        config, crop, device = self.config, self.crop, images.device
        mean = self._mean_on(device)  # 3 x S x S
        middle = (self.side - crop) // 2
        if not (device.type != "cpu" if gather is None else gather):
            views = torch.empty((len(images), 3, crop, crop), device=device)
            draws = zip(plan["offsets"].tolist(), plan["flips"].tolist(), strict=True)
            for row, ((top, left), flip) in enumerate(draws):
                pixels = images[row, top : top + crop, left : left + crop].permute(2, 0, 1)
                if config.mean_crop == "same_position":  # the mean at the crop's own position
                    m = mean[:, top : top + crop, left : left + crop]
                    m = m.flip(-1) if flip else m
                else:  # the 2012 code: the mean's centre crop, never mirrored (convdata.py)
                    m = mean[:, middle : middle + crop, middle : middle + crop]
                views[row] = (pixels.flip(-1) if flip else pixels).float() - m
        else:
            offsets, flips = plan["offsets"].to(device), plan["flips"].to(device)
            steps = torch.arange(crop, device=device)
            rows = offsets[:, :1] + steps  # B x C
            cols = offsets[:, 1:] + torch.where(
                flips[:, None], crop - 1 - steps, steps
            )  # mirrored: backwards
            batch = torch.arange(len(images), device=device)[:, None, None]
            pixels = images[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).float()
            if config.mean_crop == "same_position":
                views = pixels - mean[:, rows[:, :, None], cols[:, None, :]].permute(1, 0, 2, 3)
            else:
                views = pixels - mean[:, middle : middle + crop, middle : middle + crop]
        if config.colour_noise != "off":
            views = views + plan["shifts"].to(device)[:, :, None, None]
            if config.colour_noise == "code2012":
                views = views / (1.0 + config.colour_noise_std)  # convdata.py divides the noisy image by 1.1
        return views

    def _mean_on(self, device: torch.device) -> torch.Tensor:
        if self._means.get(device) is None:
            self._means[device] = self.mean.to(device)
        return self._means[device]

    def centre(self, images: torch.Tensor) -> torch.Tensor:
        """The centre patch: B x 3 x C x C."""
        middle = (self.side - self.crop) // 2
        return self._patch(images, middle, middle)

    def ten_crop(self, images: torch.Tensor) -> torch.Tensor:
        """§4.1's ten views per image, B x 10 x 3 x C x C: five patches, then their mirrors."""
        patches = [self._patch(images, top, left) for top, left in crop_offsets(self.side, self.crop)]
        return torch.stack(patches + [self._mirror(p) for p in patches], dim=1)
