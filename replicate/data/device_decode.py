"""JPEG store batches decoded on the training device (`data.decode_on: device`).

The loader workers only read the compressed bytes (`ImageStore.encoded`); the training device
decodes a whole batch in one call of torchvision's `decode_jpeg`: nvjpeg on a GPU, libjpeg-turbo
on the CPU. libjpeg-turbo is also what PIL decodes with in the workers, so on the CPU the pixels
are identical (tested); nvjpeg's may differ by a few levels where its IDCT and chroma
upsampling round differently (tested on a GPU, within a tolerance).
"""

from __future__ import annotations

import warnings

import torch

from replicate.config import ConfigError
from replicate.data.sources import DataError


def decode_batch(encoded: dict[str, torch.Tensor], device: torch.device | str) -> torch.Tensor:
    """uint8 B x S x S x 3 images on `device` (HWC, as `ImageStore.images` returns them)."""
    try:  # here, not on import: torchvision's import costs every command seconds
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:  # a torchvision after its image decoding's removal (deprecated in 0.29)
        raise ConfigError(
            "data.decode_on=device needs torchvision.io.decode_jpeg (torchvision 0.19 to 0.29 at least); "
            "this torchvision has none: use data.decode_on=workers"
        ) from None
    device = torch.device(device)
    pieces = list(torch.split(encoded["jpeg"], encoded["sizes"].tolist()))
    try:
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its decoders for TorchCodec's; they still work, and
            # TorchCodec is not available for every torch >= 2.4 this package supports.
            warnings.simplefilter("ignore", DeprecationWarning)
            images = decode_jpeg(pieces, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as error:
        raise DataError(
            f"store images {encoded['indices'].tolist()}: JPEG decoding on {device} failed ({error}); "
            "the store is damaged: delete its folder and prepare the data again"
        ) from None
    return torch.stack(images).permute(0, 2, 3, 1)


def images_on(pixels: torch.Tensor | dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """A device-side training batch's uint8 images on `device`: its images moved there
    (`data.augment_on: device`), or its JPEG bytes decoded there (`data.decode_on: device`)."""
    if isinstance(pixels, dict):
        return decode_batch(pixels, device)
    return pixels.to(device, non_blocking=True)
