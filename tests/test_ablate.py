import csv
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from replicate.ablate import (
    RECORD_FILES,
    WANDB_ARCHIVE,
    ablation_files,
    ensemble_record,
    preset_overrides,
)
from replicate.config import ConfigError, read_yaml, to_dict
from replicate.data.sources import safe_extract
from replicate.evaluate import errors_from_probabilities, read_predictions
from replicate.experiment import load_experiment
from replicate.paper import load_claims
from replicate.runs import evaluate_runs
from replicate.wandb_offline import offline_folders, read_offline_run
from tests.conftest import HANG_GUARD_S, PLAIN_PATHS, needs_mirror, python_m

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


def test_a_sweep_runs_the_comparisons_in_the_order_of_the_papers_claims():
    """The paper's measured comparisons first (claims.yaml's order), every config once; --only's own order."""
    claims = [claim["id"] for claim in load_claims()["ablations"]]
    tested = [read_yaml(path)["ablation"]["claim"] for path in ablation_files()]
    assert tested == [claim for claim in claims if claim in tested]
    assert len(tested) == len(list((ROOT / "experiments" / "ablations").glob("*.yaml")))
    assert tested[:2] == ["no_lrn", "non_overlapping_pooling"]
    assert [p.stem for p in ablation_files(["tanh", "no_lrn", "tanh"])] == ["tanh", "no_lrn"]


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
    command = tiny_sweep(
        tmp_path, "train.checkpoint_every=1", "train.final_views=[centre]", "tracking.wandb=offline"
    )
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
    # the interrupted run's offline W&B run is archived once, with its whole history
    safe_extract(tmp_path / "ablations-bundled" / "records" / WANDB_ARCHIVE, tmp_path / "wandb")
    runs = [read_offline_run(folder) for folder in offline_folders(tmp_path / "wandb")]
    assert sorted(run.name for run in runs) == ["baseline-seed0", "no_lrn-seed0"]
    assert all(run.values("epoch/epoch") == [1, 2] for run in runs)


# The tests of the recorded sweep run on one pytest-xdist worker (make test's --dist loadgroup), so
# that the sweep is run once, not once on each worker.
ON_THE_RECORDED_SWEEP = pytest.mark.xdist_group("recorded-sweep")


@pytest.fixture(scope="module")
def recorded_sweep(tmp_path_factory):
    """The tiny sweep (baseline and no_lrn, seed 0) with W&B offline and its records in their own
    folder: (records folder, runs folder)."""
    root = tmp_path_factory.mktemp("recorded")
    records, runs = root / "records", root / "machine1"
    command = tiny_sweep(runs, "tracking.wandb=offline", "--records", str(records))
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return records, runs


@pytest.mark.slow
@needs_mirror
@ON_THE_RECORDED_SWEEP
def test_each_finished_run_leaves_its_small_records_and_no_checkpoint(recorded_sweep):
    records, runs = recorded_sweep
    for name in ("baseline", "no_lrn"):
        record = records / name / "seed0"
        assert sorted(p.name for p in record.iterdir()) == sorted([*RECORD_FILES, "steps.csv"])
        evaluation = json.loads((record / "evaluation.json").read_text())
        saved = read_predictions(record / "predictions.npz")
        assert len(saved["labels"]) == 20 and saved["centre"].shape == saved["ten_crop"].shape == (20, 10)
        for views in ("centre", "ten_crop"):
            assert abs(saved[views].sum(1) - 1).max() < 1e-5  # each row a softmax
            again = errors_from_probabilities(saved[views], saved["labels"])
            assert again["top1_error"] == evaluation["views"][views]["top1_error"]
            assert again["top5_error"] == evaluation["views"][views]["top5_error"]
            assert abs(again["loss"] - evaluation["views"][views]["loss"]) < 1e-5
        assert (runs / "ablations-bundled" / name / "seed0" / "checkpoints" / "last.pt").is_file()
    assert not list(records.rglob("*.pt"))


@pytest.mark.slow
@needs_mirror
@ON_THE_RECORDED_SWEEP
def test_a_sweep_continues_from_its_records_alone_on_another_machine(recorded_sweep, tmp_path):
    records, _ = recorded_sweep
    elsewhere = tmp_path / "machine2"  # no runs at all: only the records
    command = tiny_sweep(elsewhere, "tracking.wandb=offline", "--records", str(records))
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("skip (recorded)") == 2 and "train: " not in done.stdout
    assert not (elsewhere / "ablations-bundled" / "no_lrn").exists()


@pytest.mark.slow
@needs_mirror
@ON_THE_RECORDED_SWEEP
def test_a_record_of_other_settings_is_refused_not_counted(recorded_sweep, tmp_path):
    records, _ = recorded_sweep
    copy = tmp_path / "records"
    shutil.copytree(records, copy)
    config = copy / "no_lrn" / "seed0" / "config.yaml"
    config.write_text(config.read_text().replace("lr: 0.01", "lr: 0.02"))
    command = tiny_sweep(tmp_path / "runs", "tracking.wandb=offline", "--records", str(copy))
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert done.returncode == 2
    assert "holds this run under other settings (optim.lr: 0.02 there, 0.01 now)" in done.stderr


@pytest.mark.slow
@needs_mirror
@ON_THE_RECORDED_SWEEP
def test_the_ensemble_from_recorded_predictions_equals_the_ensemble_of_the_checkpoints(
    recorded_sweep, tmp_path
):
    """§6's softmax average computed from predictions.npz, against the networks themselves."""
    records, runs = recorded_sweep
    names = ("baseline", "no_lrn")
    from_records = ensemble_record([records / n / "seed0" for n in names], tmp_path / "records")
    run_dirs = [runs / "ablations-bundled" / n / "seed0" for n in names]
    from_networks = evaluate_runs(run_dirs, ["centre", "ten_crop"], out=tmp_path / "networks")
    for views in ("centre", "ten_crop"):
        ours, theirs = from_records["views"][views], from_networks["views"][views]
        assert ours["images"] == theirs["images"] == 20
        assert (ours["top1_error"], ours["top5_error"]) == (theirs["top1_error"], theirs["top5_error"])
        assert abs(ours["loss"] - theirs["loss"]) < 1e-4


@pytest.mark.slow
@needs_mirror
@ON_THE_RECORDED_SWEEP
def test_a_run_logged_offline_by_the_sweep_holds_its_epochs_evaluation_group_and_tags(
    recorded_sweep, tmp_path
):
    records, _ = recorded_sweep
    unpacked = safe_extract(records / WANDB_ARCHIVE, tmp_path / "wandb")
    runs = {run.name: run for run in map(read_offline_run, offline_folders(unpacked))}
    assert sorted(runs) == ["baseline-seed0", "no_lrn-seed0"]
    run = runs["no_lrn-seed0"]
    assert run.group == "ablations-bundled"
    assert {"experiment:no_lrn", "variant:no_lrn", "seed:0"} <= set(run.tags)
    epochs = [
        int(row["epoch"]) for row in csv.DictReader((records / "no_lrn" / "seed0" / "epochs.csv").open())
    ]
    assert run.values("epoch/epoch") == epochs == [1, 2]
    recorded = json.loads((records / "no_lrn" / "seed0" / "evaluation.json").read_text())
    for views in ("centre", "ten_crop"):
        assert run.summary[f"{views}/top1_error"] == recorded["views"][views]["top1_error"]
    table = run.values("final_evaluation/path")
    assert len(table) == 1 and (run.folder / "files" / table[0]).is_file()
    listed = python_m("replicate", "sync-wandb", str(records), "--list")
    assert listed.returncode == 0 and "no_lrn-seed0: group ablations-bundled" in listed.stdout


def test_make_replicate_trains_the_bundled_sweeps_baseline_and_the_gpu_preset_the_same_protocol():
    """experiments/replicate-bundled.yaml is the bundled sweep's baseline (seed 0) in everything that
    changes its numbers; the gpu preset differs from the bundled one only in where and how it runs."""
    from replicate.ablate import _what_it_computes

    def computed(path: Path, preset: str) -> dict:
        kept = _what_it_computes(to_dict(load_experiment(path, preset_overrides(preset) if preset else [])))
        return {key: value for key, value in kept.items() if key != "name"}

    sweep_baseline = computed(ROOT / "experiments" / "baseline.yaml", "bundled")
    assert computed(ROOT / "experiments" / "replicate-bundled.yaml", "") == sweep_baseline
    assert computed(ROOT / "experiments" / "baseline.yaml", "gpu") == sweep_baseline


@pytest.mark.slow
@needs_mirror
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_run_stops_with_a_checkpoint_when_its_sweep_is_killed_outright(tmp_path):
    """Each run trains in a process of its own: SIGKILL to the sweep (no handler can pass it on)
    still stops the run, which saves a checkpoint; the sweep started again resumes it."""
    command = tiny_sweep(tmp_path, "train.checkpoint_every=1", "train.final_views=[centre]")
    sweep = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "ablations-bundled" / "baseline" / "seed0"
    deadline = time.time() + HANG_GUARD_S
    steps = run_dir / "steps.csv"
    while not (steps.is_file() and len(steps.read_text().splitlines()) > 2):
        assert sweep.poll() is None and time.time() < deadline, sweep.communicate()[1][-2000:]
        time.sleep(0.05)
    sweep.kill()
    sweep.communicate(timeout=HANG_GUARD_S)
    while json.loads((run_dir / "status.json").read_text())["state"] == "running":
        assert time.time() < deadline, "the run went on training after its sweep was killed"
        time.sleep(0.1)
    assert json.loads((run_dir / "status.json").read_text())["state"] == "interrupted"
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert again.returncode == 0, again.stderr
    assert "resume: " in again.stdout and "baseline/seed0" in again.stdout
