"""Run records as tables: every run directory (config.yaml + evaluation.json) under a runs folder,
and the ensemble evaluations, one row per (run, protocol). Read only what runs wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import yaml

BUNDLED_DATASETS = {"imagenette"}  # the 10-class subset that ships with the project
COLUMNS = [
    "run", "name", "seed", "claim", "kind", "dataset", "split", "bundled", "protocol", "images",
    "top1_error", "top5_error",
]  # fmt: skip


def _config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def load_records(root: str | Path) -> pd.DataFrame:
    """One row per evaluation protocol of every finished run or ensemble under `root`."""
    rows = []
    for evaluation_path in sorted(Path(root).rglob("evaluation.json")):
        run_dir = evaluation_path.parent
        evaluation = json.loads(evaluation_path.read_text())
        members = [Path(member["dir"]) for member in evaluation.get("runs", [])]
        if len(members) > 1:  # an ensemble (runs.evaluate_runs): its members' configs
            config = _config(members[0])
            name, seed, kind = run_dir.name, None, "ensemble"
            claim = "ensemble_5cnns" if name.startswith("ensemble") else ""
        else:
            config = _config(run_dir) or (_config(members[0]) if members else {})
            ablation = config.get("ablation", {}) or {}
            name, kind = config.get("name", run_dir.parent.name), ablation.get("kind", "train")
            seed, claim = config.get("train", {}).get("seed"), ablation.get("claim", "")
        dataset = evaluation.get("dataset", config.get("data", {}).get("dataset", "?"))
        for protocol, result in evaluation.get("views", {}).items():
            rows.append(
                {
                    "run": str(run_dir),
                    "name": name,
                    "seed": seed,
                    "claim": claim,
                    "kind": kind,
                    "dataset": dataset,
                    "split": evaluation.get("split", "?"),
                    "bundled": dataset in BUNDLED_DATASETS,
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
                    "dataset": dataset,
                    "split": data.get("eval_split", "val"),
                    "bundled": dataset in BUNDLED_DATASETS,
                    "protocol": protocol,
                    "images": summary.get(f"{protocol}/images"),
                    "top1_error": summary[f"{protocol}/top1_error"],
                    "top5_error": summary[f"{protocol}/top5_error"],
                }
            )
    return pd.DataFrame(rows, columns=COLUMNS)
