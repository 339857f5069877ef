"""Pure parts of isic_client: records (incl. the shared API fixtures), id validation, the retry policy."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest
import requests

from isic_client.client import explain_query_error, query_fields
from isic_client.models import Collection, CollectionPage, Image, Page, validate_isic_id
from isic_client.retry import (
    ISIC_RETRY,
    IsicTimeoutError,
    IsicTransportError,
    RetryPolicy,
    TruncatedBody,
    parse_retry_after,
)


def _load(d: Path, name: str):
    return json.loads((d / name).read_text())


# --------------------------------------------------------------------------- fixtures of the real API shape
def test_fixture_pages_parse_and_count_is_null_after_page_one(isic_api_fixtures: Path) -> None:
    p1 = Page.model_validate(_load(isic_api_fixtures, "images_search_page1.json"))
    p2 = Page.model_validate(_load(isic_api_fixtures, "images_search_page2.json"))
    assert p1.count == 5 and p2.count is None
    assert p1.next and "cursor=" in p1.next and p2.next is None and p2.previous
    ids = [i.isic_id for i in p1.results + p2.results]
    assert ids == [f"ISIC_900000{k}" for k in range(1, 6)]
    assert all(validate_isic_id(i) for i in ids)
    png = p2.results[1]
    assert png.full_url.endswith(".png") and png.full_size == 655320
    assert png.metadata.clinical == {"anatom_site_special": "acral palms or soles"}  # no dx, age, sex


def test_fixture_detail_flat_metadata_is_isic_cli_row(isic_api_fixtures: Path) -> None:
    img = Image.model_validate(_load(isic_api_fixtures, "image_detail.json"))
    row = img.flat_metadata()
    keys = list(row)
    assert keys[:3] == ["isic_id", "attribution", "copyright_license"]
    assert keys[3:] == sorted(keys[3:])  # isic-cli: sorted union of acquisition + clinical keys
    assert row["pixels_x"] == 6000 and row["age_approx"] == 55
    assert row["mel_thick_mm"] == "0.60" and row["clin_size_long_diam_mm"] == "7.50"  # decimals stay strings
    assert row["concomitant_biopsy"] is True and row["diagnosis_1"] == "Malignant"
    assert img.metadata["clinical"]["patient_id"] == "IP_9000101"  # dict-style access works too


def test_fixture_collections_and_error_bodies(isic_api_fixtures: Path) -> None:
    page = CollectionPage.model_validate(_load(isic_api_fixtures, "collections.json"))
    assert page.count == len(page.results) == 16 and page.next is None
    by_name = {c.name: c for c in page.results}
    assert by_name["Consecutive biopsies for melanoma across year 2020"].id == 216
    assert by_name["PROVe-AI"].doi == "10.34970/576276"
    assert _load(isic_api_fixtures, "error_400_query.json") == {"message": "Could not parse search query."}


def test_records_tolerate_omitted_extra_and_legacy_fields() -> None:
    img = Image.model_validate({
        "isic_id": "ISIC_0000001",
        "some_future_field": {"x": 1},
        "metadata": {"clinical": {"benign_malignant": "malignant", "diagnosis": "melanoma",
                                  "anatom_site_general": "posterior torso"}},
    })
    assert img.files.full is None and img.full_url is None and img.public is None
    assert img.model_extra == {"some_future_field": {"x": 1}}
    row = img.flat_metadata()
    assert row["benign_malignant"] == "malignant" and row["diagnosis"] == "melanoma"
    assert row["anatom_site_general"] == "posterior torso" and row["attribution"] is None
    assert Collection.model_validate({"id": 3, "name": "x"}).description == ""
    assert Page.model_validate({"results": []}).count is None


@pytest.mark.parametrize("good", ["ISIC_0000000", "ISIC_9999999"])
def test_validate_isic_id_accepts(good: str) -> None:
    assert validate_isic_id(good) == good


@pytest.mark.parametrize("bad", ["../x", "ISIC_123", "ISIC_12345678", "isic_0000000", "ISIC_0000000/../../etc",
                                 "ISIC_0000000\n", "", None, 1234567, "ISIC_000000١"])
def test_validate_isic_id_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="invalid isic_id"):
        validate_isic_id(bad)


# --------------------------------------------------------------------------- query hints
def test_query_error_hints_name_the_replacement_fields() -> None:
    assert query_fields('image_type:"TBP tile: close-up" AND -sex:male') == ["image_type", "sex"]
    msg = explain_query_error("benign_malignant:malignant AND anatom_site_general:x")
    assert "diagnosis_1" in msg and "anatom_site_1" in msg
    assert "diagnosis_2" in explain_query_error("diagnosis:melanoma")
    assert "did you mean age_approx" in explain_query_error("age_aprox:50")
    assert "Searchable fields" in explain_query_error("zebra:red")


# --------------------------------------------------------------------------- retry policy
def test_backoff_is_capped_jittered_and_seeded() -> None:
    p = RetryPolicy(backoff_base=1.0, backoff_cap=5.0, jitter=0.5, seed=7)
    delays = [p.backoff(a) for a in range(8)]
    for a, d in enumerate(delays):
        nominal = min(5.0, 2.0 ** a)
        assert nominal * 0.5 <= d <= nominal
    assert max(delays) <= 5.0
    same, other = (RetryPolicy(backoff_base=1.0, backoff_cap=5.0, jitter=0.5, seed=s) for s in (7, 8))
    assert delays == [same.backoff(a) for a in range(8)]
    assert delays != [other.backoff(a) for a in range(8)]
    assert ISIC_RETRY.statuses == (429, 500, 502, 503, 504)


def test_retry_after_seconds_and_http_date() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(format_datetime(now + timedelta(seconds=30), usegmt=True), now=now) == 30.0
    assert parse_retry_after(format_datetime(now - timedelta(seconds=30), usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    p = RetryPolicy(retry_after_max=60)
    assert p.delay_for(0, "12") == 12.0 and p.delay_for(0, "100000") == 60.0


class _Resp:
    def __init__(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.status_code, self.headers, self.closed = status, headers or {}, False

    def close(self) -> None:
        self.closed = True


def test_execute_retries_statuses_then_returns_final_answer() -> None:
    slept: list[float] = []
    p = RetryPolicy(max_retries=3, backoff_base=0.1, sleep=slept.append)
    answers = iter([_Resp(503), _Resp(429, {"Retry-After": "2"}), _Resp(200)])
    assert p.execute(lambda: next(answers), "u").status_code == 200
    assert len(slept) == 2 and slept[1] == 2.0 and 0.05 <= slept[0] <= 0.1
    # Out of retries: the last 5xx comes back to the caller, which raises its own clear error.
    always = RetryPolicy(max_retries=2, sleep=slept.append)
    assert always.execute(lambda: _Resp(502), "u").status_code == 502
    assert always.execute(lambda: _Resp(404), "u").status_code == 404  # not retryable: returned at once


def test_execute_retries_transport_errors_and_wraps_the_last() -> None:
    slept: list[float] = []
    calls = {"n": 0}

    def flaky() -> _Resp:
        calls["n"] += 1
        if calls["n"] < 3:
            raise requests.exceptions.ChunkedEncodingError("IncompleteRead")
        return _Resp(200)

    p = RetryPolicy(max_retries=3, sleep=slept.append)
    assert p.execute(flaky, "u").status_code == 200 and calls["n"] == 3

    def stalled() -> _Resp:
        raise requests.ReadTimeout("read timed out")

    with pytest.raises(IsicTimeoutError, match="after 3 attempt"):
        RetryPolicy(max_retries=2, sleep=slept.append).execute(stalled, "http://h/x")

    def short() -> _Resp:
        raise TruncatedBody("http://h/f", 10, 5)

    with pytest.raises(IsicTransportError) as ei:
        RetryPolicy(max_retries=1, sleep=slept.append).execute(short, "http://h/f")
    assert not isinstance(ei.value, IsicTimeoutError) and ei.value.attempts == 2

    def bug() -> _Resp:
        raise KeyError("not a transport problem")

    with pytest.raises(KeyError):  # programming errors are never retried
        RetryPolicy(max_retries=5, sleep=slept.append).execute(bug, "u")
