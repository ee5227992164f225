import pytest
import torch
from torch import nn

from replicate.config import ConfigError
from replicate.optim import OptimConfig, PaperSGD, PlateauSchedule, paper_optimizer


def formula_steps(w0: torch.Tensor, grads: list[torch.Tensor], lrs: list[float], momentum=0.9, decay=0.0005):
    """§5 written out, in float64: v <- m v - wd eps w - eps g; w <- w + v."""
    w, v, path = w0.double().clone(), torch.zeros_like(w0, dtype=torch.float64), []
    for g, eps in zip(grads, lrs, strict=True):
        v = momentum * v - decay * eps * w - eps * g.double()
        w = w + v
        path.append(w.clone())
    return path


def test_paper_sgd_follows_the_formula_through_a_learning_rate_drop():
    torch.manual_seed(0)
    w0 = torch.randn(5, dtype=torch.float64)
    grads = [torch.randn(5, dtype=torch.float64) for _ in range(8)]
    lrs = [0.01] * 4 + [0.001] * 4  # a drop after step 4
    parameter = nn.Parameter(w0.clone())
    optimizer = PaperSGD([parameter], lr=0.01)
    for step, (g, lr) in enumerate(zip(grads, lrs, strict=True)):
        optimizer.param_groups[0]["lr"] = lr
        parameter.grad = g.clone()
        optimizer.step()
        torch.testing.assert_close(parameter.detach(), formula_steps(w0, grads, lrs)[step])


def test_it_differs_from_torch_sgd_only_after_the_learning_rate_changes():
    torch.manual_seed(1)
    w0 = torch.randn(5, dtype=torch.float64)
    grads = [torch.randn(5, dtype=torch.float64) for _ in range(6)]
    ours, theirs = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    paper = PaperSGD([ours], lr=0.01)
    sgd = torch.optim.SGD([theirs], lr=0.01, momentum=0.9, weight_decay=0.0005)
    for step, g in enumerate(grads):
        if step == 3:
            paper.param_groups[0]["lr"] = sgd.param_groups[0]["lr"] = 0.001
        ours.grad, theirs.grad = g.clone(), g.clone()
        paper.step()
        sgd.step()
        if step < 3:
            torch.testing.assert_close(ours.detach(), theirs.detach())
    # After the drop SGD rescales its whole velocity to the new rate at once; the paper's does not.
    assert not torch.allclose(ours.detach(), theirs.detach(), rtol=1e-6, atol=1e-9)


def test_biases_get_twice_the_rate_and_no_weight_decay_as_in_the_2012_code():
    model = nn.Linear(3, 2)
    optimizer = paper_optimizer(model, OptimConfig())
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["weights"]["lr"] == 0.01 and groups["weights"]["weight_decay"] == 0.0005
    assert groups["biases"]["lr"] == 0.02 and groups["biases"]["weight_decay"] == 0.0
    assert groups["weights"]["params"] == [model.weight] and groups["biases"]["params"] == [model.bias]


def test_plateau_divides_by_ten_after_patience_at_most_three_times():
    optimizer = paper_optimizer(nn.Linear(1, 1), OptimConfig())
    schedule = PlateauSchedule(optimizer, OptimConfig(patience=2))
    errors = [50, 40, 41, 40, 39, 39, 39, 39, 39, 39, 39, 39, 39]
    drops = [schedule.step(e) for e in errors]
    # each rate's best is its own: 39 after the first division is the new rate's best, not a plateau
    assert [i for i, dropped in enumerate(drops) if dropped] == [3, 6, 9]  # 3 reductions, no 4th
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 / 1000)
    assert optimizer.param_groups[1]["lr"] == pytest.approx(0.02 / 1000)  # biases keep their 2x
    assert schedule.reductions == 3
    restored = PlateauSchedule(optimizer, OptimConfig(patience=2))
    restored.load_state_dict(schedule.state_dict())
    assert restored.state_dict() == schedule.state_dict()


def test_plateau_never_divides_within_the_first_reduction_after_epochs():
    optimizer = paper_optimizer(nn.Linear(1, 1), OptimConfig())
    schedule = PlateauSchedule(optimizer, OptimConfig(patience=1, first_reduction_after=3))
    drops = [schedule.step(e) for e in [50, 60, 60, 60, 60, 60]]  # no better error after the first
    assert [i for i, dropped in enumerate(drops) if dropped] == [3, 5]  # epoch 4, not 2 or 3; then 6
    restored = PlateauSchedule(optimizer, OptimConfig(patience=1, first_reduction_after=3))
    restored.load_state_dict(schedule.state_dict())
    assert restored.epochs == 6


def test_bad_optimiser_settings_are_errors():
    with pytest.raises(ConfigError, match="patience = 0 must be >= 1"):
        OptimConfig(patience=0)
    with pytest.raises(ConfigError, match=r"momentum = 1.5 must be in \[0, 1\)"):
        OptimConfig(momentum=1.5)
    with pytest.raises(ConfigError, match="weight_decay = -1 must be >= 0"):
        OptimConfig(weight_decay=-1)
