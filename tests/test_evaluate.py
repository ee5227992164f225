import numpy as np
import pytest
import torch
from torch import nn

from replicate.data.loader import Batch
from replicate.evaluate import average_softmax, evaluate, topk_correct
from replicate.model import AlexNet
from replicate.speed import set_precision


class MeanColour(nn.Module):
    """A tiny 'network': logits are a fixed linear map of the mean colour of the view."""

    def __init__(self, seed: int, classes: int = 4) -> None:
        super().__init__()
        self.weight = torch.randn(classes, 3, generator=torch.Generator().manual_seed(seed))

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        return views.mean((2, 3)) @ self.weight.T


def by_hand(models, views):
    """softmax per model and view, averaged over views, then over models: loops only."""
    out = torch.zeros(views.shape[0], 4)
    for b in range(views.shape[0]):
        for model in models:
            for v in range(views.shape[1]):
                out[b] += torch.softmax(model(views[b, v : v + 1])[0], 0) / (views.shape[1] * len(models))
    return out


def test_ten_crop_and_ensemble_average_the_softmax_by_hand():
    generator = torch.Generator().manual_seed(0)
    views = torch.randn(6, 10, 3, 8, 8, generator=generator)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    models = [MeanColour(1), MeanColour(2)]
    expected = by_hand(models, views)
    torch.testing.assert_close(average_softmax(models, views), expected)
    # Not the same as averaging logits, and not the same as one view: the test can tell them apart.
    assert not torch.allclose(expected, by_hand(models, views[:, :1]))
    result = evaluate(models, [Batch(views[:3], labels[:3]), Batch(views[3:], labels[3:])], progress=False)
    top1 = int((expected.argmax(1) == labels).sum()) / 6
    top2 = int((expected.topk(2).indices == labels[:, None]).any(1).sum()) / 6
    assert result["images"] == 6
    assert abs(result["top1_error"] - 100 * (1 - top1)) < 1e-9
    assert result["top5_error"] == 0.0  # 4 classes: the true class is always in the top 5
    nll = -expected[torch.arange(6), labels].log().mean().item()
    assert abs(result["loss"] - nll) < 1e-5
    assert topk_correct(expected, labels, (2,))[2] == round(top2 * 6)


def test_top5_error_is_the_share_of_images_with_five_likelier_classes():
    """Against an independent count, with 12 classes, so that the true class is sometimes 6th or
    lower: an image is a top-5 error when at least five classes are more probable than its own."""
    generator = torch.Generator().manual_seed(0)
    views = torch.randn(60, 10, 3, 8, 8, generator=generator)
    labels = torch.randint(0, 12, (60,), generator=generator)
    models = [MeanColour(1, classes=12), MeanColour(2, classes=12)]
    probabilities = average_softmax(models, views).numpy()
    own = probabilities[np.arange(60), labels.numpy()]
    likelier = (probabilities > own[:, None]).sum(1)  # no ties among random floats
    misses = {k: int((likelier >= k).sum()) for k in (1, 5)}
    assert 0 < misses[5] < misses[1] < 60  # neither trivial nor the same as top-1
    result = evaluate(
        models, [Batch(views[:25], labels[:25]), Batch(views[25:], labels[25:])], progress=False
    )
    assert result["images"] == 60
    assert result["top5_error"] == pytest.approx(100 * misses[5] / 60, abs=1e-9)
    assert result["top1_error"] == pytest.approx(100 * misses[1] / 60, abs=1e-9)


def test_a_single_view_batch_is_one_view_per_image():
    views = torch.randn(5, 3, 8, 8)
    model = MeanColour(3)
    torch.testing.assert_close(average_softmax([model], views), model(views).softmax(-1))


@pytest.mark.gpu
def test_ten_crop_evaluation_on_the_gpu_equals_the_cpu():
    """`evaluate` runs on the run's train.device (auto: the GPU), in fp32 as `evaluate_runs` sets it."""
    set_precision("fp32")
    generator = torch.Generator().manual_seed(0)
    views = torch.rand(4, 10, 3, 224, 224, generator=generator) * 255 - 128
    labels = torch.tensor([0, 3, 7, 9])
    model = AlexNet(10).eval()
    on_cpu = average_softmax([model], views)
    model.cuda()
    torch.testing.assert_close(average_softmax([model], views.cuda()).cpu(), on_cpu, rtol=1e-4, atol=1e-6)
    result = evaluate([model], [Batch(views, labels)], "cuda", progress=False)
    assert result["images"] == 4 and result["loss"] == pytest.approx(
        -on_cpu[torch.arange(4), labels].log().mean().item(), rel=1e-4
    )
