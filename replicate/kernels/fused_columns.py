"""Both columns of `AlexNet` in one tensor on one device (`speed.fused_columns`): grouped
convolutions in place of the per-column loop, the same function (tests/test_model.py). Faster only
under torch.compile; the per-column loop is the default (BENCHMARKS.md)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from replicate.lrn import ResponseNorm


def fused_conv_stack(columns: nn.ModuleList, stages: Sequence, images: torch.Tensor) -> torch.Tensor:
    """The same computation as the per-column loop, both columns in one tensor (one device).

    Channels [0, C/2) are column A's, [C/2, C) column B's, as `AlexNet._exchange` concatenates them.
    A layer that reads one column is a grouped convolution (groups=2: each half of the kernels
    sees only its own column's maps); conv1 and a layer that reads both columns (conv3) are one
    dense convolution with both columns' kernels stacked. The LRN runs on a (N, 2, C/2, H, W) view,
    so its window never crosses columns (§3.3). Weights stay in the columns (same parameters,
    checkpoints and `place_columns`); only their concatenation is made per call.
    """
    maps = images
    for stage in stages:
        name = stage.layer.name
        convs = [column.convs[name][0] for column in columns]
        weight = torch.cat([conv.weight for conv in convs])
        bias = torch.cat([conv.bias for conv in convs])
        groups = 1 if stage.reads_both_columns or name == "conv1" else 2
        maps = F.conv2d(maps, weight, bias, convs[0].stride, convs[0].padding, groups=groups)
        # conv, activation, norms, pools: the same modules in each column. The LRN reads its
        # column's maps only; the rest act per map.
        for module in list(columns[0].convs[name])[1:]:
            maps = module(maps, groups=2) if isinstance(module, ResponseNorm) else module(maps)
    return maps
