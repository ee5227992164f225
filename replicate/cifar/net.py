"""The four-layer CIFAR-10 network of §3.1 (Figure 1) and §3.3's CIFAR-10 normalisation claim.

The paper does not specify the net. The 2012 code's `layers-18pct.cfg` ("18% error on CIFAR-10 in
20 minutes") is the four-layer net of that era: conv 5x5 32 -> max-pool 3/2 -> [norm] -> conv 5x5 32
-> avg-pool 3/2 -> [norm] -> conv 5x5 64 -> avg-pool 3/2 -> FC 10 (three conv layers and one
fully-connected). Figure 1 uses it without the normalisation layers (paper/fidelity.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from replicate.config import Section
from replicate.lrn import ResponseNorm


@dataclass
class CifarNetConfig(Section):
    activation: Literal["relu", "tanh"] = "relu"  # §3.1: ReLU or the saturating tanh
    norm: Literal["off", "lrn"] = "off"  # §3.3: response normalisation after pool1 and pool2


# layers-18pct.cfg's initW: 1e-4 for conv1, 0.01 for the rest; biases 0.
INIT_STD = {"conv1": 1e-4, "conv2": 0.01, "conv3": 0.01, "fc10": 0.01}


def pool(kind: str) -> nn.Module:
    # cuda-convnet's pooling output size is ceil((32 - 3) / 2) + 1 = 16 -> 8 -> 4: ceil_mode.
    if kind == "max":
        return nn.MaxPool2d(3, 2, ceil_mode=True)
    return nn.AvgPool2d(3, 2, ceil_mode=True, count_include_pad=False)


class CifarNet(nn.Module):
    def __init__(self, config: CifarNetConfig | None = None) -> None:
        super().__init__()
        config = config or CifarNetConfig()
        activation = nn.ReLU if config.activation == "relu" else nn.Tanh
        layers: list[nn.Module] = []
        for name, (inputs, outputs, kind) in {
            "conv1": (3, 32, "max"),
            "conv2": (32, 32, "avg"),
            "conv3": (32, 64, "avg"),
        }.items():
            conv = nn.Conv2d(inputs, outputs, 5, padding=2)
            conv.paper_name = name
            layers += [conv, activation(), pool(kind)]
            if config.norm == "lrn" and name != "conv3":
                # §3.3's rule (k=2, n=5, alpha=1e-4, beta=0.75) across the 32 maps.
                layers.append(ResponseNorm())
        self.features = nn.Sequential(*layers)
        self.fc10 = nn.Linear(64 * 4 * 4, 10)
        self.fc10.paper_name = "fc10"
        with torch.no_grad():
            for layer in [*(m for m in self.features if isinstance(m, nn.Conv2d)), self.fc10]:
                layer.weight.normal_(0.0, INIT_STD[layer.paper_name])
                layer.bias.zero_()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc10(self.features(images).flatten(1))


def train_epoch(
    model: CifarNet,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
) -> float | None:
    """One epoch of SGD over in-memory tensors in an order drawn from `generator`; the running
    training error in percent over its batches (what the 2012 code reported), or None as soon as
    the loss stops being finite (the step is not taken)."""
    model.train()
    # drawn on the CPU generator, so the order is the same whichever device holds the images
    wrong, order = 0, torch.randperm(len(labels), generator=generator).to(images.device)
    for begin in range(0, len(order), batch_size):
        batch = order[begin : begin + batch_size]
        logits = model(images[batch])
        loss = F.cross_entropy(logits, labels[batch])
        if not torch.isfinite(loss):
            return None
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        wrong += int((logits.argmax(1) != labels[batch]).sum())
    return 100.0 * wrong / len(labels)
