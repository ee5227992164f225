"""The paper's update rule and learning-rate schedule (§5).

§5:  v <- 0.9 v - 0.0005 eps w - eps <dL/dw>;   w <- w + v.

The learning rate eps is inside the velocity. torch.optim.SGD keeps v <- 0.9 v + g + wd w and steps
w <- w - eps v instead: the same while eps is constant, different after eps drops, when the paper's
velocity still carries steps of the old eps (they decay with the momentum) whereas SGD's velocity is
rescaled to the new eps at once. The original code does exactly the paper's
(src/weights.cu, Weights::update: inc <- mom inc + eps grad - wc eps w; w <- w + inc).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
from torch import nn

from replicate.config import NonNegative, NonNegativeInt, Positive, Probability, Range, Section


@dataclass
class OptimConfig(Section):
    """§5's hyper-parameters; where the paper is silent, the 2012 code's."""

    lr: Annotated[float, Range(0, low_open=True)] = 0.01  # §5: "initialized at 0.01", the same for all layers
    momentum: Probability = 0.9  # §5 (in [0, 1): the velocity must decay)
    weight_decay: NonNegative = 0.0005  # §5
    bias_lr_scale: NonNegative = 2.0  # paper silent; 2012 code: epsB = 2 x epsW (layer-params cfgs)
    bias_weight_decay: NonNegative = 0.0  # paper silent; 2012 code: weight decay (wc) on weights only
    lr_divisor: Annotated[float, Range(1, low_open=True)] = 10.0  # §5: "divide the learning rate by 10"
    max_reductions: NonNegativeInt = 3  # §5: "reduced three times prior to termination"
    patience: Positive = (
        3  # epochs without a better validation error before dividing (paper: "stopped improving")
    )
    min_improvement: NonNegative = 0.0  # a validation error (percent) must beat the best by more than this
    first_reduction_after: NonNegativeInt = 0  # epochs at the initial rate before the rule may divide it


class PaperSGD(torch.optim.Optimizer):
    """v <- momentum v - weight_decay lr w - lr g;  w <- w + v  (§5, per parameter group)."""

    def __init__(self, params, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 0.0005) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                state = self.state[parameter]
                if "velocity" not in state:
                    state["velocity"] = torch.zeros_like(parameter)
                velocity = state["velocity"]
                velocity.mul_(momentum).add_(parameter, alpha=-decay * lr).add_(parameter.grad, alpha=-lr)
                parameter.add_(velocity)
        return loss


def paper_optimizer(model: nn.Module, config: OptimConfig) -> PaperSGD:
    """Weights at lr with weight decay; biases at bias_lr_scale x lr with bias_weight_decay."""
    weights = [p for name, p in model.named_parameters() if not name.endswith("bias")]
    biases = [p for name, p in model.named_parameters() if name.endswith("bias")]
    return PaperSGD(
        [
            {"params": weights, "lr": config.lr, "weight_decay": config.weight_decay, "name": "weights"},
            {
                "params": biases,
                "lr": config.lr * config.bias_lr_scale,
                "weight_decay": config.bias_weight_decay,
                "name": "biases",
            },
        ],
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )


class PlateauSchedule:
    """§5: divide every group's learning rate by 10 when the validation error "stopped improving with
    the current learning rate" (so each rate's best error is its own: a division starts it anew), at
    most `max_reductions` times, never within the first `first_reduction_after` epochs (the 2012
    code's first division came after 25 of its 91 epochs). `step(error)` once per epoch; True when
    it divided."""

    def __init__(self, optimizer: torch.optim.Optimizer, config: OptimConfig) -> None:
        self.optimizer, self.config = optimizer, config
        self.best = float("inf")
        self.epochs_without_improvement = 0
        self.reductions = 0
        self.epochs = 0

    def step(self, validation_error: float) -> bool:
        self.epochs += 1
        if validation_error < self.best - self.config.min_improvement:
            self.best, self.epochs_without_improvement = validation_error, 0
            return False
        self.epochs_without_improvement += 1
        if (
            self.epochs_without_improvement < self.config.patience
            or self.epochs <= self.config.first_reduction_after
            or self.reductions >= self.config.max_reductions
        ):
            return False
        for group in self.optimizer.param_groups:
            group["lr"] /= self.config.lr_divisor
        self.reductions += 1
        self.epochs_without_improvement = 0
        self.best = float("inf")  # the new rate's epochs are judged against each other
        return True

    def state_dict(self) -> dict:
        return {
            "best": self.best,
            "epochs_without_improvement": self.epochs_without_improvement,
            "reductions": self.reductions,
            "epochs": self.epochs,
        }

    def load_state_dict(self, state: dict) -> None:
        self.best = state["best"]
        self.epochs_without_improvement = state["epochs_without_improvement"]
        self.reductions = state["reductions"]
        self.epochs = state.get("epochs", 0)
