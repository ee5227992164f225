"""`make report` (= `python -m analysis.report`): the tables and figures from the runs on disk.

It executes the notebooks of analysis/notebooks headlessly (nbclient); each notebook calls one
`make_*` function below and shows what it drew. Tables go to reports/tables (Markdown, LaTeX,
CSV), figures to reports/figures (PNG, PDF), the executed notebooks to reports/notebooks. A figure
whose runs do not exist yet is skipped with a message saying which command produces them.
Folders: ALEXNET_RUNS (default runs/) and ALEXNET_REPORTS (default reports/); ALEXNET_WANDB_PROJECT
('entity/project') adds that W&B project's finished runs to the tables (online only). It also redraws
the README's figures and ablation table from the records committed under analysis/results/
(ALEXNET_RESULTS: another copy of them), executes the notebooks in place on those records (so that
they are committed with their outputs), and ends by writing reports/index.html: every table and
figure with the command that made it (analysis/index_page.py).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import figures
from analysis.ablation_results import chart_data, write_sweep_results
from analysis.index_page import write_index
from analysis.records import find_record, load_records, training_runs
from analysis.summary import summarise
from analysis.tables import all_tables, markdown, write_table
from replicate.checkpoints import WEIGHT_KEYS, read_checkpoint

NOTEBOOKS = Path(__file__).resolve().parent / "notebooks"
RESULTS = Path(__file__).resolve().parent / "results"  # small records committed with the repository
ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def runs_dir() -> Path:
    return Path(os.environ.get("ALEXNET_RUNS", "runs"))


def reports_dir() -> Path:
    return Path(os.environ.get("ALEXNET_REPORTS", "reports"))


def results_dir() -> Path:
    """The committed records the README's figures are drawn from (ALEXNET_RESULTS: a copy elsewhere)."""
    return Path(os.environ.get("ALEXNET_RESULTS", RESULTS))


def figures_dir() -> Path:
    return reports_dir() / "figures"


def skipped(what: str, how: str) -> None:
    print(f"skipped {what}: {how}")


def make_tables() -> dict[str, pd.DataFrame]:
    """Also reads the W&B project named by ALEXNET_WANDB_PROJECT ('entity/project'), when set."""
    tables = all_tables(runs_dir(), os.environ.get("ALEXNET_WANDB_PROJECT"), results_dir())
    for name, table in tables.items():
        write_table(table, reports_dir() / "tables", name)
        print(f"## {name}\n{markdown(table)}\n")
    return tables


def make_training_curves() -> list[Path] | None:
    runs = training_runs(runs_dir())
    if not runs:
        return skipped(
            "training curves", "no run with epochs.csv (make replicate, or python -m replicate train)"
        )
    return figures.save(figures.training_curves(runs), "training_curves", figures_dir())


def make_figure1() -> list[Path] | None:
    record_path = find_record(runs_dir(), "figure1.json")
    if record_path is None:
        return skipped("Figure 1", "no figure1.json (make figure1)")
    record = json.loads(record_path.read_text())
    curves = pd.read_csv(record_path.parent / "curves.csv")
    return figures.save(figures.figure1(record, curves), "figure1", figures_dir())


def trained_run() -> Path | None:
    """The newest finished training run with a checkpoint (for Figures 3 and 4)."""
    candidates = [
        run
        for run in training_runs(runs_dir())
        if (run / "checkpoints" / "last.pt").is_file() and (run / "evaluation.json").is_file()
    ]
    return max(candidates, key=lambda run: (run / "evaluation.json").stat().st_mtime, default=None)


def make_figure3() -> list[Path] | None:
    run = trained_run()
    if run is None:
        return skipped("Figure 3", "no finished run with a checkpoint (make replicate)")
    state = read_checkpoint(run / "checkpoints" / "last.pt", WEIGHT_KEYS)["model"]
    figure, means = figures.figure3(state)
    print(f"{run}: mean colourfulness per column: {', '.join(f'{m:.3f}' for m in means)}")
    return figures.save(figure, "figure3_conv1_kernels", figures_dir())


def make_figure4(queries: int = 5, neighbours: int = 6, pool_limit: int = 5000) -> list[Path] | None:
    """Test images and their nearest training images by FC7 distance (§6.1), from the newest run;
    up to `pool_limit` training images are searched (evenly spaced through the store)."""
    from replicate import devices
    from replicate.data.loader import prepare
    from replicate.data.transforms import Augment
    from replicate.runs import run_config, trained_network

    run = trained_run()
    if run is None:
        return skipped("Figure 4", "no finished run with a checkpoint (make replicate)")
    config = run_config(run, ["speed.precision=fp32"])  # no TF32 convolutions on a GPU
    model, _ = trained_network(
        run, config, devices.resolve(devices.AUTO, "device")
    )  # wherever the report runs
    prepared = prepare(config.data)
    augment = Augment(config.data.augment, prepared.stats)
    train, test = prepared.train, prepared.eval
    labels = test.labels.tolist()
    picks = [labels.index(c) for c in sorted(set(labels))][:queries]  # one test image per class
    pool = np.linspace(0, len(train) - 1, min(pool_limit, len(train))).astype(int).tolist()
    nearest = figures.nearest(
        figures.fc7_of(model, test, augment, picks), figures.fc7_of(model, train, augment, pool), neighbours
    )
    names = prepared.class_names
    query_images = test.images(picks).numpy()
    neighbour_images = np.stack([train.images([pool[i] for i in row]).numpy() for row in nearest.tolist()])
    titles = [f"test: {names[labels[i]]}" for i in picks]
    print(f"{run}: {len(picks)} test images against {len(pool)} training images")
    return figures.save(
        figures.figure4(query_images, neighbour_images, titles), "figure4_neighbours", figures_dir()
    )


def make_ablation_chart() -> list[Path] | None:
    deltas, paper, refused = chart_data(load_records(runs_dir()))
    for variant, why in refused.items():  # runs that cannot be compared: the table says why
        print(f"ablation chart: {variant}: {why}")
    if not deltas:
        return skipped("the ablation chart", "no ablation runs (make ablations)")
    return figures.save(figures.ablation_chart(deltas, paper), "ablations", figures_dir())


def execute_notebooks(out: Path, runs: Path, reports: Path) -> int:
    """Execute every notebook of analysis/notebooks headlessly on the records under `runs` (tables and
    figures into `reports`), each written with its outputs into `out`; 1 if one failed."""
    try:
        import nbformat
        from nbclient import NotebookClient
        from nbclient.exceptions import CellExecutionError
    except ImportError as error:  # the figures and the page below are still made
        print(
            f"the notebooks (every table and figure of the runs) not executed: {error.name} is not "
            "installed (`make report` installs it into .venv; or pip install nbclient nbformat ipykernel)",
            file=sys.stderr,
        )
        return 1

    out.mkdir(parents=True, exist_ok=True)
    failed = []
    saved = {key: os.environ.get(key) for key in ("ALEXNET_RUNS", "ALEXNET_REPORTS")}
    os.environ.update({"ALEXNET_RUNS": str(runs), "ALEXNET_REPORTS": str(reports)})  # the kernel's
    try:
        for path in sorted(NOTEBOOKS.glob("*.ipynb")):
            notebook = nbformat.read(path, as_version=4)
            started = time.perf_counter()
            try:
                NotebookClient(
                    notebook,
                    timeout=1800,
                    kernel_name="python3",
                    record_timing=False,  # no timestamps: a notebook changes only with its outputs
                    resources={"metadata": {"path": str(ROOT)}},
                ).execute()
                status = "ok"
            except CellExecutionError as error:
                failed.append(path.name)
                status = f"FAILED: {str(error).strip().splitlines()[-1]}"
            nbformat.write(notebook, out / path.name)
            print(f"{path.name}: {status} ({time.perf_counter() - started:.0f} s)")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return 1 if failed else 0


def execute_committed_notebooks() -> int:
    """The notebooks of analysis/notebooks executed in place on the committed records
    (analysis/results), so that a reader sees their tables and figures where they are committed.
    Figures 3 and 4 need a checkpoint, which no committed record has: those say so."""
    with tempfile.TemporaryDirectory(prefix="committed-report-") as reports:
        return execute_notebooks(NOTEBOOKS, RESULTS, Path(reports))


def make_committed_figures() -> list[Path]:
    """The README's figures, redrawn from the records committed under analysis/results/."""
    drawn = []
    full = results_dir() / "figure1-full" / "figure1.json"
    if full.is_file():
        figure = figures.figure1(json.loads(full.read_text()), pd.read_csv(full.parent / "curves.csv"))
        drawn += figures.save(figure, "figure1", full.parent, formats=("png",))
    replicate = results_dir() / "ablations-bundled" / "baseline" / "seed0"  # what make replicate trains
    if (replicate / "epochs.csv").is_file():
        drawn += summarise(replicate, formats=("png",))[1][1:]
    readme = README if results_dir().resolve() == RESULTS.resolve() else None  # not from a copy
    for sweep in sorted(p for p in results_dir().glob("ablations-*") if p.is_dir()):
        drawn += write_sweep_results(sweep, readme)
    return drawn


def main() -> int:
    runs = runs_dir()
    code = 0
    if not runs.is_dir() or not any(runs.rglob("evaluation.json")) and not any(runs.rglob("figure1.json")):
        print(
            f"no runs under {runs}/ yet: only the README's figures are drawn. Make some first: `make "
            "replicate` (a training run), `make figure1`, `make lrn-cifar`, `make ablations`; or set "
            "ALEXNET_RUNS to a runs folder.",
            file=sys.stderr,
        )
    else:
        code = execute_notebooks(reports_dir() / "notebooks", runs, reports_dir())
    produced = sorted(p.name for p in figures_dir().glob("*.png")) if figures_dir().is_dir() else []
    print(
        f"figures in {figures_dir()}: {', '.join(produced) or 'none'}; tables in {reports_dir() / 'tables'}"
    )
    committed = make_committed_figures()
    print(f"the README's figures, from {results_dir()}: {', '.join(map(str, committed)) or 'none'}")
    if results_dir().resolve() == RESULTS.resolve():  # not from a copy elsewhere
        code = max(code, execute_committed_notebooks())
        print(f"the notebooks in {NOTEBOOKS}, executed on the committed records of {RESULTS}")
    print(f"the page: {write_index(reports_dir(), results_dir())}")
    return code


if __name__ == "__main__":
    sys.exit(main())
