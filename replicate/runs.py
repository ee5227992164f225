"""Run directories after training: their config and weights, evaluated alone or as an ensemble (§6)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from replicate import devices
from replicate.config import ConfigError, apply_overrides, from_dict, to_dict
from replicate.data.loader import EpochBatches, StoreDataset, make_loader, prepare
from replicate.data.transforms import Augment
from replicate.evaluate import evaluate
from replicate.experiment import ExperimentConfig, resolve_file
from replicate.model import AlexNet
from replicate.speed import set_precision
from replicate.tracking import write_json


def run_config(run_dir: Path, overrides: list[str] = ()) -> ExperimentConfig:
    """The config a run was trained with (its config.yaml), with `overrides` applied."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    return from_dict(ExperimentConfig, apply_overrides(resolve_file(path), overrides))


def load_model(run_dir: Path, config: ExperimentConfig, weights: str = "last") -> AlexNet:
    path = Path(run_dir) / "checkpoints" / f"{weights}.pt"
    if not path.is_file():
        raise ConfigError(f"{path}: no such checkpoint (is the run finished? weights: last or best)")
    model = AlexNet.from_config(config.model)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"])
    return model.eval()


def evaluate_runs(
    run_dirs: list[Path],
    views: list[str],
    weights: str = "last",
    overrides: list[str] = (),
    out: Path | None = None,
) -> dict:
    """Evaluate one run, or average the softmax of several (the paper's "5 CNNs", §6), on the eval
    split of the first run's data config (with `overrides`, e.g. another data set or split), on its
    `train.device` (auto: the first GPU when there is one; `train.device=cpu` to choose)."""
    configs = [run_config(d, overrides) for d in run_dirs]
    data = configs[0].data
    if any(c.model.num_classes != configs[0].model.num_classes for c in configs):
        raise ConfigError("the runs of an ensemble must have the same number of classes")
    device = devices.resolve(configs[0].train.device, "train.device")
    set_precision("fp32")  # the paper's arithmetic: on a GPU, no TF32 convolutions (cuDNN's default)
    models = [load_model(d, c, weights).to(device) for d, c in zip(run_dirs, configs, strict=True)]
    prepared = prepare(data)
    augment = Augment(data.augment, prepared.stats)
    results = {}
    for view in views:
        sampler = EpochBatches(len(prepared.eval), configs[0].train.eval_batch_size, shuffle=False)
        loader = make_loader(
            StoreDataset(prepared.eval, augment, view), sampler, replace(data, persistent_workers=False)
        )
        results[view] = evaluate(models, loader, device, f"evaluate {view}", len(sampler))
    out = Path(
        out
        or (run_dirs[0] if len(run_dirs) == 1 else Path(run_dirs[0]).parent / f"ensemble-of-{len(run_dirs)}")
    )
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "dataset": data.dataset,
        "split": data.eval_split,
        "runs": [str(d) for d in run_dirs],
        "weights": weights,
        "device": devices.describe(device),
        "views": results,
        "data": to_dict(data),
    }
    write_json(out / "evaluation.json", record)
    return record
