"""A sweep's offline W&B runs: read from their archive beside the records, and synced to W&B.

`ablate` packs each run's offline W&B folder into <records>/wandb-offline.tar.gz. `python -m
replicate sync-wandb <records>` unpacks it into a temporary folder and hands every run to `wandb sync`
(into the user's own project, with the group and tags the sweep gave them); `--list` shows what
each run holds without the network. A run's .wandb file is a LevelDB-style log of protobuf records
(wandb's own format: a 7-byte header, then 32 KiB blocks of chunks, each with a 7-byte header).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from replicate.data.sources import DataError, safe_extract
from replicate.tracking import RecordError

ARCHIVE = "wandb-offline.tar.gz"
BLOCK, CHUNK_HEADER, FILE_HEADER = 32 * 1024, 7, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records_of(path: Path) -> Iterator[bytes]:
    """The raw protobuf records of one .wandb file, in the order they were written."""
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise RecordError(f"{path}: not a W&B run file")
    position, pending = FILE_HEADER, b""
    while position + CHUNK_HEADER <= len(data):
        left = BLOCK - position % BLOCK
        if left < CHUNK_HEADER:  # a block's tail too short for a chunk header is padding
            position += left
            continue
        length = int.from_bytes(data[position + 4 : position + 6], "little")
        kind = data[position + 6]
        chunk = data[position + CHUNK_HEADER : position + CHUNK_HEADER + length]
        position += CHUNK_HEADER + length
        if kind == 0:  # zero padding up to the block's end
            position += BLOCK - position % BLOCK if position % BLOCK else 0
            continue
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            yield pending
            pending = b""


@dataclass
class OfflineRun:
    """What one offline W&B run holds: its name, group and tags, and its logged history."""

    folder: Path
    name: str = ""
    group: str = ""
    tags: list[str] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)  # one dict of key -> value per log call
    summary: dict = field(default_factory=dict)

    def values(self, key: str) -> list:
        return [row[key] for row in self.history if key in row]


def read_offline_run(folder: Path) -> OfflineRun:
    """An offline-run-* folder's run file, decoded."""
    from wandb.proto import wandb_internal_pb2 as pb

    files = sorted(Path(folder).glob("run-*.wandb"))
    if not files:
        raise RecordError(f"{folder}: no run-*.wandb file (not an offline W&B run)")
    run = OfflineRun(Path(folder))
    for raw in records_of(files[0]):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.name, run.group = record.run.display_name, record.run.run_group
            run.tags = list(record.run.tags)
        elif kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            run.summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})
    return run


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def offline_folders(root: Path) -> list[Path]:
    return sorted(p for p in Path(root).rglob("offline-run-*") if p.is_dir())


def _archive(path: Path) -> Path:
    archive = path / ARCHIVE if path.is_dir() else path
    if not archive.is_file():
        raise RecordError(f"{path}: no {ARCHIVE} (a sweep run with tracking.wandb=offline writes it)")
    return archive


def main(argv: list[str] | None = None) -> int:
    """`python -m replicate sync-wandb RECORDS`: every offline W&B run of a sweep's records
    (RECORDS/wandb-offline.tar.gz) uploaded with `wandb sync` into your W&B project."""
    parser = argparse.ArgumentParser(prog="python -m replicate sync-wandb", description=main.__doc__)
    parser.add_argument("records", type=Path, help="a sweep's records folder, or its wandb-offline.tar.gz")
    parser.add_argument("--project", default="alexnet-2012", help="W&B project (default: alexnet-2012)")
    parser.add_argument("--entity", help="W&B entity (default: your default entity)")
    parser.add_argument(
        "--list", action="store_true", help="show each run's group, tags and epochs; upload nothing"
    )
    args = parser.parse_args(argv)
    try:
        archive = _archive(args.records)
        with tempfile.TemporaryDirectory(prefix="wandb-offline-") as temporary:
            unpacked = safe_extract(archive, Path(temporary) / "runs")  # links and escapes refused
            folders = offline_folders(unpacked)
            for folder in folders:
                run = read_offline_run(folder)
                epochs = len(run.values("epoch/val_top1_error"))
                print(f"{run.name}: group {run.group}, tags {', '.join(run.tags)}, {epochs} epochs logged")
            if args.list or not folders:
                return 0
            beside = Path(sys.executable).parent / "wandb"  # this environment's, before any other
            program = str(beside) if beside.is_file() else shutil.which("wandb")
            if program is None:
                raise RecordError("the wandb command is not installed (pip install wandb)")
            command = [program, "sync", "--include-offline"]
            command += ["--project", args.project] + (["--entity", args.entity] if args.entity else [])
            return subprocess.run([*command, *map(str, folders)]).returncode
    except (RecordError, DataError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
