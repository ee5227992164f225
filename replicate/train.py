"""The training loop (§5): steps, per-epoch validation and schedule, checkpoints, resume, guards.

A run is a directory: config.yaml, environment.json, steps.csv, epochs.csv, checkpoints/last.pt
and best.pt (written atomically), evaluation.json, predictions.npz (each validation image's softmax)
and status.json. `resume=True` continues from checkpoints/last.pt exactly: the data order and
augmentation are keyed by (seed, epoch, position) and the RNG state (dropout) is in the checkpoint,
so a killed and resumed run ends with the same weights as one never killed (on CPU with
train.deterministic=true).
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from replicate import devices
from replicate.checkpoints import CheckpointError, load_weights, read_checkpoint, resumable, save_atomic
from replicate.config import ConfigError, NonNegativeInt, Positive, Section, describe_differences, to_dict
from replicate.cpu_clock import TIMED_COLUMNS, CpuClock
from replicate.data.loader import (
    EpochBatches,
    Prepared,
    StoreDataset,
    make_loader,
    prepare,
    training_mode,
)
from replicate.data.transforms import Augment
from replicate.evaluate import (
    evaluate,
    evaluation_lines,
    predictions_arrays,
    topk_correct,
    write_evaluation,
    write_predictions,
)
from replicate.optim import PaperSGD, PlateauSchedule, paper_optimizer
from replicate.run_lock import RunInUse, RunLock
from replicate.speed import autocast, begin_step, build_network, compiled, memory_format
from replicate.tracking import Tracker, environment, wandb_choice, write_json


@dataclass
class TrainConfig(Section):
    epochs: Positive = 90  # §5: "roughly 90 cycles through the training set"
    seed: NonNegativeInt = 0  # data order, augmentation, initialisation, dropout
    device: str = "auto"  # auto: cuda if available, else cpu
    model_parallel: bool = False  # the two columns on two GPUs per process (§3.2)
    deterministic: bool = False  # deterministic algorithms (exact resume on CPU)
    checkpoint_every: Positive = 200  # steps between checkpoints (also at every epoch end)
    log_every: Positive = 10  # steps between rows of steps.csv
    eval_views: Literal["centre", "ten_crop"] = "centre"  # per-epoch validation, which drives the schedule
    final_views: list[str] = field(default_factory=lambda: ["centre", "ten_crop"])  # evaluation.json
    eval_batch_size: Positive = 32  # images per evaluation batch (x10 views under ten_crop)
    runs_dir: str = "runs"  # run directories go to <runs_dir>/<name>/seed<seed>
    keep_best: bool = True  # also keep checkpoints/best.pt, the weights of the best validation error
    max_steps: NonNegativeInt = 0  # >0: stop after this many steps (smoke runs, tests)

    def __post_init__(self) -> None:
        super().__post_init__()
        devices.check_name(self.device)  # whether this machine has it: when the run starts
        if self.model_parallel and self.device != devices.AUTO:
            raise ConfigError(
                f"model_parallel picks two GPUs per process itself: it needs device=auto, not {self.device}"
            )
        unknown = [v for v in self.final_views if v not in ("centre", "ten_crop")]
        if unknown:  # found now, not after hours of training
            raise ConfigError(f"final_views: {unknown[0]!r} is not one of ['centre', 'ten_crop']")


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, a run directory in the way); the message says why."""


@dataclass
class Position:
    """Where training is: the next epoch and batch, and the steps taken."""

    epoch: int = 0
    batch: int = 0
    step: int = 0


def default_run_dir(name: str, config: TrainConfig) -> Path:
    return Path(config.runs_dir) / name / f"seed{config.seed}"


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal (SIGINT: Ctrl-C; SIGTERM: kill, timeout, Slurm, containers)."""

    def __init__(self, signal_name: str, run_dir: Path | None = None) -> None:
        super().__init__(signal_name)
        self.signal_name, self.run_dir = signal_name, run_dir


class StopRequested:
    """SIGINT and SIGTERM, while training steps (`deferred`), set a flag: the loop saves a checkpoint
    after the step in progress, then stops. Elsewhere (evaluating) they stop the run at once, its
    last checkpoint being whole."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: str | None = None
        self.deferred = False

    def __enter__(self) -> StopRequested:
        self.previous = {number: signal.signal(number, self._handle) for number in self.SIGNALS}
        return self

    def _handle(self, number, _frame) -> None:
        self.requested = signal.Signals(number).name
        if not self.deferred:
            raise Interrupted(self.requested)

    def __exit__(self, *_) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)


class Trainer:
    def __init__(self, config, run_dir: Path, resume: bool, prepared: Prepared | None = None) -> None:
        self.config, self.run_dir = config, run_dir
        self.rank, self.world, local_rank = devices.distributed()
        train = config.train
        if train.deterministic:
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(train.seed)
        self.devices = devices.choose(train.device, train.model_parallel, local_rank)
        self.prepared = prepared or self._prepare()
        classes = len(self.prepared.class_names)
        if config.model.num_classes != classes:
            raise ConfigError(
                f"model.num_classes = {config.model.num_classes} but the data has {classes} classes; "
                f"set model.num_classes={classes}"
            )
        self.model = build_network(config.model, config.speed, self.devices)
        self.speed = self.model.speed  # `auto` resolved for these devices
        torch.backends.cudnn.benchmark = not train.deterministic  # fastest algorithms for these shapes
        self.optimizer: PaperSGD = paper_optimizer(self.model, config.optim)
        self.schedule = PlateauSchedule(self.optimizer, config.optim)
        self.position, self.best_error = Position(), math.inf
        self.checkpoint_step = 0  # the step of checkpoints/last.pt
        if resume:
            self._load(run_dir / "checkpoints")
        # build_network set the layout already: DDP's gradient buckets take the parameters' strides.
        network = self.model
        if self.world > 1:
            single = self.devices[0] if len(self.devices) == 1 and self.devices[0].type == "cuda" else None
            network = DistributedDataParallel(self.model, device_ids=[single] if single else None)
        self.network = compiled(network, self.speed)
        self.memory_format = memory_format(self.speed.channels_last)
        self.augment = Augment(config.data.augment, self.prepared.stats, seed=train.seed)
        self.sampler = EpochBatches(
            len(self.prepared.train),
            config.data.batch_size,
            train.seed,
            shuffle=True,
            rank=self.rank,
            world_size=self.world,
        )
        self.training_mode = training_mode(config.data, self.devices[0])  # data.augment_on=auto: by device
        self.loader = make_loader(
            StoreDataset(self.prepared.train, self.augment, self.training_mode),
            self.sampler,
            config.data,
        )

    def _prepare(self) -> Prepared:
        """Rank 0 preprocesses; the others wait, then open the finished stores."""
        if self.rank == 0:
            prepared = prepare(self.config.data)
        if self.world > 1:
            dist.barrier()
        return prepared if self.rank == 0 else prepare(self.config.data)

    def _load(self, folder: Path) -> None:
        """Continue from folder/last.pt; if it cannot be read, from the newest checkpoint there that
        can, saying so."""
        last = folder / "last.pt"
        try:
            path, state = last, read_checkpoint(last)
        except CheckpointError as error:
            others = resumable(folder)
            if not others:
                raise CheckpointError(
                    f"{error}; no other checkpoint in {folder} can resume the run (best.pt holds weights "
                    "only): train it again, or evaluate best.pt"
                ) from None
            step, path = others[0]
            print(f"{error}; resuming from {path} (step {step}) instead")
            state = read_checkpoint(path)
        load_weights(self.model, state, path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.position = Position(**state["position"])
        self.checkpoint_step = self.position.step
        self.best_error = state["best_error"]
        torch.set_rng_state(state["rng"]["cpu"])
        if torch.cuda.is_available() and state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def _state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "position": vars(self.position).copy(),
            "best_error": self.best_error,
            "rng": {
                "cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
        }

    def checkpoint(self) -> None:
        """checkpoints/last.pt: everything a resume needs."""
        if self.rank == 0:
            save_atomic(self._state(), self.run_dir / "checkpoints" / "last.pt")
        self.checkpoint_step = self.position.step

    def save_best(self) -> None:
        """checkpoints/best.pt: the weights of the best validation error so far (and where they were)."""
        if self.rank == 0:
            best = {"model": self.model.state_dict(), "position": vars(self.position).copy()}
            save_atomic({**best, "best_error": self.best_error}, self.run_dir / "checkpoints" / "best.pt")

    def evaluate(
        self, views: str, progress: bool = True, predictions: list | None = None
    ) -> dict[str, float]:
        store = self.prepared.eval
        sampler = EpochBatches(
            len(store),
            self.config.train.eval_batch_size,
            shuffle=False,
            rank=self.rank,
            world_size=self.world,
        )
        loader = make_loader(
            StoreDataset(store, self.augment, views),
            sampler,
            replace(self.config.data, persistent_workers=False),
        )
        with autocast(self.devices[0], self.speed.precision):
            return evaluate(
                [self.model],
                loader,
                self.devices[0],
                f"evaluate {views}",
                len(sampler),
                progress and self.rank == 0,
                self.memory_format,
                predictions,
            )

    def run(self, tracker: Tracker | None, stop: StopRequested) -> None:
        train, position = self.config.train, self.position
        stop.deferred = True
        try:
            while position.epoch < train.epochs:
                self.sampler.set_epoch(position.epoch, position.batch)
                # epochs.csv's seconds and CPU seconds; unknown (empty) for an epoch a stop split
                # between processes
                self.epoch_clock = CpuClock.start() if position.batch == 0 else None
                self._epoch(tracker, stop)
                if stop.requested or (train.max_steps and position.step >= train.max_steps):
                    self.checkpoint()
                    if stop.requested:
                        raise Interrupted(stop.requested)
                    return
                self._end_epoch(tracker)  # ends with a checkpoint
                if stop.requested:
                    raise Interrupted(stop.requested)
        finally:
            stop.deferred = False

    def _epoch(self, tracker: Tracker | None, stop: StopRequested) -> None:
        train, position = self.config.train, self.position
        self.network.train()
        with tqdm(
            total=len(self.sampler) + position.batch,
            initial=position.batch,
            unit="batch",
            desc=f"epoch {position.epoch + 1}/{train.epochs}",
            disable=self.rank != 0,
            leave=False,
        ) as bar:  # closed (its line cleared) however the loop ends
            start, seen = time.perf_counter(), 0
            for batch in self.loader:
                views = batch.views(self.augment, self.devices[0], self.memory_format)
                labels = batch.labels.to(self.devices[0])
                begin_step(self.speed.compile_mode)
                with autocast(self.devices[0], self.speed.precision):
                    logits = self.network(views)
                labels = labels.to(logits.device)
                loss = F.cross_entropy(logits.float(), labels)
                if not torch.isfinite(loss):
                    raise TrainingError(self._non_finite(loss.item()))
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                position.step, position.batch = position.step + 1, position.batch + 1
                seen += len(labels) * self.world
                bar.update()
                if position.step % train.log_every == 0 and tracker is not None:
                    hits = topk_correct(logits.detach().softmax(-1), labels, (1,))
                    rate = seen / (time.perf_counter() - start)
                    bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{rate:.0f}")
                    tracker.log_step(
                        {
                            "step": position.step,
                            "epoch": position.epoch,
                            "batch": position.batch,
                            "loss": loss.item(),
                            "top1_error": 100 * (1 - hits[1] / len(labels)),
                            "lr": self.optimizer.param_groups[0]["lr"],
                            "images_per_s": rate,
                        }
                    )
                if position.step % train.checkpoint_every == 0:
                    self.checkpoint()
                if stop.requested or (train.max_steps and position.step >= train.max_steps):
                    break

    def _non_finite(self, loss: float) -> str:
        """Why the run stops at a non-finite loss, and what is left to resume from."""
        position, last = self.position, self.run_dir / "checkpoints" / "last.pt"
        where = f"at step {position.step + 1} (epoch {position.epoch + 1}, batch {position.batch + 1})"
        if last.is_file():
            kept = f"The last good checkpoint is {last}, of step {self.checkpoint_step}"
        else:
            kept = (
                f"No checkpoint was written before it (the first comes at step "
                f"{self.config.train.checkpoint_every} or at the end of epoch 1)"
            )
        return f"the loss became {loss} {where}; stopped. {kept}. Try a lower optim.lr"

    def _end_epoch(self, tracker: Tracker | None) -> None:
        position = self.position
        metrics = self.evaluate(self.config.train.eval_views)
        reduced = self.schedule.step(metrics["top1_error"])
        # training and validation
        timed = self.epoch_clock.since() if self.epoch_clock else dict.fromkeys(TIMED_COLUMNS)
        position.epoch, position.batch = position.epoch + 1, 0
        improved = metrics["top1_error"] < self.best_error
        if improved:
            self.best_error = metrics["top1_error"]
        if tracker is not None:
            tracker.log_epoch(
                {
                    "epoch": position.epoch,
                    "step": position.step,
                    "val_top1_error": metrics["top1_error"],
                    "val_top5_error": metrics["top5_error"],
                    "val_loss": metrics["loss"],
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "lr_reduced": reduced,
                    "lr_reductions": self.schedule.reductions,
                    **timed,
                },
                position.step,
            )
            stalled = position.epoch >= 2 and metrics["loss"] > 0.99 * math.log(self.config.model.num_classes)
            if stalled:
                print(
                    f"warning: validation loss {metrics['loss']:.3f} is still at chance (ln C) after "
                    f"{position.epoch} epochs: check the input scale (0-255 minus the mean image, §2)"
                )
        self.checkpoint()
        if improved and self.config.train.keep_best:
            self.save_best()


def write_status(run_dir: Path, state: str, message: str = "") -> None:
    """status.json; a run that stops on an error still stops with that error if this cannot be written
    (a full disk), saying so."""
    try:
        write_json(
            run_dir / "status.json", {"state": state, "message": message, "time": time.strftime("%F %T")}
        )
    except OSError as error:
        if state == "running":
            raise
        print(f"warning: {run_dir / 'status.json'} could not be written ({error})", file=sys.stderr)


def run_training(config, run_dir: Path | None = None, resume: bool = False) -> Path:
    """Train (or resume) one run, evaluate it and print its errors (rank 0); returns the run directory.
    One process at a time writes a run directory (replicate/run_lock.py)."""
    run_dir = Path(run_dir or default_run_dir(config.name, config.train))
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainingError(f"{run_dir} is a file, not a run directory: give another --run-dir")
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun's other ranks: rank 0 holds the lock
        return _train_in(config, run_dir, resume)
    try:
        with RunLock(run_dir):
            return _train_in(config, run_dir, resume)
    except RunInUse as error:
        raise TrainingError(str(error)) from None


def _check_run_dir(config, run_dir: Path, resume: bool) -> None:
    """A new run needs an empty directory, or one whose earlier attempt with the same settings
    stopped before its first checkpoint (its rows are dropped: they are for steps no checkpoint
    kept); a resume needs a run directory."""
    if resume:
        if not (run_dir / "config.yaml").is_file():
            raise TrainingError(f"{run_dir}: not a run directory (no config.yaml)")
        return
    if list((run_dir / "checkpoints").glob("*.pt")):
        raise TrainingError(
            f"{run_dir} already holds a run: resume it with --resume {run_dir}, or choose "
            "another name, seed or train.runs_dir"
        )
    saved = run_dir / "config.yaml"
    if saved.is_file():
        changes = describe_differences(yaml.safe_load(saved.read_text()) or {}, to_dict(config))
        if changes:
            raise TrainingError(
                f"{run_dir} holds an attempt with other settings that stopped before its first "
                f"checkpoint ({changes}): delete it, or choose another name, seed or train.runs_dir"
            )
        print(f"{run_dir}: its earlier attempt stopped before its first checkpoint; starting it anew")
        for name in ("steps.csv", "epochs.csv", "evaluation.json", "predictions.npz", "wandb_id.txt"):
            (run_dir / name).unlink(missing_ok=True)
        for partial in (run_dir / "checkpoints").glob("*.partial"):  # a first checkpoint cut short
            partial.unlink()
        for offline in (run_dir / "wandb").glob("offline-run-*"):  # its offline W&B run: steps no
            shutil.rmtree(offline)  # checkpoint kept, under an id the new attempt does not reuse


def _train_in(config, run_dir: Path, resume: bool) -> Path:
    _check_run_dir(config, run_dir, resume)
    mode, why = wandb_choice(config.tracking)  # online without a key: an error before any work
    trainer = Trainer(config, run_dir, resume)
    tracker = None
    if trainer.rank == 0:
        print(f"W&B: {mode} ({why})\nspeed: {trainer.speed}")
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
        views_cut = "on the device" if trainer.training_mode != "train" else "in the loader workers"
        write_json(
            run_dir / "environment.json",
            {
                **environment([str(d) for d in trainer.devices]),
                "training_views_cut": views_cut,
                "speed": str(trainer.speed),
            },
        )
        tracker = Tracker(run_dir, config.tracking, config.name, to_dict(config), config.train.seed, resume)
        if resume:  # rows logged after the checkpoint will be logged again
            tracker.steps.truncate_after("step", trainer.position.step)
            tracker.epochs.truncate_after("step", trainer.position.step)
            # an epoch's row is written before the checkpoint that ends it: a checkpoint of the
            # epoch's last step (position.epoch not yet counted) does not keep that row
            tracker.epochs.truncate_after("epoch", trainer.position.epoch)
            tracker.replay_record()
        write_status(run_dir, "running")
    try:
        with StopRequested() as stop:
            trainer.run(tracker, stop)
            trainer.loader = None  # its persistent workers end: the evaluation's need the memory
            kept, results = {views: [] for views in config.train.final_views}, {}
            for views in kept:
                clock = CpuClock.start()
                results[views] = {**trainer.evaluate(views, predictions=kept[views]), **clock.since()}
    except Interrupted as stopped:
        if trainer.rank == 0:
            write_status(
                run_dir,
                "interrupted",
                f"stopped by {stopped.signal_name} at step {trainer.position.step}; resume with "
                f"`python -m replicate train --resume {run_dir}`",
            )
            tracker.finish(failed=True)
        stopped.run_dir = run_dir
        raise
    except (TrainingError, CheckpointError, OSError) as error:
        if trainer.rank == 0:
            write_status(run_dir, "failed", str(error))
            tracker.finish(failed=True)
        raise
    if trainer.rank == 0:
        record = write_evaluation(
            run_dir,
            results,
            config.data,
            trainer.prepared.source,
            [{"dir": str(run_dir), **vars(trainer.position)}],
            "last",
            trainer.devices[0],
            config.speed.precision,
            classes=trainer.prepared.train.classes,
        )
        arrays = {views: predictions_arrays(batches) for views, batches in kept.items()}
        labels = next(iter(arrays.values()))[1]
        write_predictions(run_dir / "predictions.npz", labels, {v: p for v, (p, _) in arrays.items()})
        print(evaluation_lines(record))
        tracker.final_evaluation(record)
        if config.tracking.log_checkpoint:
            tracker.log_checkpoint(
                run_dir / "checkpoints" / "last.pt", f"{config.name}-seed{config.train.seed}"
            )
        tracker.finish()
        write_status(run_dir, "finished")
    return run_dir
