import json
import subprocess
import sys
from pathlib import Path

import pytest

from replicate.bench.projection import EPOCHS, GRADIENT_BYTES, ILSVRC2012_TRAIN, ILSVRC2012_VAL, main, project
from tests.conftest import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]


def test_one_gpu_hours_from_the_rates_by_hand():
    # 1,000 img/s network, pipeline faster: 90 x (1,281,167 / 1,000 + 50,000 / (500 x 10)) s.
    result = project(network_rate=1000, ten_crop_rate=500, pipeline_rate=5000, gpus=1)
    expected = EPOCHS * (ILSVRC2012_TRAIN / 1000 + ILSVRC2012_VAL / 5000) / 3600
    assert result.bound_by == "network" and result.hours == pytest.approx(expected)


def test_the_slower_of_network_and_pipeline_bounds_and_gpus_add_the_all_reduce():
    slow_feed = project(network_rate=1000, ten_crop_rate=500, pipeline_rate=400, gpus=1)
    assert slow_feed.bound_by == "input pipeline" and slow_feed.train_rate == 400
    four = project(
        network_rate=1000, ten_crop_rate=500, pipeline_rate=5000, gpus=4, batch=128, bandwidth_gb_s=100
    )
    steps = ILSVRC2012_TRAIN / (128 * 4)
    all_reduce = steps * 2 * 3 / 4 * GRADIENT_BYTES / 100e9
    expected = EPOCHS * (ILSVRC2012_TRAIN / 4000 + all_reduce + ILSVRC2012_VAL / 20000) / 3600
    assert four.hours == pytest.approx(expected)


@pytest.mark.slow
def test_the_command_reads_bench_records(tmp_path, capsys):
    bench = {
        "device": "a GPU",
        "batch": 128,
        "options": "precision fp32",
        "rates": {
            "train": {"replicate (per-column)": [900, 1000, 1100]},
            "ten_crop": {"replicate (per-column)": [500, 500, 500]},
        },
    }
    data = {"workers": 16, "steady_raw": [300, 300, 300], "steady_raw_device": [5000, 5000, 5000]}
    (tmp_path / "b.json").write_text(json.dumps(bench))
    (tmp_path / "d.json").write_text(json.dumps(data))
    records = [str(tmp_path / "b.json"), "--data", str(tmp_path / "d.json")]
    command = [sys.executable, "-m", "replicate", "project", *records]
    out = subprocess.run(
        [*command, "--contender", "replicate (per-column)", "--gpus", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert out.returncode == 0, out.stderr
    hours = EPOCHS * (ILSVRC2012_TRAIN / 1000 + ILSVRC2012_VAL / 5000) / 3600
    assert f"1 GPU(s): {hours:5.1f} h for 90 epochs (1,000 img/s, bound by the network)" in out.stdout
    by_default = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert by_default.returncode == 0, by_default.stderr  # the default contender: the default path
    assert "replicate (per-column): train 1000 img/s" in by_default.stdout
    assert "input pipeline: steady_raw_device," in by_default.stdout  # as training on a GPU feeds itself
    wrong_arguments = {
        ("--pipeline", "gpu_jpeg"): "--pipeline gpu_jpeg: not measured in",
        ("--contender", "replicate (fused)"): "--contender 'replicate (fused)': not in",
        ("--gpus", "1,two"): "argument --gpus: '1,two': expected whole numbers separated by commas",
        ("--gpus", "0,1"): "argument --gpus: '0,1': every GPU count must be at least 1",
        ("--data", str(tmp_path / "b.json")): "b.json: not a record of `python -m replicate bench-data",
        ("--data", str(tmp_path / "none.json")): "none.json: no such file",
    }
    # In this process: each subprocess spends seconds importing torch, and the two above already run
    # the command as a user does.
    for arguments, message in wrong_arguments.items():
        with pytest.raises(SystemExit) as exit_status:
            main([*records, *arguments])
        stderr = capsys.readouterr().err
        assert exit_status.value.code == 2 and message in stderr, stderr
