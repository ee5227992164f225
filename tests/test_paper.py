import pytest

from replicate.paper import load_claims, paper_result


def test_tables_hold_the_papers_numbers():
    assert (paper_result("table1_cnn")["top1_error"], paper_result("table1_cnn")["top5_error"]) == (
        37.5,
        17.0,
    )
    one = paper_result("table2_1cnn")
    five = paper_result("table2_5cnns")
    assert (one["top1_error"], one["top5_error"]) == (40.7, 18.2)
    assert (five["top1_error"], five["top5_error"], five["top5_test_error"]) == (38.1, 16.4, 16.4)
    with pytest.raises(KeyError, match="no paper result 'table9'"):
        paper_result("table9")


def test_every_claim_names_its_section():
    claims = load_claims()
    entries = claims["results"] + claims["ablations"] + list(claims["training"].values())
    entries += [claims["figure1"], claims["cifar10_lrn"]]
    assert all(str(entry["section"]).startswith("§") for entry in entries)


def test_ablation_deltas():
    ablations = {a["id"]: a for a in load_claims()["ablations"]}
    assert (ablations["no_lrn"]["top1_delta"], ablations["no_lrn"]["top5_delta"]) == (1.4, 1.2)
    assert (
        ablations["non_overlapping_pooling"]["top1_delta"],
        ablations["non_overlapping_pooling"]["top5_delta"],
    ) == (0.4, 0.3)
    assert (ablations["one_column"]["top1_delta"], ablations["one_column"]["top5_delta"]) == (
        1.7,
        1.2,
    )
    assert ablations["no_pca_colour"]["top1_delta"] == 1.0
    assert ablations["no_pca_colour"]["bound"] == "at_least"
    assert ablations["remove_middle_conv"]["top1_delta"] == 2.0
    # The ensemble delta is Table 2's 5 CNNs minus 1 CNN.
    five, one = paper_result("table2_5cnns"), paper_result("table2_1cnn")
    assert ablations["ensemble_5cnns"]["top1_delta"] == pytest.approx(five["top1_error"] - one["top1_error"])
    assert ablations["ensemble_5cnns"]["top5_delta"] == pytest.approx(five["top5_error"] - one["top5_error"])


def test_figure1_cifar_and_training_facts():
    claims = load_claims()
    assert claims["figure1"]["tanh_over_relu_epochs"] == 6.0
    assert claims["figure1"]["threshold_train_error"] == 25.0
    assert (
        claims["cifar10_lrn"]["test_error_without_lrn"],
        claims["cifar10_lrn"]["test_error_with_lrn"],
    ) == (13.0, 11.0)
    training = {k: v["value"] for k, v in claims["training"].items()}
    assert training["batch_size"] == 128 and training["epochs"] == 90
    assert training["training_days"] == [5, 6] and training["neurons"] == 650_000
    assert training["parameters"] == 60_000_000


def test_the_2012_lab_notebook_parses_and_holds_the_recorded_runs():
    from replicate.paper import LAB_PROTOCOLS, lab_delta, lab_record, load_lab_notebook

    records = {r["id"]: r for r in load_lab_notebook()}
    expected = {  # the 2012 code's cfg comments: cfg -> recorded top-1 / top-5
        "c145": (40.66, 18.21),
        "c145_135": (40.25, 17.99),
        "c145_2010": (37.47, 17.00),
        "c145_2010_centre": (39.02, 18.30),
        "c148": (42.03, 19.36),
        "c147": (41.06, 18.51),
        "c145_half": (39.17, 18.23),
        "c150": (41.83, 19.33),
        "c146_2012_2011": (38.99, 16.62),
    }
    assert {k: (r["top1_error"], r["top5_error"]) for k, r in records.items()} == expected
    claims = load_claims()
    known = {r["id"] for r in claims["results"]} | {a["id"] for a in claims["ablations"]}
    for record in records.values():
        assert (
            record["protocol"] in LAB_PROTOCOLS
            and record["config"]
            and record["what"]
            and "comment" in record
        )
        assert record.get("compares_with", "table1_cnn") in known, record["id"]
        assert record.get("baseline", "c145") in records
    assert lab_record("table2_1cnn")["id"] == "c145" and lab_record("tanh") is None
    assert lab_delta("no_lrn") == pytest.approx((1.37, 1.15))  # "1.4% top-1 worse than 145"
    assert lab_delta("ten_crop") == pytest.approx((1.55, 1.30))  # centre only vs multiview, 2010
    assert lab_delta("no_column_communication") == pytest.approx((41.83 - 40.66, 19.33 - 18.21))
