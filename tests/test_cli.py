import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from replicate.bench.records import processor
from replicate.tracking import git_commit
from tests.conftest import HANG_GUARD_S, needs_mirror

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "replicate", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )


@pytest.mark.slow
def test_config_command_prints_the_resolved_config():
    result = run("config", "experiments/baseline.yaml", "model.lrn=off")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["model"]["lrn"] == "off"


@pytest.mark.slow
def test_unknown_key_is_an_error_naming_it():
    result = run("config", "experiments/baseline.yaml", "model.colums=1")
    assert result.returncode == 2
    assert "unknown config key 'model.colums'" in result.stderr


@pytest.mark.slow
def test_model_command_counts_the_papers_parameters():
    result = run("model", "experiments/baseline.yaml")
    assert result.returncode == 0, result.stderr
    assert "total parameters: 60,965,224" in result.stdout


def test_import_and_build_in_a_fresh_interpreter():
    result = subprocess.run(
        [sys.executable, "-c", "from replicate.model import AlexNet; AlexNet()"],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
@needs_mirror
def test_prepare_command_stores_a_slice_of_the_bundled_subset():
    result = run("prepare", "experiments/baseline.yaml", "data.limit_per_class=3")
    assert result.returncode == 0, result.stderr
    assert "train: 30 images, 10 classes" in result.stdout and "eval: 30 images" in result.stdout
    assert "RGB covariance eigenvalues" in result.stdout


def test_data_errors_are_named_without_a_traceback(tmp_path):
    result = run("prepare", "experiments/baseline.yaml", "data.dataset=ilsvrc2012", f"data.root={tmp_path}")
    assert result.returncode == 2
    assert "data error:" in result.stderr and "ILSVRC2012_img_train.tar" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@needs_mirror
def test_bench_data_smoke_mode_runs():
    result = run("bench-data", "--smoke")
    assert result.returncode == 0, result.stderr
    assert "ratio ours/baseline, raw store:" in result.stdout
    assert "jpeg store decoded and views cut on" in result.stdout  # data.decode_on=device
    assert f"processor: {processor()}" in result.stdout  # figures differ between CPUs


@pytest.mark.slow
def test_bench_smoke_mode_runs_and_counts_multiply_adds(tmp_path):
    saved_at = tmp_path / "records" / "bench.json"  # a folder the run makes
    # The plain torch paths, as tests whose subject is not speed take them: building the default
    # compiled kernels for every contender is minutes on a 2-core CPU (tests/test_speed.py runs them).
    plain = ["--lrn-kernel", "torch", "--conv-algorithm", "direct"]
    result = run("bench", "--smoke", "--channels-last", *plain, "--json", str(saved_at))
    assert result.returncode == 0, result.stderr
    options = json.loads(saved_at.read_text())["options"]  # the options given
    assert "channels_last True" in options and "lrn_kernel torch; conv_algorithm direct" in options
    assert "ours (compiled)" not in result.stdout  # the LRN is timed on the kernel the networks run
    assert [path.name for path in saved_at.parent.iterdir()] == ["bench.json"]  # no .partial left
    assert "replicate AlexNet: 0.724 G multiply-adds" in result.stdout
    assert "torchvision alexnet: 0.714 G multiply-adds" in result.stdout
    if sys.platform == "linux":  # glibc's mallopt: every contender runs with freed memory kept
        assert "allocator: freed memory kept for reuse" in result.stdout
    # the warm-up ran until two rounds in a row mapped no more than 16 MiB of new pages (or 8 rounds)
    warm_up = json.loads(saved_at.read_text())["warm_up"]
    faults = warm_up["page_faults_in_timed_repeats"]
    assert 2 <= warm_up["rounds"] <= 8 and isinstance(faults, int)  # a count, recorded as printed:
    assert f"warm-up: {warm_up['rounds']} round(s); page faults during the timed repeats: {faults}\n" in (
        result.stdout
    )
    assert json.loads(saved_at.read_text())["processor"] == processor()
    assert f"processor: {processor()}" in result.stdout
    for layer in ("lrn1 (48 x 55 x 55)", "lrn2 (128 x 27 x 27)"):  # ours against torch's LRN
        assert f"{layer}, one column, fwd+bwd: ours median" in result.stdout
    for layer in ("pool1 (48 x 55 x 55)", "pool2 (128 x 27 x 27)", "pool5 (128 x 13 x 13)"):
        assert f"{layer}, one column, fwd+bwd: ours median" in result.stdout  # ... and nn.MaxPool2d
    for contender in ("replicate (fused)", "replicate (per-column)"):
        assert f"train ratio {contender}/torchvision:" in result.stdout
        assert f"ten_crop ratio {contender}/torchvision:" in result.stdout
    # Every contender's conv + fc layers timed alone, with the work they do at batch 2: 3 x the
    # forward's multiply-adds (forward, input gradient, weight gradient), but conv1 needs no input
    # gradient; conv1 is 55 x 55 outputs x 363 multiply-adds per kernel, 96 kernels (ours) or 64.
    record = json.loads(saved_at.read_text())["matrix_layers"]
    forward, conv1 = {"replicate": 724_406_816, "torchvision": 714_188_480}, 55 * 55 * 363
    assert record["replicate (per-column)"]["multiply_adds"] == 2 * (3 * forward["replicate"] - 96 * conv1)
    assert record["torchvision alexnet"]["multiply_adds"] == 2 * (3 * forward["torchvision"] - 64 * conv1)
    for contender in record:
        assert f"   {contender:<22} min " in result.stdout
    assert "1.2x torchvision's median training rate is a step of" in result.stdout
    # ... and per paper layer, ours summing its two columns' halves: conv1 does forward + weight
    # gradient on 96 kernels (torchvision's 64), every other layer adds the input gradient.
    layers = {name: contender["layers"] for name, contender in record.items()}
    paper = ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]
    assert [list(per_layer) for per_layer in layers.values()] == [paper, paper]
    assert layers["replicate (per-column)"]["conv1"]["multiply_adds"] == 2 * 2 * 96 * conv1
    assert layers["torchvision alexnet"]["conv1"]["multiply_adds"] == 2 * 2 * 64 * conv1
    assert layers["replicate (per-column)"]["fc8"]["multiply_adds"] == 2 * 3 * 4096 * 1000
    for name, per_layer in layers.items():
        assert sum(layer["multiply_adds"] for layer in per_layer.values()) == record[name]["multiply_adds"]
        sums = [sum(times) for times in zip(*(layer["ms"] for layer in per_layer.values()), strict=True)]
        assert sums == pytest.approx(record[name]["ms"])
    assert "per layer, median ms (G multiply-adds/s), replicate's columns summed:" in result.stdout
    assert re.search(r"\n     conv2 +[\d.]+ \([\d.]+\) +[\d.]+ \([\d.]+\)\n", result.stdout)
    saved = run("bench", "--report", str(saved_at))
    assert saved.returncode == 0 and "smoke: timings meaningless" in saved.stdout
    assert f"processor: {processor()}" in saved.stdout
    commit = json.loads(saved_at.read_text())["commit"]  # the code the record was made with
    assert commit == git_commit() and f"; commit: {commit}" in saved.stdout


@pytest.mark.slow
def test_bench_commands_check_the_record_path_before_measuring(tmp_path):
    # Full-size runs (minutes), so an answer within the subprocess timeout means nothing was measured.
    not_a_folder = tmp_path / "notes.txt"
    not_a_folder.write_text("not a folder")
    for command in ("bench", "bench-data", "bench-winograd"):
        wrong = run(command, "--json", str(tmp_path))
        assert wrong.returncode == 2 and f"{tmp_path} is a folder: give the file" in wrong.stderr
        wrong = run(command, "--json", str(not_a_folder / "out" / "record.json"))
        assert wrong.returncode == 2 and f"{not_a_folder} is a file, not a folder" in wrong.stderr
    assert list(tmp_path.iterdir()) == [not_a_folder]


@pytest.mark.slow
def test_bench_counts_that_cannot_work_are_usage_errors_naming_the_option():
    h100 = ["analysis/benchmarks/h100/fp32.json", "--data", "analysis/benchmarks/h100/data.json"]
    expected = {
        ("bench", "--repeats", "0"): "argument --repeats: expected a whole number >= 1, got 0",
        ("bench", "--steps", "two"): "argument --steps: expected a whole number, got 'two'",
        ("bench-winograd", "--batch", "0"): "argument --batch: expected a whole number >= 1, got 0",
        ("bench-data", "--workers", "-1"): "argument --workers: expected a whole number >= 0, got -1",
        ("project", *h100, "--bandwidth", "0"): "argument --bandwidth: expected a number above 0, got 0",
    }
    for args, message in expected.items():
        wrong = run(*args)
        assert wrong.returncode == 2 and message in wrong.stderr, wrong.stderr


@pytest.mark.slow
def test_bench_report_names_a_file_that_is_no_bench_record(tmp_path):
    missing, garbled, other = tmp_path / "missing.json", tmp_path / "garbled.json", tmp_path / "other.json"
    garbled.write_text('{"device": "cpu", "rates"')
    other.write_text(json.dumps({"workers": 2, "ours": [1.0]}))  # a bench-data record
    expected = {
        missing: f"{missing}: no such file (records are written by `python -m replicate bench --json`)",
        garbled: f"{garbled}: not JSON (",
        other: f"{other}: not a record of `python -m replicate bench --json`: it has no device, batch,",
    }
    for path, message in expected.items():
        wrong = run("bench", "--report", str(path))
        assert wrong.returncode == 2 and message in wrong.stderr, wrong.stderr
        assert "Traceback" not in wrong.stderr


@pytest.mark.slow
def test_bench_refuses_the_triton_lrn_where_it_cannot_run():
    wrong = run("bench", "--device", "cpu", "--lrn-kernel", "triton")
    assert (
        wrong.returncode == 2 and "--lrn-kernel triton: the fused kernels run on CUDA devices" in wrong.stderr
    )
    wrong = run("bench", "--compile", "max-autotune")
    assert wrong.returncode == 2 and "invalid choice: 'max-autotune'" in wrong.stderr


@pytest.mark.slow
def test_a_device_this_machine_lacks_is_an_error_before_any_work(tmp_path):
    """cuda:99 on any machine: no such GPU. Named before data, models or run directories are made."""
    runs = tmp_path / "runs"
    result = run(
        "train", "experiments/replicate-bundled.yaml", "train.device=cuda:99", f"train.runs_dir={runs}"
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "config error: train.device=cuda:99: " in result.stderr and "CUDA device" in result.stderr
    assert not runs.exists()
    # evaluate runs on the run's train.device, which an override changes
    config = run("config", "experiments/replicate-bundled.yaml")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(config.stdout)
    result = run("evaluate", str(tmp_path / "run"), "train.device=cuda:99")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "config error: train.device=cuda:99: " in result.stderr
    result = run("bench", "--smoke", "--device", "cuda:99")
    assert result.returncode == 2 and "--device=cuda:99: " in result.stderr and "CUDA device" in result.stderr
    result = run("bench", "--smoke", "--device", "gpu")
    assert result.returncode == 2 and "'gpu' is not a device" in result.stderr


@pytest.mark.slow
def test_a_run_dir_that_is_a_file_is_refused_and_overrides_may_follow_options(tmp_path):
    """`--run-dir` naming a file: a clear error, nothing written. Overrides after an option are
    overrides still (the unknown key is named, not refused as an unrecognised argument)."""
    afile = tmp_path / "afile"
    afile.write_text("kept")
    result = run("train", "experiments/replicate-bundled.yaml", "--run-dir", str(afile), "tracking.wandb=off")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{afile} is a file, not a run directory: give another --run-dir" in result.stderr
    assert afile.read_text() == "kept"
    typo = run("train", "experiments/baseline.yaml", "--run-dir", str(tmp_path / "run"), "model.colums=1")
    assert typo.returncode == 2 and "unknown config key 'model.colums'" in typo.stderr
    assert not (tmp_path / "run").exists()
