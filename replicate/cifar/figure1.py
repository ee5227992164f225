"""Figure 1 (§3.1): epochs for the four-layer CIFAR-10 net to reach 25% training error, ReLU vs tanh.

§3.1: "A four-layer convolutional neural network with ReLUs reaches a 25% training error rate on
CIFAR-10 six times faster than an equivalent network with tanh neurons. The learning rates for
each network were chosen independently to make training as fast as possible. No regularization
of any kind was employed."

For each activation, every learning rate of its grid is tried (seed 0) and the one that reaches
the threshold in the fewest epochs is kept; a run is cut once it can no longer beat the best so far.
The kept rate is then run for the remaining seeds. Training error is the running error over each
epoch's batches, as the 2012 code reported it. Inputs: 0-255 minus the training mean image;
no augmentation, no weight decay, no dropout.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch

from replicate import devices
from replicate.bench.records import origin
from replicate.cifar.data import first_images, load_cifar10
from replicate.cifar.net import CifarNet, CifarNetConfig, train_epoch
from replicate.config import ConfigError, NonNegativeInt, Positive, Probability, Range, Section, to_dict
from replicate.optim import PaperSGD
from replicate.paper import load_claims
from replicate.tracking import write_json, write_record

NOT_REACHED = "not reached"


@dataclass
class Figure1Config(Section):
    train_images: NonNegativeInt = 10_000  # the first N training images in batch order; 0: all 50,000
    threshold: Annotated[float, Range(0, 100)] = 25.0  # §3.1: training error (%) to reach
    max_epochs: Positive = 60  # a run that has not reached the threshold by then is "not reached"
    batch_size: Positive = 128
    momentum: Probability = 0.9
    relu_lrs: list[float] = field(default_factory=lambda: [0.002, 0.001, 0.004])  # searched in order
    tanh_lrs: list[float] = field(default_factory=lambda: [0.002, 0.001, 0.004])
    seeds: list[int] = field(default_factory=lambda: [0])  # seed 0 searches; the rest rerun the kept rate
    exact_subset: bool = False  # swap in the exact pixels of the bundled 10% subset
    out_dir: str = "runs/figure1"
    device: str = devices.AUTO  # auto: the first GPU when there is one, else the CPU

    def __post_init__(self) -> None:
        super().__post_init__()
        devices.check_name(self.device)  # whether this machine has it: when the run starts
        if not self.seeds or self.seeds[0] != 0 or not self.relu_lrs or not self.tanh_lrs:
            raise ConfigError(
                "figure1: seeds must start with 0 (the search seed) and each lr grid be non-empty"
            )
        if min(self.relu_lrs + self.tanh_lrs) <= 0 or min(self.seeds) < 0:
            raise ConfigError("figure1: every learning rate must be > 0 and every seed >= 0")


def training_data(config: Figure1Config) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Float N x 3 x 32 x 32 images on 0-255 minus the mean image, labels, and what they are."""
    cifar = load_cifar10("train", exact_subset=config.exact_subset)
    images, labels = first_images(cifar, config.train_images)
    images -= images.mean(0, keepdim=True)  # §2-style mean image, from the images trained on
    count = len(labels)
    what = cifar.description + (f", the first {count:,} training images" if count < len(cifar.labels) else "")
    return images, labels, what


def train_until(
    images: torch.Tensor,
    labels: torch.Tensor,
    activation: str,
    lr: float,
    seed: int,
    config: Figure1Config,
    epoch_limit: int,
) -> dict:
    """Train until the running training error reaches the threshold or `epoch_limit` epochs pass."""
    torch.manual_seed(seed)
    model = CifarNet(CifarNetConfig(activation=activation)).to(images.device)
    optimizer = PaperSGD(model.parameters(), lr=lr, momentum=config.momentum, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    curve, reached, diverged = [], None, False
    for epoch in range(1, epoch_limit + 1):
        train_error = train_epoch(model, optimizer, images, labels, config.batch_size, generator)
        if train_error is None:
            diverged = True
            break
        curve.append(train_error)
        if train_error <= config.threshold:
            reached = epoch
            break
    return {
        "activation": activation,
        "lr": lr,
        "seed": seed,
        "curve": curve,
        "diverged": diverged,
        "epochs_to_threshold": reached if reached is not None else NOT_REACHED,
    }


def epochs_of(run: dict) -> float:
    return run["epochs_to_threshold"] if run["epochs_to_threshold"] != NOT_REACHED else math.inf


class Progress:
    """The finished runs of `run_figure1` so far, kept in out_dir/figure1.partial.json after each run:
    run again with the same config after an interruption, it reuses them, so at most the run in
    progress is lost (a full-size Figure 1 takes hours on a CPU)."""

    def __init__(self, config: Figure1Config):
        self.path = Path(config.out_dir) / "figure1.partial.json"
        self.config = json.loads(json.dumps(to_dict(config)))
        self.runs: list[dict] = []
        if self.path.is_file():
            saved = json.loads(self.path.read_text())
            if saved.get("config") == self.config:
                self.runs = saved["runs"]
                print(f"resuming: {len(self.runs)} finished run(s) from {self.path}")
            else:
                print(f"{self.path}: runs of another config, not reused")

    def run(self, images, labels, activation: str, lr: float, seed: int, config: Figure1Config, limit: int):
        """`train_until`'s record, from an earlier attempt if it made this run already."""
        key = (activation, lr, seed, limit)
        for run in self.runs:
            if (run["activation"], run["lr"], run["seed"], run["epoch_limit"]) == key:
                return run
        started = time.perf_counter()
        run = train_until(images, labels, activation, lr, seed, config, limit)
        run["epoch_limit"], run["seconds"] = limit, time.perf_counter() - started
        self.runs.append(run)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, {"config": self.config, "runs": self.runs})
        return run


def search(images, labels, activation: str, lrs: list[float], config: Figure1Config, progress: Progress):
    runs, best = [], math.inf
    for lr in lrs:
        limit = config.max_epochs if best == math.inf else int(best) - 1  # must beat the best to matter
        if limit < 1:
            break
        run = progress.run(images, labels, activation, lr, 0, config, limit)
        runs.append(run)
        best = min(best, epochs_of(run))
        print(
            f"{activation} lr={lr:g}: {run['epochs_to_threshold']} epochs to {config.threshold:g}% "
            f"(last training error {run['curve'][-1]:.1f}%, {run['seconds']:.0f} s)"
        )
    return runs


def run_figure1(config: Figure1Config) -> dict:
    started = time.perf_counter()
    device = devices.resolve(config.device, "device")
    images, labels, what = training_data(config)
    images, labels = images.to(device), labels.to(device)
    record: dict = {
        "dataset": what,
        "device": devices.describe(device),
        **origin(),
        "torch": torch.__version__,
        "config": to_dict(config),
        "runs": [],
        "activations": {},
    }
    progress = Progress(config)
    for activation, lrs in (("relu", config.relu_lrs), ("tanh", config.tanh_lrs)):
        runs = search(images, labels, activation, lrs, config, progress)
        best = min(runs, key=lambda r: (epochs_of(r), r["curve"][-1]))
        for seed in config.seeds[1:]:
            run = progress.run(images, labels, activation, best["lr"], seed, config, config.max_epochs)
            print(f"{activation} lr={best['lr']:g} seed {seed}: {run['epochs_to_threshold']} epochs")
            runs.append(run)
        kept = [r for r in runs if r["lr"] == best["lr"]]
        epochs = [epochs_of(r) for r in kept]
        record["runs"] += runs
        record["activations"][activation] = {
            "lr": best["lr"],
            "epochs_to_threshold": [r["epochs_to_threshold"] for r in kept],
            "mean_epochs": statistics.mean(epochs) if all(map(math.isfinite, epochs)) else NOT_REACHED,
        }
    relu, tanh = (record["activations"][a]["mean_epochs"] for a in ("relu", "tanh"))
    numeric = NOT_REACHED not in (relu, tanh)
    record["tanh_over_relu"] = tanh / relu if numeric else NOT_REACHED
    record["paper_tanh_over_relu"] = load_claims()["figure1"]["tanh_over_relu_epochs"]
    record["seconds"] = time.perf_counter() - started  # this attempt's (a resumed run reuses earlier runs)
    save(record, Path(config.out_dir))
    progress.path.unlink(missing_ok=True)
    return record


def save(record: dict, out: Path) -> None:
    rows = (
        [run["activation"], run["lr"], run["seed"], epoch, f"{error:.4f}"]
        for run in record["runs"]
        for epoch, error in enumerate(run["curve"], 1)
    )
    write_record(out, "figure1", record, ["activation", "lr", "seed", "epoch", "train_error"], rows)


def table(record: dict) -> str:
    lines = [
        f"Figure 1 (§3.1), measured on {record['dataset']}",
        "| activation | learning rate (searched) | epochs to 25% training error | per seed |",
        "|---|---|---|---|",
    ]
    for activation, result in record["activations"].items():
        mean = result["mean_epochs"]
        lines.append(
            f"| {activation} | {result['lr']:g} | {mean if mean == NOT_REACHED else f'{mean:.1f}'} | "
            f"{', '.join(str(e) for e in result['epochs_to_threshold'])} |"
        )
    ratio = record["tanh_over_relu"]
    lines.append(
        f"tanh / relu epochs: measured {ratio if ratio == NOT_REACHED else f'{ratio:.1f}'}, "
        f"paper about {record['paper_tanh_over_relu']:g}"
    )
    return "\n".join(lines)
