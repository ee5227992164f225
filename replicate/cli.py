"""`python -m replicate <command>`: one entry point per task (the Makefile calls these)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

from replicate import gpu_evidence, speed, wandb_offline
from replicate.ablate import PRESETS, run_sweep
from replicate.bench import data as bench_data
from replicate.bench import network as bench_network
from replicate.bench import projection as bench_projection
from replicate.bench import winograd as bench_winograd
from replicate.checkpoints import CheckpointError
from replicate.cifar.figure1 import Figure1Config, run_figure1
from replicate.cifar.figure1 import table as figure1_table
from replicate.cifar.lrn import LrnCifarConfig, run_lrn_cifar
from replicate.cifar.lrn import table as lrn_cifar_table
from replicate.config import ConfigError, apply_overrides, from_dict, to_dict
from replicate.data.loader import prepare
from replicate.data.sources import DataError
from replicate.evaluate import evaluation_lines
from replicate.experiment import load_experiment, resolve_file
from replicate.model import AlexNet
from replicate.runs import evaluate_runs, run_config, train_or_resume
from replicate.tracking import RecordError, read_json
from replicate.train import TrainingError, default_run_dir, run_training

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="an experiments/*.yaml file (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. model.lrn=off")


def _split(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """A first positional with '=' is an override, not a config file."""
    if args.config and "=" in args.config:
        return None, [args.config, *args.overrides]
    return args.config, list(args.overrides)


def show_config(args: argparse.Namespace) -> int:
    config = load_experiment(*_split(args))
    print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
    return 0


def show_model(args: argparse.Namespace) -> int:
    """The network layer by layer: kernels or units and parameters, column by column."""
    config = load_experiment(*_split(args))
    model = AlexNet.from_config(config.model).eval()
    print(f"{'column':<8}{'layer':<8}{'kernels/units':>16}{'parameters':>14}")
    per_column = len(model.stages) + 2  # conv stages, FC6, FC7
    for index, (name, layer) in enumerate(model.named_layers()):
        column = "AB"[index // per_column] if name != "fc8" else "-"
        count = sum(p.numel() for p in layer.parameters())
        print(f"{column:<8}{name:<8}{layer.weight.shape[0]:>16,}{count:>14,}")
    total = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        logits = model(torch.zeros(1, 3, config.model.input_size, config.model.input_size))
    print(f"total parameters: {total:,}; output {tuple(logits.shape)}")
    return 0


def prepare_data(args: argparse.Namespace) -> int:
    """Preprocess the configured data set once (§2) and print what was stored."""
    config = load_experiment(*_split(args))
    prepared = prepare(config.data)
    for name, store in (("train", prepared.train), ("eval", prepared.eval)):
        size = store.manifest["bytes"] / 2**20
        print(
            f"{name}: {len(store):,} images, {len(store.classes)} classes, {size:,.0f} MiB in {store.folder}"
        )
        if store.manifest["skipped"]:
            print(f"  skipped {len(store.manifest['skipped'])} unreadable file(s): see manifest.json")
    stats = prepared.stats
    print("mean RGB of the mean image:", stats["mean_image"].mean(axis=(0, 1)).round(2).tolist())
    print("RGB covariance eigenvalues (0-255 scale):", stats["eigenvalues"].round(2).tolist())
    return 0


def train_command(args: argparse.Namespace) -> int:
    """Train a config, or continue a run with --resume RUN_DIR (its own config.yaml)."""
    if args.resume:
        if args.config or args.overrides:
            raise ConfigError(
                "--resume continues a run with its own config.yaml: give no config or overrides"
            )
        config = run_config(Path(args.resume))
    else:
        config = load_experiment(*_split(args))
    run_dir = run_training(config, args.resume or args.run_dir, resume=bool(args.resume))
    print(f"run finished: {run_dir}")  # its errors printed by run_training (rank 0 under torchrun)
    return 0


def evaluate_command(args: argparse.Namespace) -> int:
    """Evaluate runs (several: an ensemble averaging their softmax, §6)."""
    runs = [Path(p) for p in args.runs if "=" not in p]
    overrides = [p for p in args.runs if "=" in p]
    if not runs:
        raise ConfigError("evaluate needs at least one run directory")
    print(evaluation_lines(evaluate_runs(runs, args.views, args.weights, overrides, args.out)))
    return 0


def replicate(args: argparse.Namespace) -> int:
    """The whole pipeline: prepare, train (resuming an unfinished run), evaluate, print the errors
    (`python -m analysis.tables RUN_DIR` puts them beside the paper's: `make replicate` does)."""
    config_file, overrides = _split(args)
    full = any(o.startswith("data.root=") for o in overrides)
    preset = EXPERIMENTS / ("baseline.yaml" if full else "replicate-bundled.yaml")
    config = load_experiment(config_file or preset, (["data.dataset=ilsvrc2012"] if full else []) + overrides)
    run_dir = default_run_dir(config.name, config.train)
    if train_or_resume(config, run_dir) == "finished":  # else run_training printed the errors
        print(f"{run_dir} is finished; showing its results (delete it to train again)")
        print(evaluation_lines(read_json(run_dir / "evaluation.json")))
    print(f"run: {run_dir}")
    return 0


def _integers(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def ablate_command(args: argparse.Namespace) -> int:
    """The baseline and the ablations, every seed; finished runs skipped, unfinished resumed."""
    root = run_sweep(args.preset, args.seeds, args.overrides, args.only, args.records)
    print(f"sweep complete: {root}")
    return 0


def _section_config(args: argparse.Namespace, default: str, section: type):
    """A CIFAR-10 experiment's config: its file (or experiments/cifar10/<default>) with overrides."""
    config_file, overrides = _split(args)
    data = resolve_file(config_file or EXPERIMENTS / "cifar10" / default)
    try:
        return from_dict(section, apply_overrides(data, overrides))
    except ConfigError as error:
        raise ConfigError(f"{config_file or default}: {error}") from None


def figure1_command(args: argparse.Namespace) -> int:
    """Figure 1 (§3.1): ReLU vs tanh epochs to 25% CIFAR-10 training error."""
    print(figure1_table(run_figure1(_section_config(args, "figure1.yaml", Figure1Config))))
    return 0


def lrn_cifar_command(args: argparse.Namespace) -> int:
    """§3.3 on CIFAR-10: the four-layer net with and without response normalisation."""
    print(lrn_cifar_table(run_lrn_cifar(_section_config(args, "lrn.yaml", LrnCifarConfig))))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m replicate", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, handler, help_text in [
        ("config", show_config, "print the resolved config of an experiment"),
        ("model", show_model, "print the network's layers and parameter counts"),
        ("prepare", prepare_data, "preprocess the data set once into 256x256 stores (§2)"),
        ("train", train_command, "train a config (or --resume RUN_DIR)"),
        ("replicate", replicate, "the whole pipeline (make replicate)"),
        ("figure1", figure1_command, "Figure 1: ReLU vs tanh on CIFAR-10 (make figure1)"),
        ("lrn-cifar", lrn_cifar_command, "§3.3: CIFAR-10 test error with and without LRN (make lrn-cifar)"),
    ]:
        sub = commands.add_parser(name, help=help_text)
        _config_arguments(sub)
        sub.set_defaults(handler=handler)
        if name == "train":
            sub.add_argument("--resume", metavar="RUN_DIR", help="continue this run exactly where it stopped")
            sub.add_argument(
                "--run-dir", help="where the run goes (default: <train.runs_dir>/<name>/seed<seed>)"
            )
    evaluation = commands.add_parser("evaluate", help="evaluate runs; several form an ensemble (§6)")
    evaluation.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_DIR|key=value",
        help="run directories (several: an ensemble) and overrides of their config, e.g. "
        "train.device=cpu (default: the run's own, auto: the GPU when there is one) or data.eval_split=test",
    )
    evaluation.add_argument(
        "--views", nargs="+", default=["centre", "ten_crop"], choices=["centre", "ten_crop"]
    )
    evaluation.add_argument("--weights", default="last", choices=["last", "best"])
    evaluation.add_argument("--out", type=Path, help="where evaluation.json goes")
    evaluation.set_defaults(handler=evaluate_command)
    ablation = commands.add_parser("ablate", help="the paper's ablations, configs x seeds (make ablations)")
    ablation.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every run")
    ablation.add_argument("--preset", default="bundled", choices=list(PRESETS))
    ablation.add_argument("--seeds", type=_integers, default=[0, 1, 2], help="comma-separated, e.g. 0,1,2")
    ablation.add_argument(
        "--only",
        type=lambda text: text.split(","),
        metavar="NAME[,NAME...]",
        help="these ablation configs only",
    )
    ablation.add_argument(
        "--records",
        type=Path,
        help="where each finished run's records go (default: analysis/results/ablations-<preset>, or "
        "<runs_dir>/ablations-<preset>/records when overrides change what the runs compute)",
    )
    ablation.set_defaults(handler=ablate_command)
    # Commands with parsers of their own: the rest of the command line goes to their main().
    own_parsers = {
        "bench-data": (bench_data.main, "data pipeline images/s against torchvision's"),
        "bench": (bench_network.main, "network training and 10-crop images/s against torchvision's alexnet"),
        "bench-winograd": (bench_winograd.main, "Winograd against direct convolution on conv2-conv5"),
        "project": (
            bench_projection.main,
            "hours for 90 epochs of ILSVRC-2012 from bench and bench-data records",
        ),
        "sync-wandb": (wandb_offline.main, "a sweep's offline W&B runs (its records) uploaded to W&B"),
        "gpu-evidence": (gpu_evidence.main, "on one GPU: its tests, benchmarks, the sweep and the report"),
    }
    for name, (_, help_text) in own_parsers.items():
        commands.add_parser(name, help=help_text, add_help=False)
    args, rest = parser.parse_known_args(argv)
    speed.keep_freed_memory()  # before the first large tensor: see its docstring
    try:
        if args.command in own_parsers:
            return own_parsers[args.command][0](rest)
        if rest and hasattr(args, "overrides") and not any(item.startswith("-") for item in rest):
            args.overrides += rest  # key=value after an option (argparse ends a positional there)
        elif rest:
            parser.error(f"unrecognised arguments: {' '.join(rest)}")
        return args.handler(args)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    except DataError as error:
        print(f"data error: {error}", file=sys.stderr)
        return 2
    except CheckpointError as error:
        print(f"checkpoint error: {error}", file=sys.stderr)
        return 2
    except RecordError as error:
        print(f"record error: {error}", file=sys.stderr)
        return 2
    except TrainingError as error:
        print(f"training stopped: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stopped:
        print(interrupted_message(args.command, stopped), file=sys.stderr)
        return 143 if getattr(stopped, "signal_name", "") == "SIGTERM" else 130


def interrupted_message(command: str, stopped: KeyboardInterrupt) -> str:
    """What was kept and how to go on, after SIGINT (Ctrl-C) or SIGTERM."""
    run_dir = getattr(stopped, "run_dir", None)
    by = getattr(stopped, "signal_name", "SIGINT")
    if run_dir is None:
        return f"stopped by {by}: preprocessing keeps its progress; the same command goes on from it"
    if command == "train":
        how = f"`python -m replicate train --resume {run_dir}`"
    else:  # replicate, ablate: they resume their unfinished runs themselves
        how = "the same command again (it resumes the run)"
    return f"stopped by {by}: {run_dir} saved a checkpoint; continue with {how}"
