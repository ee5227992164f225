"""One experiment's whole configuration: the sections of every configured module, composed.

An experiment is one YAML file in `experiments/`; `key=value` overrides (dotted: `model.lrn=off`)
change it from the command line. A file may name a `base:` file (relative to itself) and list
only the keys it changes, so an ablation differs from the baseline only where it ablates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from replicate.config import ConfigError, Positive, Section, apply_overrides, from_dict, read_yaml
from replicate.data.loader import DataConfig
from replicate.model import ModelConfig
from replicate.optim import OptimConfig
from replicate.speed import SpeedConfig
from replicate.tracking import TrackingConfig
from replicate.train import TrainConfig


@dataclass
class AblationConfig(Section):
    claim: str = ""  # the id in paper/claims.yaml's ablations this config tests ("" for the baseline)
    kind: Literal["train", "views", "ensemble"] = "train"  # views, ensemble: from the baseline's runs
    ensemble_size: Positive = 5  # §6: "5 CNNs"


# `fidelity: code2012`: every documented difference between the paper and the 2012 code's config
# #145, the net behind the paper's numbers (paper/fidelity.md). The preset is
# applied over the config files; `key=value` overrides come after it, so each difference can still
# be switched back one by one (or set one by one under `fidelity: paper`).
CODE2012 = {
    "model": {
        "lrn": "code2012",  # alpha / n (layer.py, cmrnorm) ...
        "lrn_k": 2.0,  # ... with #145's minDiv = 2
        "lrn1_before_relu": True,  # conv1 -> LRN -> ReLU
        "spatial_norm": True,  # the 5x5 spatial rnorm after LRN2
        "init": "code2012",  # initW 0.03 in conv3-5
    },
    "optim": {"bias_lr_scale": 2.0, "bias_weight_decay": 0.0},  # epsB = 2 epsW, no wc on biases
    "data": {"augment": {"colour_noise": "code2012", "mean_crop": "centre", "crop_chunk": 32}},  # convdata.py
}


@dataclass
class ExperimentConfig(Section):
    name: str = "baseline"  # names the run directory and the W&B run
    fidelity: Literal["paper", "code2012"] = "paper"  # the paper's text, or the 2012 code's #145 (CODE2012)
    model: ModelConfig = field(default_factory=ModelConfig)  # the network (§3)
    data: DataConfig = field(default_factory=DataConfig)  # images, preprocessing, augmentation (§2, §4.1)
    optim: OptimConfig = field(default_factory=OptimConfig)  # the update rule and schedule (§5)
    train: TrainConfig = field(default_factory=TrainConfig)  # epochs, devices, checkpoints
    speed: SpeedConfig = field(default_factory=SpeedConfig)  # precision, layout, compile, fast kernels
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # W&B and the local record
    ablation: AblationConfig = field(default_factory=AblationConfig)  # the paper claim a variant tests

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.name or "/" in self.name or "\\" in self.name or self.name.strip(".") == "":
            raise ConfigError(
                f"name = {self.name!r}: it names a folder inside train.runs_dir: no '/', no '..'"
            )
        crop, side = self.data.augment.crop_size, self.model.input_size
        if crop != side:  # found now, not at the first step
            raise ConfigError(
                f"data.augment.crop_size = {crop} but model.input_size = {side}: the network takes the "
                "crops as they are; set both to the same size"
            )


def resolve_file(path: str | Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping of `path` with its `base:` chain merged in (the file's own keys win)."""
    path = Path(path).resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'base' files form a cycle")
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: {base!r} should name one file (e.g. base: baseline.yaml)")
    return merge(resolve_file(path.parent / base, seen + (path,)), data)


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_experiment(path: str | Path | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    """The config of `path` (or the defaults) with `overrides` applied; errors name the file."""
    data = resolve_file(path) if path is not None else {}
    try:
        resolved = apply_overrides(data, overrides)
        if resolved.get("fidelity") == "code2012":  # the preset over the files, under the overrides
            resolved = apply_overrides(merge(data, CODE2012), overrides)
        return from_dict(ExperimentConfig, resolved)
    except ConfigError as error:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{error}") from None
