import math

import pytest
import torch
from torch import nn

from replicate.config import ConfigError
from replicate.model import AlexNet, PaperDropout, conv1_padding
from tests.ground_truth import assert_same_function
from tests.test_lrn import lrn_by_loop

# Parameters per layer (both columns together) at 1000 classes: §3.5's layer sizes, counted by hand.
PAPER_PARAMETERS = {
    "conv1": 34_944,
    "conv2": 307_456,
    "conv3": 885_120,
    "conv4": 663_936,
    "conv5": 442_624,
    "fc6": 37_752_832,
    "fc7": 16_781_312,
    "fc8": 4_097_000,
}


def parameters_by_layer(model: AlexNet) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name, layer in model.named_layers():
        counts[name] = counts.get(name, 0) + sum(p.numel() for p in layer.parameters())
    return counts


def record_outputs(model: AlexNet) -> dict[str, torch.Tensor]:
    """Hooks that keep every module's output, keyed 'column<i>.<module path>' and 'fc8'.

    They switch the model to the per-column path, whose modules the hooks see; the fused path is
    tested equal to it (test_fused_columns_compute_the_per_column_function)."""
    model.fused = False
    outputs: dict[str, torch.Tensor] = {}
    for i, column in enumerate(model.columns):
        for path, module in column.named_modules():
            if path and not isinstance(module, nn.Sequential):
                module.register_forward_hook(
                    lambda _m, _i, out, key=f"column{i}.{path}": outputs.__setitem__(key, out)
                )
    model.fc8.register_forward_hook(lambda _m, _i, out: outputs.__setitem__("fc8", out))
    return outputs


def test_parameter_count_is_the_papers():
    model = AlexNet()
    assert sum(p.numel() for p in model.parameters()) == 60_965_224
    assert parameters_by_layer(model) == PAPER_PARAMETERS


def test_shapes_after_every_stage(images):
    model = AlexNet()
    outputs = record_outputs(model)
    assert model(images).shape == (2, 1000)
    expected = {  # per column: conv, ReLU, LRN, pool (§3.5, Figure 2)
        "convs.conv1.0": (48, 55, 55),
        "convs.conv1.1": (48, 55, 55),
        "convs.conv1.2": (48, 55, 55),
        "convs.conv1.3": (48, 27, 27),
        "convs.conv2.0": (128, 27, 27),
        "convs.conv2.2": (128, 27, 27),
        "convs.conv2.3": (128, 13, 13),
        "convs.conv3.0": (192, 13, 13),
        "convs.conv4.0": (192, 13, 13),
        "convs.conv5.0": (128, 13, 13),
        "convs.conv5.2": (128, 6, 6),
        "fc6.0": (2048,),
        "fc7.0": (2048,),
    }
    for column in (0, 1):
        for path, shape in expected.items():
            assert outputs[f"column{column}.{path}"].shape == (2, *shape), path
    assert outputs["fc8"].shape == (2, 1000)


@pytest.mark.parametrize("side", [200, 227])
def test_an_input_of_another_size_is_an_error_naming_the_expected_one(side):
    """conv1's padding and FC6's width are computed for model.input_size: 227 x 227 would be taken
    silently and 200 x 200 fail deep in FC6 if the input were not checked on entry."""
    with pytest.raises(
        ValueError, match=rf"takes N x 3 x 224 x 224 crops \(model.input_size=224\); got 1 x 3 x {side}"
    ):
        AlexNet(10)(torch.zeros(1, 3, side, side))
    with pytest.raises(ValueError, match="takes N x 3 x 227 x 227 crops"):
        AlexNet(10, input_size=227).fc7_features(torch.zeros(1, 3, 224, 224))


def test_conv1_covers_what_the_2012_code_covered(images):
    # 224 input -> 55 outputs: the last window starts at 54*4 = 216 and its last 3 rows and columns
    # lie past the image (C: 1 + ceil((224 - 11) / 4) = 55). A 227 input needs no padding.
    assert conv1_padding(224) == 3 and conv1_padding(227) == 0
    model = AlexNet()
    outputs = record_outputs(model)
    model(images)
    conv = model.columns[1].convs["conv1"][0]
    inside = images[:, :, 216:224, 216:224]  # the 8x8 part of the window inside the image
    direct = (conv.weight[:, :, :8, :8].unsqueeze(0) * inside.unsqueeze(1)).sum((2, 3, 4)) + conv.bias
    torch.testing.assert_close(outputs["column1.convs.conv1.0"][:, :, 54, 54], direct, rtol=1e-4, atol=1e-4)
    top_left = (conv.weight.unsqueeze(0) * images[:, None, :, :11, :11]).sum((2, 3, 4)) + conv.bias
    torch.testing.assert_close(outputs["column1.convs.conv1.0"][:, :, 0, 0], top_left, rtol=1e-4, atol=1e-4)
    # The same net on a 227 crop made of the 224 crop plus 3 zero rows and columns is the same function.
    wide = AlexNet(input_size=227)
    wide.load_state_dict(model.state_dict())
    padded = torch.zeros(2, 3, 227, 227)
    padded[:, :, :224, :224] = images
    torch.testing.assert_close(wide.eval()(padded), model.eval()(images))


def test_lrn_normalises_within_each_column_only(images):
    model = AlexNet()
    outputs = record_outputs(model)
    model(images)
    for column in (0, 1):
        relu = outputs[f"column{column}.convs.conv1.1"]
        # The loop formula over this column's 48 maps alone, edge maps (0, 47) included.
        expected = lrn_by_loop(relu, 5, 1e-4, 0.75, 2.0).float()
        torch.testing.assert_close(outputs[f"column{column}.convs.conv1.2"], expected, rtol=1e-4, atol=1e-5)


def test_columns_meet_only_at_conv3(images):
    model = AlexNet()
    outputs = record_outputs(model)
    model(images)
    a_conv1 = outputs["column0.convs.conv1.0"]
    b_conv2 = outputs["column1.convs.conv2.0"]
    b_conv3 = outputs["column1.convs.conv3.0"]
    (grad_conv2,) = torch.autograd.grad(
        b_conv2.sum(), a_conv1, retain_graph=True, allow_unused=True, materialize_grads=True
    )
    assert torch.count_nonzero(grad_conv2) == 0, "column B's conv2 must not read column A"
    (grad_conv3,) = torch.autograd.grad(b_conv3.sum(), a_conv1, retain_graph=True)
    assert torch.count_nonzero(grad_conv3) > 0, "column B's conv3 reads column A (Figure 2)"
    (own,) = torch.autograd.grad(b_conv2.sum(), outputs["column1.convs.conv1.0"])
    assert torch.count_nonzero(own) > 0


def test_two_devices_give_the_same_function_and_cross_only_at_conv3_fc6_fc7_fc8(images, monkeypatch):
    torch.manual_seed(0)
    single = AlexNet(10).eval()
    placed = AlexNet(10, devices=("cpu", "cpu"), fused=False).eval()
    placed.load_state_dict(single.state_dict())
    crossings = []  # (how, the shape of one column's part) at each crossing between columns
    original, original_gather = placed._exchange, placed._gather
    monkeypatch.setattr(
        placed,
        "_exchange",
        lambda parts: crossings.append(("exchange", tuple(parts[0].shape[1:]))) or original(parts),
    )
    monkeypatch.setattr(
        placed,
        "_gather",
        lambda parts: crossings.append(("gather", tuple(parts[0].shape[1:]))) or original_gather(parts),
    )
    torch.testing.assert_close(placed(images), single(images))
    # conv3 reads both columns' pooled conv2 maps; FC6 both columns' conv5 maps (6 x 6 x 128 each);
    # FC7 both columns' FC6 units; FC8 every FC7 unit (§3.2, Figure 2)
    assert crossings == [
        ("exchange", (128, 13, 13)),
        ("exchange", (128 * 6 * 6,)),
        ("exchange", (2048,)),
        ("gather", (2048,)),
    ]


def test_devices_must_match_columns():
    with pytest.raises(ValueError, match="devices: got 3"):
        AlexNet(10, devices=("cpu", "cpu", "cpu"))


@pytest.mark.gpu
def test_cuda_and_cpu_columns_match_one_device(images):
    torch.manual_seed(0)
    single = AlexNet(10).eval()
    placed = AlexNet(10, devices=("cuda", "cpu")).eval()
    placed.load_state_dict(single.state_dict())
    assert {p.device.type for p in placed.columns[0].parameters()} == {"cuda"}
    assert {p.device.type for p in placed.columns[1].parameters()} == {"cpu"}
    torch.testing.assert_close(placed(images).cpu(), single(images), rtol=1e-3, atol=1e-3)


def test_initialisation_is_section_5():
    torch.manual_seed(0)
    model = AlexNet()
    for name, layer in model.named_layers():
        expected_bias = 1.0 if name in {"conv2", "conv4", "conv5", "fc6", "fc7"} else 0.0
        assert torch.all(layer.bias == expected_bias), name
        weight = layer.weight.detach()
        # std error of the sample std is 0.01 / sqrt(2n): 5% is many sigmas for these sizes.
        assert abs(weight.std().item() - 0.01) < 0.0005, name
        assert abs(weight.mean().item()) < 0.01 * 5 / math.sqrt(weight.numel()), name


def test_paper_dropout_masks_without_rescaling_and_halves_at_test():
    torch.manual_seed(0)
    hidden = torch.rand(1000, 64) + 1
    dropout = PaperDropout(0.5).train()
    out = dropout(hidden)
    kept = out != 0
    assert torch.equal(out[kept], hidden[kept])  # kept units unchanged: no 1/(1-p) scaling
    assert abs(kept.float().mean().item() - 0.5) < 0.01
    assert torch.equal(dropout.eval()(hidden), hidden * 0.5)


def test_inverted_dropout_option_rescales_in_training():
    torch.manual_seed(0)
    model = AlexNet(10, dropout="inverted")
    hidden = torch.rand(1000, 64) + 1
    out = model.columns[0].dropout6.train()(hidden)
    assert torch.allclose(out[out != 0], 2 * hidden[out != 0])
    assert torch.equal(model.columns[0].dropout6.eval()(hidden), hidden)
    assert isinstance(AlexNet(10, dropout="off").columns[0].dropout7, nn.Identity)


def test_fc7_features_feed_fc8_through_the_test_time_dropout_scale(images):
    model = AlexNet(10).eval()
    features = model.fc7_features(images)
    assert features.shape == (2, 4096) and bool((features >= 0).all())
    torch.testing.assert_close(model.fc8(features * 0.5), model(images))


VARIANTS = [
    {},
    {"activation": "tanh"},
    {"lrn": "off"},
    {"lrn": "code2012", "lrn_k": 1.0},
    {"pooling": "non_overlapping"},
    {"columns": 1},
    {"remove_conv": 2},
    {"remove_conv": 3},
    {"remove_conv": 4},
    {"dropout": "off"},
    {"dropout": "inverted"},
    {"num_classes": 7},
    {"column_communication": False},
    {"lrn": "code2012", "lrn1_before_relu": True, "spatial_norm": True, "init": "code2012"},  # #145
]


@pytest.mark.parametrize(
    "variant", VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) or "paper"
)
def test_every_variant_runs_forward_and_backward(variant, images):
    variant = {"num_classes": 10, **variant}
    model = AlexNet(**variant)
    logits = model(images)
    assert logits.shape == (2, variant["num_classes"])
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name


@pytest.mark.parametrize(
    "variant", VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) or "paper"
)
def test_fused_columns_compute_the_per_column_function(variant):
    """The one-tensor path (grouped convolutions, LRN on a (2N, C/2, H, W) view) against the
    per-column modules, both against the float64 ground truth (tests/ground_truth.py): the same
    outputs and gradients for every parameter, in training mode (same seed, so the same dropout
    masks) on paper-scale inputs."""
    variant = {"num_classes": 10, **variant}
    torch.manual_seed(1)
    images = torch.randn(3, 3, 224, 224) * 60
    labels = torch.tensor([0, 3, 6])
    fused = AlexNet(**variant, fused=True)
    reference = AlexNet(**variant, fused=False)
    reference.load_state_dict(fused.state_dict())
    assert fused.fuses_columns() == (fused.config.columns == 2) and not reference.fuses_columns()
    assert_same_function(reference, fused, fused, images, labels)
    with torch.no_grad():  # the forward pass is continuous: no winner to pick, fp32 against fp32
        torch.testing.assert_close(fused.eval().fc7_features(images), reference.eval().fc7_features(images))


def test_fused_path_is_used_only_on_one_device():
    assert AlexNet(10, fused=True).fuses_columns() and not AlexNet(10).fuses_columns()
    assert not AlexNet(10, devices=("cpu", "meta"), fused=True).fuses_columns()
    assert not AlexNet(10, columns=1, fused=True).fuses_columns()


def test_without_column_communication_only_fc8_reads_both_columns(images):
    """#150 of the 2012 code: conv3, FC6 and FC7 read their own column; FC8 still reads both."""
    model = AlexNet(10, column_communication=False)
    outputs = record_outputs(model)
    model(images)
    a_conv1, b_fc7 = outputs["column0.convs.conv1.0"], outputs["column1.fc7.0"]
    (grad,) = torch.autograd.grad(
        b_fc7.sum(), a_conv1, retain_graph=True, allow_unused=True, materialize_grads=True
    )
    assert torch.count_nonzero(grad) == 0, "column B's FC7 must not read column A"
    (grad,) = torch.autograd.grad(outputs["fc8"].sum(), a_conv1)
    assert torch.count_nonzero(grad) > 0, "FC8 reads both columns"
    conv3 = model.columns[1].convs["conv3"][0]
    assert conv3.in_channels == 128 and model.columns[1].fc6[0].in_features == 128 * 6 * 6
    assert model.columns[1].fc7[0].in_features == 2048 and model.fc8.in_features == 4096
    # The paper's net less the cross-column halves of conv3, FC6 and FC7's weights.
    removed = 2 * (192 * 128 * 9 + 2048 * 128 * 36 + 2048 * 2048)
    assert (
        sum(p.numel() for p in model.parameters())
        == sum(p.numel() for p in AlexNet(10).parameters()) - removed
    )


def test_non_overlapping_pooling_keeps_the_sizes(images):
    model = AlexNet(10, pooling="non_overlapping")
    outputs = record_outputs(model)
    model(images)
    assert outputs["column0.convs.conv1.3"].shape[-1] == 27
    assert outputs["column0.convs.conv2.3"].shape[-1] == 13
    assert outputs["column0.convs.conv5.2"].shape[-1] == 6
    assert isinstance(model.columns[0].convs["conv1"][3], nn.MaxPool2d)
    assert model.columns[0].convs["conv1"][3].kernel_size == 2


def test_one_column_of_half_size_keeps_conv5_and_fc_whole():
    model = AlexNet(columns=1)
    (column,) = model.columns
    widths = {name: layer.weight.shape[0] for name, layer in model.named_layers()}
    assert widths == {
        "conv1": 48,
        "conv2": 128,
        "conv3": 192,
        "conv4": 192,
        "conv5": 256,
        "fc6": 4096,
        "fc7": 4096,
        "fc8": 1000,
    }
    two = sum(p.numel() for p in AlexNet().parameters())
    one = sum(p.numel() for p in model.parameters())
    assert one == 59_798_312 and abs(one - two) / two < 0.02  # "about as many" (§3.2 footnote)


@pytest.mark.parametrize("removed", [2, 3, 4])
def test_removing_a_middle_conv_layer(removed, images):
    model = AlexNet(10, remove_conv=removed)
    names = [name for name, _ in model.named_layers() if name.startswith("conv")]
    assert names == [f"conv{i}" for i in range(1, 6) if i != removed] * 2
    outputs = record_outputs(model)
    model(images)
    last = [key for key in outputs if key.startswith("column0.convs.conv5")][-1]
    assert outputs[last].shape[-2:] == (6, 6)  # spatial sizes unchanged
    # The columns still meet once in the conv stack.
    assert sum(stage.reads_both_columns for stage in model.stages) == 1


def test_tanh_variant_uses_tanh_everywhere():
    model = AlexNet(10, activation="tanh")
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert sum(isinstance(m, nn.Tanh) for m in model.modules()) == 2 * 7


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"lrn": "none"}, "lrn = 'none' is not one of"),
        ({"columns": 3}, "columns = 3 is not one of"),
        ({"remove_conv": 5}, "remove_conv = 5 is not one of"),
        ({"dropout_p": 1.0}, r"dropout_p = 1.0 must be in \[0, 1\)"),
        ({"num_classes": 0}, "num_classes = 0 must be >= 1"),
    ],
)
def test_bad_variants_are_named_errors(bad, message):
    with pytest.raises(ConfigError, match=message):
        AlexNet(**{"num_classes": 10, **bad})


def test_multiply_adds_match_the_layer_arithmetic():
    from replicate.bench.network import multiply_adds

    # Per image, both columns: conv1 55*55*96*363, conv2 27*27*256*1200, conv3 13*13*384*2304,
    # conv4 13*13*384*1728, conv5 13*13*256*1728, FC 9216*4096 + 4096*4096 + 4096*1000.
    expected = (
        55 * 55 * 96 * 363
        + 27 * 27 * 256 * 1200
        + 13 * 13 * 384 * 2304
        + 13 * 13 * 384 * 1728
        + 13 * 13 * 256 * 1728
        + 9216 * 4096
        + 4096 * 4096
        + 4096 * 1000
    )
    assert multiply_adds(AlexNet()) == expected
