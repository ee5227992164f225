"""The JSON records of `bench`, `bench-data` and `bench-winograd --json`: checked before a benchmark starts,
written atomically after it, and read back (`bench --report`, `project`) with errors that name the
file and what is wrong with it instead of a traceback."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from replicate.tracking import git_commit, processor, write_json

# The contenders, as bench records name them; per-column is the training default (fused_columns off).
TORCHVISION, FUSED, PER_COLUMN = "torchvision alexnet", "replicate (fused)", "replicate (per-column)"

# The keys each reader uses: `project` of a bench record and of a bench-data one (plus the rate of
# the pipeline it is asked for), `bench --report` of a bench record.
BENCH_KEYS = ("device", "batch", "options", "rates")
BENCH_REPORT_KEYS = (*BENCH_KEYS, "macs")
DATA_KEYS = ("workers",)


def origin() -> dict[str, str]:
    """What a record says of where it was made: the processor and the code's commit."""
    return {"processor": processor(), "commit": git_commit()}


def origin_line(record: dict) -> str:
    """The report's line naming where the record was made: the processor and the code's commit
    (the H100 records name neither: they were made at commit 73e1977)."""
    made_on, commit = record.get("processor", "not recorded"), record.get("commit", "not recorded")
    return f"processor: {made_on}; commit: {commit}"


class RecordError(ValueError):
    """A record that cannot be read or written; the message names the file."""


def check_writable(path: Path) -> None:
    """Before measuring: `path` can be written once the run ends, so minutes of timing are not
    lost to a typo. Missing folders are made, as `make bench-gpu` makes BENCH_OUT."""
    if path.is_dir():
        raise RecordError(f"{path} is a folder: give the file to write the record to")
    existing = next(folder for folder in path.absolute().parents if folder.exists())
    if not existing.is_dir():
        raise RecordError(f"cannot write the record {path}: {existing} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RecordError(f"cannot make the folder of {path}: {error.strerror}") from None
    if not os.access(path.parent, os.W_OK):
        raise RecordError(f"cannot write the record {path}: its folder is not writable")


def check_json_option(parser: argparse.ArgumentParser, path: Path | None) -> None:
    """`check_writable` for a benchmark's --json: a bad path is a usage error (exit 2) that names it."""
    if path is not None:
        try:
            check_writable(path)
        except RecordError as error:
            parser.error(str(error))


def write(path: Path, record: dict) -> None:
    write_json(path, record)  # via a .partial file: an interrupted write leaves the old record whole


def read(path: Path, command: str, needs: tuple[str, ...]) -> dict:
    """The record at `path`, written by `<command> --json`, with the keys `needs`."""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise RecordError(f"{path}: no such file (records are written by `{command} --json`)") from None
    except IsADirectoryError:
        raise RecordError(f"{path} is a folder, not a record of `{command} --json`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RecordError(f"{path}: not JSON ({error}); was it written by `{command} --json`?") from None
    missing = [key for key in needs if key not in record] if isinstance(record, dict) else list(needs)
    if missing:
        raise RecordError(f"{path}: not a record of `{command} --json`: it has no {', '.join(missing)}")
    return record
