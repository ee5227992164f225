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

from replicate.config import ConfigError, Section

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class TrackingConfig(Section):
    wandb: Literal["auto", "online", "offline", "off"] = "auto"  # auto: online if W&B is configured, else off
    project: str = "alexnet-2012"  # W&B project
    entity: str | None = None  # W&B team or user (None: the default of the logged-in user)
    group: str | None = None  # W&B group (an ablation sweep sets it)
    variant: str = "baseline"  # which design choice the run tests (a W&B tag)
    tags: list[str] = field(default_factory=list)  # more W&B tags
    log_checkpoint: bool = False  # also upload checkpoints/last.pt at the end, as a W&B model artifact


def api_key_configured() -> bool:
    """Whether W&B can log in: WANDB_API_KEY, or the key `wandb login` writes to ~/.netrc."""
    netrc = Path.home() / ".netrc"
    return bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())


def wandb_choice(config: TrackingConfig) -> tuple[str, str]:
    """(mode, why): `auto` takes WANDB_MODE if set, else online if an API key is configured, else off.
    `online` without an API key is a ConfigError saying how to log in, raised before any work."""
    if config.wandb == "online" and not api_key_configured():
        raise ConfigError(
            "tracking.wandb=online needs a W&B API key: run `wandb login` (or set WANDB_API_KEY), "
            "or use tracking.wandb=offline (synced later with `wandb sync`) or tracking.wandb=off"
        )
    if config.wandb != "auto":
        return config.wandb, f"tracking.wandb={config.wandb}"
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        mode = {"disabled": "off"}.get(os.environ["WANDB_MODE"], os.environ["WANDB_MODE"])
        return mode, f"tracking.wandb=auto: WANDB_MODE={os.environ['WANDB_MODE']}"
    if api_key_configured():
        return "online", "tracking.wandb=auto: a W&B API key is configured"
    return "off", "tracking.wandb=auto: no W&B API key (`wandb login`, or tracking.wandb=offline)"


def git_commit() -> str:
    """HEAD's commit (`-dirty` if the tree has changes); in a source tree without git (an exported
    copy), the commit the environment variable ALEXNET_COMMIT names, marked as such."""
    if not (REPO_ROOT / ".git").exists() and os.environ.get("ALEXNET_COMMIT"):
        return f"{os.environ['ALEXNET_COMMIT']} (ALEXNET_COMMIT: no git repository)"
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


def processor() -> str:
    """The CPU a record was made on: its model, logical cores, and the vector instructions PyTorch's
    kernels use on it. CPU figures (speed, and the rounding a run's trajectory follows) differ between
    machines, even of one size (BENCHMARKS.md)."""
    import torch

    try:
        with open("/proc/cpuinfo") as info:
            name = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}; {os.cpu_count()} logical cores; {torch.backends.cpu.get_cpu_capability()}"


def environment(devices: list[str]) -> dict[str, Any]:
    """Versions, commit, processor and devices: what is needed to reproduce a run (no environment
    variables)."""
    from importlib.metadata import version

    import numpy
    import torch

    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": processor(),
        "torch": torch.__version__,
        "torchvision": version("torchvision"),  # not imported: seconds, for one string
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
        header = self._header() if self.path.is_file() else []
        added = [key for key in row if key not in header]
        if header and added:  # a run resumed by a version that records more columns
            header = [*header, *added]
            self._rewrite(header, self.rows())
        with open(self.path, "a", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=header or list(row), restval="")
            if not header:
                writer.writeheader()
            writer.writerow(row)

    def _header(self) -> list[str]:
        with open(self.path, newline="") as file:
            return next(csv.reader(file), [])

    def _rewrite(self, fieldnames: list[str], rows: list[dict[str, str]]) -> None:
        """The file replaced whole by `rows` under `fieldnames` (no header when there are none)."""
        partial = self.path.with_name(self.path.name + ".partial")
        with open(partial, "w", newline="") as file:
            if fieldnames:
                writer = csv.DictWriter(file, fieldnames=fieldnames, restval="")
                writer.writeheader()
                writer.writerows(rows)
        partial.replace(self.path)

    def rows(self) -> list[dict[str, str]]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as file:
            return list(csv.DictReader(file))

    def truncate_after(self, key: str, value: float) -> None:
        """Keep the header and the rows whose `key` is <= value (rows written after a checkpoint)."""
        if not self.path.is_file():
            return
        with open(self.path, newline="") as file:
            rows = list(csv.DictReader(file))
        kept = [r for r in rows if float(r[key]) <= value]
        self._rewrite(list(rows[0]) if rows else [], kept)


def _value(text: str) -> Any:
    """A CSV cell as the number or flag it was logged as."""
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


class Tracker:
    """Writes the local record and mirrors it to W&B (rank 0 only)."""

    def __init__(
        self, run_dir: Path, config: TrackingConfig, run_name: str, config_dict: dict, seed: int, resume: bool
    ) -> None:
        self.run_dir = run_dir
        self.steps, self.epochs = CsvLog(run_dir / "steps.csv"), CsvLog(run_dir / "epochs.csv")
        self.mode = wandb_choice(config)[0]
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

    def replay_record(self) -> None:
        """On a resume in offline mode: the local record's rows (up to the checkpoint resumed from)
        logged again, in step order, so that this offline run holds the whole history by itself (the
        run it continues may have been killed before its files were whole). Online, W&B keeps the
        history of the run it resumes."""
        if self.wandb_run is None or self.mode != "offline":
            return
        rows = [(int(r["step"]), 0, "train/", r) for r in self.steps.rows()]
        rows += [(int(r["step"]), 1, "epoch/", r) for r in self.epochs.rows()]
        for step, _, prefix, row in sorted(rows, key=lambda item: item[:2]):
            keys = [k for k in row if prefix == "epoch/" or k != "step"]
            self.wandb_run.log({prefix + k: _value(row[k]) for k in keys}, step=step)

    def log_step(self, row: dict[str, Any]) -> None:
        self.steps.append(row)
        if self.wandb_run is not None:
            self.wandb_run.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=row["step"])

    def log_epoch(self, row: dict[str, Any], step: int) -> None:
        self.epochs.append(row)
        if self.wandb_run is not None:
            self.wandb_run.log({f"epoch/{k}": v for k, v in row.items() if v is not None}, step=step)

    def final_evaluation(self, record: dict[str, Any]) -> None:
        """evaluation.json mirrored to W&B: a table of the protocols' errors, and the same as summary
        scalars (`centre/top1_error`, ...) for the runs table."""
        if self.wandb_run is None:
            return
        import wandb

        columns = ["views", "top1_error", "top5_error", "loss", "images", "data", "precision"]
        table = wandb.Table(columns=columns)
        data = f"{record['dataset']} {record['split']} ({record['source']['label']})"
        for views, result in record["views"].items():
            row = [result[key] for key in ("top1_error", "top5_error", "loss", "images")]
            table.add_data(views, *row, data, record["precision"])
            for key, value in result.items():
                self.wandb_run.summary[f"{views}/{key}"] = value
        self.wandb_run.summary["data_source"] = record["source"]["label"]  # analysis.records reads it
        self.wandb_run.log({"final_evaluation": table})

    def log_checkpoint(self, path: Path, name: str) -> None:
        """`path` as a W&B model artifact of this run (`tracking.log_checkpoint`)."""
        if self.wandb_run is None:
            return
        import wandb

        artifact = wandb.Artifact(name, type="model", metadata={"file": path.name})
        artifact.add_file(str(path))
        self.wandb_run.log_artifact(artifact)

    def finish(self, failed: bool = False) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1 if failed else 0)
            self.wandb_run = None


class RecordError(RuntimeError):
    """A record file (JSON) that cannot be read; the message names it."""


def read_json(path: Path) -> dict:
    """A JSON record, or a RecordError naming the file and what is wrong with it."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RecordError(f"{path}: not a readable JSON record ({error}); delete or restore it") from None


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
