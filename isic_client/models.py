"""Typed records of the ISIC Archive API v2, tolerant of omitted and extra fields (the API omits nulls)."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

ISIC_ID_RE = re.compile(r"ISIC_[0-9]{7}")  # not \d: that also matches non-ASCII digits
LICENSES = ("CC-0", "CC-BY", "CC-BY-NC")

# isic-metadata's registry puts these in `metadata.acquisition`; everything else is `clinical`.
ACQUISITION_FIELDS = frozenset(
    {"pixels_x", "pixels_y", "image_type", "dermoscopic_type", "image_manipulation",
     "blurry", "color_tint", "hairy", "marker_pen"}
)
# Keys the search DSL accepts (isic-metadata 5.1.0 registry fields with a search config + core fields).
SEARCHABLE_FIELDS = frozenset(
    {"isic_id", "public", "age_approx", "copyright_license", "sex",
     *(f"diagnosis_{i}" for i in range(1, 6)), "diagnosis_confirm_type",
     *(f"anatom_site_{i}" for i in range(1, 6)), "anatom_site_special",
     "image_type", "dermoscopic_type", "tbp_tile_type", "image_manipulation",
     "mel_mitotic_index", "mel_thick_mm", "mel_ulcer", "clin_size_long_diam_mm",
     "fitzpatrick_skin_type", "melanocytic", "concomitant_biopsy", "personal_hx_mm",
     "family_hx_mm", "patient_id", "lesion_id", "rcm_case_id", "color_tint", "blurry",
     "hairy", "marker_pen"}
)
# Retired fields (old CSVs still carry them; today's search rejects them) -> what replaced them.
RETIRED_FIELDS: dict[str, str] = {
    "benign_malignant": 'diagnosis_1 (Benign | Malignant | Indeterminate), e.g. diagnosis_1:Malignant',
    "diagnosis": 'diagnosis_1..diagnosis_5, e.g. diagnosis_2:"Malignant melanocytic proliferations '
                 '(Melanoma)" or diagnosis_3:Melanoma*',
    "anatom_site_general": 'anatom_site_1..anatom_site_5, e.g. anatom_site_1:"Lower extremity"',
    "legacy_dx": "diagnosis_1..diagnosis_5",
    "mel_class": "diagnosis_3..diagnosis_5",
    "mel_type": "diagnosis_4..diagnosis_5",
    "nevus_type": "diagnosis_3..diagnosis_5",
}


def validate_isic_id(s: Any) -> str:
    """Return `s` if it is `ISIC_` + 7 digits, else raise ValueError (it becomes a file name and a URL)."""
    if not isinstance(s, str) or not ISIC_ID_RE.fullmatch(s):
        raise ValueError(f"invalid isic_id {s!r}: expected 'ISIC_' followed by 7 digits, e.g. ISIC_0000000")
    return s


class _Record(BaseModel):
    """Unknown fields are kept (the API grows), missing ones default (the API omits nulls)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)


class FileRef(_Record):
    url: str
    size: int | None = None  # bytes; the only integrity information the API exposes


class ImageFiles(_Record):
    full: FileRef | None = None
    thumbnail_256: FileRef | None = None


class ImageMetadata(_Record):
    """`metadata.acquisition` + `metadata.clinical`; also readable like the JSON dict (`md["clinical"]`)."""

    acquisition: dict[str, Any] = Field(default_factory=dict)
    clinical: dict[str, Any] = Field(default_factory=dict)

    def __getitem__(self, key: str) -> dict[str, Any]:
        if key not in ("acquisition", "clinical"):
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in ("acquisition", "clinical") else default

    def flat(self) -> dict[str, Any]:
        """acquisition and clinical merged (the groups share no keys in the registry)."""
        return {**self.acquisition, **self.clinical}


class Image(_Record):
    """One image record. `isic_id` is not validated here so one odd record cannot abort a whole search;
    every consumer that turns it into a path or URL calls `validate_isic_id` first."""

    isic_id: str
    public: bool | None = None
    copyright_license: str | None = None
    attribution: str | None = None
    files: ImageFiles = Field(default_factory=ImageFiles)
    metadata: ImageMetadata = Field(default_factory=ImageMetadata)

    @property
    def full_url(self) -> str | None:
        return self.files.full.url if self.files.full else None

    @property
    def full_size(self) -> int | None:
        return self.files.full.size if self.files.full else None

    def flat_metadata(self) -> dict[str, Any]:
        """isic-cli's metadata.csv row: isic_id, attribution, copyright_license, then the sorted union of
        acquisition and clinical keys (values as given: decimal strings stay strings)."""
        row: dict[str, Any] = {
            "isic_id": self.isic_id,
            "attribution": self.attribution,
            "copyright_license": self.copyright_license,
        }
        flat = self.metadata.flat()
        for key in sorted(flat):
            row.setdefault(key, flat[key])
        return row


class Collection(_Record):
    id: int
    name: str
    description: str = ""
    public: bool | None = None
    pinned: bool | None = None
    locked: bool | None = None
    doi: str | None = None
    doi_url: str | None = None


class Page(_Record):
    """One page of `images/` or `images/search/`; `count` is null on every page but the first."""

    count: int | None = None
    next: str | None = None
    previous: str | None = None
    results: list[Image] = Field(default_factory=list)


class CollectionPage(_Record):
    count: int | None = None
    next: str | None = None
    previous: str | None = None
    results: list[Collection] = Field(default_factory=list)
