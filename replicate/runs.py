"""Run directories after training: their config and weights, evaluated alone or as an ensemble (§6)."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
import yaml

from replicate import devices
from replicate.checkpoints import WEIGHT_KEYS, CheckpointError, load_weights, read_checkpoint
from replicate.config import ConfigError, apply_overrides, describe_differences, from_dict, to_dict
from replicate.data.loader import EpochBatches, StoreDataset, make_loader, prepare
from replicate.data.transforms import Augment
from replicate.evaluate import evaluate, write_evaluation
from replicate.experiment import ExperimentConfig, resolve_file
from replicate.model import AlexNet
from replicate.run_lock import RunInUse, RunLock
from replicate.speed import autocast, build_network, compiled, memory_format
from replicate.tracking import read_json
from replicate.train import Interrupted, TrainingError, run_training


def run_config(run_dir: Path, overrides: list[str] = ()) -> ExperimentConfig:
    """The config a run was trained with (its config.yaml), with `overrides` applied."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    try:
        return from_dict(ExperimentConfig, apply_overrides(resolve_file(path), overrides))
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def run_state(run_dir: Path) -> str | None:
    """status.json's state (running, interrupted, failed, finished), or None if there is none."""
    status = Path(run_dir) / "status.json"
    return read_json(status).get("state") if status.is_file() else None


def require_same_config(run_dir: Path, config: ExperimentConfig) -> None:
    """A ConfigError naming each key where `config` differs from the one `run_dir` was trained with:
    resuming or reusing a run under other settings would record them as if they had run."""
    if not (Path(run_dir) / "config.yaml").is_file():
        return
    changes = describe_differences(to_dict(run_config(run_dir)), to_dict(config))
    if changes:
        raise ConfigError(
            f"{run_dir} was trained with other settings ({changes}). Run it again with its own settings "
            "(those of its config.yaml), or delete it or choose another train.runs_dir to train anew"
        )


def train_or_resume(config: ExperimentConfig, run_dir: Path, own_process: bool = False) -> str:
    """Train `config` into `run_dir`, resume it there if it has a checkpoint, or leave it if finished;
    returns which (trained, resumed, finished). A run of other settings is an error, not continued.
    `own_process`: the run in a process of its own (`train_in_own_process`)."""
    require_same_config(run_dir, config)
    if run_state(run_dir) == "finished":
        return "finished"
    resume = (Path(run_dir) / "checkpoints" / "last.pt").is_file()
    print(f"{'resume' if resume else 'train'}: {run_dir}", flush=True)
    if own_process:
        train_in_own_process(config, Path(run_dir), resume)
    else:
        run_training(config, run_dir, resume=resume)
    return "resumed" if resume else "trained"


def _stop_with_parent() -> None:
    """In the run's process, before it starts: on Linux, a SIGTERM when the sweep's process dies,
    however it dies (SIGKILL included), so that no run goes on training alone; the run saves a
    checkpoint and the sweep, started again, resumes it."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def train_in_own_process(config: ExperimentConfig, run_dir: Path, resume: bool) -> None:
    """`python -m replicate train` for one run of a sweep: whatever a run holds (its loader workers,
    compiled kernels, the allocator's kept memory) goes with its process, so the sweep's last run
    has as much memory as its first. SIGINT and SIGTERM are passed on to the run, which saves a
    checkpoint; then they stop the sweep as they stop a run (`Interrupted`)."""
    package_root = str(Path(__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
    }
    with tempfile.TemporaryDirectory(prefix="sweep-run-") as folder:
        command = [sys.executable, "-m", "replicate", "train"]
        if resume:
            command += ["--resume", str(run_dir)]
        else:
            resolved = Path(folder) / "config.yaml"
            resolved.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
            command += [str(resolved), "--run-dir", str(run_dir)]
        child = subprocess.Popen(command, env=env, preexec_fn=_stop_with_parent)
        passed_on: list[str] = []

        def pass_on(number: int, _frame) -> None:
            passed_on.append(signal.Signals(number).name)
            child.send_signal(number)

        previous = {number: signal.signal(number, pass_on) for number in (signal.SIGINT, signal.SIGTERM)}
        try:
            code = child.wait()
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
    if passed_on or code in (130, 143):
        raise Interrupted(passed_on[0] if passed_on else "SIGTERM" if code == 143 else "SIGINT", run_dir)
    if code != 0:
        state = run_state(run_dir)
        said = read_json(run_dir / "status.json").get("message", "") if state else ""
        raise TrainingError(
            f"{run_dir}: its training process ended with exit status {code}"
            + (f" (status {state}: {said})" if said else " (its output is above)")
        )


def trained_network(
    run_dir: Path, config: ExperimentConfig, device: torch.device, weights: str = "last"
) -> tuple[AlexNet, dict]:
    """The run's network built as its config says (`speed.build_network`) on `device`, holding the
    weights of checkpoints/<weights>.pt, and where training was when they were saved."""
    path = Path(run_dir) / "checkpoints" / f"{weights}.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint (is the run finished? weights: last or best)")
    state = read_checkpoint(path, WEIGHT_KEYS)
    model = build_network(config.model, config.speed, [device])
    load_weights(model, state, path)
    return model.eval(), state.get("position", {})


# Overrides that leave the evaluated function as the run trained it: where and how fast it runs.
SAME_EXPERIMENT = (
    "train.device",
    "train.eval_batch_size",
    "data.workers",
    "data.prefetch_factor",
    "data.pin_memory",
    "data.persistent_workers",
    "data.cache_dir",
    "speed.channels_last",
    "speed.compile",
    "speed.compile_mode",
    "speed.fused_columns",
    "speed.lrn_kernel",
    "speed.conv_algorithm",
    "tracking.",
)


def other_experiment(overrides: list[str]) -> list[str]:
    """The overrides that change what is evaluated (the network, the data, the arithmetic)."""
    return [o for o in overrides if not o.split("=", 1)[0].startswith(SAME_EXPERIMENT)]


def evaluation_target(
    run_dir: Path, views: list[str], weights: str, overrides: list[str]
) -> tuple[str, dict]:
    """Where `evaluate` writes about one run: its own evaluation.json only when it evaluates what
    training evaluated (its last weights, its final views at least, no override that changes the
    function); else a file of its own under evaluations/, marked, which no table reads as the run's."""
    own_views = run_config(run_dir).train.final_views
    changed = other_experiment(overrides)
    if not changed and weights == "last" and set(own_views) <= set(views):
        return "evaluation.json", {}
    label = "+".join([*changed, f"weights={weights}", f"views={','.join(views)}"])
    slug = re.sub(r"[^A-Za-z0-9_.=,+-]", "_", label)
    if len(slug) > 120:
        slug = slug[:80] + "-" + hashlib.sha256(label.encode()).hexdigest()[:12]
    marks = {
        "overrides": list(overrides),
        "not_the_runs_own": "evaluated with other settings than the run's own (see overrides, weights, "
        "views): its evaluation.json is left as training wrote it",
    }
    return f"evaluations/{slug}.json", marks


def same_classes(run_dirs: list[Path], configs: list[ExperimentConfig]) -> None:
    """An ensemble averages class by class: its runs must have been trained on the same classes (the
    same data set and classes, in the same order), not only the same number of them."""
    first = configs[0]
    if any(c.model.num_classes != first.model.num_classes for c in configs):
        raise ConfigError("the runs of an ensemble must have the same number of classes")
    recorded = [_recorded_classes(d) for d in run_dirs]
    if not all(recorded):  # a record without its classes: compare what its config says of them
        recorded = [_data_of(d) for d in run_dirs]
    for run_dir, theirs in zip(run_dirs[1:], recorded[1:], strict=True):
        if theirs != recorded[0]:
            raise ConfigError(
                f"the runs of an ensemble must be trained on the same classes: {run_dir} was trained "
                f"on {theirs}, {run_dirs[0]} on {recorded[0]}"
            )


def _recorded_classes(run_dir: Path) -> list[str] | None:
    """The classes a run was trained on, in label order, as its evaluation.json lists them."""
    record = Path(run_dir) / "evaluation.json"
    return read_json(record).get("classes") if record.is_file() else None


def _data_of(run_dir: Path) -> str:
    data = run_config(run_dir).data
    return f"data set {data.dataset} at {data.root or 'its default place'}"


def evaluate_runs(
    run_dirs: list[Path],
    views: list[str],
    weights: str = "last",
    overrides: list[str] = (),
    out: Path | None = None,
) -> dict:
    """Evaluate one run, or average the softmax of several (the paper's "5 CNNs", §6), on the eval
    split of the first run's data config (with `overrides`, e.g. another data set or split), on its
    `train.device` (auto: the first GPU when there is one; `train.device=cpu` to choose) and in its
    `speed` section (`speed.precision=fp32` to choose). One run's record goes into its own folder
    (`evaluation_target`: never over its own evaluation with other settings), while no other process
    writes it."""
    if out is None and len(run_dirs) == 1:
        try:
            with RunLock(run_dirs[0]):
                return _evaluate(run_dirs, views, weights, overrides, None)
        except RunInUse as error:
            raise ConfigError(str(error)) from None
    return _evaluate(run_dirs, views, weights, overrides, out)


def _evaluate(run_dirs, views, weights, overrides, out) -> dict:
    configs = [run_config(d, overrides) for d in run_dirs]
    first = configs[0]
    same_classes(run_dirs, configs)
    device = devices.resolve(first.train.device, "train.device")
    loaded = [trained_network(d, c, device, weights) for d, c in zip(run_dirs, configs, strict=True)]
    networks = [compiled(model, config.speed) for (model, _), config in zip(loaded, configs, strict=True)]
    prepared = prepare(first.data)
    augment = Augment(first.data.augment, prepared.stats)
    results = {}
    for view in views:
        sampler = EpochBatches(len(prepared.eval), first.train.eval_batch_size, shuffle=False)
        loader = make_loader(
            StoreDataset(prepared.eval, augment, view), sampler, replace(first.data, persistent_workers=False)
        )
        with autocast(device, first.speed.precision):
            results[view] = evaluate(
                networks,
                loader,
                device,
                f"evaluate {view}",
                len(sampler),
                memory_format=memory_format(first.speed.channels_last),
            )
    name, marks = "evaluation.json", {"overrides": list(overrides)} if overrides else {}
    if out is None and len(run_dirs) == 1:
        name, marks = evaluation_target(Path(run_dirs[0]), views, weights, list(overrides))
    out = Path(
        out
        or (run_dirs[0] if len(run_dirs) == 1 else Path(run_dirs[0]).parent / f"ensemble-of-{len(run_dirs)}")
    )
    out.mkdir(parents=True, exist_ok=True)
    runs = [{"dir": str(d), **position} for d, (_, position) in zip(run_dirs, loaded, strict=True)]
    record = write_evaluation(
        out,
        results,
        first.data,
        prepared.source,
        runs,
        weights,
        device,
        first.speed.precision,
        name,
        marks,
        prepared.train.classes,
    )
    if name != "evaluation.json":
        print(f"written to {out / name} (not the run's own evaluation: other settings)")
    return record
