"""Tables from synthetic run records (known numbers in, known rows out), the CI, and `make report`
end to end on tiny real runs made here."""

import json
import math
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from analysis.ablation_results import readme_block, run_minutes
from analysis.figures import colourfulness
from analysis.index_page import COMMITTED
from analysis.records import load_records
from analysis.report import execute_notebooks
from analysis.report import main as report_main
from analysis.stats import mean_ci, paired_deltas
from analysis.tables import ablation_table, all_tables, cifar_table, latex, paper_table, write_table
from tests.conftest import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]
T_975 = {2: 4.302652729911275, 3: 3.182446305284263}  # Student's t quantiles, df = n - 1


SOURCES = {
    "ilsvrc2012": "ILSVRC-2012",
    "ilsvrc2010": "ILSVRC-2010",
    "imagenette": "bundled Imagenette, 224 px",
}


def write_run(
    root: Path,
    sweep: str,
    name: str,
    seed: int,
    errors: dict,
    dataset="ilsvrc2012",
    claim="",
    max_steps=0,
    source=None,
    state="finished",
):
    run = root / sweep / name / f"seed{seed}"
    run.mkdir(parents=True)
    config = {
        "name": name,
        "train": {"seed": seed, "max_steps": max_steps, "runs_dir": str(root / sweep)},
        "data": {"dataset": dataset},
        "ablation": {"claim": claim, "kind": "train"},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    views = {v: {"images": 50000, "top1_error": e[0], "top5_error": e[1]} for v, e in errors.items()}
    split = "test" if dataset == "ilsvrc2010" else "val"
    source = {"label": source or SOURCES[dataset]}
    record = {"dataset": dataset, "split": split, "source": source, "views": views}
    (run / "evaluation.json").write_text(json.dumps(record))
    (run / "status.json").write_text(json.dumps({"state": state}))
    return run


def test_mean_ci_is_the_t_interval():
    estimate = mean_ci([1.0, 2.0, 3.0])
    assert estimate.mean == 2.0 and estimate.n == 3
    assert estimate.half_width == pytest.approx(T_975[2] * 1.0 / math.sqrt(3))
    assert estimate.text() == f"+2.00 ± {T_975[2] / math.sqrt(3):.2f}"
    assert mean_ci([4.0]).text() == "+4.00 (n=1, no CI)" and mean_ci([]).text() == "not run"
    assert paired_deltas({0: 5.0, 1: 7.0, 2: 1.0}, {0: 4.0, 1: 4.0}) == [1.0, 3.0]


@pytest.fixture
def records(tmp_path):
    sweep = "ablations-full"
    for seed, (top1, top5) in enumerate([(40.0, 18.0), (41.0, 18.5), (42.0, 19.0)]):
        write_run(
            tmp_path, sweep, "baseline", seed, {"ten_crop": (top1, top5), "centre": (top1 + 2, top5 + 1)}
        )
    for seed, (top1, top5) in enumerate(
        [(41.0, 19.0), (43.0, 19.5), (42.0, 20.0)]
    ):  # deltas 1, 2, 0 / 1, 1, 1
        write_run(tmp_path, sweep, "no_lrn", seed, {"ten_crop": (top1, top5)}, claim="no_lrn")
    ensemble = tmp_path / sweep / "ensemble_5cnns"
    ensemble.mkdir()
    members = [
        {"dir": str(tmp_path / sweep / "baseline" / f"seed{s}"), "epoch": 90, "step": 450000}
        for s in range(3)
    ]
    views = {"ten_crop": {"images": 50000, "top1_error": 38.0, "top5_error": 16.0}}
    (ensemble / "evaluation.json").write_text(
        json.dumps(
            {
                "dataset": "ilsvrc2012",
                "split": "val",
                "source": {"label": "ILSVRC-2012"},
                "runs": members,
                "views": views,
            }
        )
    )
    write_run(
        tmp_path, "replicate-bundled", "replicate-bundled", 0, {"centre": (82.0, 33.0)}, dataset="imagenette"
    )
    return tmp_path


def test_table2_rows_carry_paper_measured_difference_and_protocol(records):
    table = paper_table(load_records(records), 2)
    one_cnn = table[(table["model"] == "1 CNN") & (table["data"] == "ilsvrc2012 val (ILSVRC-2012)")]
    ten = one_cnn[one_cnn["protocol"] == "10 crops"].iloc[0]
    assert ten["paper top-1 %"] == "40.7" and ten["n"] == 3
    assert ten["measured top-1 %"] == f"41.00 ± {T_975[2] / math.sqrt(3):.2f}"  # mean 41, sd 1
    assert ten["Δ top-1"] == "+0.30" and ten["Δ top-5"] == "+0.30"
    assert (one_cnn["protocol"] == "centre crop").any()  # every measured protocol has its own row
    five = table[table["model"] == "5 CNNs"].iloc[0]
    assert five["measured top-1 %"] == "38.00 (n=1, no CI)" and five["Δ top-1"] == "-0.10"
    assert (table[table["model"] == "7 CNNs*"]["measured top-1 %"] == "not run").all()
    bundled = table[table["data"].str.contains("bundled")]
    assert len(bundled) == 1 and bundled.iloc[0]["data"] == (
        "imagenette val (bundled Imagenette, 224 px: NOT comparable with the paper)"
    )
    assert bundled.iloc[0]["Δ top-1"] == "n/a" and bundled.iloc[0]["protocol"] == "centre crop"
    table1 = paper_table(load_records(records), 1)
    assert (table1["measured top-1 %"] == "not run").all()  # no ILSVRC-2010 runs


def test_ablation_table_pairs_seeds_and_says_not_run(records):
    table = ablation_table(load_records(records)).set_index("comparison")
    row = table.loc["no local response normalisation"]
    assert row["paper Δ top-1"] == "+1.4" and row["n"] == 3 and row["protocol"] == "10 crops"
    assert row["measured Δ top-1"] == f"+1.00 ± {T_975[2] / math.sqrt(3):.2f}"  # deltas 1, 2, 0
    assert row["measured Δ top-5"] == "+1.00 ± 0.00"  # deltas 1, 1, 1
    views = table.loc["centre crop only at test, instead of 10 crops"]
    assert views["measured Δ top-1"] == "+2.00 ± 0.00" and views["protocol"] == "centre vs 10 crops"
    ensemble = table.loc["average of 5 CNNs instead of 1"]
    assert ensemble["measured Δ top-1"] == "-3.00 (n=1, no CI)"  # 38 - mean(40, 41, 42)
    assert table.loc["tanh units instead of ReLUs", "measured Δ top-1"] == "not run"
    assert table.loc["no PCA colour augmentation", "paper Δ top-1"] == "over +1"


def test_records_moved_elsewhere_still_pool_the_ensemble_with_its_members(records, tmp_path_factory):
    """An unpacked evidence archive: the ensemble's evaluation.json names its members' old folders."""
    before = ablation_table(load_records(records)).set_index("comparison")
    moved = tmp_path_factory.mktemp("moved") / "runs"
    shutil.copytree(records, moved)
    shutil.rmtree(records / "ablations-full")
    rows = load_records(moved)
    ensemble = rows[rows["kind"] == "ensemble"].iloc[0]
    assert ensemble["experiment"].startswith("ensemble_5cnns of baseline (config ")  # found its members
    after = ablation_table(rows).set_index("comparison")
    assert after.loc["average of 5 CNNs instead of 1", "measured Δ top-1"] == "-3.00 (n=1, no CI)"
    assert after.equals(before)


def test_cifar_table_and_the_three_formats(records, tmp_path):
    lrn = {
        "dataset": "JPEG-compressed CIFAR-10",
        "arms": {"off": {"test_errors": [30.0, 32.0]}, "lrn": {"test_errors": [29.0, 30.0]}},
        "delta_per_seed": [-1.0, -2.0],
    }
    table = cifar_table(None, lrn)
    assert table.iloc[0]["measured"] == "not run" and table.iloc[0]["paper"] == "6"
    sd = math.sqrt(0.5)  # of -1 and -2
    assert table.iloc[3]["measured"] == f"-1.50 ± {12.706204736174698 * sd / math.sqrt(2):.2f}"
    paths = write_table(table, tmp_path / "out", "cifar10")
    assert pd.read_csv(paths[2]).shape == table.shape
    assert "| §3.3 |" in paths[0].read_text() and r"\S{}3.3" in paths[1].read_text()
    assert latex(pd.DataFrame({"a": ["1 ± 2 %"]})).count(r"$\pm$ 2 \%") == 1
    assert set(all_tables(records)) == {"table1", "table2", "ablations", "cifar10"}


def test_colourfulness_separates_grey_from_colour_kernels():
    grey = torch.randn(4, 1, 11, 11).repeat(1, 3, 1, 1)
    colour = torch.randn(4, 3, 11, 11)
    assert colourfulness(grey).max() < 1e-6
    assert colourfulness(colour).min() > 0.5


class Links(HTMLParser):
    """Every href and src of a page."""

    def __init__(self):
        super().__init__()
        self.targets: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.targets += [value for name, value in attrs if name in ("href", "src")]


def page_links(page: Path) -> list[Path]:
    """The files `page` links to, each checked to exist."""
    parser = Links()
    parser.feed(page.read_text())
    targets = [(page.parent / target).resolve() for target in parser.targets]
    missing = [str(t) for t in targets if not t.is_file()]
    assert not missing, missing
    return targets


def committed_results(tmp_path: Path) -> Path:
    """A copy of analysis/results with its figures removed, for `make report` to redraw."""
    copy = tmp_path / "results"
    shutil.copytree(ROOT / "analysis" / "results", copy)
    for figure in copy.rglob("*.png"):
        figure.unlink()
    return copy


def test_report_redraws_the_readme_figures_and_writes_its_page_with_no_runs(tmp_path):
    results = committed_results(tmp_path)
    env = {**os.environ, "ALEXNET_RESULTS": str(results)}
    result = subprocess.run(
        [sys.executable, "-m", "analysis.report"],
        cwd=ROOT,
        env={**env, "ALEXNET_RUNS": str(tmp_path / "runs"), "ALEXNET_REPORTS": str(tmp_path / "reports")},
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert result.returncode == 0 and "no runs under" in result.stderr and "make replicate" in result.stderr
    page = tmp_path / "reports" / "index.html"
    assert f"the page: {page}" in result.stdout
    readme = [name for name in COMMITTED if (results / name).parent.is_dir()]
    assert "ablations-bundled/baseline/seed0/learning_curve.png" in readme
    linked = {path.relative_to(results.resolve()).as_posix() for path in page_links(page)}
    assert set(readme) <= linked  # each redrawn from its records, and linked
    for name in readme:
        assert COMMITTED[name].split(" (")[0] in page.read_text()


def test_report_without_nbclient_says_what_is_missing_and_still_writes_the_figures_and_page(
    tmp_path, monkeypatch, capsys
):
    (tmp_path / "runs" / "run").mkdir(parents=True)
    (tmp_path / "runs" / "run" / "evaluation.json").write_text("{}")  # a run: the notebooks would run
    monkeypatch.setenv("ALEXNET_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("ALEXNET_REPORTS", str(tmp_path / "reports"))
    monkeypatch.setenv("ALEXNET_RESULTS", str(committed_results(tmp_path)))
    monkeypatch.setitem(sys.modules, "nbclient", None)  # as in an environment without it
    assert report_main() == 1
    err = capsys.readouterr().err
    assert "notebooks (every table and figure of the runs) not executed: nbclient is not installed" in err
    drawn = tmp_path / "results" / "ablations-bundled" / "baseline" / "seed0" / "learning_curve.png"
    assert drawn.is_file()
    page_links(tmp_path / "reports" / "index.html")  # written, linking only to files that exist


class FakeRun:
    def __init__(self, seed, claim, top1):
        self.name, self.group = f"run{seed}", "ablations-full"
        self.config = {
            "name": "no_lrn" if claim else "baseline",
            "train": {"seed": seed},
            "data": {"dataset": "ilsvrc2012", "eval_split": "val"},
            "ablation": {"claim": claim},
        }
        self.summary = {
            "ten_crop/images": 50000,
            "ten_crop/top1_error": top1,
            "ten_crop/top5_error": top1 / 2,
        }


class FakeApi:
    def runs(self, path, filters):
        assert path == "me/alexnet-2012" and filters == {"state": "finished"}
        return [
            FakeRun(0, "", 40.0),
            FakeRun(1, "", 41.0),
            FakeRun(0, "no_lrn", 42.0),
            FakeRun(1, "no_lrn", 42.0),
        ]


def test_wandb_runs_become_the_same_records():
    from analysis.records import load_wandb_records

    records = load_wandb_records("me/alexnet-2012", api=FakeApi())
    assert len(records) == 4 and set(records["protocol"]) == {"ten_crop"}
    row = ablation_table(records).set_index("comparison").loc["no local response normalisation"]
    assert row["n"] == 2 and row["measured Δ top-1"].startswith("+1.50 ± ")  # deltas 2 and 1


def test_tables_show_paper_2012_log_and_measured_with_protocols(records):
    table = paper_table(load_records(records), 2).set_index("model")
    one = table.loc["1 CNN"].iloc[0]
    assert (one["paper top-1 %"], one["2012 code log top-1 %"], one["2012 code log top-5 %"]) == (
        "40.7",
        "40.66",
        "18.21",
    )
    assert one["paper protocol"] == "10 crops (§4.1)" and "layers-145.cfg" in one["2012 log protocol"]
    assert table.loc["5 CNNs", "2012 code log top-1 %"] == "-"  # no recorded run of the ensemble
    table1 = paper_table(load_records(records), 1).set_index("model")
    assert (
        table1.loc["CNN", "2012 code log top-1 %"] == "37.47"
        and "10 crops" in table1.loc["CNN", "2012 log protocol"]
    )
    ablations = ablation_table(load_records(records)).set_index("comparison")
    lrn = ablations.loc["no local response normalisation"]
    assert (lrn["paper Δ top-1"], lrn["2012 log Δ top-1"], lrn["2012 log Δ top-5"]) == (
        "+1.4",
        "+1.37",
        "+1.15",
    )
    assert lrn["protocol"] == "10 crops"  # the measured protocol, on every measured row
    assert ablations.loc["tanh units instead of ReLUs", "2012 log Δ top-1"] == "not recorded"
    no_comm = [c for c in ablations.index if c.startswith("no column communication")]
    assert ablations.loc[no_comm[0], "2012 log Δ top-1"] == "+1.17"


def test_a_row_pools_only_finished_runs_of_one_experiment_with_distinct_seeds(tmp_path):
    """Seeds of one config are pooled; a run of another config (a 2-step smoke run of the same name),
    another data source, or an unfinished run never is, and one seed measured twice is refused."""
    for seed, top1 in enumerate([40.0, 41.0, 42.0]):
        write_run(tmp_path / "a", "sweep", "baseline", seed, {"ten_crop": (top1, 18.0)})
    write_run(tmp_path / "a", "smoke", "baseline", 0, {"ten_crop": (90.0, 50.0)}, max_steps=2)
    write_run(tmp_path / "a", "sweep", "baseline", 3, {"ten_crop": (99.0, 99.0)}, state="running")
    table = paper_table(load_records(tmp_path / "a"), 2)
    rows = table[(table["model"] == "1 CNN") & (table["protocol"] == "10 crops")].set_index("n")
    assert sorted(rows.index) == [1, 3]  # the three seeds of the sweep; the smoke run on its own
    assert rows.loc[3, "measured top-1 %"].startswith("41.00 ± ")  # not the running seed 3's 99
    assert rows.loc[1, "measured top-1 %"] == "90.00 (n=1, no CI)"
    assert rows.loc[3, "experiment"] != rows.loc[1, "experiment"]
    assert rows.loc[3, "experiment"].startswith("baseline (config ")
    # the same config and seed in two run folders (a copy, a rerun elsewhere): refused, with both named
    write_run(tmp_path / "b", "sweep", "baseline", 0, {"ten_crop": (40.0, 18.0)})
    write_run(tmp_path / "b", "sweep", "baseline", 1, {"ten_crop": (41.0, 18.0)})
    shutil.copytree(
        tmp_path / "b" / "sweep" / "baseline" / "seed0", tmp_path / "b" / "rerun" / "baseline" / "seed0"
    )
    records = load_records(tmp_path / "b")
    row = paper_table(records, 2).query("model == '1 CNN' and protocol == '10 crops'").iloc[0]
    assert row["measured top-1 %"].startswith("refused: seed 0 measured by 2 runs") and row["n"] == 0
    # the bundled copy and the downloaded Imagenette: rows of their own, each saying which
    write_run(tmp_path / "c", "r", "replicate-bundled", 0, {"centre": (80.0, 30.0)}, dataset="imagenette")
    write_run(
        tmp_path / "c", "s", "replicate-bundled", 0, {"centre": (70.0, 25.0)}, dataset="imagenette",
        source="official Imagenette, 320 px",
    )  # fmt: skip
    data = set(paper_table(load_records(tmp_path / "c"), 2)["data"])
    assert "imagenette val (official Imagenette, 320 px: NOT comparable with the paper)" in data
    assert "imagenette val (bundled Imagenette, 224 px: NOT comparable with the paper)" in data


def test_the_summary_of_a_folder_that_is_not_a_finished_run_is_a_clear_error(tmp_path):
    (tmp_path / "run").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "analysis.summary", str(tmp_path / "run")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert result.returncode == 2 and "no evaluation.json (is it a finished run's folder?)" in result.stderr


def test_the_cifar_table_reads_the_committed_figure1_record_where_no_run_has_one(tmp_path):
    committed = ROOT / "analysis" / "results"
    record = json.loads((committed / "figure1-full" / "figure1.json").read_text())
    table = all_tables(tmp_path, committed=committed)["cifar10"].set_index("section")
    assert table.loc["§3.1", "measured"] == f"{record['tanh_over_relu']:.2f}"
    assert all_tables(tmp_path)["cifar10"].set_index("section").loc["§3.1", "measured"] == "not run"


def test_run_times_keep_runs_alone_on_their_machine_apart_from_the_rest(tmp_path):
    """A run counts as alone when other work took at most a tenth of a core over its wall time;
    runs alone are timed per processor; a run with an epoch of unknown seconds is left out."""
    fast, slow = "EPYC; 2 logical cores; AVX512", "EPYC; 2 logical cores; AVX2"
    named = {name: name.replace("; ", ", ") for name in (fast, slow)}

    def timed(seed: int, processor: str, seconds: list, other: list | None) -> None:
        run = write_run(tmp_path, "sweep", "baseline", seed, {"ten_crop": (40.0, 9.0)})
        epochs = {"epoch": range(1, len(seconds) + 1), "seconds": seconds}
        if other is not None:
            epochs["other_cpu_seconds"] = other
        pd.DataFrame(epochs).to_csv(run / "epochs.csv", index=False)
        evaluation = json.loads((run / "evaluation.json").read_text())
        cpu = {"other_cpu_seconds": 1.0} if other else {}
        evaluation["views"]["ten_crop"].update({"seconds": 60.0, **cpu})
        (run / "evaluation.json").write_text(json.dumps(evaluation))
        (run / "environment.json").write_text(json.dumps({"processor": processor}))

    timed(0, fast, [600.0, 540.0], [10.0, 50.0])  # 20 min, other work 61 s of 1200: alone
    timed(1, fast, [660.0, 660.0], [100.0, 20.0])  # 23 min, other work 121 s of 1380: alone
    timed(2, slow, [900.0, 840.0], [0.0, 0.0])  # 30 min, alone on the slower processor
    timed(3, fast, [1500.0, 1500.0], [1500.0, 1400.0])  # 51 min beside other work
    timed(4, fast, [1140.0, 1200.0], None)  # 40 min, from before other work was recorded
    timed(5, fast, [float("nan"), 600.0], [0.0, 0.0])  # an epoch split by a stop: not timed
    assert run_minutes(tmp_path / "sweep") == (
        f"A run alone on its machine took 30 min (median of 1) on {named[slow]}; "
        f"22 min (median of 2, 20 to 23) on {named[fast]}. "
        "Runs beside other work took 51 min (median of 1). "
        "Runs that did not record whether other work shared their machine took 40 min (median of 1). "
    )


COMMITTED_SWEEP = ROOT / "analysis" / "results" / "ablations-bundled"


@pytest.mark.skipif(not COMMITTED_SWEEP.is_dir(), reason="no committed sweep records")
def test_the_readme_ablation_table_is_what_make_report_writes_from_the_committed_records():
    block = readme_block(COMMITTED_SWEEP, "analysis/results/ablations-bundled")
    assert block in (ROOT / "README.md").read_text(), "run `make report` after committing records"
    assert (COMMITTED_SWEEP / "ablation_table.md").read_text().startswith(block.split("\n")[0])


@pytest.mark.slow
def test_the_committed_notebooks_hold_what_make_report_makes_of_the_committed_records(tmp_path):
    """The notebooks are committed executed on analysis/results; executed again on it here, the
    tables notebook prints the same tables (its text; figures are compared by eye, not bytes)."""
    import nbformat

    def printed(notebook) -> list[str]:
        outputs = [o for cell in notebook.cells for o in cell.get("outputs", [])]
        return [o["text"] for o in outputs if o["output_type"] == "stream"]

    for path in sorted((ROOT / "analysis" / "notebooks").glob("*.ipynb")):
        committed = nbformat.read(path, as_version=4)
        assert any(cell.get("outputs") for cell in committed.cells), f"{path.name} has no outputs"
    assert execute_notebooks(tmp_path, ROOT / "analysis" / "results", tmp_path / "reports") == 0
    tables = ROOT / "analysis" / "notebooks" / "1_tables.ipynb"
    again = nbformat.read(tmp_path / tables.name, as_version=4)
    assert printed(again) == printed(nbformat.read(tables, as_version=4)) != []
