"""§3.3 on CIFAR-10: the four-layer net with and without response normalisation, test error.

§3.3: "a four-layer CNN achieved a 13% test error rate without normalization and 11% with
normalization". The net is the 2012 code's layers-18pct (replicate/cifar/net.py), with its two
normalisation layers (after pool1 and pool2, §3.3's constants) or without them; both arms train
with the same seeds, data order, learning-rate schedule and §5's update rule (momentum 0.9,
weight decay 0.0005). The paper's training recipe for this net is not given (neither are its
epochs nor its augmentation), so the absolute errors of a short CPU run are not the paper's; the
comparable figure is the difference the normalisation makes, measured over seeds.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch

from replicate import devices
from replicate.cifar.data import first_images, load_cifar10
from replicate.cifar.net import CifarNet, CifarNetConfig, train_epoch
from replicate.config import (
    ConfigError,
    NonNegative,
    NonNegativeInt,
    Positive,
    Probability,
    Range,
    Section,
    to_dict,
)
from replicate.optim import PaperSGD
from replicate.paper import load_claims
from replicate.tracking import write_record


@dataclass
class LrnCifarConfig(Section):
    train_images: NonNegativeInt = 0  # the first N training images in batch order; 0: all 50,000
    test_images: NonNegativeInt = 0  # the first N test images; 0: all 10,000
    epochs: Positive = 8
    lr: Annotated[float, Range(0, low_open=True)] = 0.004
    lr_drop_epochs: list[int] = field(default_factory=lambda: [6])  # lr / 10 from these epochs on
    batch_size: Positive = 128
    momentum: Probability = 0.9  # §5
    weight_decay: NonNegative = 0.0005  # §5
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    exact_subset: bool = False  # swap in the exact pixels of the bundled 10% subset
    out_dir: str = "runs/lrn-cifar"
    device: str = devices.AUTO  # auto: the first GPU when there is one, else the CPU

    def __post_init__(self) -> None:
        super().__post_init__()
        devices.check_name(self.device)  # whether this machine has it: when the run starts
        if not self.seeds or min(self.seeds) < 0 or min(self.lr_drop_epochs, default=1) < 1:
            raise ConfigError("lrn-cifar: seeds must be non-empty and >= 0, lr_drop_epochs >= 1")


def cifar_tensors(split: str, count: int, exact_subset: bool) -> tuple[torch.Tensor, torch.Tensor, str]:
    cifar = load_cifar10(split, exact_subset=exact_subset)
    return *first_images(cifar, count), cifar.description


@torch.no_grad()
def test_error(model: CifarNet, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    wrong = sum(
        int((model(images[i : i + batch]).argmax(1) != labels[i : i + batch]).sum())
        for i in range(0, len(labels), batch)
    )
    return 100.0 * wrong / len(labels)


def train_arm(norm: str, seed: int, data: dict, config: LrnCifarConfig) -> dict:
    """One net (norm off or lrn), one seed: training and test error after every epoch."""
    torch.manual_seed(seed)
    images, labels = data["train"]
    model = CifarNet(CifarNetConfig(norm=norm)).to(images.device)
    optimizer = PaperSGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    generator = torch.Generator().manual_seed(seed)  # the same data order for both arms
    curve, started = [], time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        drops = sum(epoch > e for e in config.lr_drop_epochs)
        for group in optimizer.param_groups:
            group["lr"] = config.lr / 10**drops
        train_error = train_epoch(model, optimizer, images, labels, config.batch_size, generator)
        if train_error is None:
            raise ConfigError(f"lrn-cifar: the loss diverged (norm={norm}, seed {seed}); lower lr")
        curve.append(
            {
                "epoch": epoch,
                "lr": config.lr / 10**drops,
                "train_error": train_error,
                "test_error": test_error(model, *data["test"]),
            }
        )
        print(
            f"norm={norm} seed {seed} epoch {epoch}: train {curve[-1]['train_error']:.2f}% "
            f"test {curve[-1]['test_error']:.2f}%"
        )
    return {
        "norm": norm,
        "seed": seed,
        "curve": curve,
        "test_error": curve[-1]["test_error"],
        "seconds": time.perf_counter() - started,
    }


def run_lrn_cifar(config: LrnCifarConfig) -> dict:
    device = devices.resolve(config.device, "device")
    train_x, train_y, what = cifar_tensors("train", config.train_images, config.exact_subset)
    test_x, test_y, _ = cifar_tensors("test", config.test_images, config.exact_subset)
    mean = train_x.mean(0, keepdim=True)  # §2's mean image, from the training images only
    data = {
        "train": ((train_x - mean).to(device), train_y.to(device)),
        "test": ((test_x - mean).to(device), test_y.to(device)),
    }
    described = f"{what}: {len(train_y):,} training and {len(test_y):,} test images"
    record: dict = {
        "dataset": described,
        "device": devices.describe(device),
        "config": to_dict(config),
        "runs": [],
        "arms": {},
    }
    started = time.perf_counter()
    for seed in config.seeds:
        for norm in ("off", "lrn"):
            record["runs"].append(train_arm(norm, seed, data, config))
    for norm in ("off", "lrn"):
        errors = [r["test_error"] for r in record["runs"] if r["norm"] == norm]
        record["arms"][norm] = {"test_errors": errors, "mean": statistics.mean(errors)}
    deltas = [
        lrn["test_error"] - off["test_error"]
        for off, lrn in zip(record["runs"][0::2], record["runs"][1::2], strict=True)
    ]
    record["delta_per_seed"] = deltas  # with LRN minus without, the same seed
    record["delta_mean"] = statistics.mean(deltas)
    claim = load_claims()["cifar10_lrn"]
    record["paper"] = {
        "without": claim["test_error_without_lrn"],
        "with": claim["test_error_with_lrn"],
        "delta": claim["test_error_with_lrn"] - claim["test_error_without_lrn"],
    }
    record["seconds"] = time.perf_counter() - started
    save(record, Path(config.out_dir))
    return record


def save(record: dict, out: Path) -> None:
    rows = (
        [run["norm"], run["seed"], row["epoch"], row["lr"], row["train_error"], row["test_error"]]
        for run in record["runs"]
        for row in run["curve"]
    )
    write_record(out, "lrn-cifar", record, ["norm", "seed", "epoch", "lr", "train_error", "test_error"], rows)


def table(record: dict) -> str:
    paper, arms = record["paper"], record["arms"]

    def errors(norm: str) -> str:
        return ", ".join(f"{e:.2f}" for e in arms[norm]["test_errors"])

    return "\n".join(
        [
            f"§3.3 on CIFAR-10, measured on {record['dataset']} ({len(record['config']['seeds'])} seed(s), "
            f"{record['config']['epochs']} epochs, {record['seconds'] / 60:.0f} min)",
            "| net | paper test error (%) | measured test error (%), mean | per seed |",
            "|---|---|---|---|",
            f"| without normalisation | {paper['without']:g} | {arms['off']['mean']:.2f} | {errors('off')} |",
            f"| with normalisation | {paper['with']:g} | {arms['lrn']['mean']:.2f} | {errors('lrn')} |",
            f"| difference (with - without) | {paper['delta']:+g} | {record['delta_mean']:+.2f} | "
            f"{', '.join(f'{d:+.2f}' for d in record['delta_per_seed'])} |",
            "The absolute errors are not comparable with the paper's (its recipe for this net is not "
            "given; this is a short CPU run); the difference is.",
        ]
    )
