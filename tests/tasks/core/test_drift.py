"""Drift checks (tasks/core/drift.py) on synthetic data: quiet when both sides come from one distribution,
loud when one sex / site / source dominates, the age shifts, images are darkened or the embedding moves."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tasks.core import drift as D


def rows(n: int, seed: int, *, male: float = 0.5, site: str | None = None, source: str | None = None,
         age: float = 50.0, malignant: float = 0.3) -> pd.DataFrame:
    r = np.random.default_rng(seed)
    sites = ["back", "leg", "arm", "face"]
    return pd.DataFrame({
        "source": source or r.choice(["clinic-a", "clinic-b"], n),
        "isic_id": [f"ISIC_{seed}{i:06d}" for i in range(n)],
        "sex": r.choice(["male", "female"], n, p=[male, 1 - male]),
        "age_approx": (r.normal(age, 15, n) / 5).round() * 5,
        "anatom_site_general": site or r.choice(sites, n),
        "source_dataset": r.choice(["HAM10000", "ISIC 2020"], n),
        "target": (r.random(n) < malignant).astype(int),
    })


def images(n: int, seed: int, darken: float = 1.0) -> pd.DataFrame:
    r = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = np.clip(r.normal(150, 30, (24, 32, 3)) * np.array([1.1, 0.85, 0.8]), 0, 255) * darken
        out.append(D.image_stats(img.astype(np.uint8)))
    return pd.DataFrame(out)


def test_same_distribution_is_not_drift() -> None:
    r = np.random.default_rng(0)
    rep = D.drift_report(rows(600, 1), rows(300, 2), reference_images=images(200, 1), new_images=images(150, 2),
                         reference_features=r.normal(size=(300, 8)), new_features=r.normal(size=(200, 8)))
    assert rep["status"] == "ok" and not rep["drifted"] and rep["reasons"] == []
    assert set(rep["metadata"]) == {"sex", "site", "source", "dataset", "target", "age_approx"}
    assert all(not c["drift"] for kind in ("metadata", "images", "embedding") for c in rep[kind].values()
               if "drift" in c)
    assert rep["embedding"]["classifier"]["auc"] < 0.6 and rep["embedding"]["mmd"]["p_value"] > 0.01


@pytest.mark.parametrize("kwargs, check", [
    ({"male": 0.97}, "sex"),
    ({"site": "face"}, "site"),
    ({"source": "clinic-new"}, "source"),
    ({"malignant": 0.8}, "target"),
    ({"age": 75.0}, "age_approx"),
])
def test_a_dominating_group_or_shifted_age_is_drift(kwargs: dict, check: str) -> None:
    rep = D.drift_report(rows(600, 1), rows(300, 2, **kwargs))
    assert rep["drifted"] and rep["status"] == "drift"
    assert rep["metadata"][check]["drift"]
    assert [c for c, v in rep["metadata"].items() if v["drift"]] == [check]
    assert any(r.startswith(check) for r in rep["reasons"])


def test_source_dataset_dominating_is_drift() -> None:
    new = rows(300, 2).assign(source_dataset="HAM10000")
    rep = D.drift_report(rows(600, 1), new)
    assert rep["metadata"]["dataset"]["drift"] and rep["metadata"]["dataset"]["new"]["HAM10000"] == 1.0


def test_darkened_images_drift_in_brightness_and_colour() -> None:
    rep = D.drift_report(rows(300, 1), rows(200, 2), reference_images=images(200, 1),
                         new_images=images(150, 2, darken=0.6))
    assert rep["images"]["brightness"]["drift"] and rep["images"]["brightness"]["effect"] < -0.5
    assert not rep["images"]["width"]["drift"]  # same size
    assert any("brightness" in r for r in rep["reasons"])


def test_embedding_shift_is_found_by_the_classifier_and_mmd() -> None:
    r = np.random.default_rng(0)
    ref = r.normal(size=(300, 16))
    new = r.normal(size=(200, 16))
    new[:, :3] += 1.0  # a new camera moves a few feature directions
    rep = D.drift_report(rows(300, 1), rows(200, 2), reference_features=ref, new_features=new)
    c = rep["embedding"]["classifier"]
    assert c["drift"] and c["auc"] > 0.8 and c["p_value"] < 1e-6
    assert rep["embedding"]["mmd"]["p_value"] < 0.01 and rep["embedding"]["mmd"]["mmd2"] > 0


def test_too_few_new_rows_are_reported_but_not_called_drift() -> None:
    rep = D.drift_report(rows(300, 1), rows(10, 2, male=1.0), thresholds=D.Thresholds(min_new=20))
    assert rep["status"] == "too-few" and not rep["drifted"] and rep["reasons"] == []
    assert rep["metadata"]["sex"]["new"]["male"] == 1.0 and "min_new" in rep["note"]
    assert D.drift_report(rows(300, 1), rows(0, 2))["status"] == "no-new-data"


def test_effect_size_guards_against_tiny_but_significant_differences() -> None:
    # 52 % vs 50 % male over 40k rows is "significant" but not drift
    ref = pd.DataFrame({"sex": ["male"] * 20000 + ["female"] * 20000, "source": "a"})
    new = pd.DataFrame({"sex": ["male"] * 20800 + ["female"] * 19200, "source": "a"})
    c = D.drift_report(ref, new)["metadata"]["sex"]
    assert c["p_value"] < 0.01 and c["effect"] < 0.1 and not c["drift"]


def test_categorical_and_numeric_tests_edge_cases() -> None:
    same = D.categorical_test(["a"] * 5, ["a"] * 7)
    assert same["p_value"] == 1.0 and same["effect"] == 0.0
    assert D.categorical_test([], ["a"])["p_value"] is None
    n = D.numeric_test([1.0, np.nan], [2.0, 3.0])
    assert n["p_value"] is None and n["missing_reference"] == 0.5
    assert D.smd(np.ones(5), np.ones(5)) == 0.0 and D.smd(np.ones(5), np.full(5, 2.0)) == np.inf


def test_metadata_frame_normalises_columns() -> None:
    df = pd.DataFrame({"sex": ["MALE", None, "x"], "anatom_site_1": [None, "Back", "leg"],
                       "anatom_site_general": ["head/neck", None, None], "source": ["s", "s", "s"],
                       "target": [0, 1, None], "age_approx": [30, None, 40]})
    m = D.metadata_frame(df)
    assert m["sex"].tolist() == ["male", "unknown", "unknown"]
    assert m["site"].tolist() == ["head/neck", "back", "leg"]
    assert m["target"].tolist() == ["benign", "malignant", "unknown"] and m["dataset"].eq("unknown").all()
