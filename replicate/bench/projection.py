"""`python -m replicate project`: hours for the paper's 90 epochs of ILSVRC-2012 (§5), from measured rates.

Inputs are the JSON records of `bench --json` (the network's training and 10-crop rates on one
device) and `bench-data --json` (the input pipeline's rates on that machine). Per epoch:

    training:   1,281,167 images / min(network rate x N x scaling, pipeline rate x N)
    validation: 50,000 centre crops / (10-crop rate x 10 x N)  (the per-epoch validation of §5's
                schedule; a centre crop is one view, a 10-crop image ten)
    all-reduce: steps x 2 (N-1)/N x 244 MB of fp32 gradients / interconnect bandwidth (DDP, N > 1)

N GPUs under torchrun: each process trains on 1/N of every epoch at the one-GPU rate (the global
batch is N x 128). The pipeline is assumed to scale with the GPUs (one machine's CPU cores per
GPU, as measured); the interconnect bandwidth is an assumption, printed with the result.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from pathlib import Path

from replicate.bench import records as bench_records
from replicate.bench.arguments import positive_number

ILSVRC2012_TRAIN = 1_281_167
ILSVRC2012_VAL = 50_000
EPOCHS = 90  # §5: "roughly 90 cycles"
PAPER_DAYS = (5, 6)  # §5: "five to six days on two NVIDIA GTX 580 3GB GPUs"
GRADIENT_BYTES = 60_965_224 * 4  # every parameter's fp32 gradient, all-reduced each step
PIPELINES = ("steady_raw", "steady_raw_device", "steady_jpeg", "steady_jpeg_device", "gpu_jpeg")


@dataclass(frozen=True)
class Projection:
    gpus: int
    train_rate: float  # images/s of the whole job, after the input-pipeline bound
    bound_by: str  # "network" or "input pipeline"
    hours: float


def project(
    network_rate: float,
    ten_crop_rate: float,
    pipeline_rate: float,
    gpus: int,
    batch: int = 128,
    bandwidth_gb_s: float = 300.0,
) -> Projection:
    """Hours for 90 epochs on `gpus` GPUs from one GPU's rates (images/s)."""
    compute, feed = network_rate * gpus, pipeline_rate * gpus
    rate, bound = (compute, "network") if compute <= feed else (feed, "input pipeline")
    steps = ILSVRC2012_TRAIN / (batch * gpus)
    all_reduce = 0.0 if gpus == 1 else steps * 2 * (gpus - 1) / gpus * GRADIENT_BYTES / (bandwidth_gb_s * 1e9)
    validation = ILSVRC2012_VAL / (ten_crop_rate * 10 * gpus)
    epoch = ILSVRC2012_TRAIN / rate + all_reduce + validation
    return Projection(gpus, rate, bound, EPOCHS * epoch / 3600)


def gpu_counts(text: str) -> list[int]:
    """`--gpus 1,2,4,8` as numbers, each at least 1."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected whole numbers separated by commas") from None
    if min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every GPU count must be at least 1")
    return counts


def median_rates(bench: dict, data: dict, contender: str, pipeline: str) -> tuple[float, float, float]:
    rates = bench["rates"]
    return (
        statistics.median(rates["train"][contender]),
        statistics.median(rates["ten_crop"][contender]),
        statistics.median(data[pipeline]),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m replicate project",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("bench", type=Path, nargs="+", help="JSON files written by `bench --json`")
    parser.add_argument("--data", type=Path, required=True, help="JSON file written by `bench-data --json`")
    parser.add_argument(
        "--contender",
        default=bench_records.PER_COLUMN,
        help="whose rates, of the bench records' contenders (default: the training default's path)",
    )
    parser.add_argument(
        "--pipeline",
        default="steady_raw_device",
        help="which measured input pipeline feeds the GPU: steady_raw_device (default: raw store, views "
        "cut on the GPU, as data.augment_on=auto does there), steady_raw (raw store, views cut by CPU "
        "workers: data.augment_on=workers), "
        "steady_jpeg (JPEG store, CPU decode), steady_jpeg_device (JPEG store decoded and views cut on "
        "the GPU: data.decode_on=device), gpu_jpeg (older records: nvjpeg decode and crop alone)",
    )
    parser.add_argument("--gpus", type=gpu_counts, default="1,2,4,8", help="comma-separated GPU counts")
    parser.add_argument("--bandwidth", type=positive_number, default=300.0, help="all-reduce GB/s (assumed)")
    args = parser.parse_args(argv)
    try:  # every record read and checked before anything is printed
        data = bench_records.read(args.data, "python -m replicate bench-data", bench_records.DATA_KEYS)
        benches = [
            bench_records.read(path, "python -m replicate bench", bench_records.BENCH_KEYS)
            for path in args.bench
        ]
    except bench_records.RecordError as error:
        parser.error(str(error))
    if args.pipeline not in data:
        measured = [k for k in PIPELINES if k in data]
        parser.error(f"--pipeline {args.pipeline}: not measured in {args.data} (it has {measured})")
    for path, bench in zip(args.bench, benches, strict=True):
        contenders = bench["rates"].get("train", {})
        if args.contender not in contenders:
            parser.error(f"--contender {args.contender!r}: not in {path} (it has {list(contenders)})")
    print(
        f"input pipeline: {args.pipeline}, {data['workers']} workers, median "
        f"{statistics.median(data[args.pipeline]):.0f} images/s; all-reduce at {args.bandwidth:g} GB/s "
        f"(assumed); paper: {PAPER_DAYS[0]}-{PAPER_DAYS[1]} days on two GTX 580"
    )
    for bench in benches:
        network, ten_crop, pipeline = median_rates(bench, data, args.contender, args.pipeline)
        print(
            f"{bench['device']}; {bench['options']}; {args.contender}: train {network:.0f} img/s, "
            f"10-crop {ten_crop:.0f} img/s"
        )
        for gpus in args.gpus:
            result = project(network, ten_crop, pipeline, gpus, bench["batch"], args.bandwidth)
            print(
                f"  {gpus} GPU(s): {result.hours:5.1f} h for {EPOCHS} epochs "
                f"({result.train_rate:,.0f} img/s, bound by the {result.bound_by})"
            )
    return 0
