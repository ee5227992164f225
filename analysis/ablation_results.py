"""A sweep's committed records (analysis/results/ablations-<preset>/) as the README's ablation table
and chart: the paper's delta, the 2012 code's, the measured one (variant minus baseline on the same
seeds: mean, 95% t-interval, n) and the baseline, each row linking its records.

`make report` writes ablation_table.md and ablations.png into the sweep's folder and the table into
README.md between its two markers (`update_readme`); nothing in it is typed by hand.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import pandas as pd

from analysis import figures
from analysis.records import load_records
from analysis.stats import mean_ci
from analysis.tables import claim_deltas, markdown
from replicate.ablate import ablation_files
from replicate.experiment import load_experiment
from replicate.paper import lab_delta, load_claims
from replicate.tracking import read_json

ROOT = Path(__file__).resolve().parents[1]
BEGIN = "<!-- ablation table: written by `make report` from analysis/results/{sweep}; do not edit -->"
END = "<!-- end of the ablation table -->"
RECORDS_OF = {"ten_crop": "baseline"}  # a comparison computed from the baseline's own records


def configs_by_claim() -> dict[str, str]:
    """Each claim id of paper/claims.yaml -> the ablation config that tests it."""
    return {load_experiment(path).ablation.claim: path.stem for path in ablation_files()}


def processor_name(processor: str) -> str:
    """environment.json's processor ("AMD EPYC; 2 logical cores; AVX512") for a list of them."""
    return processor.replace("; ", ", ")


def hardware(sweep: Path) -> str:
    """The processors and torch versions of the sweep's runs, each with its count of runs (each run's
    commit is in its linked environment.json)."""
    environments = [read_json(p) for p in sorted(sweep.glob("*/seed*/environment.json"))]

    def counted(key: str, shorten=lambda v: v, between: str = ", ") -> str:
        values = pd.Series([shorten(str(e.get(key, "?"))) for e in environments]).value_counts()
        return between.join(f"{value} ({count} run{'s' * (count > 1)})" for value, count in values.items())

    return f"Processors: {counted('processor', processor_name, '; ')}. Torch {counted('torch')}"


# A run had its machine to itself when other work took at most this many CPU seconds per second of
# its wall time: a tenth of one core on average (epochs.csv's other_cpu_seconds, replicate/cpu_clock.py).
ALONE_SHARE = 0.1


def _total(intervals: list[dict], key: str) -> float | None:
    """The sum of `key` over the intervals; None if any of them lacks it."""
    values = [interval.get(key) for interval in intervals]
    return None if any(value is None or pd.isna(value) for value in values) else sum(values)


def run_times(sweep: Path) -> pd.DataFrame:
    """Each run whose every interval recorded its seconds (epochs.csv: training and validation;
    evaluation.json: the final evaluations; not the start): its minutes, its processor, and whether
    it had its machine to itself (None where it did not record other work's CPU time)."""
    rows = []
    for epochs_csv in sorted(sweep.glob("*/seed*/epochs.csv")):
        run = epochs_csv.parent
        views = read_json(run / "evaluation.json")["views"].values()
        intervals = [*pd.read_csv(epochs_csv).to_dict("records"), *views]
        seconds, other = _total(intervals, "seconds"), _total(intervals, "other_cpu_seconds")
        if seconds is not None:
            rows.append(
                {
                    "minutes": seconds / 60,
                    "processor": processor_name(read_json(run / "environment.json").get("processor", "?")),
                    "alone": None if other is None else other <= ALONE_SHARE * seconds,
                }
            )
    return pd.DataFrame(rows, columns=["minutes", "processor", "alone"])


def _median(minutes: pd.Series) -> str:
    spread = f", {minutes.min():.0f} to {minutes.max():.0f}" if len(minutes) > 1 else ""
    return f"{minutes.median():.0f} min (median of {len(minutes)}{spread})"


def run_minutes(sweep: Path) -> str:
    """How long a run took: on each processor, the runs that had their machine to itself; then the
    runs beside other work, and those that did not record whether there was any."""
    runs = run_times(sweep)
    alone, shared, unknown = runs["alone"].eq(True), runs["alone"].eq(False), runs["alone"].isna()
    text = ""
    if alone.any():
        each = [f"{_median(group['minutes'])} on {name}" for name, group in runs[alone].groupby("processor")]
        text += f"A run alone on its machine took {'; '.join(each)}. "
    if shared.any():
        text += f"Runs beside other work took {_median(runs[shared]['minutes'])}. "
    if unknown.any():
        minutes = _median(runs[unknown]["minutes"])
        text += f"Runs that did not record whether other work shared their machine took {minutes}. "
    return text


def _baseline_ten_crop(records: pd.DataFrame) -> pd.DataFrame:
    """The baseline's trained runs, their 10-crop rows."""
    baseline = records[(records["claim"] == "") & (records["kind"] == "train")]
    return baseline[baseline["protocol"] == "ten_crop"]


def baseline_spread(records: pd.DataFrame) -> dict | None:
    """The baseline's 10-crop top-1 and top-5 error over its seeds: mean, 95% CI, standard deviation."""
    ten = _baseline_ten_crop(records).sort_values("seed")
    if ten.empty:
        return None
    top1, top5 = list(ten["top1_error"]), list(ten["top5_error"])
    return {
        "seeds": [int(s) for s in ten["seed"]],
        "top1": mean_ci(top1),
        "top5": mean_ci(top5),
        "top1_sd": statistics.stdev(top1) if len(top1) > 1 else float("nan"),
        "top1_each": top1,
    }


def _baseline_of(claim: str, records: pd.DataFrame) -> str:
    """The baseline's mean 10-crop top-1 error over the seeds this comparison pairs it with."""
    ten = _baseline_ten_crop(records)
    variant = records[(records["claim"] == claim) & (records["kind"] == "train")]
    if claim not in ("ten_crop", "ensemble_5cnns"):
        ten = ten[ten["seed"].isin(set(variant["seed"]))]
    return f"{ten['top1_error'].mean():.1f}" if not ten.empty else "-"


def _paper(claim: dict) -> str:
    bound = {"at_least": "over ", "about": "about "}.get(claim.get("bound", ""), "")
    top1 = f"{bound}{claim['top1_delta']:+g}" if "top1_delta" in claim else "not reported"
    return top1 + (f" / {claim['top5_delta']:+g}" if "top5_delta" in claim else "")


def chart_data(
    records: pd.DataFrame,
) -> tuple[dict[str, list[float]], dict[str, float | None], dict[str, str]]:
    """For the chart: each measured comparison's top-1 deltas and the paper's delta; and, for each
    comparison whose runs cannot be compared, why (`claim_deltas`)."""
    deltas, paper, refused = {}, {}, {}
    for claim in load_claims()["ablations"]:
        found = claim_deltas(claim["id"], records)
        if isinstance(found, str):
            refused[claim["variant"]] = found
        elif found is not None:
            deltas[claim["variant"]], paper[claim["variant"]] = found[0], claim.get("top1_delta")
    return deltas, paper, refused


def table(records: pd.DataFrame, link: str) -> pd.DataFrame:
    """The README's rows for every comparison of paper/claims.yaml, measured or "not run yet".
    `link`: the sweep folder as the README links it."""
    configs = configs_by_claim()
    rows = []
    for claim in load_claims()["ablations"]:
        found = claim_deltas(claim["id"], records)
        lab = lab_delta(claim["id"])
        folder = RECORDS_OF.get(claim["id"], configs.get(claim["id"], claim["id"]))
        row = {
            "comparison": claim["variant"],
            "§": claim["section"].split(" (")[0].lstrip("§"),
            "paper Δ top-1 / top-5": _paper(claim),
            "2012 code Δ top-1 / top-5": f"{lab[0]:+.2f} / {lab[1]:+.2f}" if lab else "not recorded",
        }
        if found is None or isinstance(found, str):
            measured = {"measured Δ top-1": found or "not run yet", "measured Δ top-5": "", "n": 0}
            rows.append({**row, **measured, "baseline top-1": "-", "records": "-"})
            continue
        top1, top5, _, _ = found
        rows.append(
            {
                **row,
                "measured Δ top-1": mean_ci(top1).text(1),
                "measured Δ top-5": mean_ci(top5).text(1),
                "n": len(top1),
                "baseline top-1": _baseline_of(claim["id"], records),
                "records": f"[{folder}/]({link}/{folder}/)",
            }
        )
    return pd.DataFrame(rows)


def readme_block(sweep: Path, link: str, records: pd.DataFrame | None = None) -> str:
    """The README's ablation block: the baseline and its spread, the hardware, the table. `records`:
    the sweep's, when already loaded."""
    records = load_records(sweep) if records is None else records
    rows = table(records, link)
    spread = baseline_spread(records)
    lines = [BEGIN.format(sweep=sweep.name)]
    if spread is None:
        lines.append("No run of this sweep has finished yet.")
    else:
        each = ", ".join(f"{e:.1f}" for e in spread["top1_each"])
        top1, top5 = spread["top1"], spread["top5"]
        interval = f" ± {top1.half_width:.1f} (95% CI)" if top1.n > 1 else ""
        sd = f", standard deviation {spread['top1_sd']:.1f} points" if top1.n > 1 else ""
        lines.append(
            f"Baseline, seed{'s' * (top1.n > 1)} {', '.join(map(str, spread['seeds']))}: 10-crop top-1 error "
            f"{top1.mean:.1f}{interval} % (each seed: {each}{sd}); top-5 {top5.mean:.1f} %. "
            f"{run_minutes(sweep)}{hardware(sweep)}."
        )
    lines += ["", markdown(rows), END]
    return "\n".join(lines)


def update_readme(readme: Path, block: str, sweep: str) -> bool:
    """Replace the README's block of this sweep (its markers included) with `block`; False if the
    README has no block of it."""
    text = readme.read_text()
    begin = text.find(BEGIN.format(sweep=sweep))
    end = text.find(END, begin)
    if begin < 0 or end < 0:
        return False
    readme.write_text(text[:begin] + block + text[end + len(END) :])
    return True


def write_sweep_results(sweep: Path, readme: Path | None = None) -> list[Path]:
    """ablation_table.md and ablations.png into `sweep`, and the README's block when `readme` is given."""
    where = sweep.resolve()
    link = where.relative_to(ROOT).as_posix() if where.is_relative_to(ROOT) else str(sweep)
    records = load_records(sweep)
    block = readme_block(sweep, link, records)
    written = [sweep / "ablation_table.md"]
    written[0].write_text(block.replace(f"({link}/", "(") + "\n")  # links relative to the sweep folder
    deltas, paper, _ = chart_data(records)
    if deltas:
        written += figures.save(figures.ablation_chart(deltas, paper), "ablations", sweep, formats=("png",))
    if readme is not None and update_readme(readme, block, sweep.name):
        written.append(readme)
    return written
