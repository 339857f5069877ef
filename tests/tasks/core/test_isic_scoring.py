"""evaluate's metrics against the ISIC Challenge's own scorer (`isic-challenge-scoring`) on a small fixed set.

The scorer is called on its in-memory tables (`ClassificationScore(truth, prediction, weights, metric)`): its CSV
loader (`from_stream` / `from_file`) calls `DataFrame.applymap`, which pandas 3 removed. A binary task is two
categories, malignant and benign (p and 1 - p). The scorer's balanced accuracy labels each image by its
largest category probability, so malignant means p > 0.5; the fixed set has no p of exactly 0.5, where
evaluate (p >= threshold) and the scorer ('undecided') part ways by design.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tasks.core import metrics as M

scoring = pytest.importorskip("isic_challenge_scoring.classification")

# 30 images, 13 malignant; probabilities in steps of 0.1, so with ties (AUC must average them).
Y = np.array([1, 0, 1, 1, 1, 1, 0, 1, 0, 0, 1, 0, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1])
P = np.array([0.9, 0.6, 0.8, 0.4, 0.4, 0.8, 0.0, 1.0, 0.1, 0.4, 0.6, 0.2, 0.4, 0.8, 0.6, 0.6, 0.4, 0.6, 0.7, 0.7,
              0.6, 0.2, 0.2, 0.7, 1.0, 0.3, 0.6, 0.6, 0.7, 0.4])


def official(p: np.ndarray, y: np.ndarray, metric: str = "AUC") -> scoring.ClassificationScore:
    """The scorer's result for binary predictions p of targets y (images ISIC_0000000, ...)."""
    index = pd.Index([f"ISIC_{i:07d}" for i in range(len(y))], name="image")
    truth = pd.DataFrame({"malignant": y.astype(float), "benign": 1.0 - y}, index=index)
    pred = pd.DataFrame({"malignant": p.astype(float), "benign": 1.0 - p}, index=index)
    weights = pd.DataFrame({"score_weight": 1.0, "validation_weight": 1.0}, index=index)
    return scoring.ClassificationScore(truth, pred, weights, getattr(scoring.ClassificationMetric, metric))


def test_fixed_set_is_what_the_docstring_says() -> None:
    assert len(Y) == len(P) == 30 and Y.sum() == 13 and not (P == 0.5).any()
    assert len(np.unique(P)) < len(P)  # ties


def test_auc_and_average_precision_match_the_isic_scorer() -> None:
    ref = official(P, Y)
    mal = ref.per_category.loc["malignant"]
    ours = M.score(P, Y, n_bootstrap=0)
    assert ours["auc"] == pytest.approx(mal["auc"], abs=1e-12)
    assert M.roc_auc(P, Y) == pytest.approx(mal["auc"], abs=1e-12)
    assert M.sklearn_auc(Y, P) == pytest.approx(mal["auc"], abs=1e-12)
    assert ours["average_precision"] == pytest.approx(mal["ap"], abs=1e-12)


def test_balanced_accuracy_sensitivity_specificity_at_half_match_the_isic_scorer() -> None:
    ref = official(P, Y, "BALANCED_ACCURACY")
    ours = M.binary_metrics(P, Y, 0.5)
    assert ours["balanced_accuracy"] == pytest.approx(ref.aggregate["balanced_accuracy"], abs=1e-12)
    assert ref.overall == pytest.approx(ours["balanced_accuracy"], abs=1e-12)
    mal = ref.per_category.loc["malignant"]
    assert ours["sensitivity"] == pytest.approx(mal["sensitivity"], abs=1e-12)
    assert ours["specificity"] == pytest.approx(mal["specificity"], abs=1e-12)
    assert ours["precision"] == pytest.approx(mal["ppv"], abs=1e-12)


@pytest.mark.parametrize("threshold", [0.35, 0.6, 0.75])
def test_balanced_accuracy_at_an_operating_point_matches_the_isic_scorer(threshold: float) -> None:
    """At evaluate's stored operating point: the scorer scores the thresholded (one-hot) predictions."""
    decided = (P >= threshold).astype(float)
    ref = official(decided, Y, "BALANCED_ACCURACY")
    ours = M.binary_metrics(P, Y, threshold)
    assert ours["balanced_accuracy"] == pytest.approx(ref.aggregate["balanced_accuracy"], abs=1e-12)


def test_subgroup_auc_matches_the_isic_scorer_per_group() -> None:
    groups = pd.DataFrame({"source": ["a"] * 30, "dataset": np.where(np.arange(30) % 3 == 0, "HAM10000", "ISIC 2020")})
    table = M.subgroup_table(groups, P, Y, threshold=0.5)
    for row in table[table["kind"] == "dataset"].to_dict("records"):
        m = groups["dataset"].to_numpy() == row["group"]
        ref = official(P[m], Y[m], "BALANCED_ACCURACY")
        assert row["auc"] == pytest.approx(ref.per_category.loc["malignant", "auc"], abs=1e-12), row["group"]
        assert row["balanced_accuracy_at_op"] == pytest.approx(ref.aggregate["balanced_accuracy"], abs=1e-12)
