"""A local ISIC-API-v2-compatible HTTP server over an ISIC-style folder, with fault injection.

Folder layout (what `isic image download DIR` writes): `<isic_id>.jpg|png` images + `metadata.csv` with the
flattened columns; optional `collections.json`. Used offline by the demo, the tests and the benchmarks.
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import logging
import random
import re
import struct
import threading
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit

from isic_client.models import ACQUISITION_FIELDS, ISIC_ID_RE, LICENSES, SEARCHABLE_FIELDS

__all__ = ["IsicServer", "running_server", "serve_forever", "compile_query", "QueryError",
           "image_size", "write_png", "write_sample_folder"]

log = logging.getLogger("tasks.fake.isic_server")

API_PREFIX = "/api/v2/"
MAX_LIMIT = 100
IMAGE_EXTS = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png",
              ".tif": "image/tiff", ".tiff": "image/tiff"}
INT_FIELDS = {"age_approx", "pixels_x", "pixels_y", "acquisition_day"}
NUMERIC_FIELDS = {"age_approx", "mel_thick_mm", "clin_size_long_diam_mm"}
BOOL_FIELDS = {"public", "concomitant_biopsy", "melanocytic", "personal_hx_mm", "family_hx_mm",
               "mel_ulcer", "blurry", "hairy", "marker_pen"}
# Columns that are not metadata: top-level image fields, or the license under isic-cli-era names.
TOP_LEVEL = {"isic_id", "attribution", "copyright_license", "public"}
VALUE_ALIASES = {("image_type", "clinical"): "clinical: close-up", ("image_type", "overview"): "clinical: overview"}
NOT_FOUND = {"detail": "Not Found"}
BAD_QUERY = {"message": "Could not parse search query."}
BAD_CURSOR = {"detail": [{"type": "value_error", "loc": ["query", "cursor"], "msg": "Value error, Invalid cursor."}]}
LICENSE_TEXT = {
    "CC-0": "CC0 1.0 Universal (CC0 1.0) Public Domain Dedication\n"
            "https://creativecommons.org/publicdomain/zero/1.0/legalcode\n",
    "CC-BY": "Attribution 4.0 International (CC BY 4.0)\nhttps://creativecommons.org/licenses/by/4.0/legalcode\n",
    "CC-BY-NC": "Attribution-NonCommercial 4.0 International (CC BY-NC 4.0)\n"
                "https://creativecommons.org/licenses/by-nc/4.0/legalcode\n",
}


# =========================================================================== image headers
def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG IHDR or a JPEG SOFn header; None when neither parses."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        w, h = struct.unpack(">II", data[16:24])
        return int(w), int(h)
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        (seg_len,) = struct.unpack(">H", data[i + 2:i + 4])
        # SOF0..SOF15 minus DHT (C4), JPG (C8), DAC (CC) carry the frame size.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > len(data):
                return None
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return int(w), int(h)
        if marker == 0xDA:  # start of scan before any SOF: not a valid header
            return None
        i += 2 + seg_len
    return None


def write_png(path: Path, width: int, height: int, seed: int = 0) -> int:
    """A small valid RGB PNG (a seeded colour pattern) written with zlib only; returns its byte size."""
    rng = random.Random(seed)
    base = [rng.randrange(256) for _ in range(3)]
    rows = []
    for y in range(height):
        row = bytearray([0])  # filter type 0
        for x in range(width):
            row += bytes(((base[0] + 7 * x) % 256, (base[1] + 5 * y) % 256, (base[2] + 3 * (x ^ y)) % 256))
        rows.append(bytes(row))

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"".join(rows), 6)) + chunk(b"IEND", b""))
    Path(path).write_bytes(data)
    return len(data)


def write_sample_folder(root: Path, n: int = 12, seed: int = 0, size: tuple[int, int] = (24, 16)) -> Path:
    """A tiny ISIC-style folder (valid PNGs + metadata.csv with current-API columns) for tests/benchmarks.

    Not lesion-like (that is tasks/synthetic.py); varied metadata so search and collections have work."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    cols = ["isic_id", "attribution", "copyright_license", "image_type", "age_approx", "sex", "anatom_site_1",
            "diagnosis_1", "diagnosis_2", "diagnosis_3", "melanocytic", "mel_thick_mm", "patient_id",
            "lesion_id", "collection"]
    dx = [("Benign", "Benign melanocytic proliferations", "Nevus"),
          ("Malignant", "Malignant melanocytic proliferations (Melanoma)", "Melanoma Invasive"),
          ("Malignant", "Malignant adnexal epithelial proliferations - Follicular", "Basal cell carcinoma"),
          ("Indeterminate", "Indeterminate epidermal proliferations", "Solar or actinic keratosis"),
          ("", "", "")]
    rows = []
    for i in range(n):
        isic_id = f"ISIC_{9100000 + i:07d}"
        write_png(root / f"{isic_id}.png", size[0] + i % 3, size[1], seed=seed * 100003 + i)
        d1, d2, d3 = dx[i % len(dx)]
        rows.append({
            "isic_id": isic_id,
            "attribution": ["Anonymous", "Sample Clinic A", "Sample Institute B"][i % 3],
            "copyright_license": LICENSES[i % 3],
            "image_type": "dermoscopic" if i % 4 else "clinical: close-up",
            "age_approx": "" if i % 7 == 6 else str(5 * rng.randrange(4, 17)),
            "sex": "" if i % 5 == 4 else rng.choice(["male", "female"]),
            "anatom_site_1": rng.choice(["Trunk", "Head and neck", "Lower extremity", "Upper extremity"]),
            "diagnosis_1": d1, "diagnosis_2": d2, "diagnosis_3": d3,
            "melanocytic": {"Nevus": "true", "Melanoma Invasive": "true"}.get(d3, "false" if d3 else ""),
            "mel_thick_mm": f"{rng.randrange(10, 300) / 100:.2f}" if d3 == "Melanoma Invasive" else "",
            "patient_id": f"IP_{9100100 + i // 2:07d}",
            "lesion_id": f"IL_{9100200 + i:07d}",
            "collection": "Sample collection A" if i % 2 == 0 else "Sample collection B",
        })
    with open(root / "metadata.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return root


# =========================================================================== query language
class QueryError(ValueError):
    """A query the ISIC DSL would not parse (the server answers 400)."""


_TOKEN_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BARE_VALUE = re.compile(r"[A-Za-z0-9*_.\-]+")


@dataclass(frozen=True)
class _Term:
    field: str
    kind: str  # "present" | "exact" | "wild" | "range"
    value: Any = None

    def __call__(self, rec: dict[str, Any]) -> bool:
        v = rec.get(self.field)
        if v is None or v == "":
            return False
        if self.kind == "present":
            return True
        if self.kind == "range":
            lo, lo_incl, hi, hi_incl = self.value
            try:
                x = float(v)
            except (TypeError, ValueError):
                return False
            if lo is not None and (x < lo or (x == lo and not lo_incl)):
                return False
            return not (hi is not None and (x > hi or (x == hi and not hi_incl)))
        if isinstance(v, bool):
            return str(v).lower() == str(self.value).lower()
        if self.kind == "wild":
            return bool(self.value.fullmatch(str(v)))
        if self.field in NUMERIC_FIELDS:
            try:
                return float(v) == float(self.value)
            except (TypeError, ValueError):
                return False
        return str(v) == self.value  # keyword fields: exact and case-sensitive


def _tokenize(q: str) -> list[tuple[str, Any]]:
    toks: list[tuple[str, Any]] = []
    i, n = 0, len(q)
    while i < n:
        c = q[i]
        if c.isspace():
            i += 1
        elif c in "()":
            toks.append((c, c))
            i += 1
        elif c == "-" and i + 1 < n and (q[i + 1] == "(" or q[i + 1].isalpha() or q[i + 1] == "_"):
            toks.append(("NOT", "-"))
            i += 1
        else:
            m = _TOKEN_FIELD.match(q, i)
            if not m:
                raise QueryError(f"unexpected {c!r} at {i}")
            word, j = m.group(), m.end()
            if word in ("AND", "OR") and (j == n or q[j].isspace() or q[j] in "()"):
                toks.append((word, word))
                i = j
                continue
            if j >= n or q[j] != ":":
                raise QueryError(f"expected field:value at {i}")
            value, i = _read_value(q, j + 1)
            toks.append(("TERM", _make_term(word, value)))
    return toks


def _read_value(q: str, i: int) -> tuple[tuple[str, Any], int]:
    n = len(q)
    if i >= n:
        raise QueryError("missing value")
    if q[i] == '"':
        j, out = i + 1, []
        while j < n and q[j] != '"':
            if q[j] == "\\" and j + 1 < n:
                j += 1
            out.append(q[j])
            j += 1
        if j >= n:
            raise QueryError("unterminated quote")
        return ("quoted", "".join(out)), j + 1
    if q[i] in "[{":
        close = re.compile(r"[\]}]").search(q, i)
        if not close:
            raise QueryError("unterminated range")
        inner = q[i + 1:close.start()].split()
        if len(inner) != 3 or inner[1] != "TO":
            raise QueryError("range must be [a TO b]")
        return ("range", (inner[0], q[i] == "[", inner[2], close.group() == "]")), close.end()
    m = _BARE_VALUE.match(q, i)
    if not m:
        raise QueryError(f"bad value at {i} (quote values with spaces, colons or commas)")
    return ("bare", m.group()), m.end()


def _num(s: str) -> float | None:
    if s == "*":
        return None
    try:
        return float(s)
    except ValueError:
        raise QueryError(f"range bound {s!r} is not a number") from None


def _make_term(fld: str, value: tuple[str, Any]) -> _Term:
    if fld not in SEARCHABLE_FIELDS:  # incl. retired benign_malignant / diagnosis / anatom_site_general
        raise QueryError(f"unknown field {fld!r}")
    kind, v = value
    if kind == "range":
        lo, lo_incl, hi, hi_incl = v
        return _Term(fld, "range", (_num(lo), lo_incl, _num(hi), hi_incl))
    if kind == "bare" and v == "*":
        return _Term(fld, "present")
    if fld in BOOL_FIELDS and v not in ("true", "false"):
        raise QueryError(f"{fld} takes true, false or *")
    if fld in NUMERIC_FIELDS and kind == "bare" and "*" not in v:
        _num(v)
    v = VALUE_ALIASES.get((fld, v), v)
    if kind == "bare" and "*" in v:
        return _Term(fld, "wild", re.compile(".*".join(re.escape(p) for p in v.split("*")), re.DOTALL))
    return _Term(fld, "exact", v)


def compile_query(query: str) -> Callable[[dict[str, Any]], bool]:
    """Compile the ISIC search DSL into a predicate over a flat record; raises QueryError if unparseable.

    Supports field:value, "quoted values", AND / OR / implicit AND, parentheses, -negation (also matches
    records lacking the field), field:* presence, prefix*/*suffix wildcards, [a TO b] / {a TO b} ranges."""
    toks = _tokenize(query)
    if not toks:
        return lambda rec: True
    pos = 0

    def peek() -> str | None:
        return toks[pos][0] if pos < len(toks) else None

    def parse_or() -> Callable[[dict[str, Any]], bool]:
        nonlocal pos
        parts = [parse_and()]
        while peek() == "OR":
            pos += 1
            parts.append(parse_and())
        return parts[0] if len(parts) == 1 else (lambda r, ps=tuple(parts): any(p(r) for p in ps))

    def parse_and() -> Callable[[dict[str, Any]], bool]:
        nonlocal pos
        parts = [parse_unary()]
        while peek() not in (None, "OR", ")"):
            if peek() == "AND":
                pos += 1
            parts.append(parse_unary())
        return parts[0] if len(parts) == 1 else (lambda r, ps=tuple(parts): all(p(r) for p in ps))

    def parse_unary() -> Callable[[dict[str, Any]], bool]:
        nonlocal pos
        kind = peek()
        if kind == "NOT":
            pos += 1
            inner = parse_unary()
            return lambda r: not inner(r)
        if kind == "(":
            pos += 1
            inner = parse_or()
            if peek() != ")":
                raise QueryError("unbalanced parentheses")
            pos += 1
            return inner
        if kind == "TERM":
            term = toks[pos][1]
            pos += 1
            return term
        raise QueryError(f"unexpected {toks[pos][1] if kind else 'end of query'!r}")

    pred = parse_or()
    if pos != len(toks):
        raise QueryError(f"unexpected {toks[pos][1]!r}")
    return pred


# =========================================================================== the catalogue
@dataclass
class _Record:
    seq: int
    isic_id: str
    file: Path
    size: int
    public: bool
    top: dict[str, Any]  # attribution, copyright_license when known
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
    """The folder's images and metadata in `created` order (= metadata.csv row order), plus collections."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"ISIC server root {self.root} is not a folder")
        files = {p.stem: p for p in sorted(self.root.iterdir())
                 if p.suffix.lower() in IMAGE_EXTS and ISIC_ID_RE.fullmatch(p.stem)}
        rows = self._read_metadata()
        self.records: list[_Record] = []
        self.by_id: dict[str, _Record] = {}
        self.by_file: dict[str, _Record] = {}
        self.skipped: dict[str, str] = {}
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
                self.skipped[isic_id] = "no image file"
                continue
            self._add(row, files[isic_id])
        if self.skipped:
            log.warning("%s: %d metadata rows not served (e.g. %s)", self.root, len(self.skipped),
                        next(iter(self.skipped.items())))
        self.collections = self._load_collections(rows)

    def _read_metadata(self) -> list[dict[str, str]]:
        path = self.root / "metadata.csv"
        if not path.exists():
            return []
        with open(path, newline="", encoding="utf-8-sig") as fh:
            return [dict(r) for r in csv.DictReader(fh)]

    def _add(self, row: dict[str, str], file: Path) -> None:
        acq: dict[str, Any] = {}
        clin: dict[str, Any] = {}
        top: dict[str, Any] = {}
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
                top[key] = value
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
        rec = _Record(len(self.records), row["isic_id"].strip(), file, file.stat().st_size, public, top,
                      dict(sorted(acq.items())), dict(sorted(clin.items())))
        self.records.append(rec)
        self.by_id[rec.isic_id] = rec
        self.by_file[file.name] = rec

    def _load_collections(self, rows: list[dict[str, str]]) -> list[dict[str, Any]]:
        """collections.json if present; else one per `collection` / `source_dataset` value; else one."""
        cfile = self.root / "collections.json"
        out: list[dict[str, Any]] = []
        if cfile.exists():
            raw = json.loads(cfile.read_text(encoding="utf-8"))
            items = raw.get("results", raw) if isinstance(raw, dict) else raw
            for c in items:
                if "id" not in c or "name" not in c:
                    raise ValueError(f"{cfile}: every collection needs `id` and `name` (got {c!r})")
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


# =========================================================================== faults
@dataclass
class Fault:
    """A scripted one-shot fault: the next `times` requests whose path contains `match` get it."""

    kind: str  # "status" | "ratelimit" | "truncate" | "stall"
    match: str = ""
    times: int = 1
    status: int = 503
    retry_after: str | None = "1"


@dataclass
class RequestLog:
    role: str  # "api" or "files" (which listener took it)
    method: str
    path: str
    headers: dict[str, str]
    status: int = 0


# =========================================================================== HTTP
class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a pooled client reuses connections like it would with S3
    server_version = "lesionflow-isic-server/0.1"
    timeout = 60  # idle keep-alive connections give their thread back
    # Headers and body go out in separate writes; with Nagle on, the body then waits for the client's
    # delayed ACK (~40 ms per request on Linux), which would swamp any latency we inject on purpose.
    disable_nagle_algorithm = True

    @property
    def isic(self) -> "IsicServer":
        return self.server.isic  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), format % args)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_GET(self) -> None:
        self._dispatch(head=False)

    # ------------------------------------------------------------------ plumbing
    def _dispatch(self, head: bool) -> None:
        srv = self.isic
        entry = RequestLog(self.server.role, self.command, self.path, dict(self.headers.items()))  # type: ignore[attr-defined]
        srv._record(entry)
        self._entry = entry
        self._head = head
        path = urlsplit(self.path).path
        k, fault = srv._next_fault(path)
        if fault == "stall" or any(s in path for s in srv.stall_paths):
            srv._stop.wait(srv.stall_seconds)  # hold the connection; released early on shutdown
            if srv._stop.is_set():
                self.close_connection = True
                return
        if srv.latency_ms:
            time.sleep(srv.latency_ms / 1000.0)
        if isinstance(fault, Fault) and fault.kind == "status":
            return self._json(fault.status, {"detail": "injected failure"})
        if (isinstance(fault, Fault) and fault.kind == "ratelimit") or (
                srv.rate_limit_every and k % srv.rate_limit_every == 0):
            ra = fault.retry_after if isinstance(fault, Fault) else srv.retry_after
            return self._json(429, {"detail": "Too Many Requests"}, {"Retry-After": ra} if ra else None)
        if srv.fail_rate and srv._draw() < srv.fail_rate:
            return self._json(503, {"detail": "Service Unavailable (injected)"})
        truncate = (isinstance(fault, Fault) and fault.kind == "truncate") or (
            srv.truncate_rate > 0 and path.startswith("/images/") and srv._draw() < srv.truncate_rate)
        try:
            self._route(path, truncate)
        except BrokenPipeError:
            self.close_connection = True

    def _send(self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None,
              truncate: bool = False) -> None:
        self._entry.status = status
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))  # always the full length, even when cut
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if truncate:
            self.send_header("Connection", "close")
        self.end_headers()
        if self._head:
            return
        if truncate:
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True  # EOF before Content-Length bytes: the client sees a short body
        else:
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None, truncate: bool = False) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json", headers, truncate)

    def _api_origin(self) -> str:
        """Absolute URLs are built from the Host header, like Django's build_absolute_uri."""
        host = self.headers.get("Host") or "%s:%d" % self.server.server_address[:2]
        return f"http://{host}"

    def _files_origin(self) -> str:
        host = self._api_origin()[len("http://"):]
        if not host.endswith("]"):  # drop the port; "[::1]" alone has none
            host = host.rsplit(":", 1)[0]
        return f"http://{host}:{self.isic.files_port}"

    # ------------------------------------------------------------------ routes
    def _route(self, path: str, truncate: bool) -> None:
        srv = self.isic
        if path.startswith("/images/"):
            rec = srv.catalog.by_file.get(path[len("/images/"):])
            if rec is None:
                return self._json(404, NOT_FOUND)
            return self._send(200, rec.file.read_bytes(), IMAGE_EXTS[rec.file.suffix.lower()], truncate=truncate)
        if not path.startswith(API_PREFIX):
            return self._json(404, NOT_FOUND)
        rest = path[len(API_PREFIX):]
        params = parse_qsl(urlsplit(self.path).query, keep_blank_values=True)
        q = dict(params)
        if rest in ("images/", "images/search/"):
            return self._search(params, q, searching=rest == "images/search/", truncate=truncate)
        m = re.fullmatch(r"images/([^/]+)/", rest)
        if m:
            rec = srv.catalog.by_id.get(m.group(1))
            return self._json(200, self._image(rec), truncate=truncate) if rec else self._json(404, NOT_FOUND)
        if rest == "collections/":
            return self._collections(params, q)
        m = re.fullmatch(r"collections/(\d+)/", rest)
        if m:
            c = next((c for c in srv.catalog.collections if c["id"] == int(m.group(1))), None)
            return self._json(200, c) if c else self._json(404, NOT_FOUND)
        m = re.fullmatch(r"zip-download/license-file/([^/]+)/", rest)
        if m and m.group(1) in LICENSE_TEXT:
            return self._send(200, LICENSE_TEXT[m.group(1)].encode(), "text/plain; charset=utf-8")
        return self._json(404, NOT_FOUND)

    def _image(self, rec: _Record) -> dict[str, Any]:
        url = f"{self._files_origin()}/images/{rec.file.name}"
        return {"isic_id": rec.isic_id, "public": rec.public, **rec.top,
                "files": {"full": {"url": url, "size": rec.size}},
                "metadata": {"acquisition": rec.acquisition, "clinical": rec.clinical}}

    def _limit(self, q: dict[str, str]) -> int | None:
        try:
            n = int(q.get("limit") or 0)
        except ValueError:
            return None
        return MAX_LIMIT if n <= 0 else min(n, MAX_LIMIT)

    def _page_urls(self, params: list[tuple[str, str]], rows: list[Any], start: int, end: int,
                   key: Callable[[Any], int], had_cursor: bool) -> tuple[str | None, str | None]:
        """Absolute next/previous URLs: original params kept, cursor swapped, params sorted (like ninja)."""
        base = f"{self._api_origin()}{urlsplit(self.path).path}"
        kept = [(k, v) for k, v in params if k != "cursor"]

        def url(cursor: str) -> str:
            return base + "?" + urlencode(sorted(kept + [("cursor", cursor)]))

        nxt = url(_cursor(p=key(rows[end - 1]))) if end < len(rows) and end > start else None
        prev = url(_cursor(p=key(rows[start]), r=1)) if had_cursor and start > 0 and end > start else None
        return nxt, prev

    def _paginate(self, params: list[tuple[str, str]], q: dict[str, str], rows: list[Any],
                  key: Callable[[Any], int]) -> tuple[dict[str, Any], list[Any]] | None:
        limit = self._limit(q)
        if limit is None:
            self._json(422, {"detail": [{"type": "int_parsing", "loc": ["query", "limit"],
                                         "msg": "Input should be a valid integer"}]})
            return None
        cursor = q.get("cursor")
        start = 0
        if cursor:
            pos = _decode_cursor(cursor)
            if pos is None:
                self._json(422, BAD_CURSOR)
                return None
            p, reverse = pos
            keys = [key(r) for r in rows]
            if reverse:  # the `limit` rows just before position p
                before = sum(1 for k in keys if k < p)
                start = max(0, before - limit)
            else:
                start = sum(1 for k in keys if k <= p)
        end = min(len(rows), start + limit)
        nxt, prev = self._page_urls(params, rows, start, end, key, bool(cursor))
        return {"count": None if cursor else len(rows), "next": nxt, "previous": prev}, rows[start:end]

    def _search(self, params: list[tuple[str, str]], q: dict[str, str], searching: bool, truncate: bool) -> None:
        srv = self.isic
        try:
            pred = compile_query(q.get("query", "")) if searching else (lambda r: True)
        except QueryError as exc:
            log.debug("bad query %r: %s", q.get("query"), exc)
            return self._json(400, BAD_QUERY)
        wanted: set[int] | None = None
        if searching and q.get("collections"):
            try:
                wanted = {int(c) for c in q["collections"].split(",") if c.strip()}
            except ValueError:
                return self._json(422, {"detail": [{"type": "value_error", "loc": ["query", "collections"],
                                                    "msg": "collections must be comma-separated integers"}]})
        rows = [r for r in srv.catalog.records
                if (wanted is None or r.collections & wanted) and pred(r.flat)]
        page = self._paginate(params, q, rows, key=lambda r: r.seq)
        if page is not None:
            env, chunk = page
            self._json(200, {**env, "results": [self._image(r) for r in chunk]}, truncate=truncate)

    def _collections(self, params: list[tuple[str, str]], q: dict[str, str]) -> None:
        colls = self.isic.catalog.collections
        if q.get("pinned") in ("true", "false"):
            colls = [c for c in colls if c["pinned"] == (q["pinned"] == "true")]
        if q.get("sort") == "name":
            colls = sorted(colls, key=lambda c: c["name"])
        order = {c["id"]: i for i, c in enumerate(colls)}  # keyset over the listing order
        page = self._paginate(params, q, colls, key=lambda c: order[c["id"]])
        if page is not None:
            env, chunk = page
            self._json(200, {**env, "results": chunk})


def _cursor(p: int, r: int | None = None) -> str:
    """Opaque cursor in the API's shape: base64 of a urlencoded `p=<position>` (+ `r=1` for previous)."""
    fields = [("p", str(p))] + ([("r", str(r))] if r else [])
    return base64.b64encode(urlencode(sorted(fields)).encode()).decode()


def _decode_cursor(cursor: str) -> tuple[int, bool] | None:
    try:
        raw = base64.b64decode(cursor.encode(), validate=True).decode()
        d = dict(parse_qsl(raw, strict_parsing=True))
        return int(d["p"]), d.get("r") == "1"
    except (binascii.Error, UnicodeDecodeError, ValueError, KeyError):
        return None


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # 16+ clients connecting at once must not see refused connections
    allow_reuse_address = True


class IsicServer:
    """The catalogue + fault injector + two listeners: the API, and a separate origin for file URLs
    (as in production, where files live on S3), so clients cannot assume same-origin."""

    def __init__(
        self,
        root: Path,
        latency_ms: float = 0,
        fail_rate: float = 0.0,
        rate_limit_every: int = 0,
        truncate_rate: float = 0.0,
        seed: int = 0,
        stall_paths: Sequence[str] = (),
        stall_seconds: float = 30.0,
        retry_after: str = "1",
    ) -> None:
        if not 0.0 <= fail_rate <= 1.0 or not 0.0 <= truncate_rate <= 1.0:
            raise ValueError("fail_rate and truncate_rate must be in [0, 1]")
        if rate_limit_every < 0 or latency_ms < 0:
            raise ValueError("rate_limit_every and latency_ms must be >= 0")
        self.catalog = Catalog(root)
        self.latency_ms = float(latency_ms)
        self.fail_rate = float(fail_rate)
        self.rate_limit_every = int(rate_limit_every)
        self.truncate_rate = float(truncate_rate)
        self.stall_paths = tuple(stall_paths)
        self.stall_seconds = float(stall_seconds)
        self.retry_after = retry_after
        self.requests: list[RequestLog] = []
        self._faults: list[Fault] = []
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._count = 0
        self._stop = threading.Event()
        self._servers: list[_HTTPServer] = []
        self._threads: list[threading.Thread] = []
        self.host = "127.0.0.1"
        self.port = 0
        self.files_port = 0

    # ------------------------------------------------------------------ faults & log
    def add_fault(self, kind: str, match: str = "", times: int = 1, **kw: Any) -> None:
        """Script the next `times` requests whose path contains `match` (deterministic, for tests)."""
        if kind not in ("status", "ratelimit", "truncate", "stall"):
            raise ValueError(f"unknown fault kind {kind!r}")
        with self._lock:
            self._faults.append(Fault(kind, match, times, **kw))

    def _next_fault(self, path: str) -> tuple[int, Fault | str | None]:
        with self._lock:
            self._count += 1
            for f in self._faults:
                if f.times > 0 and f.match in path:
                    f.times -= 1
                    return self._count, (f.kind if f.kind == "stall" else f)
            return self._count, None

    def _draw(self) -> float:
        with self._lock:
            return self._rng.random()

    def _record(self, entry: RequestLog) -> None:
        with self._lock:
            self.requests.append(entry)

    def requests_to(self, fragment: str) -> list[RequestLog]:
        """Logged requests whose path contains `fragment`."""
        with self._lock:
            return [r for r in self.requests if fragment in r.path]

    # ------------------------------------------------------------------ lifecycle
    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}{API_PREFIX}"

    def start(self, host: str = "127.0.0.1", port: int = 0, files_port: int | None = None) -> "IsicServer":
        """Bind both listeners and serve them from background threads."""
        self.host = host
        self._stop.clear()
        api = _HTTPServer((host, port), _Handler)
        if files_port is None:
            files_port = port + 1 if port else 0
        files = _HTTPServer((host, files_port), _Handler)
        for srv, role in ((api, "api"), (files, "files")):
            srv.isic = self  # type: ignore[attr-defined]
            srv.role = role  # type: ignore[attr-defined]
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1},
                                 name=f"isic-server-{role}", daemon=True)
            t.start()
            self._servers.append(srv)
            self._threads.append(t)
        self.port, self.files_port = api.server_address[1], files.server_address[1]
        return self

    def stop(self) -> None:
        self._stop.set()  # releases stalled handlers
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
        for t in self._threads:
            t.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> "IsicServer":
        return self.start() if not self._servers else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


@contextmanager
def running_server(root: Path, **faults: Any) -> Iterator[str]:
    """Serve `root` on 127.0.0.1 (ephemeral ports) for the duration; yields the API base URL."""
    srv = IsicServer(Path(root), **faults).start()
    try:
        yield srv.api_url
    finally:
        srv.stop()


def serve_forever(
    root: Path,
    host: str = "127.0.0.1",
    port: int = 8765,
    latency_ms: float = 0.0,
    fail_rate: float = 0.0,
    rate_limit_every: int = 0,
    truncate_rate: float = 0.0,
    seed: int = 0,
) -> None:
    """`lesionflow isic-server`: serve until Ctrl-C (API on `port`, file URLs on `port + 1`)."""
    srv = IsicServer(Path(root), latency_ms=latency_ms, fail_rate=fail_rate, rate_limit_every=rate_limit_every,
                     truncate_rate=truncate_rate, seed=seed).start(host, port)
    print(f"serving {len(srv.catalog.records)} images, {len(srv.catalog.collections)} collections from "
          f"{root} at {srv.api_url} (files on port {srv.files_port}); Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()
