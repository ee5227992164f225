"""reports/index.html, the page `make report` ends with: every table and figure it made, and the
README's figures drawn from the records committed in analysis/results/, each with the command that
made it, and links to the executed notebooks. One self-contained HTML file: tables inline, figures
as links to their PNG (relative paths, so the folder can be moved together with the repository)."""

from __future__ import annotations

import html
import os
from pathlib import Path

import pandas as pd

REPORT = "make report (python -m analysis.report)"
# What produced the runs behind each table and figure of reports/, by file stem.
SOURCES = {
    "table1": "make replicate DATA=/path/to/ILSVRC2010 (baseline runs)",
    "table2": "make replicate DATA=/path/to/ILSVRC2012; make ablations DATA=... (the 5-CNN ensemble)",
    "ablations": "make ablations (or make gpu-evidence)",
    "cifar10": "make figure1; make lrn-cifar",
    "training_curves": "make replicate, make ablations or python -m replicate train",
    "figure1": "make figure1",
    "figure3_conv1_kernels": "make replicate (the newest finished run's conv1 kernels)",
    "figure4_neighbours": "make replicate (the newest finished run's FC7 features)",
}
# The README's figures, drawn by `make report` from the records committed under analysis/results/.
COMMITTED = {
    "figure1-full/figure1.png": "make figure1 PRESET=full (its records: figure1.json, curves.csv)",
    "ablations-bundled/baseline/seed0/learning_curve.png": "make replicate, or make ablations for the "
    "baseline, seed 0 (its records: epochs.csv, steps.csv)",
}


def _link(path: Path, page_dir: Path) -> str:
    return html.escape(Path(os.path.relpath(path, page_dir)).as_posix())


def _section(title: str, made_by: str, body: str) -> str:
    return (
        f"<section><h3>{html.escape(title)}</h3><p class='cmd'>made by: <code>{html.escape(made_by)}</code>"
        f"</p>{body}</section>"
    )


def write_index(reports: Path, results: Path) -> Path:
    """reports/index.html from what lies in reports/{tables,figures,notebooks} and `results`."""
    reports.mkdir(parents=True, exist_ok=True)
    none_yet = (
        "<p>none yet: make replicate, make figure1, make lrn-cifar or make ablations, then make report</p>"
    )
    tables = sorted((reports / "tables").glob("*.csv"))
    parts = ["<h2>Tables</h2>", "" if tables else none_yet]
    for csv in tables:
        table = pd.read_csv(csv).to_html(index=False, na_rep="", border=0)
        formats = " ".join(
            f"<a href='{_link(csv.with_suffix(s), reports)}'>{s[1:]}</a>"
            for s in (".md", ".tex", ".csv")
            if csv.with_suffix(s).is_file()
        )
        made_by = f"{REPORT}, from the runs of {SOURCES.get(csv.stem, 'the runs folder')}"
        parts.append(_section(csv.stem, made_by, f"<p>{formats}</p>{table}"))
    pngs = sorted((reports / "figures").glob("*.png"))
    parts += ["<h2>Figures</h2>", "" if pngs else none_yet]
    for png in pngs:
        made_by = f"{REPORT}, from the runs of {SOURCES.get(png.stem, 'the runs folder')}"
        link = _link(png, reports)
        parts.append(_section(png.stem, made_by, f"<a href='{link}'><img src='{link}' alt='{png.stem}'></a>"))
    committed = [(results / name, how) for name, how in COMMITTED.items() if (results / name).is_file()]
    if committed:
        parts.append("<h2>The README's figures (records committed in analysis/results/)</h2>")
    for path, how in committed:
        link = _link(path, reports)
        made_by = f"{how}; redrawn by {REPORT}"
        parts.append(
            _section(path.parent.name, made_by, f"<a href='{link}'><img src='{link}' alt='{path.stem}'></a>")
        )
    notebooks = sorted((reports / "notebooks").glob("*.ipynb"))
    if notebooks:
        items = "".join(
            f"<li><a href='{_link(n, reports)}'>{html.escape(n.name)}</a></li>" for n in notebooks
        )
        parts.append(f"<h2>Executed notebooks</h2><ul>{items}</ul>")
    page = reports / "index.html"
    page.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>alexnet-2012 report</title><style>"
        "body{font-family:sans-serif;max-width:70em;margin:auto}img{max-width:100%}"
        "table{border-collapse:collapse;font-size:85%}td,th{border:1px solid #ccc;padding:2px 6px}"
        ".cmd{color:#555}</style></head><body><h1>alexnet-2012: tables and figures</h1>"
        + "".join(parts)
        + "</body></html>\n"
    )
    return page
