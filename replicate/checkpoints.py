"""A run's checkpoints: written atomically, read safely (`weights_only=True`), and every way a file can
fail to be one (truncated, another kind of file, entries missing) an error naming the file.

checkpoints/last.pt holds everything a resume needs; best.pt the weights of the best validation
error only (`train.keep_best`), about half the size.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import torch
from torch import nn

# What `train --resume` needs of a checkpoint, and what evaluation needs.
RESUME_KEYS = ("model", "optimizer", "schedule", "position", "best_error", "rng")
WEIGHT_KEYS = ("model",)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what is wrong with it."""


def save_atomic(state: dict, path: Path) -> None:
    """torch.save via a .partial file: a killed write leaves the previous checkpoint whole. A write
    that fails (a full disk) removes the .partial and raises a CheckpointError saying why."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        torch.save(state, partial)
        partial.replace(path)
        return
    except (OSError, RuntimeError) as error:  # torch.save reports a failed write as a RuntimeError
        free = shutil.disk_usage(path.parent).free  # with the .partial still there: what the write met
        full = free < 2**20 or _no_space(error)
        reason = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
    # out of the except block, the error and the writer it holds are gone: the .partial is closed
    partial.unlink(missing_ok=True)
    kept = "the previous checkpoint is kept" if path.is_file() else "no earlier checkpoint to keep"
    raise CheckpointError(
        f"{path}: could not be written ({'No space left on device' if full else reason}; "
        f"{free / 2**20:,.0f} MiB free there); {kept}: make room, then resume"
    )


def _no_space(error: Exception) -> bool:
    return getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error)


def read_checkpoint(path: Path, needs: tuple[str, ...] = RESUME_KEYS) -> dict:
    """The checkpoint at `path` (on the CPU), holding at least the entries `needs`."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises RuntimeError, UnpicklingError, EOFError, ... by cause
        first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise CheckpointError(
            f"{path}: not a readable checkpoint, truncated or another kind of file ({first})"
        ) from None
    missing = [key for key in needs if key not in state] if isinstance(state, dict) else list(needs)
    if missing:
        raise CheckpointError(
            f"{path}: a file without the checkpoint entries {', '.join(missing)} "
            "(not written by this project?)"
        )
    return state


def load_weights(model: nn.Module, state: dict, path: Path) -> None:
    """`state`'s weights into `model`, or an error naming the file when they do not fit it."""
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError) as error:
        first = next((line for line in str(error).splitlines() if line.strip()), "")
        raise CheckpointError(
            f"{path}: its weights do not fit this run's network (another model config?): {first}"
        ) from None


def resumable(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint in `folder` that a resume can use, newest first."""
    found = []
    for path in folder.glob("*.pt"):
        try:
            found.append((read_checkpoint(path)["position"]["step"], path))
        except CheckpointError:
            continue
    return sorted(found, key=lambda found: -found[0])
