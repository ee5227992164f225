import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from replicate.ablate import ablation_files, preset_overrides
from replicate.config import ConfigError, read_yaml, to_dict
from replicate.experiment import load_experiment
from replicate.paper import load_claims
from tests.conftest import HANG_GUARD_S, PLAIN_PATHS, needs_mirror

ROOT = Path(__file__).resolve().parents[1]
METADATA = {"name", "tracking.variant", "ablation.claim", "ablation.kind", "ablation.ensemble_size"}


def flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("path", ablation_files(), ids=lambda p: p.stem)
def test_each_ablation_differs_from_the_baseline_only_in_its_keys(path):
    baseline = flat(to_dict(load_experiment(ROOT / "experiments" / "baseline.yaml")))
    variant = flat(to_dict(load_experiment(path)))
    changed = {key for key in baseline if baseline[key] != variant[key]} - METADATA
    declared = {key for key in flat(read_yaml(path)) if key != "base"} - METADATA  # what the file sets
    assert changed == declared, f"{path.name} changes {changed}, declares {declared}"
    config = load_experiment(path)
    assert config.name == path.stem and config.tracking.variant == path.stem
    claims = {claim["id"] for claim in load_claims()["ablations"]}
    assert config.ablation.claim in claims
    if config.ablation.kind == "train":
        assert declared, "a trained ablation must change something"


def test_presets_and_names_are_checked():
    assert "model.num_classes=10" in preset_overrides("bundled")
    with pytest.raises(ConfigError, match="preset 'tiny'"):
        preset_overrides("tiny")
    with pytest.raises(ConfigError, match="no ablation config 'no_lnr'"):
        ablation_files(["no_lnr"])


def tiny_sweep(runs_dir: Path, *extra: str) -> list[str]:
    """`ablate` for the no_lrn comparison, seed 0, on 2 bundled images per class, 2 epochs."""
    return [
        sys.executable, "-m", "replicate", "ablate",
        "--preset", "bundled", "--only", "no_lrn", "--seeds", "0",
        "data.limit_per_class=2", "data.batch_size=8", "data.workers=0", "train.epochs=2",
        "train.eval_batch_size=20", "train.log_every=1", "tracking.wandb=off", f"train.runs_dir={runs_dir}",
        *PLAIN_PATHS, *extra,
    ]  # fmt: skip


@pytest.mark.slow
@needs_mirror
def test_the_runner_resumes_an_interrupted_run_and_skips_finished_ones(tmp_path):
    command = tiny_sweep(tmp_path, "train.checkpoint_every=1", "train.final_views=[centre]")
    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    steps = tmp_path / "ablations-bundled" / "baseline" / "seed0" / "steps.csv"
    deadline = time.time() + HANG_GUARD_S
    while not (steps.is_file() and len(steps.read_text().splitlines()) > 2):
        assert first.poll() is None and time.time() < deadline, first.communicate()[1][-2000:]
        time.sleep(0.05)
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=HANG_GUARD_S)
    assert first.returncode == 130
    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert second.returncode == 0, second.stderr
    assert "resume: " in second.stdout and "baseline/seed0" in second.stdout
    assert "train: " in second.stdout and "no_lrn/seed0" in second.stdout
    third = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert third.returncode == 0, third.stderr
    assert third.stdout.count("skip (recorded)") == 2
    saved = (tmp_path / "ablations-bundled" / "no_lrn" / "seed0" / "config.yaml").read_text()
    assert "lrn: 'off'" in saved or "lrn: off" in saved
    assert "group: ablations-bundled" in saved
