"""The catalogue a local ISIC server serves: an ISIC-style folder's images, metadata and collections."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from isic_client.models import ACQUISITION_FIELDS, ISIC_ID_RE
from tasks.core.errors import InputError
from tasks.fake.isic_folder import image_size, scan_images

__all__ = ["Catalog", "Record", "CatalogError"]

log = logging.getLogger(__name__)

INT_FIELDS = {"age_approx", "pixels_x", "pixels_y", "acquisition_day"}


class CatalogError(InputError):
    """The folder cannot be served (not a folder, unreadable metadata.csv, bad collections.json)."""


@dataclass
class Record:
    seq: int
    isic_id: str
    file: Path
    size: int
    public: bool
    top: dict[str, Any]  # attribution (always; "" when unknown), copyright_license when known
    acquisition: dict[str, Any]
    clinical: dict[str, Any]
    collections: set[int] = field(default_factory=set)
    flat: dict[str, Any] = field(default_factory=dict)  # what the query language matches against

    def __post_init__(self) -> None:
        self.flat = {"isic_id": self.isic_id, "public": self.public, **self.top, **self.acquisition,
                     **self.clinical}


def _typed(key: str, raw: str) -> Any:
    """CSV text -> the JSON type the API uses (ints for ages/pixels, bools); decimals stay strings."""
    low = raw.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if key in INT_FIELDS:
        try:
            return int(float(raw))
        except ValueError:
            return raw
    return raw


class Catalog:
    """The folder's images and metadata in `created` order (= metadata.csv row order), plus collections.

    Entries named like images that are not regular files (directories, named pipes, symlinks leaving the
    folder) and ids with several image files are never served; they are listed in `skipped`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise CatalogError(f"ISIC server root {self.root} is not a folder")
        scan = scan_images(self.root)
        files = {i: p for i, p in scan.files.items() if ISIC_ID_RE.fullmatch(i)}
        rows = self._read_metadata()
        self.records: list[Record] = []
        self.by_id: dict[str, Record] = {}
        self.by_file: dict[str, Record] = {}
        self.skipped: dict[str, str] = {i: why for i, why in scan.problems.items() if ISIC_ID_RE.fullmatch(i)}
        listed = {(r.get("isic_id") or "").strip() for r in rows}
        # Images without a metadata row are still served (pixel sizes from their headers only).
        for row in rows + [{"isic_id": i} for i in files if i not in listed]:
            isic_id = (row.get("isic_id") or "").strip()
            if not ISIC_ID_RE.fullmatch(isic_id):
                self.skipped[isic_id or "<empty>"] = "invalid isic_id"
                continue
            if isic_id in self.by_id:
                self.skipped[isic_id] = "duplicate metadata row"
                continue
            if isic_id not in files:
                self.skipped.setdefault(isic_id, "no image file")
                continue
            self._add(row, files[isic_id])
        if self.skipped:
            log.warning("%s: %d entries not served (e.g. %s)", self.root, len(self.skipped),
                        next(iter(self.skipped.items())))
        self.collections = self._load_collections(rows)

    def _read_metadata(self) -> list[dict[str, str]]:
        path = self.root / "metadata.csv"
        if not path.is_file():
            return []
        try:
            with open(path, newline="", encoding="utf-8-sig") as fh:
                return [dict(r) for r in csv.DictReader(fh)]
        except UnicodeDecodeError as exc:
            raise CatalogError(f"{path} is not UTF-8 ({exc.reason} at byte {exc.start}); re-save it as UTF-8") from None
        except csv.Error as exc:
            raise CatalogError(f"{path}: unreadable CSV ({exc})") from None

    def _add(self, row: dict[str, str], file: Path) -> None:
        acq: dict[str, Any] = {}
        clin: dict[str, Any] = {}
        top: dict[str, Any] = {"attribution": ""}  # always present: isic-cli reads image["attribution"]
        public = True
        for key, raw in row.items():
            if key is None or raw is None or str(raw).strip() == "":
                continue  # the API omits nulls
            value = _typed(key, str(raw))
            if key == "isic_id":
                continue
            if key == "public":
                public = bool(value) if isinstance(value, bool) else True
            elif key in ("attribution", "copyright_license"):
                top[key] = value if key == "copyright_license" else str(raw)
            elif key == "license" and "copyright_license" not in row:
                top["copyright_license"] = value  # older dumps call it `license`
            elif key in ACQUISITION_FIELDS:
                acq[key] = value
            else:
                clin[key] = value
        if "pixels_x" not in acq or "pixels_y" not in acq:
            with open(file, "rb") as fh:
                wh = image_size(fh.read(1 << 16))
            if wh:
                acq.setdefault("pixels_x", wh[0])
                acq.setdefault("pixels_y", wh[1])
        rec = Record(len(self.records), row["isic_id"].strip(), file, file.stat().st_size, public, top,
                     dict(sorted(acq.items())), dict(sorted(clin.items())))
        self.records.append(rec)
        self.by_id[rec.isic_id] = rec
        self.by_file[file.name] = rec

    def _load_collections(self, rows: list[dict[str, str]]) -> list[dict[str, Any]]:
        """collections.json if present; else one per `collection` / `source_dataset` value; else one."""
        cfile = self.root / "collections.json"
        out: list[dict[str, Any]] = []
        if cfile.is_file():
            try:
                raw = json.loads(cfile.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise CatalogError(f"{cfile}: not valid UTF-8 JSON ({exc})") from None
            items = raw.get("results", raw) if isinstance(raw, dict) else raw
            for c in items:
                if not isinstance(c, dict) or "id" not in c or "name" not in c:
                    raise CatalogError(f"{cfile}: every collection needs `id` and `name` (got {c!r})")
                members = set(c.get("isic_ids", []))
                out.append(self._collection(int(c["id"]), str(c["name"]), c))
                for rec in self.records:
                    if rec.isic_id in members:
                        rec.collections.add(int(c["id"]))
            return out
        column = next((c for c in ("collection", "source_dataset") if rows and c in rows[0]), None)
        if column:
            names = sorted({v.strip() for r in rows for v in (r.get(column) or "").split("|") if v.strip()})
            ids = {name: i + 1 for i, name in enumerate(names)}
            out = [self._collection(ids[name], name, {}) for name in names]
            for rec in self.records:
                value = rec.clinical.get(column, "")
                rec.collections.update(ids[v.strip()] for v in str(value).split("|") if v.strip() in ids)
            return out
        for rec in self.records:
            rec.collections.add(1)
        return [self._collection(1, "All images", {"description": f"Every image in {self.root.name}."})]

    @staticmethod
    def _collection(cid: int, name: str, extra: dict[str, Any]) -> dict[str, Any]:
        return {"id": cid, "name": name, "description": extra.get("description", ""),
                "public": extra.get("public", True), "pinned": extra.get("pinned", False),
                "locked": extra.get("locked", False), "doi": extra.get("doi"), "doi_url": extra.get("doi_url")}
