"""How much of its machine a run had: the CPU time the run's own processes (this process, its loader
workers, any other child) used over an interval, and the CPU time the rest of the machine used over
the same interval (other processes, and time the hypervisor gave to other machines: "steal").

epochs.csv and evaluation.json record both beside each interval's wall-clock seconds (`CpuClock`),
so a run time can be told apart from one measured beside other work (analysis/ablation_results.py).
Under torchrun the other ranks on the same machine count as other work.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import psutil

# what `CpuClock.since` measures, as epochs.csv and evaluation.json name it
TIMED_COLUMNS = ("seconds", "cpu_seconds", "other_cpu_seconds")


def _run_cpu_seconds() -> float:
    """This process's CPU seconds, its finished children's and its live ones' (loader workers)."""
    me = psutil.Process()
    times = me.cpu_times()
    seconds = times.user + times.system + times.children_user + times.children_system
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):  # ended (or a zombie) between listing and reading
            child_times = child.cpu_times()
            seconds += child_times.user + child_times.system
    return seconds


def _machine_busy_seconds() -> float:
    """The CPU seconds all of the machine's logical cores spent not idle (nor waiting on I/O)."""
    times = psutil.cpu_times()._asdict()
    # Linux's user and nice already hold guest and guest_nice
    idle = ("idle", "iowait", "guest", "guest_nice")
    return sum(value for name, value in times.items() if name not in idle)


def _cpu_readings() -> tuple[float, float] | tuple[None, None]:
    """(the run's CPU seconds, the machine's busy seconds); None where the operating system does not say."""
    try:
        return _run_cpu_seconds(), _machine_busy_seconds()
    except (psutil.Error, OSError, AttributeError):
        return None, None


@dataclass
class CpuClock:
    """Readings taken at the start of an interval; `since` gives the interval's wall-clock seconds
    and CPU seconds."""

    wall: float
    run: float | None
    machine: float | None

    @classmethod
    def start(cls) -> CpuClock:
        return cls(time.perf_counter(), *_cpu_readings())

    def since(self) -> dict[str, float | None]:
        """{"seconds": wall-clock, "cpu_seconds": the run's, "other_cpu_seconds": everything else's}
        since this reading; the CPU seconds None where the operating system does not say."""
        seconds = time.perf_counter() - self.wall
        run_now, machine_now = _cpu_readings()
        run = other = None
        if run_now is not None and self.run is not None:
            run = run_now - self.run
            # the two counters are read at slightly different instants: never below zero
            other = max(0.0, machine_now - self.machine - run)
        return dict(zip(TIMED_COLUMNS, (seconds, run, other), strict=True))
