import pandas as pd

from mlops_assets.validation.report import ValidationThresholds, build_report, render_markdown


def test_report_figures_on_calibrated_data(spec, simulated):
    frame = simulated.astype("Int64")
    frame.loc[:9, spec.label] = pd.NA
    frame.loc[10:14, "port"] = pd.NA
    report = build_report(frame, spec, ValidationThresholds(), data_version="abc")
    assert report["row_count"] == 3000
    assert report["schema"]["valid"] is True
    assert report["unlabelled_rows"] == 10
    assert report["rows_with_missing_features"] == 5
    assert report["null_share"] == round(5 / (3000 * 30), 6)
    assert 0.4 < report["duplicate_share"] < 0.55
    assert report["conflicting_label_vectors"] > 0
    assert set(report["label_share"]) == {"1", "-1"}
    assert report["value_counts"]["port"] == {
        "-1": int((frame["port"] == -1).sum()), "1": int((frame["port"] == 1).sum())}
    text = render_markdown(report)
    assert "data version abc" in text and "| rows | 3000 |" in text


def test_report_lists_contract_violations(spec, simulated):
    frame = simulated.head(50).astype(object)
    frame.loc[3, "port"] = 0
    report = build_report(frame, spec, ValidationThresholds(), data_version="x")
    assert report["schema"]["valid"] is False
    (violation,) = report["schema"]["violations"]
    assert violation["column"] == "port" and violation["kind"] == "out_of_domain"
    assert "port" in render_markdown(report)


def test_single_class_data_has_zero_minority_share(spec, simulated):
    one_class = simulated[simulated[spec.label] == 1]
    report = build_report(one_class, spec, ValidationThresholds(), data_version="x")
    assert report["minority_class_share"] == 0.0
