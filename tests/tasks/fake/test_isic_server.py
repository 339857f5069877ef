"""The local ISIC server: query language, pagination envelope, error bodies, files, metadata typing."""

from __future__ import annotations

import base64
import csv
import json
import os
import shutil
import struct
import time
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests

from tasks.fake.isic_catalog import Catalog
from tasks.fake.isic_folder import image_size, scan_images, write_png, write_sample_folder
from tasks.fake.isic_query import MAX_DEPTH, QueryError, compile_query, glob_match
from tasks.fake.isic_server import IsicServer, running_server

REC = {"isic_id": "ISIC_0000001", "public": True, "age_approx": 45, "sex": "female", "diagnosis_1": "Malignant",
       "diagnosis_3": "Melanoma Invasive", "image_type": "TBP tile: close-up", "melanocytic": True,
       "mel_thick_mm": "0.60", "anatom_site_1": "Trunk"}
OTHER = {"isic_id": "ISIC_0000002", "public": True, "age_approx": 70, "diagnosis_1": "Benign",
         "diagnosis_3": "Nevus", "image_type": "dermoscopic", "melanocytic": False}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sample_folder(tmp_path_factory.mktemp("isic") / "src", n=12, seed=0)


@pytest.fixture()
def server(folder: Path):
    with IsicServer(folder) as srv:
        yield srv


# --------------------------------------------------------------------------- query language (pure)
@pytest.mark.parametrize("query, hits", [
    ("", {1, 2}),
    ("diagnosis_1:Malignant", {1}),
    ("diagnosis_1:malignant", set()),  # keyword fields are case-sensitive
    ('image_type:"TBP tile: close-up"', {1}),
    ("diagnosis_1:Malignant OR diagnosis_1:Benign", {1, 2}),
    ("diagnosis_1:Malignant AND sex:female", {1}),
    ("diagnosis_1:Benign sex:female", set()),  # whitespace = AND
    ("(diagnosis_1:Benign OR sex:female) AND melanocytic:true", {1}),
    ("-sex:female", {2}),  # negation also matches the record that lacks `sex`
    ("-(diagnosis_1:Benign OR sex:male)", {1}),
    ("sex:*", {1}),
    ("-sex:*", {2}),
    ("diagnosis_3:Melanoma*", {1}),
    ("diagnosis_3:*vus", {2}),
    ("age_approx:[40 TO 45]", {1}),
    ("age_approx:{40 TO 45}", set()),  # exclusive bounds
    ("age_approx:[50 TO *]", {2}),
    ("age_approx:45", {1}),
    ("mel_thick_mm:[0.5 TO 1]", {1}),  # decimal strings compare as numbers
    ("melanocytic:false", {2}),
    ("isic_id:ISIC_0000002", {2}),
])
def test_query_language(query: str, hits: set[int]) -> None:
    pred = compile_query(query)
    assert {i for i, r in ((1, REC), (2, OTHER)) if pred(r)} == hits


@pytest.mark.parametrize("query", [
    "benign_malignant:malignant", "diagnosis:melanoma", "anatom_site_general:x",  # retired fields
    "acquisition_day:0", "colour:red",  # not searchable / unknown
    "diagnosis_1:Malignant AND", "(sex:male", "sex:male)", 'image_type:"open', "sex:male,female",
    "age_approx:old", "melanocytic:yes", "age_approx:[1 TO]", "diagnosis_1 Malignant",
])
def test_query_language_rejects(query: str) -> None:
    with pytest.raises(QueryError):
        compile_query(query)


# --------------------------------------------------------------------------- search over HTTP
def test_search_pagination_envelope_cursor_and_sorted_absolute_next(server: IsicServer) -> None:
    url = server.api_url + "images/search/?query=-diagnosis_1%3ABenign&limit=4"
    pages = []
    while url:
        r = requests.get(url, timeout=5)
        assert r.status_code == 200
        pages.append(r.json())
        url = pages[-1]["next"]
    assert len(pages) >= 3
    assert pages[0]["count"] == sum(len(p["results"]) for p in pages) == 9
    assert all(p["count"] is None for p in pages[1:])
    assert pages[0]["previous"] is None and pages[1]["previous"]
    nxt = urlsplit(pages[0]["next"])
    assert f"{nxt.scheme}://{nxt.netloc}/" == server.api_url.split("api/v2/")[0]
    keys = [k for k, _ in parse_qsl(nxt.query)]
    assert keys == sorted(keys) == ["cursor", "limit", "query"]
    cursor = dict(parse_qsl(nxt.query))["cursor"]
    assert base64.b64decode(cursor).decode().startswith("p=")  # the API's shape, opaque to clients
    ids = [i["isic_id"] for p in pages for i in p["results"]]
    assert ids == sorted(ids) and len(set(ids)) == 9  # metadata.csv order, no row twice
    back = requests.get(pages[1]["previous"], timeout=5).json()
    assert [i["isic_id"] for i in back["results"]] == [i["isic_id"] for i in pages[0]["results"]]


def test_limit_is_clamped_to_100(tmp_path: Path) -> None:
    root = write_sample_folder(tmp_path / "big", n=103, size=(4, 4))
    with running_server(root) as api:
        first = requests.get(api + "images/search/?limit=500", timeout=5).json()
        assert len(first["results"]) == 100 and first["count"] == 103
        assert len(requests.get(first["next"], timeout=5).json()["results"]) == 3
        assert len(requests.get(api + "images/?limit=0", timeout=5).json()["results"]) == 100


def test_error_bodies_match_the_api_fixtures(server: IsicServer, isic_api_fixtures: Path) -> None:
    expect = {n: json.loads((isic_api_fixtures / n).read_text())
              for n in ("error_400_query.json", "error_404.json", "error_422_cursor.json")}
    api = server.api_url
    for q in ("benign_malignant:malignant", "diagnosis:melanoma", "anatom_site_general:x", "sex:"):
        r = requests.get(api + "images/search/", params={"query": q}, timeout=5)
        assert (r.status_code, r.json()) == (400, expect["error_400_query.json"])
    r = requests.get(api + "images/search/", params={"cursor": "!!not-base64!!"}, timeout=5)
    assert (r.status_code, r.json()) == (422, expect["error_422_cursor.json"])
    r = requests.get(api + "images/search/", params={"cursor": base64.b64encode(b"x=1").decode()}, timeout=5)
    assert r.status_code == 422
    for path in ("images/ISIC_0000404/", "collections/999/", "nothing/", "images/search"):
        r = requests.get(api + path, timeout=5)
        assert (r.status_code, r.json()) == (404, expect["error_404.json"])
    assert requests.get(api + "images/search/?limit=abc", timeout=5).status_code == 422


def test_collections_filter_and_detail(server: IsicServer) -> None:
    api = server.api_url
    colls = requests.get(api + "collections/", timeout=5).json()
    assert colls["count"] == 2 and [c["name"] for c in colls["results"]] == ["Sample collection A",
                                                                           "Sample collection B"]
    a = colls["results"][0]["id"]
    assert requests.get(f"{api}collections/{a}/", timeout=5).json()["name"] == "Sample collection A"
    only_a = requests.get(api + "images/search/", params={"collections": str(a)}, timeout=5).json()
    assert only_a["count"] == 6
    both = requests.get(api + "images/search/", params={"collections": "1,2,77"}, timeout=5).json()
    assert both["count"] == 12
    assert requests.get(api + "images/search/", params={"collections": "77"}, timeout=5).json()["count"] == 0
    assert requests.get(api + "images/search/", params={"collections": "a,b"}, timeout=5).status_code == 422


def test_image_detail_files_and_licence(server: IsicServer, folder: Path) -> None:
    api = server.api_url
    img = requests.get(api + "images/ISIC_9100001/", timeout=5).json()
    full = img["files"]["full"]
    assert urlsplit(full["url"]).port == server.files_port != server.port  # a separate origin, like S3
    body = requests.get(full["url"], timeout=5)
    on_disk = (folder / "ISIC_9100001.png").read_bytes()
    assert body.content == on_disk and full["size"] == len(on_disk)
    assert body.headers["Content-Length"] == str(len(on_disk)) and body.headers["Content-Type"] == "image/png"
    assert requests.get(server.api_url.split("api/v2/")[0] + "images/../metadata.csv", timeout=5).status_code == 404
    lic = requests.get(api + "zip-download/license-file/CC-BY-NC/", timeout=5)
    assert lic.status_code == 200 and "NonCommercial" in lic.text
    assert requests.get(api + "zip-download/license-file/GPL/", timeout=5).status_code == 404


# --------------------------------------------------------------------------- catalogue
def test_metadata_typing_and_groups(folder: Path) -> None:
    cat = Catalog(folder)
    rec = cat.by_id["ISIC_9100001"]
    assert rec.acquisition == {"image_type": "dermoscopic", "pixels_x": 25, "pixels_y": 16}  # from PNG IHDR
    assert isinstance(rec.clinical["age_approx"], int) and rec.clinical["melanocytic"] is True
    assert rec.clinical["mel_thick_mm"].count(".") == 1  # decimal stays a string, as the API sends it
    assert "sex" in cat.by_id["ISIC_9100000"].clinical and "sex" not in cat.by_id["ISIC_9100004"].clinical
    assert rec.top == {"attribution": "Sample Clinic A", "copyright_license": "CC-BY"}


def test_collections_json_and_single_collection_fallback(tmp_path: Path) -> None:
    root = tmp_path / "c"
    root.mkdir()
    write_png(root / "ISIC_0000001.png", 3, 2)
    write_png(root / "ISIC_0000002.png", 5, 4)
    write_png(root / "not_an_id.png", 2, 2)  # ignored: never served under a bad name
    cat = Catalog(root)  # no metadata.csv at all: images alone are served
    assert [r.isic_id for r in cat.records] == ["ISIC_0000001", "ISIC_0000002"]
    assert cat.collections[0]["name"] == "All images" and cat.records[1].acquisition["pixels_x"] == 5
    (root / "collections.json").write_text(json.dumps([
        {"id": 216, "name": "Consecutive biopsies for melanoma across year 2020", "isic_ids": ["ISIC_0000002"],
         "doi": "10.34970/151324"}]))
    cat = Catalog(root)
    assert cat.collections[0]["id"] == 216 and cat.collections[0]["doi"] == "10.34970/151324"
    assert cat.by_id["ISIC_0000002"].collections == {216} and not cat.by_id["ISIC_0000001"].collections


def test_jpeg_and_png_header_sizes(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", 31, 17)
    assert image_size((tmp_path / "a.png").read_bytes()) == (31, 17)
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, 480, 640, 3) + b"\x01\x22\x00"
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00" + bytes(9)
    assert image_size(b"\xff\xd8" + app0 + sof + b"\xff\xd9") == (640, 480)
    assert image_size(b"GIF89a....") is None and image_size(b"\xff\xd8\xff\xda\x00\x02") is None


@pytest.mark.realdata
def test_serves_an_isic_cli_style_real_folder(isic_real: Path, tmp_path: Path) -> None:
    """Real JPEGs + legacy columns: pixel sizes from JPEG headers, `license` mapped, legacy keys kept."""
    with open(isic_real / "metadata.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))[:5]
    root = tmp_path / "real"
    root.mkdir()
    for r in rows:
        shutil.copy(isic_real / f"{r['isic_id']}.jpg", root)
    with open(root / "metadata.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cat = Catalog(root)
    assert len(cat.records) == 5 and {c["name"] for c in cat.collections} == {r["source_dataset"] for r in rows}
    for r, rec in zip(rows, cat.records, strict=True):
        w_, h_ = (int(x) for x in r["stored_size"].split("x"))
        assert (rec.acquisition["pixels_x"], rec.acquisition["pixels_y"]) == (w_, h_)
        assert rec.top["copyright_license"] == r["license"] and rec.clinical["benign_malignant"]


# --------------------------------------------------------------------------- hardening
@pytest.mark.parametrize("pattern, text, ok", [
    ("Mel*", "Melanoma", True), ("*vus", "Nevus", True), ("*", "", True), ("a*b*c", "aXbYc", True),
    ("a*b*c", "acb", False), ("a*a", "a", False), ("ab*ba", "aba", False), ("*x*", "abc", False),
    ("a**b", "ab", True), ("Nevus", "Nevus", True), ("Nevus", "nevus", False),
])
def test_glob_match(pattern: str, text: str, ok: bool) -> None:
    assert glob_match(pattern, text) is ok


def test_wildcards_never_backtrack() -> None:
    """`a*a*...*b` against a long run of `a`s is exponential for a backtracking regex; linear here."""
    pattern = "a*" * 40 + "b"
    t0 = time.perf_counter()
    assert not glob_match(pattern, "a" * 20_000)
    assert not compile_query(f"diagnosis_3:{pattern}")({"diagnosis_3": "a" * 20_000})
    assert time.perf_counter() - t0 < 1.0


def test_deep_nesting_is_a_query_error_and_a_400(server: IsicServer) -> None:
    deep = "(" * 1500 + "sex:male" + ")" * 1500  # the old recursive parser died with RecursionError here
    negated = "-(" * 1000 + "sex:male" + ")" * 1000
    for q in (deep, negated):
        with pytest.raises(QueryError, match="nested deeper"):
            compile_query(q)
    ok = "(" * MAX_DEPTH + "sex:male" + ")" * MAX_DEPTH
    assert compile_query(ok)({"sex": "male"})
    r = requests.get(server.api_url + "images/search/", params={"query": deep},
                     timeout=5)
    assert r.status_code == 400 and "nested deeper" in r.json()["message"]
    r = requests.get(server.api_url + "images/search/", params={"query": "sex:male OR " * 400 + "sex:female"},
                     timeout=5)
    assert r.status_code == 400 and "longer than" in r.json()["message"]
    assert requests.get(server.api_url + "images/search/?query=sex%3Amale", timeout=5).status_code == 200


def test_request_log_is_bounded_and_keeps_no_secrets(folder: Path) -> None:
    with IsicServer(folder, max_logged_requests=5) as srv:
        for i in range(12):
            requests.get(srv.api_url + f"images/?limit=1&token=tok-{i}", timeout=5,
                         headers={"Authorization": f"Bearer sekrit-{i}", "Cookie": f"session=c00kie-{i}"})
        log_ = srv.requests
    assert len(log_) == 5 and log_[-1].path.endswith("token=REDACTED")
    assert log_[-1].headers["Authorization"] == "Bearer REDACTED" and log_[-1].headers["Cookie"] == "REDACTED"
    text = repr(log_)
    assert "sekrit" not in text and "c00kie" not in text and "tok-" not in text


def test_items_always_carry_attribution(tmp_path: Path) -> None:
    """isic-cli reads image["attribution"] unconditionally; a folder without that column must not break it."""
    root = write_sample_folder(tmp_path / "s", n=3)
    with open(root / "metadata.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    with open(root / "metadata.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=[c for c in rows[0] if c != "attribution"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with running_server(root) as api:
        page = requests.get(api + "images/search/", timeout=5).json()
        one = requests.get(api + "images/ISIC_9100001/", timeout=5).json()
    assert [i["attribution"] for i in page["results"]] == ["", "", ""] and one["attribution"] == ""


def test_non_regular_entries_named_like_images_are_skipped(tmp_path: Path) -> None:
    root = write_sample_folder(tmp_path / "s", n=5)
    outside = tmp_path / "outside.png"
    write_png(outside, 2, 2)
    (root / "ISIC_9100000.png").unlink()
    (root / "ISIC_9100000.png").mkdir()
    (root / "ISIC_9100001.png").unlink()
    os.mkfifo(root / "ISIC_9100001.png")  # opening it to read a header would hang the server's start
    (root / "ISIC_9100002.png").unlink()
    (root / "ISIC_9100002.png").symlink_to(outside)
    shutil.copy(root / "ISIC_9100003.png", root / "ISIC_9100003.jpeg")
    cat = Catalog(root)
    assert [r.isic_id for r in cat.records] == ["ISIC_9100004"]
    assert "directory" in cat.skipped["ISIC_9100000"] and "named pipe" in cat.skipped["ISIC_9100001"]
    assert "outside" in cat.skipped["ISIC_9100002"] and "several image files" in cat.skipped["ISIC_9100003"]
    with running_server(root) as api:
        assert requests.get(api + "images/search/", timeout=5).json()["count"] == 1


def test_scan_images_follows_only_symlinks_inside_the_folder(tmp_path: Path) -> None:
    root = tmp_path / "s"
    root.mkdir()
    write_png(root / "ISIC_0000001.png", 2, 2)
    (root / "ISIC_0000002.PNG").symlink_to(root / "ISIC_0000001.png")  # inside: fine
    (root / "ISIC_0000003.png").symlink_to(root / "missing.png")  # broken
    (root / "notes.txt").write_text("ignored")
    scan = scan_images(root)
    assert sorted(scan.files) == ["ISIC_0000001", "ISIC_0000002"] and list(scan.problems) == ["ISIC_0000003"]
