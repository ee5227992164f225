"""The CPU time a run had and the CPU time other work took: real processes burning known CPU time.

Every amount is CPU time each process measures of itself (`time.process_time`), so the test holds
however busy the machine is; the only waits are for files the processes write (hang guards).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from replicate.cpu_clock import CpuClock
from tests.conftest import HANG_GUARD_S

SPIN = "import sys, time\nwhile time.process_time() < {seconds}: pass\nopen(sys.argv[1], 'w').close()\n"
STAY = "time.sleep(600)\n"  # then killed


def spin(seconds: float) -> None:
    """Burn `seconds` of this process's CPU time."""
    until = time.process_time() + seconds
    while time.process_time() < until:
        pass


def wait_for(path: Path) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never came"
        time.sleep(0.05)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's machine-wide counters")
def test_the_runs_cpu_time_counts_its_children_and_not_other_processes(tmp_path):
    clock = CpuClock.start()
    assert clock.run is not None
    # a child that ends (and is reaped), a child still alive at the reading, this process itself ...
    ended = tmp_path / "ended"
    subprocess.run([sys.executable, "-c", SPIN.format(seconds=0.5), ended], check=True, timeout=HANG_GUARD_S)
    alive_done = tmp_path / "alive"
    alive = subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=0.5) + STAY, alive_done])
    # ... and a process that is not the run's: orphaned at once (its parent, the shell, does not wait)
    other_done = tmp_path / "other"
    subprocess.run(
        ["sh", "-c", f'"{sys.executable}" -c "$0" "$1" &', SPIN.format(seconds=1.5), str(other_done)],
        check=True,
        timeout=HANG_GUARD_S,
    )
    spin(0.5)
    try:
        wait_for(alive_done)
        wait_for(other_done)
        measured = clock.since()
    finally:
        alive.kill()
        alive.wait()
    # 1.5 s of the run's own spinning, plus the children's interpreter start; the other process's
    # 1.5 s counted there would make it at least 3
    assert 1.45 <= measured["cpu_seconds"] < 2.7, measured
    assert measured["other_cpu_seconds"] >= 1.4, measured
