"""`fidelity: code2012`: exactly the documented differences between the paper and the 2012 code's
config #145 (its layers.cfg and layer-params.cfg), each also switchable on its own. The augmentation
differences are tested against their formulas in test_data_transforms.py (chunk-of-32 crops, the
mean's centre crop, the colour-noise rule); the LRN constants in test_lrn.py."""

from pathlib import Path

import pytest
import torch
from torch import nn

from replicate.config import to_dict
from replicate.experiment import load_experiment
from replicate.lrn import ResponseNorm, SpatialResponseNorm
from replicate.model import AlexNet
from tests.test_ablate import flat

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
DIFFERENCES = {  # key: (paper, code2012)
    "model.lrn": ("paper", "code2012"),
    "model.lrn1_before_relu": (False, True),
    "model.spatial_norm": (False, True),
    "model.init": ("paper", "code2012"),
    "data.augment.colour_noise": ("paper", "code2012"),
    "data.augment.mean_crop": ("same_position", "centre"),
    "data.augment.crop_chunk": (1, 32),
}


def configs(*overrides: str):
    paper = flat(to_dict(load_experiment(EXPERIMENTS / "baseline.yaml")))
    code = flat(to_dict(load_experiment(EXPERIMENTS / "code2012.yaml", list(overrides))))
    return paper, code


def test_the_switch_changes_exactly_the_documented_keys():
    paper, code = configs()
    changed = {key for key in paper if paper[key] != code[key]} - {"name", "fidelity", "tracking.variant"}
    assert changed == set(DIFFERENCES)
    assert all((paper[key], code[key]) == values for key, values in DIFFERENCES.items())
    # The same in both: the paper is silent on biases, so both follow C (§5); k=2 (§3.3).
    assert (code["optim.bias_lr_scale"], code["optim.bias_weight_decay"], code["model.lrn_k"]) == (
        2.0,
        0.0,
        2.0,
    )


def text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


@pytest.mark.parametrize("key", sorted(DIFFERENCES))
def test_each_difference_switches_on_its_own(key):
    paper_value, code_value = DIFFERENCES[key]
    _, code = configs(f"{key}={text(paper_value)}")  # code2012 with this one difference switched back
    assert code[key] == paper_value
    assert all(code[other] == values[1] for other, values in DIFFERENCES.items() if other != key)
    one = flat(to_dict(load_experiment(EXPERIMENTS / "baseline.yaml", [f"{key}={text(code_value)}"])))
    assert one[key] == code_value and one["fidelity"] == "paper"  # the paper with this one switched on
    assert all(one[other] == values[0] for other, values in DIFFERENCES.items() if other != key)


def layer_list(model: AlexNet) -> list[tuple[str, str, str]]:
    """(layer, module type, its settings) for column A, in order."""
    return [
        (name, type(module).__name__, module.extra_repr())
        for name, block in model.columns[0].convs.items()
        for module in block
        if not isinstance(module, nn.Conv2d)
    ]


def test_the_two_models_differ_in_the_listed_layers_only():
    paper = AlexNet(10)
    code = AlexNet.from_config(load_experiment(EXPERIMENTS / "code2012.yaml", ["model.num_classes=10"]).model)
    paper_layers, code_layers = layer_list(paper), layer_list(code)
    assert [t for n, t, _ in paper_layers if n == "conv1"][:2] == ["ReLU", "ResponseNorm"]
    assert [t for n, t, _ in code_layers if n == "conv1"] == ["ResponseNorm", "MaxPool", "ReLU"]  # #145
    assert [t for n, t, _ in code_layers if n == "conv2"] == [
        "ReLU",
        "ResponseNorm",
        "SpatialResponseNorm",
        "MaxPool",
    ]
    paper_norms = [m for m in paper.modules() if isinstance(m, ResponseNorm)]
    code_norms = [m for m in code.modules() if isinstance(m, ResponseNorm)]
    assert {(m.alpha, m.k) for m in paper_norms} == {(1e-4, 2.0)} and {
        (m.alpha, m.k) for m in code_norms
    } == {(2e-5, 2.0)}
    # Same layers otherwise: drop the code's extras and LRN settings, and the lists match.
    strip = [(n, t) for n, t, _ in code_layers if t != "SpatialResponseNorm"]
    assert sorted(strip) == sorted((n, t) for n, t, _ in paper_layers)
    assert sum(p.numel() for p in code.parameters()) == sum(p.numel() for p in paper.parameters())
    for (name, a), (_, b) in zip(paper.named_layers(), code.named_layers(), strict=True):
        expected = 0.03 if name in ("conv3", "conv4", "conv5") else 0.01  # #145's initW
        assert abs(b.weight.std().item() - expected) < 0.05 * expected, name
        assert abs(a.weight.std().item() - 0.01) < 0.0005, name
        assert torch.equal(a.bias, b.bias), name  # initB the same: 1 in conv2, 4, 5, FC6, FC7


def test_spatial_norm_is_the_5x5_formula_clipped_at_the_border():
    torch.manual_seed(0)
    maps = torch.randn(2, 3, 9, 8, dtype=torch.float64) * 20
    out = SpatialResponseNorm()(maps)
    expected = torch.empty_like(maps)
    for y in range(9):
        for x in range(8):
            window = maps[:, :, max(0, y - 2) : y + 3, max(0, x - 2) : x + 3]
            total = (window**2).sum((2, 3))
            expected[:, :, y, x] = maps[:, :, y, x] / (1 + 0.001 / 25 * total) ** 0.75
    torch.testing.assert_close(out, expected)


def test_conv1_normalises_before_the_relu_under_code2012(images):
    model = AlexNet(10, lrn1_before_relu=True)
    block = model.columns[0].convs["conv1"]
    conv, norm = block[0], block[1]
    padded = torch.nn.functional.pad(images, (0, 3, 0, 3))
    expected = torch.relu(torch.nn.functional.max_pool2d(norm(conv(padded)), 3, 2))  # conv, LRN, pool, ReLU
    torch.testing.assert_close(block(padded), expected)
    paper_order = torch.nn.functional.max_pool2d(norm(torch.relu(conv(padded))), 3, 2)
    assert (block(padded) - paper_order).abs().max() > 1e-3  # a different function from the paper's
