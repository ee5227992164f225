"""`python -m replicate ablate`: the paper's design comparisons, configs x seeds, as one sweep.

Every config in experiments/ablations/ names the claim it tests (paper/claims.yaml). A sweep runs
the baseline and each ablation for each seed under <runs_dir>/<sweep>/<name>/seed<k>, one W&B
group per sweep; a finished run is skipped and an unfinished one resumed, so the command can be
run again after any interruption. Comparisons that need no training of their own (centre crop vs
10 crops, the ensemble of baseline seeds) are computed from the baseline's runs.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from replicate.config import ConfigError, read_yaml
from replicate.experiment import ExperimentConfig, load_experiment
from replicate.runs import evaluate_runs, train_or_resume
from replicate.tracking import wandb_choice, write_json

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
PRESETS = ("bundled", "gpu", "full")


def ablation_files(only: list[str] | None = None) -> list[Path]:
    files = sorted((EXPERIMENTS / "ablations").glob("*.yaml"))
    if only:
        known = {f.stem for f in files}
        unknown = sorted(set(only) - known)
        if unknown:
            raise ConfigError(f"no ablation config {unknown[0]!r}; known: {', '.join(sorted(known))}")
        files = [f for f in files if f.stem in only]
    return files


def preset_overrides(preset: str) -> list[str]:
    """The preset file as dotted key=value overrides (applied over every config)."""
    if preset not in PRESETS:
        raise ConfigError(f"preset {preset!r}: expected one of {list(PRESETS)}")

    def flatten(data: dict, prefix: str = "") -> list[str]:
        items = []
        for key, value in data.items():
            if isinstance(value, dict):
                items += flatten(value, f"{prefix}{key}.")
            else:
                items.append(f"{prefix}{key}={json.dumps(value)}")
        return items

    return flatten(read_yaml(EXPERIMENTS / "presets" / f"{preset}.yaml"))


def ensure_trained(config: ExperimentConfig, run_dir: Path, log: list[dict]) -> None:
    """Train `config` into `run_dir` unless finished there; resume it if it has a checkpoint."""
    action = train_or_resume(config, run_dir)
    if action == "finished":
        print(f"skip (finished): {run_dir}")
    log.append({"run": str(run_dir), "action": "skipped" if action == "finished" else action})


def run_sweep(
    preset: str, seeds: list[int], overrides: list[str] = (), only: list[str] | None = None
) -> Path:
    """Run the baseline and the ablations (or `only` these) for every seed; returns the sweep dir."""
    sweep = f"ablations-{preset}"
    extra = preset_overrides(preset) + [f"tracking.group={sweep}", *overrides]
    baseline = load_experiment(EXPERIMENTS / "baseline.yaml", extra)
    wandb_choice(baseline.tracking)  # online without an API key: an error before the first run
    root = Path(baseline.train.runs_dir) / sweep
    configs = [load_experiment(path, extra) for path in ablation_files(only)]
    ensemble_seeds = max(
        [c.ablation.ensemble_size for c in configs if c.ablation.kind == "ensemble"], default=0
    )
    baseline_seeds = sorted(set(seeds) | set(range(ensemble_seeds)))
    log: list[dict] = []
    for seed in baseline_seeds:
        config = replace(baseline, train=replace(baseline.train, seed=seed))
        ensure_trained(config, root / baseline.name / f"seed{seed}", log)
    for config in configs:
        if config.ablation.kind == "train":
            for seed in seeds:
                seeded = replace(config, train=replace(config.train, seed=seed))
                ensure_trained(seeded, root / config.name / f"seed{seed}", log)
        elif config.ablation.kind == "ensemble":
            out = root / config.name
            if (out / "evaluation.json").is_file():
                print(f"skip (finished): {out}")
                continue
            members = [root / baseline.name / f"seed{s}" for s in range(config.ablation.ensemble_size)]
            evaluate_runs(members, ["centre", "ten_crop"], out=out)
            log.append({"run": str(out), "action": "evaluated"})
        # kind "views": the baseline runs' evaluation.json already holds both protocols.
    write_json(
        root / "sweep.json",
        {
            "preset": preset,
            "seeds": seeds,
            "overrides": list(overrides),
            "configs": [c.name for c in configs],
            "log": log,
        },
    )
    return root
