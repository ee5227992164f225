from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from replicate.ablate import ensure_trained
from replicate.cli import main
from replicate.config import ConfigError, to_dict
from replicate.experiment import load_experiment
from replicate.runs import require_same_config

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def test_a_run_is_not_resumed_or_shown_under_other_settings(tmp_path, capsys):
    """`replicate` and `ablate` continue a run only with the settings it was trained with: a run killed
    and resumed with train.epochs=1 would otherwise stop after one epoch while its record says 2."""
    runs = tmp_path / "runs"
    trained = load_experiment(
        EXPERIMENTS / "replicate-bundled.yaml", [f"train.runs_dir={runs}", "train.epochs=2"]
    )
    run_dir = runs / "replicate-bundled" / "seed0"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(trained), sort_keys=False))
    assert main(["replicate", f"train.runs_dir={runs}", "train.epochs=1", "optim.lr=0.02"]) == 2
    error = capsys.readouterr().err
    assert f"{run_dir} was trained with other settings" in error
    assert "optim.lr: 0.01 there, 0.02 now; train.epochs: 2 there, 1 now" in error
    shorter = replace(trained, train=replace(trained.train, epochs=1))
    with pytest.raises(ConfigError, match="train.epochs: 2 there, 1 now"):
        ensure_trained(shorter, run_dir, [])
    require_same_config(run_dir, trained)  # its own settings: no error
    require_same_config(tmp_path / "new", shorter)  # no run yet: nothing to compare
