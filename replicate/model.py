"""The two-column ("two-GPU") network of §3 and Figure 2, and the variants the paper compares.

Each column is a stack of its own modules. Columns exchange activations only where the paper's
Figure 2 draws connections between the GPUs: conv3 and FC6 read both columns' maps, FC7 and FC8
read all hidden units. Everywhere else a column reads only its own maps, so the two columns can
live on two devices (`devices=(a, b)`), as they did on two GTX 580s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import nn

from replicate.config import Positive, Probability, Range, Section
from replicate.kernels.fused_columns import fused_conv_stack
from replicate.lrn import LRNRule, SpatialResponseNorm, response_norm
from replicate.pool import MaxPool

Activation = Literal["relu", "tanh"]
Pooling = Literal["overlapping", "non_overlapping"]
DropoutRule = Literal["paper", "inverted", "off"]


@dataclass
class ModelConfig(Section):
    """The network and its ablation variants; every field is one switch of the paper's."""

    num_classes: Positive = 1000  # ILSVRC's 1000 classes; any number works
    input_size: Positive = 224  # side of the crop fed to conv1 (§3.5 says 224; see `conv1_padding`)
    activation: Activation = "relu"  # §3.1: relu, or tanh for the saturating comparison
    lrn: LRNRule = "paper"  # §3.3: paper's formula, the 2012 code's alpha/n rule, or off
    lrn_k: Annotated[float, Range(0, low_open=True)] = (
        2.0  # k of the normalisation (§3.3: 2; the 2012 code's default minDiv: 1)
    )
    pooling: Pooling = "overlapping"  # §3.4: z=3, s=2; or non-overlapping z=s=2
    columns: Literal[1, 2] = 2  # 2: the paper's net; 1: §3.2's single column of half size
    remove_conv: Literal[0, 2, 3, 4] = 0  # §7: remove one middle conv layer (0 keeps all)
    dropout: DropoutRule = "paper"  # §4.2: paper's test-time x0.5 rule, PyTorch's inverted, off
    dropout_p: Probability = 0.5  # §4.2: probability of dropping a hidden unit of FC6 and FC7
    # §3.2/Figure 2: conv3, FC6 and FC7 read both columns. False: every layer but FC8 reads only its
    # own column (the 2012 code's #150, an ablation the paper never reported).
    column_communication: bool = True
    # The 2012 code's config #145 where it differs from the paper (`fidelity: code2012` sets all):
    lrn1_before_relu: bool = False  # #145: conv1 -> LRN -> pool -> ReLU; the paper (§3.5): ReLU, then LRN
    spatial_norm: bool = False  # #145: a 5x5 spatial rnorm after LRN2 (not in the paper)
    init: Literal["paper", "code2012"] = "paper"  # §5: std 0.01 everywhere; #145: 0.03 in conv3-5


@dataclass(frozen=True)
class ConvLayer:
    """One convolutional layer of §3.5, per column."""

    name: str
    kernel: int
    stride: int
    padding: int
    reads_both_columns: bool  # Figure 2: only conv3 crosses between the GPUs
    normalised: bool  # §3.5: LRN follows conv1 and conv2
    pooled: bool  # §3.5: max-pooling follows both LRN layers and conv5


CONV_LAYERS = (
    ConvLayer("conv1", 11, 4, 0, False, True, True),  # padding: see conv1_padding
    ConvLayer("conv2", 5, 1, 2, False, True, True),
    ConvLayer("conv3", 3, 1, 1, True, False, False),
    ConvLayer("conv4", 3, 1, 1, False, False, False),
    ConvLayer("conv5", 3, 1, 1, False, False, True),
)

# Kernels (conv) or hidden units (fc) per column. §3.2 footnote: the one-column net halves every
# conv layer except the last, and keeps the fully-connected layers whole.
WIDTHS = {
    2: {
        "conv1": 48,
        "conv2": 128,
        "conv3": 192,
        "conv4": 192,
        "conv5": 128,
        "fc6": 2048,
        "fc7": 2048,
    },
    1: {
        "conv1": 48,
        "conv2": 128,
        "conv3": 192,
        "conv4": 192,
        "conv5": 256,
        "fc6": 4096,
        "fc7": 4096,
    },
}

# §5: "We initialized the neuron biases in the second, fourth, and fifth convolutional layers,
# as well as in the fully-connected hidden layers, with the constant 1 ... the remaining with 0."
BIAS_ONE = frozenset({"conv2", "conv4", "conv5", "fc6", "fc7"})
INIT_STD = 0.01  # §5: weights from N(0, 0.01^2) in every layer
CODE2012_INIT_STD = {"conv3": 0.03, "conv4": 0.03, "conv5": 0.03}  # #145's initW; 0.01 elsewhere


def conv1_padding(input_size: int, kernel: int = 11, stride: int = 4) -> int:
    """Zeros to add at the right and bottom only, so that conv1 covers what the 2012 code covered.

    The original code (layer.py, modulesX) sets a conv's output size to 1 + ceil((in - k) / stride)
    with no padding, letting the last window run past the image into zeros: 224 -> 55, the last
    window reading 3 pixels beyond the right and bottom edges. Padding 3 zeros there and running a
    valid convolution is the same computation. A 227 input needs none.
    """
    outputs = 1 + math.ceil((input_size - kernel) / stride)
    return (outputs - 1) * stride + kernel - input_size


class PaperDropout(nn.Module):
    """§4.2 and the 2012 code (layer.cu, HiddenSexLayer): in training, zero each unit with
    probability p and leave the rest as they are; at test, keep all units and multiply by 1 - p.
    (nn.Dropout instead scales the kept units by 1 / (1 - p) in training and is the identity at test.)
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.training:
            # a uniform float32 draw below 1 - p keeps a unit with that probability (to 2^-24; a bf16
            # draw would have 8 bits); on the CPU such draws are cheaper than bernoulli_'s
            keep = torch.rand(hidden.shape, device=hidden.device) < 1.0 - self.p
            return hidden * keep
        return hidden * (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, test-time scale={1.0 - self.p}"


def make_dropout(rule: DropoutRule, p: float) -> nn.Module:
    if rule == "paper":
        return PaperDropout(p)
    if rule == "inverted":
        return nn.Dropout(p)
    return nn.Identity()


def make_activation(name: Activation) -> nn.Module:
    return nn.ReLU() if name == "relu" else nn.Tanh()


def make_pool(pooling: Pooling) -> nn.Module:
    # §3.4: overlapping z=3, s=2. Non-overlapping z=s=2 gives the same sizes (55->27->13->6),
    # so FC6 reads 6x6 maps under both; FC6's input size is computed, not assumed, all the same.
    return MaxPool(3, 2) if pooling == "overlapping" else MaxPool(2, 2)


@dataclass(frozen=True)
class Stage:
    """A kept conv layer with what follows it: conv -> activation -> [LRN] -> [max-pool ...]."""

    layer: ConvLayer
    in_channels: int
    reads_both_columns: bool
    pools: int  # pools after it: its own, plus that of a removed layer right after it


def plan_stages(config: ModelConfig) -> list[Stage]:
    """The conv layers that remain after `remove_conv`, with their inputs (§7).

    A removed layer takes its LRN with it; its max-pool stays (appended to the layer before), so the
    spatial sizes do not change; the next layer reads what the removed one read, crossing the
    columns if the removed one did, so the columns still communicate once in the conv stack.
    """
    widths = WIDTHS[config.columns]
    stages: list[Stage] = []
    channels, crosses = 3, False
    for layer in CONV_LAYERS:
        if layer.name == f"conv{config.remove_conv}":
            crosses = crosses or (layer.reads_both_columns and config.column_communication)
            if layer.pooled:
                last = stages[-1]
                stages[-1] = Stage(last.layer, last.in_channels, last.reads_both_columns, last.pools + 1)
            continue
        crosses = crosses or (layer.reads_both_columns and config.column_communication)
        in_channels = channels * config.columns if crosses and layer.name != "conv1" else channels
        stages.append(Stage(layer, in_channels, crosses, int(layer.pooled)))
        channels, crosses = widths[layer.name], False
    return stages


def feature_side(config: ModelConfig, stages: Sequence[Stage]) -> int:
    """Side of each column's last pooled maps (6 for a 224 input), computed layer by layer."""
    side = config.input_size + conv1_padding(config.input_size)
    window, step = (3, 2) if config.pooling == "overlapping" else (2, 2)
    for stage in stages:
        side = (side + 2 * stage.layer.padding - stage.layer.kernel) // stage.layer.stride + 1
        for _ in range(stage.pools):
            side = (side - window) // step + 1
    if side < 1:
        raise ValueError(f"input_size {config.input_size} is too small for this network")
    return side


class Column(nn.Module):
    """One column (one GPU in 2012): its conv stages and its half of FC6 and FC7."""

    def __init__(self, config: ModelConfig, stages: Sequence[Stage], fc6_inputs: int) -> None:
        super().__init__()
        widths = WIDTHS[config.columns]
        self.convs = nn.ModuleDict()
        for stage in stages:
            name = stage.layer.name
            block = [
                nn.Conv2d(
                    stage.in_channels,
                    widths[name],
                    stage.layer.kernel,
                    stage.layer.stride,
                    stage.layer.padding,
                ),
                make_activation(config.activation),
            ]
            if stage.layer.normalised:
                block.append(response_norm(config.lrn, config.lrn_k))  # within this column only
                if name == "conv2" and config.spatial_norm:
                    block.append(SpatialResponseNorm())
            block += [make_pool(config.pooling) for _ in range(stage.pools)]
            if name == "conv1" and config.lrn1_before_relu:
                # #145's layer 1: conv -> LRN -> pool -> ReLU (the LRN reads the conv output). The
                # same function as conv -> LRN -> ReLU -> pool: max-pooling and a monotone
                # activation commute.
                block.append(block.pop(1))
            self.convs[name] = nn.Sequential(*block)
        # FC7 reads every FC6 unit of every column (of its own, without column communication)
        hidden = widths["fc6"] * (config.columns if config.column_communication else 1)
        self.fc6 = nn.Sequential(nn.Linear(fc6_inputs, widths["fc6"]), make_activation(config.activation))
        self.dropout6 = make_dropout(config.dropout, config.dropout_p)
        self.fc7 = nn.Sequential(nn.Linear(hidden, widths["fc7"]), make_activation(config.activation))
        self.dropout7 = make_dropout(config.dropout, config.dropout_p)


class AlexNet(nn.Module):
    """The network of §3.5: five conv layers and three fully-connected ones, in one or two columns.

    `AlexNet()` is the paper's net for 1000 classes (60,965,224 parameters). Keyword arguments are
    fields of `ModelConfig` (`AlexNet(10, lrn="off")`); `devices=(a, b)` puts column A's layers on
    device a, column B's (and nothing else) on b, and FC8 on a. Inputs are 224x224 crops on the
    paper's pixel scale (0-255 minus the mean image, §2).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        *,
        devices: Sequence[torch.device | str] | None = None,
        fused: bool = False,
        **variant,
    ) -> None:
        super().__init__()
        self.config = config = ModelConfig(num_classes=num_classes, **variant)
        # Both columns' convolutions as one tensor when they share a device: the same function, but
        # slower in eager mode (the fused contender of `python -m replicate bench`: BENCHMARKS.md), so
        # off unless asked for.
        self.fused = fused
        self.stages = plan_stages(config)
        side = feature_side(config, self.stages)
        last = WIDTHS[config.columns][self.stages[-1].layer.name]
        # FC6 reads both columns' pooled maps (only its own without column communication)
        fc6_inputs = last * side * side * (config.columns if config.column_communication else 1)
        self.columns = nn.ModuleList(Column(config, self.stages, fc6_inputs) for _ in range(config.columns))
        self.fc8 = nn.Linear(WIDTHS[config.columns]["fc7"] * config.columns, num_classes)
        self.conv1_padding = conv1_padding(config.input_size)
        self.initialise()
        if devices is not None:
            self.place_columns(devices)

    @classmethod
    def from_config(
        cls, config: ModelConfig, devices: Sequence[torch.device | str] | None = None, fused: bool = False
    ) -> AlexNet:
        values = {f.name: getattr(config, f.name) for f in fields(config)}
        return cls(values.pop("num_classes"), devices=devices, fused=fused, **values)

    @torch.no_grad()
    def initialise(self) -> None:
        """§5: weights N(0, 0.01^2); biases 1 in conv2, conv4, conv5, FC6, FC7, else 0.
        init=code2012: #145's std 0.03 in conv3-5."""
        stds = CODE2012_INIT_STD if self.config.init == "code2012" else {}
        for name, layer in self.named_layers():
            layer.weight.normal_(0.0, stds.get(name, INIT_STD))
            layer.bias.fill_(1.0 if name in BIAS_ONE else 0.0)

    def named_layers(self) -> list[tuple[str, nn.Conv2d | nn.Linear]]:
        """(paper name, layer) for every weight layer, column by column, FC8 last."""
        layers = []
        for column in self.columns:
            layers += [(name, block[0]) for name, block in column.convs.items()]
            layers += [("fc6", column.fc6[0]), ("fc7", column.fc7[0])]
        return layers + [("fc8", self.fc8)]

    def place_columns(self, devices: Sequence[torch.device | str]) -> AlexNet:
        """Column i's layers on devices[i]; FC8 on devices[0] (§3.2: one GPU per column)."""
        if len(devices) != len(self.columns):
            raise ValueError(f"devices: got {len(devices)} for a net of {len(self.columns)} column(s)")
        for column, device in zip(self.columns, devices, strict=True):
            column.to(device)
        self.fc8.to(devices[0])
        return self

    def column_devices(self) -> list[torch.device]:
        return [column.fc6[0].weight.device for column in self.columns]

    def _exchange(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each column's input to a layer that reads both columns (conv3, FC6, FC7, §3.2): all columns'
        outputs, concatenated on its own device.
        The only place activations move between columns (and so between devices)."""
        if not self.config.column_communication:  # #150: each column keeps its own
            return parts
        devices = self.column_devices()
        if len(set(devices)) == 1:  # one device: one concatenation serves every column
            return [torch.cat(parts, dim=1)] * len(devices)
        return [torch.cat([part.to(device) for part in parts], dim=1) for device in devices]

    def fuses_columns(self) -> bool:
        return self.fused and len(self.columns) == 2 and len(set(self.column_devices())) == 1

    def _conv_stack(self, images: torch.Tensor) -> list[torch.Tensor]:
        images = F.pad(images, (0, self.conv1_padding, 0, self.conv1_padding))
        maps = [images.to(device) for device in self.column_devices()]  # each column sees the image
        for stage in self.stages:
            name = stage.layer.name
            if stage.reads_both_columns:
                maps = self._exchange(maps)
            maps = [column.convs[name](m) for column, m in zip(self.columns, maps, strict=True)]
        return maps

    def _hidden(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Each column's FC7 activations, before dropout."""
        side = self.config.input_size  # conv1's padding and FC6's inputs are computed for it
        if images.dim() != 4 or tuple(images.shape[-3:]) != (3, side, side):
            raise ValueError(
                f"AlexNet takes N x 3 x {side} x {side} crops (model.input_size={side}); "
                f"got {' x '.join(map(str, images.shape))}"
            )
        if self.fuses_columns():
            padded = F.pad(images, (0, self.conv1_padding, 0, self.conv1_padding))
            # (N, 2C, 6, 6).flatten(1) is column A's flattened maps, then column B's: FC6's input
            maps = fused_conv_stack(self.columns, self.stages, padded)
            if self.config.column_communication:
                hidden = [maps.flatten(1)] * 2
            else:
                hidden = [part.flatten(1) for part in maps.chunk(2, dim=1)]
        else:
            maps = self._conv_stack(images)
            hidden = self._exchange([m.flatten(1) for m in maps])
        hidden = [column.dropout6(column.fc6(h)) for column, h in zip(self.columns, hidden, strict=True)]
        hidden = self._exchange(hidden)
        return [column.fc7(h) for column, h in zip(self.columns, hidden, strict=True)]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class scores (logits; the softmax is in the loss) for a batch of crops."""
        hidden = [column.dropout7(h) for column, h in zip(self.columns, self._hidden(images), strict=True)]
        return self.fc8(self._gather(hidden))

    def fc7_features(self, images: torch.Tensor) -> torch.Tensor:
        """The 4096-d activations of the last hidden layer, FC7 after its ReLU (Figure 4)."""
        return self._gather(self._hidden(images))

    def _gather(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """All columns' units on FC8's device (§3.5: FC8 reads every FC7 unit)."""
        device = self.fc8.weight.device
        return torch.cat([part.to(device) for part in parts], dim=1)
