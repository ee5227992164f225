"""`make gpu-evidence OUT=dir` (= `python -m replicate gpu-evidence OUT`): in one call on one GPU,
what a CPU cannot show, every record under OUT:

1. the GPU-only tests (`pytest -m gpu`, OUT/gpu-tests.xml);
2. the headline `bench` lines (OUT/bench/): every default (fp32), the Triton LRN in fp32 (whether
   it beats the torch LRN that `speed.lrn_kernel=auto` takes on a GPU), and the fastest path the H100
   records measured (bf16 autocast, channels-last, torch.compile);
3. the bundled ablation sweep under `--preset gpu` (experiments/presets/gpu.yaml): the baseline and
   every ablation of experiments/ablations/, seeds 0-2 (and baseline seeds 3-4 for the 5-CNN
   ensemble), OUT/runs, each finished run's small records in OUT/ablations-gpu (copied to
   analysis/results/ablations-gpu they are committed as the CPU sweep's are). The seeds train side
   by side, one process each sharing the GPU, after the data is prepared once;
4. `make report` on those runs: OUT/report/ (tables, figures, index.html), and the sweep's
   ablation table and chart into OUT/ablations-gpu.

Before the first step it prints the projected time from the H100 records of analysis/benchmarks/h100
(`projection`). Each step is its own process with its log in OUT/logs/; a failed step is recorded
and the later ones still run, so nothing measured is lost. OUT/evidence.json records each step's
command, seconds and exit status, and every call made into OUT. Last, OUT/evidence-records.tar.gz
packs every file under OUT but the checkpoints: the small records to carry back from a rented GPU
(`--unpack` extracts it safely; `make report` with ALEXNET_RUNS on its runs/ redraws the tables).

`--steps tests,bench,sweep,report` runs only those steps. `--minutes M` bounds the call's wall time:
a step still running when the time left is only what the report needs is stopped as Ctrl-C stops it
(a training run saves a checkpoint), later steps are skipped, and the report is made of what
finished. Called again with the same OUT, a call skips the steps an earlier call finished and resumes
the sweep where it stopped (`ablate` skips finished runs and resumes interrupted ones).

`--smoke` runs every step at toy size (CI, on any CPU): the GPU tests skip, `bench --smoke`, the
baseline and no_lrn for two seeds on 2 images per class; the bench lines that need a GPU are
recorded as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from replicate.ablate import preset_overrides
from replicate.bench.records import PER_COLUMN, origin
from replicate.bench.records import read as read_bench_record
from replicate.data.sources import DataError, safe_extract
from replicate.tracking import write_json

ROOT = Path(__file__).resolve().parents[1]
H100 = ROOT / "analysis" / "benchmarks" / "h100"
SEEDS = (0, 1, 2)
ENSEMBLE = "ensemble_5cnns"  # its baseline seeds 3 and 4 train after the side-by-side seeds
BENCH_LINES = {
    "fp32": ["--precision", "fp32"],
    "fp32-triton-lrn": ["--precision", "fp32", "--lrn-kernel", "triton"],
    "bf16-cl-compile": ["--precision", "bf16", "--channels-last", "--compile"],
}
# The smoke sweep: 2 images per class, one epoch, on the plain torch paths a GPU takes by default
# (on a CPU the default compiled kernels would be built anew in every process).
SMOKE_SWEEP = [
    "data.limit_per_class=2", "data.batch_size=8", "data.workers=0", "train.epochs=1",
    "train.eval_batch_size=20", "train.final_views=[centre,ten_crop]",
    "speed.lrn_kernel=torch", "speed.conv_algorithm=direct",
]  # fmt: skip
SMOKE_BENCH = ["--smoke", "--lrn-kernel", "torch", "--conv-algorithm", "direct"]
# Fixed costs the records cannot give (assumed, printed with the projection): the GPU tests, one bench
# line (warm-up and compilation included), a run's start and end (network, loader, checkpoint), the report.
ASSUMED_SECONDS = {"tests": 120, "bench line": 60, "run overhead": 8, "report": 60}
BUNDLED_TRAIN, BUNDLED_VAL = 5_000, 1_500  # images of the bundled Imagenette subset
GROUPS = ("tests", "bench", "sweep", "report")  # what --steps selects, in the order they run
# Under --minutes: how long a stopped step's processes get to save their work (a training run writes
# its checkpoint after the step in progress) before they are killed; and the time kept for packing.
STOP_GRACE_S, PACK_S = 30, 15
ARCHIVE = "evidence-records.tar.gz"
NOT_PACKED = (".pt", ".partial")  # checkpoints (hundreds of MB each), files still being written


@dataclass
class Step:
    name: str
    group: str  # one of GROUPS
    commands: list[list[str]]  # run side by side; the step fails if any fails
    env: dict[str, str] = field(default_factory=dict)
    needs_gpu: bool = False


def gpu_preset() -> dict:
    return yaml.safe_load((ROOT / "experiments" / "presets" / "gpu.yaml").read_text())


def ablation_names() -> list[str]:
    return sorted(path.stem for path in (ROOT / "experiments" / "ablations").glob("*.yaml"))


def sweep_run_count() -> int:
    """Runs the gpu sweep trains: the baseline's 5 seeds and each trained ablation's 3."""
    trained = 0
    for name in ablation_names():
        kind = yaml.safe_load((ROOT / "experiments" / "ablations" / f"{name}.yaml").read_text())["ablation"]
        trained += kind.get("kind", "train") == "train"
    return 5 + len(SEEDS) * trained


def projection(record_dir: Path = H100) -> tuple[float, list[str]]:
    """Seconds the full (not smoke) evidence is projected to take on an H100 if the side-by-side seeds
    share the GPU perfectly (the lower bound), and the lines giving both bounds and how."""
    bench = read_bench_record(record_dir / "fp32.json", "python -m replicate bench", ("rates", "device"))
    train_rate = statistics.median(bench["rates"]["train"][PER_COLUMN])
    ten_crop_rate = statistics.median(bench["rates"]["ten_crop"][PER_COLUMN])  # images of 10 views
    centre_rate = ten_crop_rate * 10
    epochs = gpu_preset()["train"]["epochs"]
    epoch = BUNDLED_TRAIN / train_rate + BUNDLED_VAL / centre_rate
    run = (
        epochs * epoch
        + BUNDLED_VAL / centre_rate
        + BUNDLED_VAL / ten_crop_rate
        + ASSUMED_SECONDS["run overhead"]
    )
    runs = sweep_run_count()
    ensemble = 5 * BUNDLED_VAL / ten_crop_rate
    # the side-by-side seeds: from perfect sharing of the GPU (each seed's runs as if alone) to none
    shared = ((runs - 2) / len(SEEDS) + 2) * run + ensemble
    alone = runs * run + ensemble
    fixed = (
        ASSUMED_SECONDS["tests"]
        + len(BENCH_LINES) * ASSUMED_SECONDS["bench line"]
        + ASSUMED_SECONDS["report"]
    )
    lines = [
        f"projected from {record_dir.relative_to(ROOT)}/fp32.json ({bench['device']}, fp32, per-column net): "
        f"train {train_rate:.0f} images/s, 10-crop {ten_crop_rate:.0f} images/s",
        f"sweep: {runs} runs x {epochs} epochs of {BUNDLED_TRAIN:,} images, {run:.0f} s a run alone; "
        f"{len(SEEDS)} seeds side by side: {shared / 60:.1f} min if they share the GPU perfectly, "
        f"{alone / 60:.1f} min if not at all",
        f"assumed: {', '.join(f'{k} {v} s' for k, v in ASSUMED_SECONDS.items())}; "
        f"total {(fixed + shared) / 60:.1f} to {(fixed + alone) / 60:.1f} min",
    ]
    total = fixed + shared
    return total, lines


def steps(out: Path, smoke: bool) -> list[Step]:
    python = sys.executable
    runs = out / "runs"
    records = out / "ablations-gpu"  # as analysis/results/ablations-bundled holds the CPU sweep's
    sweep = [python, "-m", "replicate", "ablate", "--preset", "gpu", "--records", str(records)]
    sweep += [f"train.runs_dir={runs}"]
    sweep += SMOKE_SWEEP if smoke else []
    seeds = SEEDS[:2] if smoke else SEEDS
    side_by_side = ["no_lrn"] if smoke else [name for name in ablation_names() if name != ENSEMBLE]
    rest = ["--only", "no_lrn"] if smoke else []
    tests = [python, "-m", "pytest", "-m", "gpu", "-rs", "-p", "no:cacheprovider"]
    # once, before the side-by-side processes would each build the same store
    prepare = [python, "-m", "replicate", "prepare", "experiments/baseline.yaml", *preset_overrides("gpu")]
    return [
        Step("gpu tests", "tests", [[*tests, f"--junitxml={out / 'gpu-tests.xml'}"]]),
        *(
            Step(
                f"bench {name}",
                "bench",
                [
                    [
                        python,
                        "-m",
                        "replicate",
                        "bench",
                        *flags,
                        *(SMOKE_BENCH if smoke else ["--steps", "10"]),
                    ]
                    + ["--json", str(out / "bench" / f"{name}.json")]
                ],
                needs_gpu=name != "fp32",  # the GPU's lines: the Triton LRN, and compiled bf16
            )
            for name, flags in BENCH_LINES.items()
        ),
        Step("prepare the data", "sweep", [prepare + (SMOKE_SWEEP if smoke else [])]),
        Step(
            "sweep, seeds side by side",
            "sweep",
            [[*sweep, "--seeds", str(seed), "--only", ",".join(side_by_side)] for seed in seeds],
        ),
        Step("sweep, the rest", "sweep", [[*sweep, "--seeds", ",".join(map(str, seeds)), *rest]]),
        Step(
            "report",
            "report",
            [[python, "-m", "analysis.report"]],
            # its ablation table and chart into OUT/ablations-gpu; the checkout's README untouched
            env={
                "ALEXNET_RUNS": str(runs),
                "ALEXNET_REPORTS": str(out / "report"),
                "ALEXNET_RESULTS": str(out),
            },
        ),
    ]


def run_step(
    step: Step,
    logs: Path,
    gpu: bool,
    deadline: float = float("inf"),
    call: int = 1,
    time_is_up: Callable[[], bool] | None = None,
) -> dict:
    """Run `step`'s commands side by side, each logging to logs/call<call>-<step>-<k>.log; its record.
    Processes still running at `deadline` (time.monotonic), or once `time_is_up()` says so where it
    is given, get SIGINT, as Ctrl-C, and are killed STOP_GRACE_S later if they have not exited."""
    if time_is_up is None:

        def time_is_up() -> bool:
            return time.monotonic() >= deadline

    if step.needs_gpu and not gpu:
        print(f"== {step.name}: skipped (needs a GPU)", flush=True)
        return {"step": step.name, "skipped": "needs a GPU"}
    print(f"== {step.name}", flush=True)
    started = time.monotonic()
    slug = step.name.replace(" ", "-").replace(",", "")
    paths = [logs / f"call{call}-{slug}-{k}.log" for k in range(len(step.commands))]
    files = [open(path, "w") for path in paths]  # noqa: SIM115 (closed below, after every process)
    stopped_at = None
    try:
        processes = [
            subprocess.Popen(
                command, cwd=ROOT, stdout=file, stderr=subprocess.STDOUT, env={**os.environ, **step.env}
            )
            for command, file in zip(step.commands, files, strict=True)
        ]
        while any(process.poll() is None for process in processes):
            now = time.monotonic()
            if stopped_at is None and time_is_up():
                stopped_at = now
                for process in processes:
                    if process.poll() is None:
                        process.send_signal(signal.SIGINT)
            elif stopped_at is not None and now >= stopped_at + STOP_GRACE_S:
                for process in processes:
                    if process.poll() is None:
                        process.kill()
            time.sleep(0.2)
        codes = [process.wait() for process in processes]
    finally:
        for file in files:
            file.close()
    seconds = time.monotonic() - started
    failed = [str(path) for path, code in zip(paths, codes, strict=True) if code != 0]
    if stopped_at is not None:
        outcome = f"STOPPED after {stopped_at - started:.0f} s: the time given ran out"
    else:
        outcome = "FAILED, see " + ", ".join(failed) if failed else "ok"
    print(f"   {outcome} ({seconds:.0f} s)", flush=True)
    record = {
        "step": step.name,
        "commands": [" ".join(map(str, command)) for command in step.commands],
        "seconds": round(seconds, 1),
        "exit_codes": codes,
        "logs": [str(path) for path in paths],
    }
    if stopped_at is not None:
        record["stopped"] = f"by the time limit, after {stopped_at - started:.0f} s"
    return record


def finished_ok(record: dict) -> bool:
    return bool(record.get("exit_codes")) and not any(record["exit_codes"]) and "stopped" not in record


def unfinished_runs(out: Path) -> list[str]:
    """The sweep's run folders whose status is not `finished` (interrupted, failed, still running)."""
    unfinished = []
    for path in sorted((out / "runs").rglob("status.json")):
        state = json.loads(path.read_text()).get("state")
        if state != "finished":
            unfinished.append(f"{path.parent.relative_to(out)} ({state})")
    return unfinished


def pack(out: Path) -> tuple[Path, int]:
    """OUT/ARCHIVE: every plain file under `out` but checkpoints and partial files (no links: W&B
    links its debug logs, and the unpacking refuses links); written atomically."""
    archive = out / ARCHIVE
    partial = archive.with_name(archive.name + ".partial")
    files = [
        path
        for path in sorted(out.rglob("*"))
        if path.is_file() and not path.is_symlink() and path != archive and not path.name.endswith(NOT_PACKED)
    ]
    with tarfile.open(partial, "w:gz") as tar:
        for path in files:
            tar.add(path, arcname=path.relative_to(out).as_posix(), recursive=False)
    partial.replace(archive)
    return archive, len(files)


def unpack(archive: Path, destination: Path) -> Path:
    """Extract an evidence archive into the new folder `destination`, refusing unsafe members."""
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise DataError(f"{destination} exists and is not an empty folder: give a new one to unpack into")
    if not archive.is_file():
        raise DataError(f"{archive}: no such archive (make gpu-evidence writes OUT/{ARCHIVE})")
    safe_extract(archive, destination)
    (destination / ".complete").unlink()  # safe_extract's marker: not one of the records
    return destination


def previous_record(out: Path, smoke: bool) -> dict | None:
    """OUT/evidence.json of an earlier call into OUT, which this call continues."""
    path = out / "evidence.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{path} is not a readable evidence record ({error}): give another folder") from None
    if record.get("smoke") != smoke:
        kind = "a smoke" if record.get("smoke") else "a full"
        raise DataError(f"{out} holds {kind} evidence run: give another folder")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m replicate gpu-evidence",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit status: 0 every step ok; 1 a step failed; 2 a usage error; "
        "3 stopped by --minutes (call again with the same OUT to finish)",
    )
    parser.add_argument("out", type=Path, help="the folder every record, log, table and figure goes to")
    parser.add_argument("--smoke", action="store_true", help="every step at toy size (CI, any CPU)")
    every = ",".join(GROUPS)
    parser.add_argument("--steps", default=every, help=f"which steps, comma-separated (default: {every})")
    parser.add_argument("--minutes", type=float, help="the call's wall-time limit (default: none)")
    parser.add_argument(
        "--unpack", type=Path, metavar="ARCHIVE", help=f"extract ARCHIVE ({ARCHIVE}) into OUT, nothing else"
    )
    args = parser.parse_args(argv)
    if args.unpack:
        try:
            print(f"unpacked into {unpack(args.unpack, args.out)}")
        except DataError as error:
            parser.error(str(error))
        return 0
    groups = [group.strip() for group in args.steps.split(",") if group.strip()]
    if unknown := sorted(set(groups) - set(GROUPS)):
        parser.error(f"--steps: no step {unknown[0]!r}; the steps: {', '.join(GROUPS)}")
    if args.minutes is not None and args.minutes <= 0:
        parser.error("--minutes must be positive")
    import torch

    gpu = torch.cuda.is_available()
    if not gpu and not args.smoke:
        parser.error("no GPU here: the evidence is a GPU run (--smoke runs its steps at toy size on the CPU)")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"{args.out} is a file: give a folder")
    try:
        previous = previous_record(args.out, args.smoke)
    except DataError as error:
        parser.error(str(error))
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    projected, lines = projection()
    print("\n".join(lines), flush=True)
    started = time.monotonic()
    end = started + args.minutes * 60 if args.minutes else float("inf")
    # the time kept, under --minutes, for stopping the work in hand, the report and the archive
    work_deadline = end - PACK_S - ("report" in groups) * (ASSUMED_SECONDS["report"] + STOP_GRACE_S)
    earlier = {s["step"]: s for s in (previous or {}).get("steps", [])}
    calls = (previous or {}).get("calls", [])
    call = len(calls) + 1
    record = {
        **origin(),
        "device": torch.cuda.get_device_name(0) if gpu else "cpu",
        "smoke": args.smoke,
        "projected_seconds": round(projected),
        "calls": [*calls, {"steps": groups, "minutes": args.minutes}],
        "steps": [],
    }
    for step in steps(args.out, args.smoke):
        done = earlier.get(step.name)
        if step.group not in groups or (step.group != "report" and done and finished_ok(done)):
            if done:
                print(f"== {step.name}: {'done in an earlier call' if finished_ok(done) else 'not run now'}")
                record["steps"].append(done)
            continue
        deadline = end - PACK_S if step.group == "report" else work_deadline
        if time.monotonic() >= deadline:
            print(f"== {step.name}: skipped (out of time)", flush=True)
            record["steps"].append({"step": step.name, "skipped": "out of time (--minutes)"})
        else:
            record["steps"].append({**run_step(step, logs, gpu, deadline, call), "call": call})
        record["calls"][-1]["seconds"] = round(time.monotonic() - started, 1)
        write_json(args.out / "evidence.json", record)  # after every step: a later failure loses nothing
    unfinished = unfinished_runs(args.out)
    record["unfinished_runs"] = unfinished
    record["calls"][-1]["seconds"] = round(time.monotonic() - started, 1)
    write_json(args.out / "evidence.json", record)
    archive, packed = pack(args.out)
    failed = [s["step"] for s in record["steps"] if any(s.get("exit_codes", [])) and "stopped" not in s]
    incomplete = [
        s["step"] for s in record["steps"] if "stopped" in s or "out of time" in s.get("skipped", "")
    ]
    print(
        f"evidence in {args.out}: {record['calls'][-1]['seconds'] / 60:.1f} min this call "
        f"(projected for all of it: >= {projected / 60:.1f}); "
        + (f"FAILED: {', '.join(failed)}" if failed else "no step failed")
        + (f"; not finished in the time given: {', '.join(incomplete)}" if incomplete else "")
    )
    if unfinished:
        print(f"unfinished runs ({len(unfinished)}): {', '.join(unfinished)}")
    if incomplete or unfinished:
        again = " ".join(["python -m replicate gpu-evidence", *(sys.argv[1:] if argv is None else argv)])
        print(f"the same command with the same OUT finishes them: {again}")
    print(f"records: {archive} ({packed} files, {archive.stat().st_size / 2**20:.1f} MiB, no checkpoints)")
    return 1 if failed else 3 if incomplete else 0


if __name__ == "__main__":
    raise SystemExit(main())
