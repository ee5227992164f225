"""`bench`'s layer timings: one column's LRN and pooling layers, ours against torch's own."""

import pytest
import torch

from replicate.bench.layers import layer_times


@pytest.mark.slow  # builds the compiled LRN's kernels
def test_the_lrn_is_timed_on_the_kernel_the_networks_run():
    cpu = torch.device("cpu")
    plain = layer_times(cpu, batch=1, repeats=1, channels_last=False)
    compiled = layer_times(cpu, batch=1, repeats=1, channels_last=False, lrn_kernel="compiled")
    for times, kernels in ((plain, []), (compiled, ["ours (compiled)"])):
        assert list(times["lrn"]) == ["lrn1 (48 x 55 x 55)", "lrn2 (128 x 27 x 27)"]
        for layer in times["lrn"].values():
            assert list(layer) == ["ours", "torch F.local_response_norm", *kernels]
            assert all(len(ms) == 1 for ms in layer.values())  # repeats=1: one timing each
        assert list(times["pool"]["pool5 (128 x 13 x 13)"]) == ["ours", "torch nn.MaxPool2d"]
