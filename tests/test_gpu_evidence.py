"""`make gpu-evidence` (replicate/gpu_evidence.py): its steps, its smoke mode on any CPU, its clock,
its archive and its projection."""

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from unittest.mock import ANY

import pandas as pd
import pytest
import torch
import yaml

from analysis.records import load_records
from analysis.tables import ablation_table
from replicate.gpu_evidence import ARCHIVE, Step, finished_ok, projection, run_step
from replicate.gpu_evidence import main as evidence_main
from replicate.gpu_evidence import steps as evidence_steps
from tests.cifar.test_figure1 import figure1 as run_figure1
from tests.conftest import HANG_GUARD_S, needs_mirror
from tests.test_analysis import committed_results, page_links

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@needs_mirror
def test_gpu_evidence_smoke_mode_runs_every_step_and_reports_every_figure_and_table(tmp_path):
    """`make gpu-evidence SMOKE=1` on the CPU: the GPU tests (skipped here), `bench --smoke`, a sweep
    of two seeds side by side on 2 images per class, and `make report` on it; with a tiny Figure 1
    run placed among its runs, every figure and table of the report is drawn."""
    out = tmp_path / "evidence"
    figure1 = run_figure1(
        "train_images=256", "max_epochs=2", "relu_lrs=[0.004]", "tanh_lrs=[0.004]", "threshold=99",
        "seeds=[0]", f"out_dir={out / 'runs' / 'figure1'}",
    )  # fmt: skip
    assert figure1.returncode == 0, figure1.stderr
    env = {**os.environ, "TQDM_DISABLE": "1", "ALEXNET_RESULTS": str(committed_results(tmp_path))}
    results = [
        subprocess.run(
            [
                "make",
                "gpu-evidence",
                "SMOKE=1",
                f"OUT={out}",
                f"PY={sys.executable}",
                "STAMP=",
                f"STEPS={steps}",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=HANG_GUARD_S,
        )
        for steps in ("tests,bench", "tests,sweep,report")  # two calls into one OUT
    ]
    for result in results:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "projected from analysis/benchmarks/h100/fp32.json" in result.stdout
    assert "== gpu tests: done in an earlier call" in results[1].stdout
    record = json.loads((out / "evidence.json").read_text())
    steps = {step["step"]: step for step in record["steps"]}
    assert list(steps) == [step.name for step in evidence_steps(out, smoke=True)]  # every step, in order
    assert steps["gpu tests"]["call"] == 1 and steps["report"]["call"] == 2 and len(record["calls"]) == 2
    skipped = {"step": "bench fp32-triton-lrn", "skipped": "needs a GPU", "call": 1}
    assert steps["bench fp32-triton-lrn"] == skipped
    assert all(code == 0 for step in steps.values() for code in step.get("exit_codes", []))
    assert len(steps["sweep, seeds side by side"]["exit_codes"]) == 2  # seeds 0 and 1, one process each
    assert record["unfinished_runs"] == []
    assert "smoke: timings meaningless" in json.loads((out / "bench" / "fp32.json").read_text())["options"]
    reports = out / "report"
    figures = reports / "figures"
    names = ["training_curves", "figure1", "figure3_conv1_kernels", "figure4_neighbours", "ablations"]
    for name in names:
        for suffix in (".png", ".pdf"):
            assert (figures / f"{name}{suffix}").stat().st_size > 1000, name + suffix
    for name in ("table1", "table2", "ablations", "cifar10"):
        for suffix in (".md", ".tex", ".csv"):
            assert (reports / "tables" / f"{name}{suffix}").is_file()
    ablations = pd.read_csv(reports / "tables" / "ablations.csv").set_index("comparison")
    measured = ablations.loc["no local response normalisation"]
    assert measured["n"] == 2 and "bundled" in measured["data"] and measured["measured Δ top-1"] != "not run"
    sweep_table = (out / "ablations-gpu" / "ablation_table.md").read_text()  # from the sweep's records
    assert (
        "| no local response normalisation |" in sweep_table
        and (out / "ablations-gpu" / "ablations.png").is_file()
    )
    executed = sorted(p.name for p in (reports / "notebooks").glob("*.ipynb"))
    assert len(executed) == 6
    linked = {path.name for path in page_links(reports / "index.html")}
    assert {f"{name}.png" for name in names} | {f"{name}.csv" for name in ("table1", "ablations")} <= linked
    assert set(executed) <= linked
    # the archive to carry back: every record but the checkpoints, from which the tables come out again
    with tarfile.open(out / ARCHIVE) as tar:
        packed = tar.getnames()
    assert not [name for name in packed if name.endswith(".pt")] and list((out / "runs").rglob("*.pt"))
    assert {"evidence.json", "report/tables/ablations.csv", "bench/fp32.json"} <= set(packed)
    unpacked = tmp_path / "unpacked"
    result = subprocess.run(
        [sys.executable, "-m", "replicate", "gpu-evidence", str(unpacked), "--unpack", str(out / ARCHIVE)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert result.returncode == 0, result.stderr
    again = ablation_table(load_records(unpacked / "runs")).set_index("comparison")
    assert again.loc["no local response normalisation", "measured Δ top-1"] == measured["measured Δ top-1"]


def test_a_step_still_running_when_the_time_runs_out_is_stopped_as_ctrl_c_stops_it(tmp_path):
    """--minutes: SIGINT at the deadline, as a training run expects it (it saves a checkpoint)."""
    script = (
        "import pathlib, signal, sys, time\n"
        "def saved(*_):\n"
        "    pathlib.Path(sys.argv[1]).write_text('saved')\n"
        "    raise SystemExit(130)\n"
        "signal.signal(signal.SIGINT, saved)\n"
        "pathlib.Path(sys.argv[1] + '.started').touch()\n"
        "time.sleep(600)\n"
    )
    marks = [tmp_path / f"run{k}" for k in range(2)]
    step = Step("sweep, seeds side by side", "sweep", [[sys.executable, "-c", script, str(m)] for m in marks])
    started = time.monotonic()
    ready = [m.with_name(m.name + ".started") for m in marks]  # each handler in place, by the child's word
    record = run_step(step, tmp_path, gpu=False, time_is_up=lambda: all(r.exists() for r in ready))
    assert time.monotonic() - started < HANG_GUARD_S
    assert [m.read_text() for m in marks] == ["saved", "saved"] and record["exit_codes"] == [130, 130]
    assert record["stopped"].startswith("by the time limit") and not finished_ok(record)


def test_gpu_evidence_out_of_time_skips_the_work_still_packs_and_asks_to_be_called_again(tmp_path):
    out = tmp_path / "out"
    code = evidence_main([str(out), "--smoke", "--steps", "bench", "--minutes", "0.001"])
    record = json.loads((out / "evidence.json").read_text())
    assert code == 3 and record["calls"] == [{"steps": ["bench"], "minutes": 0.001, "seconds": ANY}]
    assert [s["skipped"] for s in record["steps"]] == ["out of time (--minutes)"] * len(record["steps"]) != []
    with tarfile.open(out / ARCHIVE) as tar:
        assert "evidence.json" in tar.getnames()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "tests,benhc"], "--steps: no step 'benhc'"),
        (["--minutes", "0"], "--minutes must be positive"),
        (["--unpack", "missing.tar.gz"], "missing.tar.gz: no such archive"),
    ],
)
def test_gpu_evidence_refuses_a_bad_argument_naming_it(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        evidence_main([str(tmp_path / "out"), "--smoke", *args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_gpu_evidence_does_not_continue_another_kind_of_evidence_in_one_folder(tmp_path, capsys):
    (tmp_path / "evidence.json").write_text(json.dumps({"smoke": False, "steps": []}))
    with pytest.raises(SystemExit):
        evidence_main([str(tmp_path), "--smoke", "--steps", "bench"])
    assert "holds a full evidence run: give another folder" in capsys.readouterr().err


def test_gpu_evidence_without_a_gpu_asks_for_smoke_mode(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = subprocess.run(
        [sys.executable, "-m", "replicate", "gpu-evidence", str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert result.returncode == 2 and "no GPU here" in result.stderr and "--smoke" in result.stderr
    assert not (tmp_path / "out").exists()


def test_the_gpu_evidence_projection_counts_every_run_of_the_sweep():
    total, lines = projection()
    epochs = yaml.safe_load((ROOT / "experiments" / "presets" / "gpu.yaml").read_text())["train"]["epochs"]
    assert f"sweep: 32 runs x {epochs} epochs of 5,000 images" in lines[1]  # 5 baseline seeds, 9 x 3
    assert "NVIDIA H100" in lines[0] and 0 < total < 3600
