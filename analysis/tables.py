"""Paper-vs-measured tables from run records (evaluation.json); nothing is filled in by hand."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from analysis.records import NO_SOURCE, find_record, load_records, load_wandb_records
from analysis.stats import Estimate, mean_ci, paired_deltas
from replicate.paper import LAB_PROTOCOLS, lab_delta, lab_record, load_claims, paper_result
from replicate.tracking import RecordError, read_json

# Which paper row a measurement is compared with, by data set and split.
PAPER_ROW = {("ilsvrc2012", "val"): "table2_1cnn", ("ilsvrc2010", "test"): "table1_cnn"}
VIEW_NAMES = {"centre": "centre crop", "ten_crop": "10 crops"}


def replication_table(run_dir: str | Path) -> pd.DataFrame:
    """The paper's error beside this run's, one row per protocol, each row saying what it measured."""
    evaluation = read_json(Path(run_dir) / "evaluation.json")
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
    source = evaluation.get("source", {}).get("label", NO_SOURCE)
    for views, result in evaluation["views"].items():
        where = f"{dataset} {split}, {source}" + ("" if comparable else ": NOT comparable with the paper")
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


# --- Tables 1 and 2, the ablation table, the CIFAR-10 results -------------------

PROTOCOLS = ("ten_crop", "centre")  # the paper's protocol first (§4.1)
BASELINE_MODELS = {"table1_cnn", "table2_1cnn"}  # rows measured by this repository's baseline runs
ENSEMBLE_MODELS = {"table2_5cnns": "ensemble_5cnns"}


def _where(row: pd.Series) -> str:
    """What a row measured on: the data set and split, and which copy of it (`source`)."""
    where = f"{row['dataset']} {row['split']} ({row['source']}"
    return where + (": NOT comparable with the paper)" if row["bundled"] else ")")


def _errors(records: pd.DataFrame, column: str) -> Estimate:
    return mean_ci(list(records[column]))


def experiments(records: pd.DataFrame) -> list[pd.DataFrame]:
    """`records` split into experiments: one data set, split and source, one config but for the seed
    (records.experiment_id). Only rows of one experiment may be pooled into a mean."""
    keys = ["dataset", "split", "source", "experiment"]
    return [group for _, group in records.groupby(keys, sort=True)] if not records.empty else []


def refusal(group: pd.DataFrame) -> str | None:
    """Why the runs of one experiment cannot be pooled (a seed measured by two runs), or None."""
    runs = group.drop_duplicates("run")
    repeated = runs[runs["seed"].notna() & runs["seed"].duplicated(keep=False)]
    if repeated.empty:
        return None
    seed = repeated.iloc[0]["seed"]
    twins = sorted(repeated[repeated["seed"] == seed]["run"])
    return f"refused: seed {seed} measured by {len(twins)} runs ({', '.join(twins)})"


def paper_table(records: pd.DataFrame, table: int, claims: dict | None = None) -> pd.DataFrame:
    """Table 1 (ILSVRC-2010 test) or Table 2 (ILSVRC-2012 val): the paper's rows, each with the
    measured error (mean ± 95% CI over the seeds of one experiment, n) per protocol, or "not run";
    and, for Table 2, the runs on the 10-class subset, labelled as not comparable. Runs of different
    configs or data sources are never pooled: each experiment has rows of its own."""
    claims = claims or load_claims()
    rows = []
    baseline = records[(records["claim"] == "") & (records["kind"] == "train")]
    ensembles = records[records["kind"] == "ensemble"]
    for paper in (r for r in claims["results"] if r["table"] == table):
        dataset, split = paper["dataset"], paper["split"]
        if paper["id"] in BASELINE_MODELS:
            measured = baseline
        elif paper["id"] in ENSEMBLE_MODELS:
            measured = ensembles
        else:
            measured = records.iloc[0:0]
        found = measured[(measured["dataset"] == dataset) & (measured["split"] == split)]
        base = {"model": paper["model"], "section": paper["section"], "data": f"{dataset} {split}"}
        if found.empty:
            rows.append(
                {
                    **base,
                    **_paper_columns(paper),
                    "experiment": "-",
                    "protocol": "-",
                    "measured top-1 %": "not run",
                    "measured top-5 %": "not run",
                    "Δ top-1": "",
                    "Δ top-5": "",
                    "n": 0,
                }
            )
        groups = experiments(found)
        if table == 2 and paper["id"] in BASELINE_MODELS | set(ENSEMBLE_MODELS):  # the subset, labelled
            groups += experiments(measured[measured["bundled"]])
        for group in groups:
            rows += _experiment_rows(base, paper, group)
    return pd.DataFrame(rows)


def _experiment_rows(base: dict, paper: dict, group: pd.DataFrame) -> list[dict]:
    """One experiment's rows of a paper table, one per protocol measured."""
    first, reason = group.iloc[0], refusal(group)
    base = {**base, "data": _where(first), **_paper_columns(paper), "experiment": first["experiment"]}
    rows = []
    for protocol in PROTOCOLS:
        subset = group[group["protocol"] == protocol]
        if subset.empty:
            continue
        if reason:
            measured = {"measured top-1 %": reason, "measured top-5 %": reason, "Δ top-1": "", "Δ top-5": ""}
            rows.append({**base, "protocol": VIEW_NAMES[protocol], **measured, "n": 0})
        else:
            rows.append({**base, **_measured(subset, paper, protocol, comparable=not first["bundled"])})
    return rows


def _paper_columns(paper: dict) -> dict:
    """The paper's numbers and protocol, and the 2012 code's recorded run of the same net."""

    def value(key: str) -> str:
        return "-" if paper.get(key) is None else f"{paper[key]:g}"

    lab = lab_record(paper["id"])
    cnn = "CNN" in paper["model"]
    return {
        "paper top-1 %": value("top1_error"),
        "paper top-5 %": value("top5_error"),
        "paper protocol": "10 crops (§4.1)" if cnn else "-",
        "2012 code log top-1 %": f"{lab['top1_error']:g}" if lab else "-",
        "2012 code log top-5 %": f"{lab['top5_error']:g}" if lab else "-",
        "2012 log protocol": f"{LAB_PROTOCOLS[lab['protocol']]} ({lab['config']})" if lab else "-",
    }


def _measured(subset: pd.DataFrame, paper: dict, protocol: str, comparable: bool = True) -> dict:
    top1, top5 = _errors(subset, "top1_error"), _errors(subset, "top5_error")

    def difference(estimate: Estimate, key: str) -> str:
        if not comparable or paper.get(key) is None:
            return "n/a"
        return f"{estimate.mean - paper[key]:+.2f}"

    return {
        "protocol": VIEW_NAMES[protocol],
        "measured top-1 %": top1.text().lstrip("+"),
        "measured top-5 %": top5.text().lstrip("+"),
        "Δ top-1": difference(top1, "top1_error"),
        "Δ top-5": difference(top5, "top5_error"),
        "n": top1.n,
    }


def _per_seed(records: pd.DataFrame, protocol: str, column: str) -> dict[int, float]:
    chosen = records[records["protocol"] == protocol]
    return {int(seed): value for seed, value in zip(chosen["seed"], chosen[column], strict=True)}


def _sweep(run: str) -> str:
    """The folder that holds a sweep's configs (runs/<sweep>/<name>/seed<k> -> runs/<sweep>)."""
    return str(Path(run).parent.parent)


def ablation_table(records: pd.DataFrame, claims: dict | None = None) -> pd.DataFrame:
    """Each comparison of the paper: its claimed effect beside the measured one (variant minus
    baseline, the same seeds, mean ± 95% CI), with n, the protocol and the data; or "not run"."""
    claims = claims or load_claims()
    rows = []
    for claim in claims["ablations"]:
        bound = {"at_least": "over ", "about": "about "}.get(claim.get("bound", ""), "")
        lab, lab_variant = lab_delta(claim["id"]), lab_record(claim["id"])
        row = {
            "comparison": claim["variant"],
            "section": claim["section"],
            "paper Δ top-1": f"{bound}{claim['top1_delta']:+g}" if "top1_delta" in claim else "not reported",
            "paper Δ top-5": f"{claim['top5_delta']:+g}" if "top5_delta" in claim else "not reported",
            "2012 log Δ top-1": f"{lab[0]:+.2f}" if lab else "not recorded",
            "2012 log Δ top-5": f"{lab[1]:+.2f}" if lab else "not recorded",
            "2012 log protocol": LAB_PROTOCOLS[lab_variant["protocol"]] if lab else "-",
        }
        deltas = claim_deltas(claim["id"], records)
        if deltas is None or isinstance(deltas, str):
            why = deltas or "not run"
            rows.append(
                {
                    **row,
                    "measured Δ top-1": why,
                    "measured Δ top-5": why,
                    "n": 0,
                    "protocol": "-",
                    "data": "-",
                }
            )
            continue
        top1, top5, protocol, data = deltas
        rows.append(
            {
                **row,
                "measured Δ top-1": mean_ci(top1).text(),
                "measured Δ top-5": mean_ci(top5).text(),
                "n": len(top1),
                "protocol": protocol,
                "data": data,
            }
        )
    return pd.DataFrame(rows)


def claim_deltas(claim: str, records: pd.DataFrame):
    """(top-1 deltas, top-5 deltas, protocol, data) for one claim; a string saying why its runs
    cannot be compared (seeds measured twice, baselines of several configs in one sweep); or None
    when not run. Deltas pair a variant's seeds with the same seeds of its sweep's baseline."""
    trained = records[records["kind"] == "train"]
    baselines = trained[trained["claim"] == ""]
    if claim == "ten_crop":  # centre crop only, against 10 crops, on the baseline's own runs
        for group in experiments(baselines):
            reason = refusal(group)
            if reason:
                return reason
            centre, ten = (_per_seed(group, p, "top1_error") for p in ("centre", "ten_crop"))
            centre5, ten5 = (_per_seed(group, p, "top5_error") for p in ("centre", "ten_crop"))
            if paired_deltas(centre, ten):
                deltas = paired_deltas(centre, ten), paired_deltas(centre5, ten5)
                return (*deltas, "centre vs 10 crops", _where(group.iloc[0]))
        return None
    if claim == "ensemble_5cnns":
        ensembles = records[records["kind"] == "ensemble"]
        for run, group in ensembles.groupby("run"):
            protocol = "ten_crop" if (group["protocol"] == "ten_crop").any() else "centre"
            row = group[group["protocol"] == protocol].iloc[0]
            members = baselines[
                (baselines["run"].map(_sweep) == str(Path(run).parent)) & (baselines["protocol"] == protocol)
            ]
            if members.empty:
                continue
            return (
                [row["top1_error"] - members["top1_error"].mean()],
                [row["top5_error"] - members["top5_error"].mean()],
                VIEW_NAMES[protocol],
                _where(row),
            )
        return None
    variants = trained[trained["claim"] == claim]
    for group in experiments(variants):
        sweep = _sweep(group.iloc[0]["run"])
        base = baselines[
            (baselines["run"].map(_sweep) == sweep) & (baselines["source"] == group.iloc[0]["source"])
        ]
        if base["experiment"].nunique() > 1:
            return f"refused: the baseline runs of {sweep} are of {base['experiment'].nunique()} configs"
        reason = refusal(group) or refusal(base)
        if reason:
            return reason
        protocol = "ten_crop" if (group["protocol"] == "ten_crop").any() else "centre"
        top1 = paired_deltas(
            _per_seed(group, protocol, "top1_error"), _per_seed(base, protocol, "top1_error")
        )
        top5 = paired_deltas(
            _per_seed(group, protocol, "top5_error"), _per_seed(base, protocol, "top5_error")
        )
        if top1:
            return top1, top5, VIEW_NAMES[protocol], _where(group.iloc[0])
    return None


def cifar_table(figure1: dict | None, lrn: dict | None, claims: dict | None = None) -> pd.DataFrame:
    """The two CIFAR-10 experiments: Figure 1's epoch ratio and §3.3's test errors."""
    claims = claims or load_claims()
    paper_lrn = claims["cifar10_lrn"]
    ratio = "not run" if figure1 is None else figure1["tanh_over_relu"]
    rows = [
        {
            "experiment": "Figure 1: tanh / ReLU epochs to 25% training error",
            "section": "§3.1",
            "paper": f"{claims['figure1']['tanh_over_relu_epochs']:g}",
            "measured": ratio if isinstance(ratio, str) else f"{ratio:.2f}",
            "data": "-" if figure1 is None else figure1["dataset"],
        }
    ]
    names = (
        ("without", "off", "test error without normalisation %"),
        ("with", "lrn", "test error with normalisation %"),
    )
    for key, arm, label in names:
        measured = "not run" if lrn is None else mean_ci(lrn["arms"][arm]["test_errors"]).text().lstrip("+")
        paper = f"{paper_lrn[f'test_error_{key}_lrn']:g}"
        data = "-" if lrn is None else lrn["dataset"]
        rows.append(
            {"experiment": label, "section": "§3.3", "paper": paper, "measured": measured, "data": data}
        )
    delta = "not run" if lrn is None else mean_ci(lrn["delta_per_seed"]).text()
    rows.append(
        {
            "experiment": "difference (with - without) %",
            "section": "§3.3",
            "paper": f"{paper_lrn['test_error_with_lrn'] - paper_lrn['test_error_without_lrn']:+g}",
            "measured": delta,
            "data": "-" if lrn is None else lrn["dataset"],
        }
    )
    return pd.DataFrame(rows)


LATEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "%": r"\%",
    "&": r"\&",
    "_": r"\_",
    "#": r"\#",
    "$": r"\$",
    "±": r"$\pm$",
    "Δ": r"$\Delta$",
    "§": r"\S{}",
}


def latex(table: pd.DataFrame) -> str:
    """A LaTeX tabular (without pandas' optional jinja2 dependency)."""

    def escape(value) -> str:
        return "".join(LATEX_ESCAPES.get(char, char) for char in str(value))

    lines = [
        r"\begin{tabular}{" + "l" * len(table.columns) + "}",
        r"\hline",
        " & ".join(escape(c) for c in table.columns) + r" \\",
        r"\hline",
        *(" & ".join(escape(v) for v in row) + r" \\" for row in table.itertuples(index=False)),
        r"\hline",
        r"\end{tabular}",
    ]
    return "\n".join(lines)


def write_table(table: pd.DataFrame, out_dir: str | Path, name: str) -> list[Path]:
    """name.md, name.tex and name.csv in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.md", out / f"{name}.tex", out / f"{name}.csv"]
    paths[0].write_text(markdown(table) + "\n")
    paths[1].write_text(latex(table) + "\n")
    table.to_csv(paths[2], index=False)
    return paths


def all_tables(
    runs_root: str | Path, wandb_project: str | None = None, committed: str | Path | None = None
) -> dict[str, pd.DataFrame]:
    """Every table from the records under `runs_root`, plus a W&B project's runs when given. The
    CIFAR-10 experiments' records come from `committed` (analysis/results) where `runs_root` has none."""
    records = load_records(runs_root)
    if wandb_project:
        records = pd.concat([records, load_wandb_records(wandb_project)], ignore_index=True)
    figure1, lrn = (
        find_record(runs_root, name) or (find_record(committed, name) if committed else None)
        for name in ("figure1.json", "lrn-cifar.json")
    )
    return {
        "table1": paper_table(records, 1),
        "table2": paper_table(records, 2),
        "ablations": ablation_table(records),
        "cifar10": cifar_table(
            json.loads(figure1.read_text()) if figure1 else None, json.loads(lrn.read_text()) if lrn else None
        ),
    }


def main(argv: list[str] | None = None) -> int:
    """`python -m analysis.tables RUN_DIR`: a finished run's errors beside the paper's; or, given a
    runs folder, every table of the runs under it (Markdown, printed)."""
    parser = argparse.ArgumentParser(prog="python -m analysis.tables", description=main.__doc__)
    parser.add_argument("path", type=Path, help="a finished run's folder, or a folder of runs")
    args = parser.parse_args(argv)
    if not args.path.is_dir():
        parser.error(f"{args.path}: no such folder")
    try:
        if (args.path / "evaluation.json").is_file():
            print(markdown(replication_table(args.path)))
            return 0
        for name, table in all_tables(args.path).items():
            print(f"## {name}\n\n{markdown(table)}\n")
    except RecordError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
