import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "replicate", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_config_command_prints_the_resolved_config():
    result = run("config", "experiments/baseline.yaml", "model.lrn=off")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["model"]["lrn"] == "off"


def test_unknown_key_is_an_error_naming_it():
    result = run("config", "experiments/baseline.yaml", "model.colums=1")
    assert result.returncode == 2
    assert "unknown config key 'model.colums'" in result.stderr


def test_model_command_counts_the_papers_parameters():
    result = run("model", "experiments/baseline.yaml")
    assert result.returncode == 0, result.stderr
    assert "total parameters: 60,965,224" in result.stdout


def test_import_and_build_in_a_fresh_interpreter():
    result = subprocess.run(
        [sys.executable, "-c", "from replicate.model import AlexNet; AlexNet()"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
