"""Run records as tables: every finished run directory (config.yaml + evaluation.json) under a runs
folder, and the ensemble evaluations, one row per (run, protocol). Read only what runs wrote.

Each row names its `experiment`: the run's name and a hash of its resolved config but for the seed,
so that tables pool only runs of one experiment (analysis/tables.py), and its data `source` (which
copy of which data set produced the store: `evaluation.json`'s source label).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pandas as pd
import yaml

from replicate.tracking import RecordError, read_json

SMALL_DATASETS = {"imagenette"}  # 10 classes: never comparable with the paper's ILSVRC numbers
COLUMNS = [
    "run", "name", "seed", "claim", "kind", "experiment", "dataset", "split", "source", "bundled",
    "protocol", "images", "top1_error", "top5_error",
]  # fmt: skip
# Keys that differ between the runs of one experiment: the seed, and the folder runs are written to.
NOT_THE_EXPERIMENT = {("train", "seed"), ("train", "runs_dir")}
NO_SOURCE = "source not recorded"


def experiment_id(config: dict) -> str:
    """`name (config <hash>)`: runs that share it differ at most in their seed and folder."""
    kept = {
        section: {k: v for k, v in values.items() if (section, k) not in NOT_THE_EXPERIMENT}
        if isinstance(values, dict)
        else values
        for section, values in config.items()
    }
    digest = hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{config.get('name', '?')} (config {digest})"


def finished(run_dir: Path) -> bool:
    """A run's record counts once its status says finished (an ensemble folder has no status)."""
    status = run_dir / "status.json"
    return not status.is_file() or read_json(status).get("state") == "finished"


def skipped(run_dir: Path, error: RecordError) -> None:
    """One unreadable record leaves its run out of the tables, saying so; the others still count."""
    print(f"warning: {run_dir} left out of the tables: {error}", file=sys.stderr)


def _config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def member_dir(ensemble_dir: Path, recorded: str) -> Path:
    """An ensemble member's run folder: where its evaluation.json says, or, once the records were
    moved (an evidence archive unpacked elsewhere), the folder of that name beside the ensemble's."""
    path = Path(recorded)
    moved = ensemble_dir.parent / path.parent.name / path.name
    return moved if not path.is_dir() and moved.is_dir() else path


def load_records(root: str | Path) -> pd.DataFrame:
    """One row per evaluation protocol of every finished run or ensemble under `root`."""
    rows = []
    for evaluation_path in sorted(Path(root).rglob("evaluation.json")):
        run_dir = evaluation_path.parent
        try:
            if not finished(run_dir):
                continue
            evaluation = read_json(evaluation_path)
        except RecordError as error:
            skipped(run_dir, error)
            continue
        members = [member_dir(run_dir, member["dir"]) for member in evaluation.get("runs", [])]
        if len(members) > 1:  # an ensemble (runs.evaluate_runs): its members' configs
            config = _config(members[0])
            name, seed, kind = run_dir.name, None, "ensemble"
            claim = "ensemble_5cnns" if name.startswith("ensemble") else ""
            experiment = f"{name} of {experiment_id(config)}"
        else:
            config = _config(run_dir) or (_config(members[0]) if members else {})
            ablation = config.get("ablation", {}) or {}
            name, kind = config.get("name", run_dir.parent.name), ablation.get("kind", "train")
            seed, claim = config.get("train", {}).get("seed"), ablation.get("claim", "")
            experiment = experiment_id(config)
        dataset = evaluation.get("dataset", config.get("data", {}).get("dataset", "?"))
        for protocol, result in evaluation.get("views", {}).items():
            rows.append(
                {
                    "run": str(run_dir),
                    "name": name,
                    "seed": seed,
                    "claim": claim,
                    "kind": kind,
                    "experiment": experiment,
                    "dataset": dataset,
                    "split": evaluation.get("split", "?"),
                    "source": evaluation.get("source", {}).get("label", NO_SOURCE),
                    "bundled": dataset in SMALL_DATASETS,
                    "protocol": protocol,
                    "images": result["images"],
                    "top1_error": result["top1_error"],
                    "top5_error": result["top5_error"],
                }
            )
    return pd.DataFrame(rows, columns=COLUMNS)


def training_runs(root: str | Path) -> list[Path]:
    """Run directories with an epochs.csv (training curves), sorted."""
    return sorted(path.parent for path in Path(root).rglob("epochs.csv"))


def find_record(root: str | Path, filename: str) -> Path | None:
    """The newest `filename` (figure1.json, lrn-cifar.json) under `root`, if any."""
    found = sorted(Path(root).rglob(filename), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def load_wandb_records(path: str, api=None) -> pd.DataFrame:
    """The finished runs of a W&B project ('entity/project') as `load_records` rows, from each run's
    config and the summary the tracker writes ('centre/top1_error', ...). Needs the network and a
    login (wandb.Api); `api` is for tests. A run's sweep is its W&B group."""
    if api is None:
        import wandb

        api = wandb.Api()
    rows = []
    for run in api.runs(path, filters={"state": "finished"}):
        config, summary = dict(run.config), dict(run.summary)
        data, ablation = config.get("data", {}), config.get("ablation", {}) or {}
        name, seed = config.get("name", run.name), config.get("train", {}).get("seed")
        dataset = data.get("dataset", "?")
        for protocol in ("centre", "ten_crop"):
            if f"{protocol}/top1_error" not in summary:
                continue
            rows.append(
                {
                    "run": f"wandb:{run.group or 'ungrouped'}/{name}/seed{seed}",
                    "name": name,
                    "seed": seed,
                    "claim": ablation.get("claim", ""),
                    "kind": ablation.get("kind", "train"),
                    "experiment": experiment_id(config),
                    "dataset": dataset,
                    "split": data.get("eval_split", "val"),
                    "source": summary.get("data_source", NO_SOURCE),
                    "bundled": dataset in SMALL_DATASETS,
                    "protocol": protocol,
                    "images": summary.get(f"{protocol}/images"),
                    "top1_error": summary[f"{protocol}/top1_error"],
                    "top5_error": summary[f"{protocol}/top5_error"],
                }
            )
    return pd.DataFrame(rows, columns=COLUMNS)
