"""One writer per run directory: an exclusive lock on <run>/run.lock, held while a process trains,
resumes or evaluates into it.

The lock is the kernel's (`fcntl.flock`): it goes with the process, however that ends (SIGKILL
included), so a stale lock never blocks a resume. The file also says who holds it, for the error
the next writer gets.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on Windows: no lock there
    fcntl = None

LOCK_NAME = "run.lock"


class RunInUse(RuntimeError):
    """Another process is writing the run directory; the message names it."""


class RunLock:
    """`with RunLock(run_dir):` holds the run directory's lock, or raises RunInUse at once. A run that
    wrote nothing (it stopped on an error first) leaves no lock file, nor the folders made for it."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.file = None
        self.made: list[Path] = []  # the folders made for the lock, deepest first

    def __enter__(self) -> RunLock:
        folder = self.path.parent
        while not folder.exists():
            self.made.append(folder)
            folder = folder.parent
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")  # noqa: SIM115 (held until __exit__)
        if fcntl is not None:
            try:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.file.seek(0)
                holder = self.file.read().strip() or "another process"
                self.file.close()
                raise RunInUse(
                    f"{self.path.parent} is being written by {holder}: one process at a time writes a "
                    "run. Wait for it to end, or stop it (Ctrl-C, or kill its PID: it saves a "
                    "checkpoint) and resume"
                ) from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} since {time.strftime('%F %T')} ({' '.join(sys.argv)})\n")
        self.file.flush()
        return self

    def __exit__(self, *_) -> None:
        if self.file is None:
            return
        if [p.name for p in self.path.parent.iterdir()] == [LOCK_NAME]:  # nothing written
            self.path.unlink()
            for folder in self.made:
                try:
                    folder.rmdir()
                except OSError:  # another run's files: keep it
                    break
        self.file.close()  # releases the lock
        self.file = None
