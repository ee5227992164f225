"""`make gpu-evidence OUT=dir` (= `python -m analysis.evidence OUT`): in one call on one GPU, what a
CPU cannot show, every record under OUT:

1. the GPU-only tests (`pytest -m gpu`, OUT/gpu-tests.xml);
2. the headline `bench` lines (OUT/bench/): every default (fp32), the Triton LRN in fp32 (whether
   it beats the torch LRN that `speed.lrn_kernel=auto` takes on a GPU), and the fastest path the H100
   records measured (bf16 autocast, channels-last, torch.compile);
3. the bundled ablation sweep under `--preset gpu` (experiments/presets/gpu.yaml): the baseline and
   every ablation of experiments/ablations/, seeds 0-2 (and baseline seeds 3-4 for the 5-CNN
   ensemble), OUT/runs. The seeds train side by side, one process each sharing the GPU, after the
   data is prepared once;
4. `make report` on those runs: OUT/report/ (tables, figures, index.html).

Before the first step it prints the projected time from the H100 records of analysis/benchmarks/h100
(`projection`). Each step is its own process with its log in OUT/logs/; a failed step is recorded
and the later ones still run, so nothing measured is lost. OUT/evidence.json records each step's
command, seconds and exit status. `--smoke` runs every step at toy size (CI, on any CPU): the GPU
tests skip, `bench --smoke`, the baseline and no_lrn for two seeds on 2 images per class; the bench
lines that need a GPU are recorded as skipped.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from replicate.ablate import preset_overrides
from replicate.bench.records import PER_COLUMN, origin
from replicate.bench.records import read as read_bench_record
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


@dataclass
class Step:
    name: str
    commands: list[list[str]]  # run side by side; the step fails if any fails
    env: dict[str, str] = field(default_factory=dict)
    needs_gpu: bool = False


def gpu_preset() -> dict:
    return yaml.safe_load((ROOT / "experiments" / "presets" / "gpu.yaml").read_text())


def ablation_names() -> list[str]:
    return sorted(path.stem for path in (ROOT / "experiments" / "ablations").glob("*.yaml"))


def training_runs() -> int:
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
    runs = training_runs()
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
    sweep = [python, "-m", "replicate", "ablate", "--preset", "gpu", f"train.runs_dir={runs}"]
    sweep += SMOKE_SWEEP if smoke else []
    seeds = SEEDS[:2] if smoke else SEEDS
    side_by_side = ["no_lrn"] if smoke else [name for name in ablation_names() if name != ENSEMBLE]
    rest = ["--only", "no_lrn"] if smoke else []
    tests = [python, "-m", "pytest", "-m", "gpu", "-rs", "-p", "no:cacheprovider"]
    # once, before the side-by-side processes would each build the same store
    prepare = [python, "-m", "replicate", "prepare", "experiments/baseline.yaml", *preset_overrides("gpu")]
    return [
        Step("gpu tests", [[*tests, f"--junitxml={out / 'gpu-tests.xml'}"]]),
        *(
            Step(
                f"bench {name}",
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
        Step("prepare the data", [prepare + (SMOKE_SWEEP if smoke else [])]),
        Step(
            "sweep, seeds side by side",
            [[*sweep, "--seeds", str(seed), "--only", ",".join(side_by_side)] for seed in seeds],
        ),
        Step("sweep, the rest", [[*sweep, "--seeds", ",".join(map(str, seeds)), *rest]]),
        Step(
            "report",
            [[python, "-m", "analysis.report"]],
            env={"ALEXNET_RUNS": str(runs), "ALEXNET_REPORTS": str(out / "report")},
        ),
    ]


def run_step(step: Step, logs: Path, gpu: bool) -> dict:
    """Run `step`'s commands side by side, each logging to logs/<step>-<k>.log; its record."""
    if step.needs_gpu and not gpu:
        print(f"== {step.name}: skipped (needs a GPU)", flush=True)
        return {"step": step.name, "skipped": "needs a GPU"}
    print(f"== {step.name}", flush=True)
    started = time.perf_counter()
    slug = step.name.replace(" ", "-").replace(",", "")
    paths = [logs / f"{slug}-{k}.log" for k in range(len(step.commands))]
    files = [open(path, "w") for path in paths]  # noqa: SIM115 (closed below, after every process)
    try:
        processes = [
            subprocess.Popen(
                command, cwd=ROOT, stdout=file, stderr=subprocess.STDOUT, env={**os.environ, **step.env}
            )
            for command, file in zip(step.commands, files, strict=True)
        ]
        codes = [process.wait() for process in processes]
    finally:
        for file in files:
            file.close()
    seconds = time.perf_counter() - started
    failed = [str(path) for path, code in zip(paths, codes, strict=True) if code != 0]
    print(f"   {'FAILED, see ' + ', '.join(failed) if failed else 'ok'} ({seconds:.0f} s)", flush=True)
    return {
        "step": step.name,
        "commands": [" ".join(map(str, command)) for command in step.commands],
        "seconds": round(seconds, 1),
        "exit_codes": codes,
        "logs": [str(path) for path in paths],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.evidence",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out", type=Path, help="the folder every record, log, table and figure goes to")
    parser.add_argument("--smoke", action="store_true", help="every step at toy size (CI, any CPU)")
    args = parser.parse_args(argv)
    import torch

    gpu = torch.cuda.is_available()
    if not gpu and not args.smoke:
        parser.error("no GPU here: the evidence is a GPU run (--smoke runs its steps at toy size on the CPU)")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"{args.out} is a file: give a folder")
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    projected, lines = projection()
    print("\n".join(lines), flush=True)
    record = {
        **origin(),
        "device": torch.cuda.get_device_name(0) if gpu else "cpu",
        "smoke": args.smoke,
        "projected_seconds": round(projected),
        "steps": [],
    }
    started = time.perf_counter()
    for step in steps(args.out, args.smoke):
        record["steps"].append(run_step(step, logs, gpu))
        record["seconds"] = round(time.perf_counter() - started, 1)
        write_json(args.out / "evidence.json", record)  # after every step: a later failure loses nothing
    failed = [s["step"] for s in record["steps"] if any(s.get("exit_codes", []))]
    print(
        f"evidence in {args.out}: {record['seconds'] / 60:.1f} min (projected: >= {projected / 60:.1f}); "
        + (f"FAILED: {', '.join(failed)}" if failed else "every step ok")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
