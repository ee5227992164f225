"""`python -m replicate ablate`: the paper's design comparisons, configs x seeds, as one sweep.

Every config in experiments/ablations/ names the claim it tests (paper/claims.yaml). A sweep runs
the baseline and each ablation for each seed under <runs_dir>/<sweep>/<name>/seed<k>, one W&B
group per sweep. As each run finishes, its small records (`RECORD_FILES`, never a checkpoint) are
copied to <records>/<name>/seed<k>/: analysis/results/ablations-<preset>/ in the checkout, to be
committed. A run is skipped when its record is there with the same settings, or when it is finished
in runs_dir; an unfinished one is resumed. So the sweep continues after any interruption, on this
machine from its runs, on another from the committed records alone. Comparisons that need no
training of their own are computed from the baseline's records: centre crop vs 10 crops from its
evaluation.json, the ensemble of seeds from its predictions.npz.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from replicate.config import ConfigError, describe_differences, from_dict, read_yaml, to_dict
from replicate.evaluate import errors_from_probabilities, read_predictions
from replicate.experiment import ExperimentConfig, load_experiment, resolve_file
from replicate.paper import load_claims
from replicate.runs import SAME_EXPERIMENT, other_experiment, train_or_resume
from replicate.tracking import RecordError, read_json, wandb_choice, write_json

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
RESULTS = ROOT / "analysis" / "results"
PRESETS = ("bundled", "gpu", "full")
# What a finished run leaves that is worth keeping: small, and enough for every table and figure.
RECORD_FILES = (
    "config.yaml", "environment.json", "status.json", "epochs.csv", "evaluation.json", "predictions.npz",
)  # fmt: skip
OPTIONAL_RECORD_FILES = ("steps.csv",)  # none where a run is shorter than train.log_every steps
# Keys that say where and how often a run writes, not what it computes: a record of another machine
# counts as the same run whatever they were there.
WHERE_AND_HOW_OFTEN = ("train.runs_dir", "train.checkpoint_every", "train.log_every", "train.keep_best")
WANDB_ARCHIVE = "wandb-offline.tar.gz"
WANDB_ARCHIVE_LIMIT = 25 * 2**20  # larger archives are not kept beside the records


def ablation_files(only: list[str] | None = None) -> list[Path]:
    """The ablation configs in the order of their claims in paper/claims.yaml, whose first ones the
    paper measured: an interrupted sweep has filled those rows first. `only`: these, in its order."""
    files = {f.stem: f for f in (EXPERIMENTS / "ablations").glob("*.yaml")}
    if only:
        unknown = [name for name in only if name not in files]
        if unknown:
            raise ConfigError(f"no ablation config {unknown[0]!r}; known: {', '.join(sorted(files))}")
        return [files[name] for name in dict.fromkeys(only)]
    claims = [claim["id"] for claim in load_claims()["ablations"]]

    def place(path: Path) -> tuple[int, str]:
        claim = (read_yaml(path).get("ablation") or {}).get("claim")
        return (claims.index(claim) if claim in claims else len(claims), path.stem)

    return sorted(files.values(), key=place)


def preset_overrides(preset: str) -> list[str]:
    """The preset file as dotted key=value overrides (applied over every config)."""
    if preset not in PRESETS:
        raise ConfigError(f"preset {preset!r}: expected one of {list(PRESETS)}")
    preset_file = read_yaml(EXPERIMENTS / "presets" / f"{preset}.yaml")
    return [f"{key}={json.dumps(value)}" for key, value in _flat(preset_file).items()]


def default_records(preset: str, overrides: list[str], root: Path) -> Path:
    """Where a sweep's records go: analysis/results/ablations-<preset> for the preset as it is, and
    beside its runs (<root>/records) when overrides change what the runs compute, so that no record
    of other settings lands among the committed ones."""
    changed = [o for o in other_experiment(list(overrides)) if not o.startswith(WHERE_AND_HOW_OFTEN)]
    return root / "records" if changed else RESULTS / f"ablations-{preset}"


def _what_it_computes(config: dict) -> dict:
    """A config without the keys that cannot change a run's numbers (`SAME_EXPERIMENT`, ...)."""
    ignored = (*SAME_EXPERIMENT, *WHERE_AND_HOW_OFTEN)
    return {key: value for key, value in _flat(config).items() if not key.startswith(ignored)}


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def recorded(config: ExperimentConfig, record: Path) -> bool:
    """Whether `record` holds this run finished (every record file there, its status finished). A
    record of the same run under other settings is an error: it would be counted as this one."""
    if not (record / "status.json").is_file():
        return False
    try:
        theirs = from_dict(ExperimentConfig, resolve_file(record / "config.yaml"))
    except (ConfigError, OSError) as error:
        raise RecordError(f"{record}: its config.yaml cannot be read ({error})") from None
    described = describe_differences(_what_it_computes(to_dict(theirs)), _what_it_computes(to_dict(config)))
    if described:
        raise RecordError(
            f"{record} holds this run under other settings ({described}): move it away to run it anew "
            "with these, or pass --records DIR to keep this sweep's records elsewhere"
        )
    missing = [name for name in RECORD_FILES if not (record / name).is_file()]
    return read_json(record / "status.json").get("state") == "finished" and not missing


def save_record(run_dir: Path, record: Path) -> None:
    """Copy a finished run's small records to `record`, whole or not at all (a folder renamed into
    place); then its offline W&B run into the sweep's archive."""
    missing = [name for name in RECORD_FILES if not (run_dir / name).is_file()]
    if missing:
        raise RecordError(f"{run_dir}: finished, but without {', '.join(missing)}: train it again")
    record.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{record.name}-", dir=record.parent))
    staging.chmod(0o755)  # a record folder like any other (mkdtemp makes it private)
    for name in RECORD_FILES + OPTIONAL_RECORD_FILES:
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, staging / name)
    if record.exists():  # an unfinished record of an earlier attempt
        shutil.rmtree(record)
    os.replace(staging, record)
    add_wandb_run(run_dir, record.parents[1] / WANDB_ARCHIVE, f"{record.parent.name}-{record.name}")
    print(f"record: {record}")


def add_wandb_run(run_dir: Path, archive: Path, name: str) -> None:
    """Add the run's offline W&B run to `archive` under `name`/, replacing what it held under that
    name; kept only while the archive is under 25 MB. Of a resumed run's folders
    (<run_dir>/wandb/offline-run-<time>-<id>) the last alone: it logged the whole history again
    (`Tracker.replay_record`)."""
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))[-1:]
    if not offline:
        return
    archive.parent.mkdir(parents=True, exist_ok=True)
    with open(archive.with_name(f".{archive.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # sweeps of several seeds side by side share the archive
        _add_to_archive(offline, archive, name, run_dir)


def _add_to_archive(offline: list[Path], archive: Path, name: str, run_dir: Path) -> None:
    partial = archive.with_name(archive.name + ".partial")
    with tarfile.open(partial, "w:gz") as out:
        if archive.is_file():
            with tarfile.open(archive, "r:gz") as before:
                for member in before.getmembers():
                    if member.isfile() and not member.name.startswith(f"{name}/"):
                        out.addfile(member, before.extractfile(member))
        for folder in offline:  # its debug logs left out: `wandb sync` needs none of them
            out.add(folder, arcname=f"{name}/{folder.name}", filter=_without_debug_logs)
    if partial.stat().st_size > WANDB_ARCHIVE_LIMIT:
        partial.unlink()
        print(f"W&B: {archive} would pass 25 MB with {name}; its offline run stays in {run_dir / 'wandb'}")
        return
    os.replace(partial, archive)


def _without_debug_logs(member: tarfile.TarInfo) -> tarfile.TarInfo | None:
    """Plain files and folders only (W&B links its debug logs), and no debug logs."""
    logs = "/logs/" in member.name or member.name.endswith("/logs")
    return member if (member.isfile() or member.isdir()) and not logs else None


def ensure_trained(config: ExperimentConfig, run_dir: Path, record: Path, log: list[dict]) -> None:
    """Train `config` into `run_dir` unless its record says it is finished; resume it if it has a
    checkpoint; then copy its records to `record`."""
    if recorded(config, record):
        print(f"skip (recorded): {record}")
        log.append({"run": str(run_dir), "action": "skipped", "record": str(record)})
        return
    action = train_or_resume(config, run_dir, own_process=True)
    if action == "finished":
        print(f"skip (finished): {run_dir}")
    save_record(run_dir, record)
    log.append({"run": str(run_dir), "action": "skipped" if action == "finished" else action})


def ensemble_record(members: list[Path], out: Path) -> dict:
    """§6's ensemble from its members' records: each image's softmax averaged over the members, for
    each protocol, into out/evaluation.json (no checkpoint needed). The members must have been
    evaluated on the same images in the same order, with the same classes."""
    saved = [read_predictions(m / "predictions.npz") for m in members]
    evaluations = [read_json(m / "evaluation.json") for m in members]
    for member, theirs, evaluation in zip(members[1:], saved[1:], evaluations[1:], strict=True):
        if not np.array_equal(theirs["labels"], saved[0]["labels"]):
            raise RecordError(f"{member}: its predictions are of other images than {members[0]}'s")
        if evaluation.get("classes") != evaluations[0].get("classes"):
            raise RecordError(f"{member}: trained on other classes than {members[0]}")
    views = [v for v in evaluations[0]["views"] if all(v in s for s in saved)]
    results = {
        view: errors_from_probabilities(np.mean([s[view] for s in saved], axis=0), saved[0]["labels"])
        for view in views
    }
    shared = ("dataset", "split", "source", "weights", "precision", "data", "classes")
    record = {
        **{key: evaluations[0][key] for key in shared},
        "runs": [{"record": str(m), **e["runs"][0]} for m, e in zip(members, evaluations, strict=True)],
        "devices": sorted({e["device"] for e in evaluations}),
        "views": results,
        "computed_from": "the members' predictions.npz: softmax averaged over members (§6)",
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "evaluation.json", record)
    return record


def run_sweep(
    preset: str,
    seeds: list[int],
    overrides: list[str] = (),
    only: list[str] | None = None,
    records: Path | None = None,
) -> Path:
    """Run the baseline and the ablations (or `only` these) for every seed; returns the sweep dir.
    `records`: where each finished run's records go (default: `default_records`)."""
    sweep = f"ablations-{preset}"
    extra = preset_overrides(preset) + [f"tracking.group={sweep}", *overrides]
    baseline = load_experiment(EXPERIMENTS / "baseline.yaml", extra)
    wandb_choice(baseline.tracking)  # online without an API key: an error before the first run
    root = Path(baseline.train.runs_dir) / sweep
    records = Path(records) if records else default_records(preset, list(overrides), root)
    print(f"runs: {root}\nrecords: {records}")
    configs = [load_experiment(path, extra) for path in ablation_files(only)]
    ensemble_seeds = max(
        [c.ablation.ensemble_size for c in configs if c.ablation.kind == "ensemble"], default=0
    )
    baseline_seeds = sorted(set(seeds) | set(range(ensemble_seeds)))
    log: list[dict] = []
    for seed in baseline_seeds:
        config = replace(baseline, train=replace(baseline.train, seed=seed))
        place = f"{baseline.name}/seed{seed}"
        ensure_trained(config, root / place, records / place, log)
    # The ensemble as soon as its members are recorded; the trained ablations after it.
    for config in sorted(configs, key=lambda c: c.ablation.kind != "ensemble"):
        if config.ablation.kind == "train":
            for seed in seeds:
                seeded = replace(config, train=replace(config.train, seed=seed))
                place = f"{config.name}/seed{seed}"
                ensure_trained(seeded, root / place, records / place, log)
        elif config.ablation.kind == "ensemble":
            out = records / config.name
            members = [records / baseline.name / f"seed{s}" for s in range(config.ablation.ensemble_size)]
            ensemble_record(members, out)  # cheap: recomputed, so it always matches its members
            print(f"ensemble: {out / 'evaluation.json'}")
            log.append({"run": str(out), "action": "evaluated"})
        # kind "views": the baseline runs' evaluation.json already holds both protocols.
    root.mkdir(parents=True, exist_ok=True)  # every run recorded: nothing else made it
    write_json(
        root / "sweep.json",
        {
            "preset": preset,
            "seeds": seeds,
            "overrides": list(overrides),
            "configs": [c.name for c in configs],
            "records": str(records),
            "log": log,
        },
    )
    return root
