import os

import pytest
import torch

from replicate import tracking
from replicate.config import ConfigError
from replicate.experiment import ExperimentConfig
from replicate.tracking import TrackingConfig, wandb_choice
from replicate.train import run_training


@pytest.fixture
def no_wandb_login(tmp_path, monkeypatch):
    """No API key anywhere W&B looks: the environment, or ~/.netrc under a HOME of the test's own."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)


def test_online_without_an_api_key_is_an_error_before_any_work(tmp_path, no_wandb_login):
    config = ExperimentConfig(tracking=TrackingConfig(wandb="online"))
    with pytest.raises(ConfigError, match=r"tracking.wandb=online needs a W&B API key: run `wandb login`"):
        run_training(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # no run directory, no data prepared


def test_auto_says_which_mode_it_chose_and_why(tmp_path, no_wandb_login, monkeypatch):
    auto = TrackingConfig(wandb="auto")
    assert wandb_choice(auto) == (
        "off",
        "tracking.wandb=auto: no W&B API key (`wandb login`, or tracking.wandb=offline)",
    )
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    assert wandb_choice(auto) == ("online", "tracking.wandb=auto: a W&B API key is configured")
    assert wandb_choice(TrackingConfig(wandb="online"))[0] == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_choice(auto) == ("offline", "tracking.wandb=auto: WANDB_MODE=offline")
    (tmp_path / "home").mkdir()
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.delenv("WANDB_MODE")
    (tmp_path / "home" / ".netrc").write_text(
        "machine api.wandb.ai\n  login user\n  password " + "1" * 40 + "\n"
    )
    assert wandb_choice(auto)[0] == "online"


def test_a_source_tree_without_git_names_the_commit_alexnet_commit_gives(monkeypatch, tmp_path):
    monkeypatch.setattr(tracking, "REPO_ROOT", tmp_path)  # an exported copy: no .git
    monkeypatch.setenv("ALEXNET_COMMIT", "e11b29f")
    assert tracking.git_commit() == "e11b29f (ALEXNET_COMMIT: no git repository)"
    monkeypatch.delenv("ALEXNET_COMMIT")
    assert tracking.git_commit() == "unknown"


def test_the_processor_names_its_model_cores_and_vector_instructions():
    name, cores, capability = tracking.processor().rsplit("; ", 2)
    assert name and cores == f"{os.cpu_count()} logical cores"
    assert capability == torch.backends.cpu.get_cpu_capability()  # e.g. AVX2, AVX512: kernels differ


def test_a_log_resumed_by_a_version_with_more_columns_keeps_every_row_under_one_header(tmp_path):
    log = tracking.CsvLog(tmp_path / "epochs.csv")
    log.append({"epoch": 1, "val_top1_error": 80.0})
    log.append({"epoch": 2, "val_top1_error": 70.0, "seconds": 91.5})
    log.append({"epoch": 3, "val_top1_error": 65.0, "seconds": 90.0})
    assert (tmp_path / "epochs.csv").read_text().splitlines() == [
        "epoch,val_top1_error,seconds",
        "1,80.0,",
        "2,70.0,91.5",
        "3,65.0,90.0",
    ]
