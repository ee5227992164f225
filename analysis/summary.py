"""`python -m analysis.summary RUN_DIR`, the last step of `make replicate`: a finished run's errors
beside the paper's (printed, and written as RUN_DIR/replication_table.md) and its learning curve
(training loss and validation top-1 error per epoch, the learning-rate drops marked), drawn beside
them as RUN_DIR/learning_curve.png and .pdf."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from analysis import figures
from analysis.tables import markdown, replication_table
from replicate.tracking import RecordError


def summarise(run_dir: Path, formats: tuple[str, ...] = ("png", "pdf")) -> tuple[str, list[Path]]:
    """The table as Markdown, and the files written: the table, then the figure in each format."""
    table = markdown(replication_table(run_dir))
    table_path = run_dir / "replication_table.md"
    table_path.write_text(table + "\n")
    classes = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["num_classes"]
    curve = figures.training_curves([run_dir], chance=100 * (1 - 1 / classes))
    return table, [table_path, *figures.save(curve, "learning_curve", run_dir, formats)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.summary", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="a finished run (its evaluation.json and epochs.csv)")
    args = parser.parse_args(argv)
    for needed in ("evaluation.json", "epochs.csv", "config.yaml"):
        if not (args.run_dir / needed).is_file():
            parser.error(f"{args.run_dir}: no {needed} (is it a finished run's folder?)")
    try:
        table, paths = summarise(args.run_dir)
    except RecordError as error:
        parser.exit(2, f"error: {error}\n")
    print(table)
    print(f"table: {paths[0]}\nlearning curve: {paths[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
