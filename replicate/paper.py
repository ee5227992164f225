"""The paper's numbers (paper/claims.yaml), for tables that put them beside measured ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

CLAIMS_FILE = Path(__file__).resolve().parents[1] / "paper" / "claims.yaml"


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
