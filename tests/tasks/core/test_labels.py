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


# --------------------------------------------------------------------------- the ISIC Archive's own definitions
def test_classes_are_the_official_hierarchy_top_level():
    from isic_metadata.diagnosis_hierarchical import DiagnosisEnum

    from tasks.core.labels import HIERARCHY_CLASSES

    assert HIERARCHY_CLASSES == ("benign", "indeterminate", "malignant")
    assert {m.value.split(":")[0].lower() for m in DiagnosisEnum} == set(HIERARCHY_CLASSES)


@pytest.mark.parametrize(
    "value,cls",
    [
        ("Malignant:Malignant melanocytic proliferations (Melanoma):Melanoma, NOS", "malignant"),
        ("Melanoma, NOS", "malignant"),  # a node by its own name
        ("melanoma in situ", "malignant"),  # any case
        ("Nevus", "benign"),
        ("Solar or actinic keratosis", "indeterminate"),
        ("Basal cell carcinoma", "malignant"),
        ("not a diagnosis", None),
        ("", None),
    ],
)
def test_hierarchy_class(value, cls):
    from tasks.core.labels import hierarchy_class

    assert hierarchy_class(value) == cls


def test_every_official_legacy_value_has_an_explicit_label():
    """A legacy value the package adds later fails here instead of silently becoming benign; where a legacy
    value is also a node of the hierarchy, the table says what the hierarchy says."""
    from isic_metadata.fields import LegacyDxEnum

    from tasks.core.labels import _LEGACY_NOT_IN_HIERARCHY, LEGACY_DX, hierarchy_class

    for member in LegacyDxEnum:
        key = member.value.lower()
        node = hierarchy_class(key)
        assert node is not None or key in _LEGACY_NOT_IN_HIERARCHY, member.value
        assert LEGACY_DX[key] == (node or _LEGACY_NOT_IN_HIERARCHY[key]), member.value
    assert LEGACY_DX["melanoma"] == LEGACY_DX["melanoma metastasis"] == "malignant"
    assert LEGACY_DX["atypical spitz tumor"] == "indeterminate"


# Labels of the former hand-written tables, which the official definitions must keep.
FORMER = {"melanoma": "malignant", "melanoma metastasis": "malignant", "basal cell carcinoma": "malignant",
          "squamous cell carcinoma": "malignant", "merkel cell carcinoma": "malignant", "mel": "malignant",
          "bcc": "malignant", "akiec": "malignant", "scc": "malignant", "actinic keratosis": "indeterminate",
          "aimp": "indeterminate", "atypical melanocytic proliferation": "indeterminate",
          "atypical spitz tumor": "indeterminate", "nv": "benign", "bkl": "benign", "df": "benign",
          "vasc": "benign", "nevus": "benign", "seborrheic_keratosis": "benign", "pigmented benign keratosis": "benign",
          "dermatofibroma": "benign", "vascular lesion": "benign", "solar lentigo": "benign", "lentigo NOS": "benign",
          "angioma": "benign", "adnexal tumor": "benign", "made-up name": "benign"}


@pytest.mark.parametrize("dx,label", sorted(FORMER.items()))
def test_legacy_labels_unchanged(dx, label):
    assert label_of({"diagnosis": dx}) == (label, "diagnosis")


def test_legacy_hierarchy_names_and_deeper_levels():
    # a newer export's node name in the flat column: formerly "benign" by default, now its class
    assert label_of({"diagnosis": "Melanoma in situ"}) == ("malignant", "diagnosis")
    # a deeper hierarchy level without diagnosis_1 still decides, before the legacy columns
    assert label_of({"diagnosis_2": "Malignant epidermal proliferations", "benign_malignant": "benign"}) == \
        ("malignant", "diagnosis_2")
    assert label_of({"diagnosis_3": "Nevus"}) == ("benign", "diagnosis_3")
    assert label_of({"diagnosis_2": "no such node", "dx": "mel"}) == ("malignant", "dx")
    assert label_of({"diagnosis": "other"}) == ("unknown", "")
