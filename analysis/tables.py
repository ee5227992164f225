"""Paper-vs-measured tables from run records (evaluation.json); nothing is filled in by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from replicate.paper import paper_result

# Which paper row a measurement is compared with, by data set and split.
PAPER_ROW = {("ilsvrc2012", "val"): "table2_1cnn", ("ilsvrc2010", "test"): "table1_cnn"}
VIEW_NAMES = {"centre": "centre crop", "ten_crop": "10 crops"}


def replication_table(run_dir: str | Path) -> pd.DataFrame:
    """The paper's error beside this run's, one row per protocol, each row saying what it measured."""
    evaluation = json.loads((Path(run_dir) / "evaluation.json").read_text())
    dataset, split = evaluation["dataset"], evaluation["split"]
    comparable = (dataset, split) in PAPER_ROW
    paper = paper_result(PAPER_ROW.get((dataset, split), "table2_1cnn"))
    rows = [
        {
            "source": f"paper ({paper['section']}, {paper['model']}, {paper['dataset']} {paper['split']})",
            "protocol": "10 crops (§4.1)",
            "top-1 error %": paper["top1_error"],
            "top-5 error %": paper["top5_error"],
        }
    ]
    for views, result in evaluation["views"].items():
        where = (
            f"{dataset} {split}"
            if comparable
            else (f"{dataset} {split}: bundled subset, NOT comparable with the paper")
        )
        rows.append(
            {
                "source": f"measured ({where}, {result['images']} images)",
                "protocol": VIEW_NAMES.get(views, views),
                "top-1 error %": round(result["top1_error"], 2),
                "top-5 error %": round(result["top5_error"], 2),
            }
        )
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame) -> str:
    """A Markdown table (without pandas' optional `tabulate` dependency)."""
    header = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body])
