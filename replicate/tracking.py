"""The run record: a local directory that is always written, and W&B online, offline or off.

Local files are the source of truth (analysis reads them); W&B mirrors them. No credential is ever
written: the environment record lists package versions and devices, never environment variables.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import sys
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from replicate.config import Section

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class TrackingConfig(Section):
    wandb: Literal["auto", "online", "offline", "off"] = "auto"  # auto: online if W&B is configured, else off
    project: str = "alexnet-2012"  # W&B project
    entity: str | None = None  # W&B team or user (None: the default of the logged-in user)
    group: str | None = None  # W&B group (an ablation sweep sets it)
    variant: str = "baseline"  # which design choice the run tests (a W&B tag)
    tags: list[str] = field(default_factory=list)  # more W&B tags


def wandb_mode(config: TrackingConfig) -> str:
    """`auto`: WANDB_MODE if set; online if an API key is configured (env or ~/.netrc); else off."""
    if config.wandb != "auto":
        return config.wandb
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return {"disabled": "off"}.get(os.environ["WANDB_MODE"], os.environ["WANDB_MODE"])
    netrc = Path.home() / ".netrc"
    configured = bool(os.environ.get("WANDB_API_KEY")) or (
        netrc.is_file() and "api.wandb.ai" in netrc.read_text()
    )
    return "online" if configured else "off"


def git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit or "unknown") + ("-dirty" if dirty else "")


def environment(devices: list[str]) -> dict[str, Any]:
    """Versions, commit and devices: what is needed to reproduce a run (no environment variables)."""
    import numpy
    import torch
    import torchvision

    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "git_commit": git_commit(),
        "devices": devices,
        "cpu_threads": torch.get_num_threads(),
        "cuda": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    return info


class CsvLog:
    """Rows appended to a CSV file (pandas.read_csv reads it); `truncate_after` drops rows past a step."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, row: dict[str, Any]) -> None:
        new = not self.path.is_file()
        with open(self.path, "a", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def truncate_after(self, key: str, value: float) -> None:
        """Keep the header and the rows whose `key` is <= value (rows written after a checkpoint)."""
        if not self.path.is_file():
            return
        with open(self.path, newline="") as file:
            rows = list(csv.DictReader(file))
        kept = [r for r in rows if float(r[key]) <= value]
        partial = self.path.with_name(self.path.name + ".partial")
        with open(partial, "w", newline="") as file:
            if rows:
                writer = csv.DictWriter(file, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(kept)
        partial.replace(self.path)


class Tracker:
    """Writes the local record and mirrors it to W&B (rank 0 only)."""

    def __init__(
        self, run_dir: Path, config: TrackingConfig, run_name: str, config_dict: dict, seed: int, resume: bool
    ) -> None:
        self.run_dir = run_dir
        self.steps, self.epochs = CsvLog(run_dir / "steps.csv"), CsvLog(run_dir / "epochs.csv")
        self.mode = wandb_mode(config)
        self.wandb_run = None
        if self.mode != "off":
            import wandb

            id_file = run_dir / "wandb_id.txt"
            run_id = id_file.read_text().strip() if resume and id_file.is_file() else uuid.uuid4().hex[:8]
            id_file.write_text(run_id + "\n")
            tags = [f"experiment:{run_name}", f"variant:{config.variant}", f"seed:{seed}", *config.tags]
            self.wandb_run = wandb.init(
                project=config.project,
                entity=config.entity,
                group=config.group,
                name=f"{run_name}-seed{seed}",
                id=run_id,
                resume="allow",
                dir=str(run_dir),
                mode=self.mode,
                config=config_dict,
                tags=tags,
            )

    def log_step(self, row: dict[str, Any]) -> None:
        self.steps.append(row)
        if self.wandb_run is not None:
            self.wandb_run.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=row["step"])

    def log_epoch(self, row: dict[str, Any], step: int) -> None:
        self.epochs.append(row)
        if self.wandb_run is not None:
            self.wandb_run.log({f"epoch/{k}": v for k, v in row.items()}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb_run is not None:
            for key, value in values.items():
                self.wandb_run.summary[key] = value

    def finish(self, failed: bool = False) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1 if failed else 0)
            self.wandb_run = None


def write_json(path: Path, data: dict) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=1, default=str) + "\n")
    partial.replace(path)


def write_record(out: Path, name: str, record: dict, header: list[str], rows: Iterable[list]) -> None:
    """An experiment's record: out/<name>.json, and its per-epoch curves as out/curves.csv."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{name}.json", record)
    with open(out / "curves.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)
