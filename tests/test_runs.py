import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from analysis.records import load_records
from replicate.ablate import ensure_trained
from replicate.cli import main
from replicate.config import ConfigError, to_dict
from replicate.experiment import load_experiment
from replicate.runs import evaluate_runs, require_same_config

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"


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
        ensure_trained(shorter, run_dir, tmp_path / "records" / "seed0", [])
    require_same_config(run_dir, trained)  # its own settings: no error
    require_same_config(tmp_path / "new", shorter)  # no run yet: nothing to compare


COMMITTED_RUN = ROOT / "analysis" / "results" / "ablations-bundled" / "baseline" / "seed0"


def copied_runs(root: Path, names: list[str]) -> list[Path]:
    """The committed bundled run's records (config, evaluation, status, curves), once per name."""
    runs = []
    for name in names:
        run_dir = root / name / "seed0"
        run_dir.mkdir(parents=True)
        for record in ("config.yaml", "evaluation.json", "status.json", "epochs.csv", "steps.csv"):
            (run_dir / record).write_bytes((COMMITTED_RUN / record).read_bytes())
        runs.append(run_dir)
    return runs


def test_one_unreadable_record_leaves_its_run_out_of_the_tables_naming_its_file(tmp_path, capsys):
    good, bad = copied_runs(tmp_path, ["good", "bad"])
    (bad / "evaluation.json").write_text('{"views": {"centre": ')  # cut short
    rows = load_records(tmp_path)
    assert set(rows["run"]) == {str(good)}
    assert f"warning: {bad} left out of the tables: {bad / 'evaluation.json'}: not a readable JSON" in (
        capsys.readouterr().err
    )
    summary = subprocess.run(
        [sys.executable, "-m", "analysis.summary", str(bad)], cwd=ROOT, capture_output=True, text=True
    )
    assert summary.returncode == 2 and "Traceback" not in summary.stderr
    assert f"error: {bad / 'evaluation.json'}: not a readable JSON record" in summary.stderr


def test_an_ensemble_of_runs_trained_on_other_classes_is_refused_naming_them(tmp_path):
    first, second = copied_runs(tmp_path, ["a", "b"])
    record = json.loads((second / "evaluation.json").read_text())
    classes = [f"n{i:08d}" for i in range(10)]
    (first / "evaluation.json").write_text(json.dumps({**record, "classes": classes}))
    (second / "evaluation.json").write_text(json.dumps({**record, "classes": classes[::-1]}))
    with pytest.raises(ConfigError, match=f"must be trained on the same classes: {second} was trained on"):
        evaluate_runs([first, second], ["centre"])
    assert main(["evaluate", str(first), str(second)]) == 2
