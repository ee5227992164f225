import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from replicate.cifar.lrn import LrnCifarConfig
from replicate.config import ConfigError
from tests.conftest import HANG_GUARD_S, needs_mirror

ROOT = Path(__file__).resolve().parents[2]


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="epochs = 0 must be >= 1"):
        LrnCifarConfig(epochs=0)


@pytest.mark.slow
@needs_mirror
def test_a_short_run_records_both_arms_the_difference_and_the_paper(tmp_path):
    command = [sys.executable, "-m", "replicate", "lrn-cifar", "experiments/cifar10/lrn.yaml"]
    small = ["train_images=256", "test_images=200", "epochs=2", "lr_drop_epochs=[1]", "seeds=[0, 1]"]
    result = subprocess.run(
        [*command, *small, f"out_dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "lrn-cifar.json").read_text())
    assert record["dataset"] == "JPEG-compressed CIFAR-10: 256 training and 200 test images"
    assert record["device"].split()[0] == ("cuda:0" if torch.cuda.is_available() else "cpu")  # device: auto
    assert [(r["norm"], r["seed"]) for r in record["runs"]] == [
        ("off", 0),
        ("lrn", 0),
        ("off", 1),
        ("lrn", 1),
    ]
    for run in record["runs"]:
        assert [row["lr"] for row in run["curve"]] == [0.004, 0.0004]  # the drop after epoch 1
        assert run["test_error"] == run["curve"][-1]["test_error"]
    off, lrn = record["arms"]["off"]["test_errors"], record["arms"]["lrn"]["test_errors"]
    assert record["delta_per_seed"] == pytest.approx([b - a for a, b in zip(off, lrn, strict=True)])
    assert record["paper"] == {"without": 13.0, "with": 11.0, "delta": -2.0}
    assert "| with normalisation | 11 |" in result.stdout and "the difference is" in result.stdout
    curves = pd.read_csv(tmp_path / "curves.csv")
    assert len(curves) == 8 and set(curves["norm"]) == {"off", "lrn"}
    typo = subprocess.run(
        [*command, "epochz=3"], cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert typo.returncode == 2 and "epochz" in typo.stderr
    missing = subprocess.run(
        [*command, "device=cuda:99"], cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S
    )  # a GPU this machine lacks: named before any data is read
    assert missing.returncode == 2 and "device=cuda:99: " in missing.stderr
    assert "Traceback" not in missing.stderr
