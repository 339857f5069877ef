"""Binary target from ISIC metadata: the diagnosis hierarchy (current API) or legacy columns (old CSVs)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

Label = Literal["malignant", "benign", "indeterminate", "unknown"]

# Legacy flat `diagnosis` (ISIC archive <= 2024) and HAM10000 `dx` codes.
_LEGACY_MALIGNANT = {
    "melanoma", "melanoma metastasis", "basal cell carcinoma", "squamous cell carcinoma",
    "merkel cell carcinoma", "mel", "bcc", "akiec", "scc",
}
_LEGACY_INDETERMINATE = {"actinic keratosis", "aimp", "atypical melanocytic proliferation", "atypical spitz tumor"}
_LEGACY_UNKNOWN = {"other", "unknown", ""}


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def label_of(row: Mapping[str, Any]) -> tuple[Label, str]:
    """(label, which column decided it); the hierarchy wins over legacy columns when both are present."""
    d1 = _text(row.get("diagnosis_1"))
    if d1:
        key = d1.lower()
        if key in ("malignant", "benign", "indeterminate"):
            return key, "diagnosis_1"  # type: ignore[return-value]
        return "unknown", "diagnosis_1"
    bm = _text(row.get("benign_malignant")).lower()
    if bm:
        if bm in ("malignant", "benign"):
            return bm, "benign_malignant"  # type: ignore[return-value]
        if bm.startswith("indeterminate"):
            return "indeterminate", "benign_malignant"
    for col in ("diagnosis", "dx"):
        dx = _text(row.get(col)).lower().replace("_", " ")
        if not dx:
            continue
        if dx in _LEGACY_MALIGNANT:
            return "malignant", col
        if dx in _LEGACY_INDETERMINATE:
            return "indeterminate", col
        if dx in _LEGACY_UNKNOWN:
            continue  # e.g. ISIC 2020 benign rows say "unknown" here but carry benign_malignant
        return "benign", col
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
