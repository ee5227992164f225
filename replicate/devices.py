"""Device names as configs and command lines give them (`train.device`, the CIFAR-10 configs' `device`,
`bench --device`): checked before any work starts, so that a typo or a missing GPU is an error that
names it, not a traceback from the first tensor moved there."""

from __future__ import annotations

import torch

from replicate.config import ConfigError

AUTO = "auto"  # the first GPU when there is one, else the CPU


def name_problem(name: str) -> str | None:
    """Why `name` names no device at all (on any machine); None if it does."""
    if name == AUTO:
        return None
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        return f"{name!r} is not a device: use auto, cpu, cuda or cuda:N"
    return None


def check_name(name: str) -> None:
    """A config's `device` key: a ConfigError unless it names a device (on some machine)."""
    problem = name_problem(name)
    if problem:
        raise ConfigError(f"device: {problem}")


def availability_problem(device: torch.device) -> str | None:
    """Why this machine cannot run on `device`; None if it can. CUDA devices are checked; other types
    are left to torch."""
    if device.type != "cuda":
        return None
    count = torch.cuda.device_count()  # 0 without a driver, and does not initialise CUDA
    if count == 0:
        return "no CUDA device is visible on this machine (torch.cuda.is_available() is False)"
    if device.index is not None and device.index >= count:
        return f"only {count} CUDA device(s) visible here (cuda:0 to cuda:{count - 1})"
    return None


def resolve(name: str, key: str) -> torch.device:
    """The device `name` stands for on this machine; a ConfigError naming `key` if there is none."""
    if name == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    problem = name_problem(name) or availability_problem(torch.device(name))
    if problem:
        raise ConfigError(f"{key}={name}: {problem}")
    return torch.device(name)


def describe(device: torch.device) -> str:
    """What a record says it ran on: `cpu`, or `cuda:0 (NVIDIA H100 80GB HBM3)`."""
    if device.type != "cuda":
        return str(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
