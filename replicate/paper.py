"""The paper's numbers (paper/claims.yaml), for tables that put them beside measured ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

CLAIMS_FILE = Path(__file__).resolve().parents[1] / "paper" / "claims.yaml"
LAB_NOTEBOOK_FILE = CLAIMS_FILE.with_name("lab_notebook.yaml")
LAB_PROTOCOLS = {"ten_crop": "10 crops", "centre": "centre crop", "unstated": "protocol not stated"}


def load_claims(path: str | Path = CLAIMS_FILE) -> dict[str, Any]:
    """The whole claims file: results (Tables 1, 2), ablations, figure1, cifar10_lrn, training."""
    with open(path) as file:
        return yaml.safe_load(file)


def paper_result(result_id: str, claims: dict[str, Any] | None = None) -> dict[str, Any]:
    """One row of Table 1 or 2 by id (e.g. 'table2_1cnn')."""
    rows = (claims or load_claims())["results"]
    for row in rows:
        if row["id"] == result_id:
            return row
    raise KeyError(f"no paper result {result_id!r}; known: {', '.join(r['id'] for r in rows)}")


def load_lab_notebook(path: str | Path = LAB_NOTEBOOK_FILE) -> list[dict[str, Any]]:
    """The 2012 code's recorded runs (paper/lab_notebook.yaml), one dict per run."""
    with open(path) as file:
        return yaml.safe_load(file)["records"]


def lab_record(compares_with: str, records: list[dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """The 2012 run recorded for a paper row or ablation id, if any."""
    return next((r for r in records or load_lab_notebook() if r.get("compares_with") == compares_with), None)


def lab_delta(compares_with: str, records: list[dict[str, Any]] | None = None) -> tuple[float, float] | None:
    """(top-1, top-5) error change of an ablation in the 2012 runs: the variant minus its baseline."""
    records = records or load_lab_notebook()
    variant = lab_record(compares_with, records)
    if variant is None or "baseline" not in variant:
        return None
    base = next(r for r in records if r["id"] == variant["baseline"])
    return variant["top1_error"] - base["top1_error"], variant["top5_error"] - base["top5_error"]
