"""Device names as configs and command lines give them (`train.device`, the CIFAR-10 configs' `device`,
`bench --device`): checked before any work starts, so that a typo or a missing GPU is an error that
names it, not a traceback from the first tensor moved there."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

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


def resolve(name: str, key: str, local_rank: int = 0) -> torch.device:
    """The device `name` stands for on this machine, in the process of `local_rank` under torchrun:
    `auto` and `cuda` with no index are that process's GPU (`auto`: the CPU when there is no GPU).
    A ConfigError naming `key` if this machine has no such device."""
    if name == AUTO and not torch.cuda.is_available():
        return torch.device("cpu")
    where, problem = f"{key}={name}", name_problem(name)
    if problem:
        raise ConfigError(f"{where}: {problem}")
    device = torch.device("cuda" if name == AUTO else name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
        if local_rank:
            where += f", the process of local rank {local_rank}"
    problem = availability_problem(device)
    if problem:
        raise ConfigError(f"{where}: {problem}")
    return device


def describe(device: torch.device) -> str:
    """What a record says it ran on: `cpu`, or `cuda:0 (NVIDIA H100 80GB HBM3)` (a device of `resolve`)."""
    if device.type != "cuda":
        return str(device)
    return f"{device} ({torch.cuda.get_device_name(device)})"


def distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank), initialising torch.distributed under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if world > 1:
        return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def choose(device: str, model_parallel: bool, local_rank: int = 0) -> list[torch.device]:
    """The devices a training process runs on: one per column under `model_parallel` (two GPUs per
    process, §3.2), else `device` resolved for the process of `local_rank`."""
    if model_parallel:  # device=auto (TrainConfig); on a machine without GPUs too, not ignored
        if torch.cuda.device_count() < 2 * (local_rank + 1):
            raise ConfigError(  # as a device this machine lacks (devices.resolve)
                f"train.model_parallel needs 2 GPUs per process; {torch.cuda.device_count()} visible"
            )
        return [torch.device("cuda", 2 * local_rank), torch.device("cuda", 2 * local_rank + 1)]
    return [resolve(device, "train.device", local_rank)]
