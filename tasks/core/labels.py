"""Binary target from ISIC metadata: the diagnosis hierarchy (current API) or legacy columns (old CSVs).

The hierarchy is the ISIC Archive's own, from its metadata package (`isic-metadata`,
`isic_metadata.diagnosis_hierarchical.DiagnosisEnum`): its top level (`diagnosis_1`) gives the classes, and any
node of it, fully qualified ('Malignant:...:Melanoma, NOS') or by its own name ('Melanoma, NOS'), resolves to
its class (`hierarchy_class`). The package lists the legacy flat `diagnosis` values (`LegacyDxEnum`) but does
not say which class each belongs to: `LEGACY_DX` takes the class from the hierarchy where a legacy value is
also a node of it, and states the rest here (plus HAM10000's `dx` codes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import cache
from typing import Any, Literal

from isic_metadata.diagnosis_hierarchical import DiagnosisEnum
from isic_metadata.fields import LegacyDxEnum

Label = Literal["malignant", "benign", "indeterminate", "unknown"]

# The hierarchy's top level, lower-cased: ("benign", "indeterminate", "malignant").
HIERARCHY_CLASSES: tuple[str, ...] = tuple(sorted({m.value.split(":")[0].lower() for m in DiagnosisEnum}))
# Deeper levels: they name their class too when level 1 is absent.
HIERARCHY_COLUMNS = ("diagnosis_2", "diagnosis_3", "diagnosis_4", "diagnosis_5")

# Legacy values that are not nodes of the hierarchy (lower-cased), with the class the hierarchy gives the
# nearest node: actinic keratosis -> 'Indeterminate:...:Solar or actinic keratosis', AIMP -> 'Indeterminate
# melanocytic proliferations'. 'other' decides nothing (ISIC 2020's benign rows say 'unknown' here and carry
# benign_malignant).
_LEGACY_NOT_IN_HIERARCHY: dict[str, Label] = {
    "melanoma": "malignant", "squamous cell carcinoma": "malignant",
    "actinic keratosis": "indeterminate", "aimp": "indeterminate",
    "atypical melanocytic proliferation": "indeterminate",
    "adnexal tumor": "benign", "angioma": "benign", "cafe-au-lait macule": "benign", "lichenoid keratosis": "benign",
    "mucosal melanosis": "benign", "nevus spilus": "benign", "acrochordon": "benign",
    "angiofibroma or fibrous papule": "benign", "vascular lesion": "benign",
    "other": "unknown",
}
# HAM10000 `dx` codes (akiec: actinic keratoses AND intraepithelial carcinoma, counted malignant as before).
_HAM_DX: dict[str, Label] = {"mel": "malignant", "bcc": "malignant", "akiec": "malignant", "scc": "malignant",
                             "nv": "benign", "bkl": "benign", "df": "benign", "vasc": "benign"}


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


@cache
def _hierarchy() -> dict[str, str]:
    """Lower-cased node -> class: every fully qualified value and every node's own name (all unique)."""
    out: dict[str, str] = {}
    for member in DiagnosisEnum:
        levels = member.value.split(":")
        out[member.value.lower()] = levels[0].lower()
        out.setdefault(levels[-1].lower(), levels[0].lower())
    return out


def hierarchy_class(value: str) -> Label | None:
    """'malignant' / 'benign' / 'indeterminate' of a hierarchy node (any level, any case); None if not a node."""
    return _hierarchy().get(_text(value).lower())  # type: ignore[return-value]


def _legacy_table() -> dict[str, Label]:
    table: dict[str, Label] = {}
    for member in LegacyDxEnum:
        key = member.value.lower()
        table[key] = _LEGACY_NOT_IN_HIERARCHY.get(key) or hierarchy_class(key) or "benign"
    return {**table, **_HAM_DX, "unknown": "unknown", "": "unknown"}


LEGACY_DX: dict[str, Label] = _legacy_table()  # lower-cased legacy `diagnosis` / HAM `dx` value -> label


def legacy_label(value: str) -> Label:
    """Label of a legacy `diagnosis` / `dx` value ('_' read as ' '): the table, else the hierarchy (a newer
    export's node name), else benign (the archive's flat list was mostly benign names)."""
    key = _text(value).lower().replace("_", " ")
    return LEGACY_DX.get(key) or hierarchy_class(key) or "benign"


def label_of(row: Mapping[str, Any]) -> tuple[Label, str]:
    """(label, which column decided it); the hierarchy wins over legacy columns when both are present."""
    d1 = _text(row.get("diagnosis_1"))
    if d1:
        key = d1.lower()
        if key in HIERARCHY_CLASSES:
            return key, "diagnosis_1"  # type: ignore[return-value]
        return "unknown", "diagnosis_1"
    for col in HIERARCHY_COLUMNS:  # a deeper level without level 1 still names its class
        cls = hierarchy_class(_text(row.get(col)))
        if cls:
            return cls, col
    bm = _text(row.get("benign_malignant")).lower()
    if bm:
        if bm in ("malignant", "benign"):
            return bm, "benign_malignant"  # type: ignore[return-value]
        if bm.startswith("indeterminate"):
            return "indeterminate", "benign_malignant"
    for col in ("diagnosis", "dx"):
        dx = _text(row.get(col))
        if not dx:
            continue
        label = legacy_label(dx)
        if label == "unknown":
            continue  # e.g. ISIC 2020 benign rows say "unknown" here but carry benign_malignant
        return label, col
    return "unknown", ""


def target_of(label: Label, indeterminate: Literal["drop", "benign", "malignant"] = "drop") -> int | None:
    """0/1 for training, or None when the row must be dropped."""
    if label == "malignant":
        return 1
    if label == "benign":
        return 0
    if label == "indeterminate" and indeterminate != "drop":
        return 1 if indeterminate == "malignant" else 0
    return None
