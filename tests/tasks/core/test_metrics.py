"""tasks.core.metrics: operating point, ranking, calibration and the headline score against hand-computed values."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tasks.core import metrics as E


def test_binary_metrics_by_hand() -> None:
    p = [0.9, 0.6, 0.4, 0.2, 0.7, 0.1]
    y = [1, 1, 1, 0, 0, 0]
    m = E.binary_metrics(p, y, 0.5)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (2, 1, 1, 2)
    assert m["sensitivity"] == pytest.approx(2 / 3) and m["specificity"] == pytest.approx(2 / 3)
    assert m["precision"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)
    assert E.binary_metrics(p, y, 0.4)["tp"] == 3  # p >= threshold is malignant
    none = E.binary_metrics([0.1, 0.2], [0, 0], 0.5)
    assert none["sensitivity"] is None and none["precision"] is None and none["specificity"] == 1.0


def test_roc_auc_matches_sklearn_with_ties_and_ci_brackets_it() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.round(np.clip(y * 0.3 + rng.uniform(0, 0.7, 300), 0, 1), 1)  # coarse: many ties
    assert E.roc_auc(p, y) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    lo, hi = E.auc_ci(p, y, n_bootstrap=500, seed=1)
    assert lo < E.roc_auc(p, y) < hi and hi - lo < 0.15
    assert E.auc_ci(p, y, n_bootstrap=500, seed=1) == (lo, hi)  # seeded
    lo_small, hi_small = E.auc_ci(p[:60], y[:60], n_bootstrap=500, seed=1)
    assert hi_small - lo_small > hi - lo  # fewer cases, wider interval
    assert E.roc_auc([0.2, 0.4], [1, 1]) is None and E.auc_ci([0.2, 0.4], [1, 1]) == (None, None)


def test_calibration_and_ece() -> None:
    y = np.array([1] * 50 + [0] * 50)
    assert E.expected_calibration_error(np.full(100, 0.9), y) == pytest.approx(0.4)
    assert E.expected_calibration_error(np.full(100, 0.5), y) == pytest.approx(0.0)
    p = np.r_[np.full(50, 0.95), np.full(50, 0.05)]
    assert E.expected_calibration_error(p, y) == pytest.approx(0.05)
    table = E.calibration_table(p, y, bins=10)
    assert table["count"].sum() == 100 and len(table) == 10
    assert table.loc[9, "fraction_malignant"] == 1.0 and table.loc[0, "fraction_malignant"] == 0.0
    assert E.calibration_table([1.0], [1], bins=4)["count"].tolist() == [0, 0, 0, 1]  # p = 1 in the last bin


def test_score_reports_both_thresholds() -> None:
    p = [0.9, 0.6, 0.4, 0.2, 0.7, 0.1]
    y = [1, 1, 1, 0, 0, 0]
    s = E.score(p, y, threshold=0.35, n_bootstrap=100)
    assert s["n"] == 6 and s["n_malignant"] == 3
    assert s["auc"] == pytest.approx(7 / 9)
    assert s["at_0.5"]["fn"] == 1 and s["at_operating_point"]["fn"] == 0
    assert s["brier"] == pytest.approx(np.mean((np.array(p) - np.array(y)) ** 2))
    assert set(s) >= {"average_precision", "ece", "auc_ci_low", "auc_ci_high"}
    with pytest.raises(ValueError, match="NaN"):
        E.score([np.nan, 0.1], [1, 0])


def test_operating_point_and_round_floats() -> None:
    p = np.array([0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.1, 0.05, 0.65])
    y = np.array([1, 1, 0, 1, 1, 0, 0, 1, 0, 0])
    assert E.threshold_for_sensitivity(p, y, 0.8) == 0.4
    with pytest.raises(ValueError, match="no malignant"):
        E.threshold_for_sensitivity(p, np.zeros(10, int))
    assert E.round_floats({"a": [1.23456789, {"b": 2.0000004}], "c": "x"}) == {"a": [1.234568, {"b": 2.0}], "c": "x"}
    assert E.sklearn_auc([0, 1, 1], [0.1, 0.9, 0.8]) == 1.0 and E.sklearn_auc([1, 1], [0.2, 0.3]) is None


def test_raw_size_prefers_declared_then_original_then_decoded() -> None:
    df = pd.DataFrame({"pixels_x": [6000, np.nan, np.nan, 0, np.nan], "pixels_y": [4000, np.nan, np.nan, 0, np.nan],
                       "orig_size": ["1022x767", "200 X 150", None, "512x512", "junk"],
                       "image_width": [1, 2, 300, 4, np.nan], "image_height": [1, 2, 250, 4, np.nan]})
    size = E.raw_size(df)
    assert size["width"].tolist()[:4] == [6000, 200, 300, 512] and np.isnan(size["width"].iloc[4])
    assert size["height"].tolist()[:4] == [4000, 150, 250, 512]
    assert E.has_raw_size(df) and E.has_raw_size(df[["orig_size"]]) and not E.has_raw_size(df[["pixels_x"]])


def test_resolution_bands_in_size_order() -> None:
    w = pd.Series([200, 600, 1024, 6000, 255, np.nan, 256])
    h = pd.Series([150, 450, 768, 4000, 4000, 100, 9000])
    bands = E.resolution_band(w, h)
    assert bands.astype(str).tolist() == ["0-255", "256-511", "512-1023", "2048-up", "0-255", "unknown", "256-511"]
    groups = pd.DataFrame({"source": ["a"] * 7, "resolution": bands})
    table = E.subgroup_table(groups, [0.9, 0.1, 0.8, 0.2, 0.7, 0.4, 0.6], [1, 0, 1, 0, 0, 1, 1], 0.5)
    res = table[table["kind"] == "resolution"]
    assert res["group"].tolist() == ["0-255", "256-511", "512-1023", "2048-up", "unknown"]  # not alphabetical
    assert res["n"].sum() == 7
    summary = E.subgroup_summary(table, "resolution")
    assert list(summary) == res["group"].tolist() and summary["0-255"]["n"] == 2
    assert set(summary["0-255"]) == {"n", "auc", "sensitivity_at_op", "specificity_at_op"}
    assert E.subgroup_summary(table.iloc[0:0], "resolution") == {}
