"""evaluate: the pure scoring functions against hand-computed values, then the stage on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks import evaluate as E
from tasks.core.config import Params, parse_params
from tasks.core.io import Paths
from tasks.train import INPUT_STAGE


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


def test_age_bands_and_subgroup_table() -> None:
    bands = E.age_band(pd.Series([5, 30, 44.9, 45, 80, np.nan, 250]), [0, 30, 45, 60, 75, 200])
    assert bands.tolist() == ["0-30", "30-45", "30-45", "45-60", "75-200", "unknown", "unknown"]
    df = pd.DataFrame({"source": ["a", "a", "b", "b"], "sex": ["male", "FEMALE", None, "x"],
                       "age_approx": [20, 50, np.nan, 70], "anatom_site_1": ["back", None, "leg", "back"]})
    g = E.subgroup_frame(df, [0, 30, 60, 200])
    assert g["sex"].tolist() == ["male", "female", "unknown", "unknown"]
    assert g["site"].tolist() == ["back", "unknown", "leg", "back"]
    table = E.subgroup_table(g, [0.9, 0.2, 0.8, 0.3], [1, 0, 1, 0], threshold=0.5)
    by_kind = table.groupby("kind")["n"].sum()
    assert (by_kind == 4).all() and set(by_kind.index) == {"source", "sex", "age_band", "site"}
    with_dataset = E.subgroup_frame(df.assign(source_dataset=["HAM", "HAM", None, "2017"]), [0, 200])
    assert with_dataset["dataset"].tolist() == ["HAM", "HAM", "unknown", "2017"]
    row = table[(table["kind"] == "source") & (table["group"] == "a")].iloc[0]
    assert row["auc"] == 1.0 and row["sensitivity_at_op"] == 1.0 and row["fn_at_op"] == 0


def test_confident_mistakes_orders_by_confidence() -> None:
    pred = pd.DataFrame({"isic_id": list("abcde"), "target": [1, 0, 1, 0, 0],
                         "probability_malignant": [0.05, 0.95, 0.3, 0.6, 0.1]})
    got = E.confident_mistakes(pred, 0.5, 10)
    assert got["isic_id"].tolist() == ["a", "b", "c", "d"]  # e is right; a (p=.05, malignant) is the surest miss


def _no_mlflow(params: Params) -> Params:
    data = params.model_dump(mode="json")
    data["evaluate"]["mlflow"] = False
    return parse_params(data)


def test_evaluate_stage_reports_consistent_metrics(lf_trained: Path, lf_tiny_params: Params) -> None:
    paths = Paths(lf_trained)
    summary = E.run(_no_mlflow(lf_tiny_params), paths)
    out = paths.reports / "evaluate"
    metrics = json.loads((out / "metrics.json").read_text())
    pred = pd.read_csv(out / "predictions.csv")
    assert len(pred) == metrics["n"] == summary["n_test"] == 24
    # The report is exactly what the predictions say.
    assert metrics["auc"] == pytest.approx(E.roc_auc(pred["probability_malignant"], pred["target"]), abs=1e-6)
    assert metrics["at_operating_point"]["fn"] == int(((pred["prediction"] == 0) & (pred["target"] == 1)).sum())
    cfg = json.loads((paths.models / "classifier.json").read_text())
    assert metrics["at_operating_point"]["threshold"] == pytest.approx(cfg["threshold"], abs=1e-6)
    assert metrics["auc_ci_low"] <= metrics["auc"] <= metrics["auc_ci_high"]
    assert sum(v["n"] for v in metrics["by_source"].values()) == 24
    sub = pd.read_csv(out / "subgroups.csv")
    assert set(sub["kind"]) == {"source", "sex", "age_band", "site"}
    for name in ("roc", "pr", "confusion", "calibration", "thresholds", "mistakes", "gradcam"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    for name in ("roc", "pr", "calibration", "thresholds", "confusion"):
        assert len(pd.read_csv(out / f"{name}.csv")) > 1, name
    assert metrics["auc"] > 0.8
    assert "mlflow" not in summary  # evaluate.mlflow: false logs nothing


def test_score_model_on_raw_images_matches_the_stage(lf_trained: Path, lf_tiny_params: Params) -> None:
    """score_model re-preprocesses the raw images with the model's stored config; same numbers as evaluate."""
    paths = Paths(lf_trained)
    E.run(_no_mlflow(lf_tiny_params), paths)
    index = pd.read_parquet(paths.index(INPUT_STAGE))
    s = E.score_model(paths.models, index, paths, n_bootstrap=0, with_predictions=True)
    stage = pd.read_csv(paths.reports / "evaluate" / "predictions.csv")
    got = pd.DataFrame(s["predictions"]).merge(stage, on=["source", "isic_id"])
    assert len(got) == 24 and s["n_errors"] == 0
    np.testing.assert_allclose(got["probability_malignant_x"], got["probability_malignant_y"], atol=1e-5)
    metrics = json.loads((paths.reports / "evaluate" / "metrics.json").read_text())
    assert s["auc"] == pytest.approx(metrics["auc"], abs=1e-6)
    assert s["false_negatives"] == metrics["at_operating_point"]["fn"]
    by_params = E.score_model(str(paths.models / "classifier.keras"), lf_tiny_params, paths)  # nightly's call
    assert by_params["auc"] == pytest.approx(s["auc"], abs=1e-6) and by_params["auc_ci_low"] is not None
