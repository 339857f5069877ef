"""evaluate: subgroups and mistakes, then the stage on the tiny model (metric maths: tests/tasks/core/)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks import evaluate as E
from tasks.core import metrics as M
from tasks.core.config import Params, parse_params
from tasks.core.io import Paths
from tasks.models.bundle import score_model
from tasks.models.inputs import INPUT_STAGE


def test_age_bands_and_subgroup_table() -> None:
    bands = M.age_band(pd.Series([5, 30, 44.9, 45, 80, np.nan, 250]), [0, 30, 45, 60, 75, 200])
    assert bands.tolist() == ["0-30", "30-45", "30-45", "45-60", "75-200", "unknown", "unknown"]
    df = pd.DataFrame({"source": ["a", "a", "b", "b"], "sex": ["male", "FEMALE", None, "x"],
                       "age_approx": [20, 50, np.nan, 70], "anatom_site_1": ["back", None, "leg", "back"]})
    g = E.subgroup_frame(df, [0, 30, 60, 200])
    assert g["sex"].tolist() == ["male", "female", "unknown", "unknown"]
    assert g["site"].tolist() == ["back", "unknown", "leg", "back"]
    table = M.subgroup_table(g, [0.9, 0.2, 0.8, 0.3], [1, 0, 1, 0], threshold=0.5)
    by_kind = table.groupby("kind")["n"].sum()
    assert (by_kind == 4).all() and set(by_kind.index) == {"source", "sex", "age_band", "site"}
    with_dataset = E.subgroup_frame(df.assign(source_dataset=["HAM", "HAM", None, "2017"]), [0, 200])
    assert with_dataset["dataset"].tolist() == ["HAM", "HAM", "unknown", "2017"]
    row = table[(table["kind"] == "source") & (table["group"] == "a")].iloc[0]
    assert row["auc"] == 1.0 and row["sensitivity_at_op"] == 1.0 and row["fn_at_op"] == 0


def test_shortcut_subgroups_dataset_and_resolution() -> None:
    """source_dataset and the raw image's size band sit beside sex/age/site, only when the index has them."""
    df = pd.DataFrame({"source": ["a"] * 4, "sex": ["male"] * 4, "age_approx": [20, 50, 60, 70],
                       "anatom_site_1": ["back"] * 4,
                       "source_dataset": ["HAM10000", "ISIC 2020", "ISIC 2020", "UDA-1"],
                       "pixels_x": [np.nan, 6000, np.nan, np.nan], "pixels_y": [np.nan, 4000, np.nan, np.nan],
                       "orig_size": ["600x450", None, "1024x1024", None],
                       "image_width": [600, 512, 1024, 300], "image_height": [450, 512, 1024, 200]})
    g = E.subgroup_frame(df, [0, 200])
    assert list(g.columns) == ["source", "dataset", "resolution", "sex", "age_band", "site"]
    assert g["resolution"].astype(str).tolist() == ["256-511", "2048-up", "1024-2047", "0-255"]
    table = M.subgroup_table(g, [0.9, 0.2, 0.8, 0.3], [1, 0, 1, 0], threshold=0.5)
    assert table["kind"].drop_duplicates().tolist() == ["source", "dataset", "resolution", "sex", "age_band", "site"]
    assert table[table["kind"] == "resolution"]["group"].tolist() == ["0-255", "256-511", "1024-2047", "2048-up"]
    plain = E.subgroup_frame(df.drop(columns=["source_dataset", "pixels_x", "pixels_y", "orig_size",
                                              "image_width", "image_height"]), [0, 200])
    assert list(plain.columns) == ["source", "sex", "age_band", "site"]


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
    assert metrics["auc"] == pytest.approx(M.roc_auc(pred["probability_malignant"], pred["target"]), abs=1e-6)
    assert metrics["at_operating_point"]["fn"] == int(((pred["prediction"] == 0) & (pred["target"] == 1)).sum())
    cfg = json.loads((paths.models / "classifier.json").read_text())
    assert metrics["at_operating_point"]["threshold"] == pytest.approx(cfg["threshold"], abs=1e-6)
    assert metrics["auc_ci_low"] <= metrics["auc"] <= metrics["auc_ci_high"]
    assert sum(v["n"] for v in metrics["by_source"].values()) == 24
    sub = pd.read_csv(out / "subgroups.csv")
    assert set(sub["kind"]) == {"source", "sex", "age_band", "site"}  # no dataset / size columns in this index
    assert "by_dataset" not in metrics and "by_resolution" not in metrics
    for name in ("roc", "pr", "confusion", "calibration", "thresholds", "mistakes", "gradcam"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    for name in ("roc", "pr", "calibration", "thresholds", "confusion"):
        assert len(pd.read_csv(out / f"{name}.csv")) > 1, name
    assert metrics["auc"] > 0.8
    assert "mlflow" not in summary  # evaluate.mlflow: false logs nothing


def test_evaluate_stage_reports_shortcut_subgroups(lf_trained: Path, lf_tiny_params: Params, tmp_path: Path) -> None:
    """With source_dataset and raw sizes in the index: dataset and resolution rows in subgroups.csv, by_dataset /
    by_resolution in metrics.json (MLflow metrics test.by_<kind>.*), the bands in predictions.csv."""
    import shutil

    root = tmp_path / "proj"
    shutil.copytree(lf_trained, root, ignore=shutil.ignore_patterns("mlruns", "reports"))
    paths = Paths(root)
    index = pd.read_parquet(paths.index(INPUT_STAGE))
    n = len(index)
    index["source_dataset"] = np.where(np.arange(n) % 2, "HAM10000", "ISIC 2020")
    index["pixels_x"] = np.where(np.arange(n) % 3 == 0, 6000.0, np.nan)
    index["pixels_y"] = np.where(np.arange(n) % 3 == 0, 4000.0, np.nan)
    index["orig_size"] = np.where(np.arange(n) % 3 == 1, "600x450", None)
    index.to_parquet(paths.index(INPUT_STAGE))
    E.run(_no_mlflow(lf_tiny_params), paths)
    out = paths.reports / "evaluate"
    sub = pd.read_csv(out / "subgroups.csv")
    assert sub["kind"].drop_duplicates().tolist() == ["source", "dataset", "resolution", "sex", "age_band", "site"]
    assert (sub.groupby("kind")["n"].sum() == 24).all()
    assert set(sub.loc[sub["kind"] == "dataset", "group"]) == {"HAM10000", "ISIC 2020"}
    assert sub.loc[sub["kind"] == "resolution", "group"].tolist() == ["256-511", "2048-up", "unknown"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["by_dataset"]) == {"HAM10000", "ISIC 2020"}
    assert sum(v["n"] for v in metrics["by_resolution"].values()) == 24
    pred = pd.read_csv(out / "predictions.csv")
    assert {"dataset", "resolution"} <= set(pred.columns)


def test_score_model_on_raw_images_matches_the_stage(lf_trained: Path, lf_tiny_params: Params) -> None:
    """score_model re-preprocesses the raw images with the model's stored config; same numbers as evaluate."""
    paths = Paths(lf_trained)
    E.run(_no_mlflow(lf_tiny_params), paths)
    index = pd.read_parquet(paths.index(INPUT_STAGE))
    s = score_model(paths.models, index, paths, n_bootstrap=0, with_predictions=True)
    stage = pd.read_csv(paths.reports / "evaluate" / "predictions.csv")
    got = pd.DataFrame(s["predictions"]).merge(stage, on=["source", "isic_id"])
    assert len(got) == 24 and s["n_errors"] == 0
    np.testing.assert_allclose(got["probability_malignant_x"], got["probability_malignant_y"], atol=1e-5)
    metrics = json.loads((paths.reports / "evaluate" / "metrics.json").read_text())
    assert s["auc"] == pytest.approx(metrics["auc"], abs=1e-6)
    assert s["false_negatives"] == metrics["at_operating_point"]["fn"]
    by_params = score_model(str(paths.models / "classifier.keras"), lf_tiny_params, paths)  # nightly's call
    assert by_params["auc"] == pytest.approx(s["auc"], abs=1e-6) and by_params["auc_ci_low"] is not None


def test_evaluate_scores_through_the_bundle_with_the_old_numbers(lf_trained: Path, lf_tiny_params: Params) -> None:
    """One scoring path: the stage's probabilities are the bundle's, and equal (bit for bit) to the former
    evaluate code path (processed PNGs + metadata encoding + predict_proba on the bare Keras model)."""
    from tasks.models.bundle import load_bundle, predict_proba
    from tasks.models.classifier import load_keras
    from tasks.models.inputs import MODEL_FILE, encode_metadata, load_config, load_images, test_rows

    paths = Paths(lf_trained)
    E.run(_no_mlflow(lf_tiny_params), paths)
    stage = pd.read_csv(paths.reports / "evaluate" / "predictions.csv")
    rows = test_rows(pd.read_parquet(paths.index(INPUT_STAGE)))
    files = [paths.abs(f) for f in rows["processed_path"]]
    cfg = load_config(paths.models)
    old = predict_proba(load_keras(paths.models / MODEL_FILE), load_images(files, cfg["image_size"]),
                        encode_metadata(rows, cfg["metadata"]), tta=cfg["tta"])
    new, _ = load_bundle(paths.models).predict_processed(files, rows)
    np.testing.assert_array_equal(new, old)
    np.testing.assert_allclose(stage["probability_malignant"], old, rtol=0, atol=1e-12)
    metrics = json.loads((paths.reports / "evaluate" / "metrics.json").read_text())
    expected = M.round_floats(M.score(old, rows["target"], threshold=cfg["threshold"],
                                      n_bootstrap=lf_tiny_params.evaluate.bootstrap, seed=lf_tiny_params.evaluate.seed))
    for key in ("auc", "auc_ci_low", "auc_ci_high", "brier", "ece", "at_operating_point"):
        assert metrics[key] == expected[key], key


def test_evaluate_reads_only_its_own_params_section(lf_trained: Path, lf_tiny_params: Params) -> None:
    """The stage runs on a view holding only [evaluate] (training info comes from classifier.json)."""
    view = _no_mlflow(lf_tiny_params).view(("evaluate",), "evaluate")
    summary = E.run(view, Paths(lf_trained))
    assert summary["n_test"] == 24
