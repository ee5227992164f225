"""A run directory says only what happened: one writer at a time, no rows of a lost attempt or of
an epoch counted twice, a clear stop when the disk fills. Real `train` processes, killed where a
kill hurts most: each stops itself there and says so in a file, and the test kills it then."""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import HANG_GUARD_S, PLAIN_PATHS, needs_mirror
from tests.test_train import ROOT, TINY, resume, train, wait_for_step

pytestmark = [pytest.mark.slow, needs_mirror]


def train_killed_at_checkpoint(runs: Path, when: str, *overrides: str) -> None:
    """`train` (the TINY config), SIGKILLed inside the first checkpoint whose position makes `when`
    (a Python expression of `position`) true: half its file written, not yet renamed."""
    mark = runs / "stopped-in-a-checkpoint"
    script = textwrap.dedent(f"""
        import pathlib, sys, time
        from replicate import train
        from replicate.cli import main
        checkpoint = train.Trainer.checkpoint
        def stopping(self):
            position = self.position
            if {when}:
                partial = self.run_dir / "checkpoints" / "last.pt.partial"
                partial.parent.mkdir(parents=True, exist_ok=True)
                partial.write_bytes(b"half a checkpoint")
                pathlib.Path({str(mark)!r}).touch()
                time.sleep(600)
            checkpoint(self)
        train.Trainer.checkpoint = stopping
        sys.exit(main(sys.argv[1:]))
    """)
    command = ["train", "experiments/baseline.yaml", *TINY, *PLAIN_PATHS, f"train.runs_dir={runs}"]
    runs.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [sys.executable, "-c", script, *command, *overrides],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + HANG_GUARD_S
    while not mark.is_file() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert mark.is_file(), f"the run never reached that checkpoint: {process.communicate()[1][-2000:]}"
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_one_process_writes_a_run_at_a_time(tmp_path):
    """A second `train` into the same run, or a `--resume` of it, while the first trains: refused,
    naming the process; the first run goes on untouched, every step and epoch recorded once."""
    first = train(tmp_path, "train.epochs=3", wait=False)
    run_dir = tmp_path / "baseline" / "seed0"
    wait_for_step(run_dir, 1, first)
    code, _, err = train(tmp_path, "train.epochs=3")
    assert code == 1 and f"{run_dir} is being written by pid {first.pid}" in err, err
    resumed = resume(run_dir)
    assert resumed.returncode == 1 and f"is being written by pid {first.pid}" in resumed.stderr
    assert "Traceback" not in err + resumed.stderr
    _, err = first.communicate(timeout=HANG_GUARD_S)
    assert first.returncode == 0, err
    assert pd.read_csv(run_dir / "steps.csv")["step"].tolist() == list(range(1, 10))
    assert pd.read_csv(run_dir / "epochs.csv")["epoch"].tolist() == [1, 2, 3]
    # the lock went with the process: the finished run can be opened again (here: refused as finished)
    code, _, err = train(tmp_path, "train.epochs=3")
    assert code == 1 and "already holds a run" in err


def test_an_attempt_killed_before_its_first_checkpoint_is_redone_only_with_its_own_settings(tmp_path):
    runs = tmp_path / "runs"
    offline = ("train.epochs=2", "tracking.wandb=offline")
    train_killed_at_checkpoint(runs, "True", *offline)  # TINY's first checkpoint: step 1
    run_dir = runs / "baseline" / "seed0"
    assert len(pd.read_csv(run_dir / "steps.csv")) == 1 and not (run_dir / "checkpoints" / "last.pt").exists()
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    code, _, err = train(runs, *offline, "optim.lr=0.001")
    assert code == 1 and "holds an attempt with other settings" in err
    assert "optim.lr: 0.01 there, 0.001 now" in err and "Traceback" not in err
    assert "lr: 0.01\n" in (run_dir / "config.yaml").read_text()  # its record untouched
    code, out, err = train(runs, *offline)
    assert code == 0, err
    assert "its earlier attempt stopped before its first checkpoint; starting it anew" in out
    assert pd.read_csv(run_dir / "steps.csv")["step"].tolist() == list(range(1, 7))  # each step once
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1  # the redone attempt's alone


def test_a_kill_while_the_checkpoint_ending_an_epoch_is_written_leaves_no_epoch_twice(tmp_path):
    """A checkpoint falls due on an epoch's last step (3 steps an epoch, one every 3), then the
    epoch's row is written, then the checkpoint that ends the epoch: killed inside that one, the run
    resumes from the step's checkpoint and writes the epoch's row again, once."""
    runs = tmp_path / "runs"
    overrides = ("train.epochs=2", "train.checkpoint_every=3")
    train_killed_at_checkpoint(runs, "position.epoch == 1 and position.batch == 0", *overrides)
    run_dir = runs / "baseline" / "seed0"
    assert pd.read_csv(run_dir / "epochs.csv")["epoch"].tolist() == [1]  # written before the kill
    resumed = resume(run_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert pd.read_csv(run_dir / "epochs.csv")["epoch"].tolist() == [1, 2]
    assert pd.read_csv(run_dir / "steps.csv")["step"].tolist() == list(range(1, 7))
    assert not (run_dir / "checkpoints" / "last.pt.partial").exists()


FULL_DISK = """
set -e
mount -t tmpfs -o size={size} tmpfs {runs}
cd {root}
set +e
{python} -m replicate train {train} > {log}/first.out 2> {log}/first.err
echo $? > {log}/first.code
ls {runs}/baseline/seed0/checkpoints > {log}/left
cp {runs}/baseline/seed0/status.json {log}/status.json
mount -o remount,size=2g {runs}
{python} -m replicate train --resume {runs}/baseline/seed0 > {log}/resumed.out 2> {log}/resumed.err
echo $? > {log}/resumed.code
cp {runs}/baseline/seed0/steps.csv {log}/steps.csv
"""


def test_a_full_disk_stops_the_run_saying_so_and_keeps_the_last_checkpoint(tmp_path):
    """The runs folder on a 700 MB file system (in a mount namespace of the test's own): the first
    checkpoint (~460 MB) fits, the second does not. The run stops with an error that says the disk
    is full, the status says failed, no half-written file is left, and once there is room the
    resume goes on from the first checkpoint."""
    unshare = shutil.which("unshare")
    probe = [unshare or "unshare", "--user", "--map-root-user", "--mount", "true"]
    if not unshare or subprocess.run(probe, capture_output=True).returncode != 0:
        pytest.skip("needs unshare(1) and user namespaces to mount a small file system")
    runs, log = tmp_path / "runs", tmp_path / "log"
    runs.mkdir()
    log.mkdir()
    overrides = [*TINY, *PLAIN_PATHS, "train.checkpoint_every=1", "train.keep_best=false"]
    script = FULL_DISK.format(
        size="700m",
        runs=runs,
        root=ROOT,
        log=log,
        python=sys.executable,
        train=" ".join(["experiments/baseline.yaml", *overrides, f"train.runs_dir={runs}", "train.epochs=1"]),
    )
    done = subprocess.run(
        [unshare, "--user", "--map-root-user", "--mount", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr
    err = (log / "first.err").read_text()
    assert (log / "first.code").read_text().strip() == "2", err
    assert "No space left on device" in err and "the previous checkpoint" in err and "Traceback" not in err
    status = json.loads((log / "status.json").read_text())
    assert status["state"] == "failed" and "No space left on device" in status["message"]
    assert (log / "left").read_text().split() == ["last.pt"]  # no .partial left behind
    assert (log / "resumed.code").read_text().strip() == "0", (log / "resumed.err").read_text()
    assert pd.read_csv(log / "steps.csv")["step"].tolist() == [1, 2, 3]


def wandb_history_steps(path: Path) -> list[int]:
    """The steps of the history records in a W&B run file (.wandb): a LevelDB-style log of protobuf
    records in 32 KiB blocks after a 7-byte header, each chunk with a 7-byte header of its own."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending, steps = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header: padding
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                steps.append(record.history.step.num)
    return steps


def test_a_run_killed_and_resumed_logs_its_whole_history_to_wandb_offline(tmp_path):
    """The offline W&B run of the resumed process holds every step from the first, the ones before
    the checkpoint logged again from the local record: syncing it alone gives the whole curve."""
    process = train(
        tmp_path, "train.epochs=2", "tracking.wandb=offline", wait=False, env={"WANDB_SILENT": "true"}
    )
    run_dir = tmp_path / "baseline" / "seed0"
    wait_for_step(run_dir, 3, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = resume(run_dir, env={"WANDB_SILENT": "true"})
    assert resumed.returncode == 0, resumed.stderr
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2  # the killed process's, and the resumed one's
    steps = wandb_history_steps(next(offline[-1].glob("*.wandb")))
    assert sorted(set(steps)) == list(range(1, 7)), steps  # TINY: 3 steps an epoch, 2 epochs
