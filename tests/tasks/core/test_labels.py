import pytest

from tasks.core.labels import label_of, target_of


@pytest.mark.parametrize(
    "row,label",
    [
        ({"diagnosis_1": "Malignant", "diagnosis_2": "Malignant melanocytic proliferations (Melanoma)"}, "malignant"),
        ({"diagnosis_1": "Benign"}, "benign"),
        ({"diagnosis_1": "Indeterminate"}, "indeterminate"),
        ({}, "unknown"),
        ({"benign_malignant": "malignant", "diagnosis": "melanoma"}, "malignant"),
        ({"benign_malignant": "indeterminate/benign"}, "indeterminate"),
        ({"diagnosis": "nv"}, "benign"),
        ({"dx": "akiec"}, "malignant"),
        ({"diagnosis": "actinic keratosis"}, "indeterminate"),
        ({"diagnosis": "unknown", "benign_malignant": "benign"}, "benign"),
        ({"diagnosis": "unknown"}, "unknown"),
        ({"diagnosis_1": float("nan"), "benign_malignant": "benign"}, "benign"),
    ],
)
def test_label_of(row, label):
    assert label_of(row)[0] == label


def test_hierarchy_wins_over_legacy():
    assert label_of({"diagnosis_1": "Benign", "benign_malignant": "malignant"}) == ("benign", "diagnosis_1")


def test_target_policy():
    assert target_of("malignant") == 1 and target_of("benign") == 0
    assert target_of("indeterminate") is None and target_of("unknown") is None
    assert target_of("indeterminate", "malignant") == 1 and target_of("indeterminate", "benign") == 0
