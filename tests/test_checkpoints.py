import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from replicate.checkpoints import (
    RESUME_KEYS,
    WEIGHT_KEYS,
    CheckpointError,
    load_weights,
    read_checkpoint,
    resumable,
    save_atomic,
)
from replicate.config import to_dict
from replicate.experiment import ExperimentConfig
from replicate.model import AlexNet, ModelConfig
from tests.conftest import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]


def full_state(step: int) -> dict:
    """A checkpoint with every entry a resume reads (small tensors stand in for the net's)."""
    state = {key: {} for key in RESUME_KEYS}
    state["model"] = {"w": torch.ones(3)}
    state["position"] = {"epoch": 0, "batch": step, "step": step}
    return state


def test_a_truncated_file_another_file_and_missing_entries_are_errors_naming_the_file(tmp_path):
    good = tmp_path / "good.pt"
    save_atomic(full_state(4), good)
    assert read_checkpoint(good)["position"]["step"] == 4 and not list(tmp_path.glob("*.partial"))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    weights_only = tmp_path / "weights.pt"
    torch.save({"model": {"w": torch.ones(3)}}, weights_only)
    cases = [
        (
            truncated,
            RESUME_KEYS,
            "truncated.pt: not a readable checkpoint, truncated or another kind of file",
        ),
        (text, WEIGHT_KEYS, "notes.pt: not a readable checkpoint"),
        (weights_only, RESUME_KEYS, "weights.pt: a file without the checkpoint entries optimizer, schedule"),
        (tmp_path / "absent.pt", WEIGHT_KEYS, "absent.pt: no such checkpoint"),
    ]
    for path, needs, message in cases:
        with pytest.raises(CheckpointError, match=message):
            read_checkpoint(path, needs)
    assert read_checkpoint(weights_only, WEIGHT_KEYS)["model"]["w"].sum() == 3


def test_weights_of_another_network_are_an_error_naming_the_file(tmp_path):
    path = tmp_path / "ten.pt"
    torch.save({"model": AlexNet(10).state_dict()}, path)
    with pytest.raises(CheckpointError, match="ten.pt: its weights do not fit this run's network"):
        load_weights(AlexNet(1000), read_checkpoint(path, WEIGHT_KEYS), path)


def test_resumable_lists_only_full_checkpoints_newest_first(tmp_path):
    save_atomic(full_state(3), tmp_path / "older.pt")
    save_atomic(full_state(7), tmp_path / "newer.pt")
    torch.save({"model": {}}, tmp_path / "best.pt")  # weights only: not resumable
    (tmp_path / "last.pt").write_bytes(b"\x00" * 10)
    assert resumable(tmp_path) == [(7, tmp_path / "newer.pt"), (3, tmp_path / "older.pt")]


@pytest.mark.slow
def test_evaluate_with_a_broken_checkpoint_names_it_without_a_traceback(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    config = ExperimentConfig(model=ModelConfig(num_classes=10))
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    (run / "checkpoints" / "last.pt").write_bytes(b"PK\x03\x04 truncated")
    done = subprocess.run(
        [sys.executable, "-m", "replicate", "evaluate", str(run), "train.device=cpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"checkpoint error: {run / 'checkpoints' / 'last.pt'}: not a readable checkpoint" in done.stderr
