"""IsicClient + download_images against the running local server, with injected faults."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest
import requests

from isic_client import (
    ISIC_RETRY,
    Image,
    IsicApiError,
    IsicClient,
    IsicTimeoutError,
    RetryPolicy,
    download_images,
)
from isic_client.download import PARTIAL_PREFIX
from tasks.fake.isic_folder import write_sample_folder
from tasks.fake.isic_server import IsicServer

N = 12


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sample_folder(tmp_path_factory.mktemp("isic") / "src", n=N, seed=1)


@pytest.fixture()
def server(folder: Path) -> Iterator[IsicServer]:
    with IsicServer(folder) as srv:
        yield srv


@pytest.fixture()
def slept() -> list[float]:
    return []


@pytest.fixture()
def fast(slept: list[float]) -> RetryPolicy:
    """The default policy's shape, but sleeping is recorded instead of waited."""
    return ISIC_RETRY.replace(max_retries=3, sleep=slept.append)


def _files(d: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in d.iterdir()}


# --------------------------------------------------------------------------- faults
def test_429_retry_after_is_honoured(server: IsicServer, fast: RetryPolicy, slept: list[float]) -> None:
    server.add_fault("ratelimit", match="images/search/", retry_after="3")
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=40), usegmt=True)
    server.add_fault("ratelimit", match="images/search/", retry_after=when)
    client = IsicClient(server.api_url, retry=fast)
    assert client.count() == N
    assert slept[0] == 3.0 and 38.0 <= slept[1] <= 40.0  # seconds form and HTTP-date form
    assert [r.status for r in server.requests_to("images/search/")] == [429, 429, 200]


def test_5xx_then_success_and_5xx_forever(server: IsicServer, fast: RetryPolicy, slept: list[float]) -> None:
    server.add_fault("status", match="images/ISIC_9100003/", status=502, times=2)
    client = IsicClient(server.api_url, retry=fast)
    assert client.image("ISIC_9100003").isic_id == "ISIC_9100003"
    assert len(slept) == 2 and slept[1] > slept[0] * 0.9  # exponential (jittered) backoff, no Retry-After
    server.add_fault("status", match="collections/", status=503, times=10)
    with pytest.raises(IsicApiError) as ei:
        client.collections()
    assert ei.value.status == 503 and "after 3 retries" in str(ei.value)
    assert len(server.requests_to("collections/")) == 4  # 1 + max_retries, then a clear error


def test_truncated_bodies_are_retried(server: IsicServer, fast: RetryPolicy, tmp_path: Path) -> None:
    server.add_fault("truncate", match="images/search/")  # a JSON page cut short
    client = IsicClient(server.api_url, retry=fast)
    images = list(client.search())
    assert len(images) == N
    server.add_fault("truncate", match="/images/ISIC_9100002", times=2)  # a file cut short, twice
    report = download_images(images, tmp_path / "out", workers=3, retry=fast)
    assert report.ok and len(report.downloaded) == N
    got = tmp_path / "out" / "ISIC_9100002.png"
    assert got.read_bytes() == (server.catalog.by_id["ISIC_9100002"].file).read_bytes()
    assert [r.status for r in server.requests_to("/images/ISIC_9100002")] == [200, 200, 200]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(PARTIAL_PREFIX)]


def test_stalled_server_times_out_with_a_clear_error(folder: Path, slept: list[float]) -> None:
    with IsicServer(folder, stall_paths=("images/search/",), stall_seconds=10) as srv:
        client = IsicClient(srv.api_url, timeout=(1.0, 0.3), retry=ISIC_RETRY.replace(max_retries=1,
                                                                                       sleep=slept.append))
        with pytest.raises(IsicTimeoutError) as ei:
            next(client.search())
        assert "images/search/" in ei.value.url and ei.value.attempts == 2
        assert client.collections()  # other paths still answer


def test_random_faults_from_the_cli_flags_still_converge(folder: Path, tmp_path: Path, slept: list[float]) -> None:
    """The `--fail-rate/--rate-limit-every/--truncate-rate` injector: patient retries get everything."""
    with IsicServer(folder, fail_rate=0.2, rate_limit_every=5, truncate_rate=0.2, seed=3) as srv:
        retry = ISIC_RETRY.replace(max_retries=8, sleep=slept.append)
        client = IsicClient(srv.api_url, retry=retry)
        images = list(client.search(page_size=5))
        report = download_images(images, tmp_path / "out", workers=4, retry=retry)
        statuses = {r.status for r in srv.requests}
    assert report.ok and len(report.downloaded) == N and {429, 503} <= statuses


# --------------------------------------------------------------------------- client API
def test_pagination_follows_next_verbatim_and_limit_stops(server: IsicServer, fast: RetryPolicy) -> None:
    client = IsicClient(server.api_url, retry=fast)
    pages = list(client.search_pages(page_size=4))
    assert len(pages) == 3 and pages[0].count == N and pages[1].count is None and pages[2].count is None
    paths = [r.path for r in server.requests_to("images/search/")]
    for page, path in zip(pages, paths[1:], strict=False):
        assert page.next.endswith(path)  # the next request is exactly the server's `next`
    assert [i.isic_id for i in client.search(page_size=4)] == [i.isic_id for p in pages for i in p.results]
    before = len(server.requests_to("images/search/"))
    assert len(list(client.search(limit=5, page_size=4))) == 5
    assert len(server.requests_to("images/search/")) - before == 2  # stopped after the page holding #5


def test_query_and_collections_through_the_client(server: IsicServer, fast: RetryPolicy) -> None:
    client = IsicClient(server.api_url, retry=fast)
    mal = list(client.search('diagnosis_1:Malignant AND -diagnosis_3:"Basal cell carcinoma"'))
    assert mal and all(i.metadata.clinical["diagnosis_3"] == "Melanoma Invasive" for i in mal)
    [a] = client.resolve_collections(["sample collection a"])  # case-insensitive exact name
    assert client.resolve_collections([a, "Sample collection B", "2"]) == [a, 2]
    in_a = list(client.search(collections=[a]))
    assert len(in_a) == N // 2 and all(i.metadata.clinical["collection"] == "Sample collection A" for i in in_a)
    assert client.count("sex:*", collections=[a]) == sum(1 for i in in_a if "sex" in i.metadata.clinical)
    with pytest.raises(ValueError, match="Sample collection A"):
        client.resolve_collections(["Sample colection A"])  # typo: the message lists close matches
    with pytest.raises(IsicApiError) as ei:
        next(client.search("benign_malignant:malignant"))
    assert ei.value.status == 400 and "benign_malignant:malignant" in str(ei.value)
    assert "diagnosis_1" in str(ei.value)
    with pytest.raises(IsicApiError) as ei:
        client.image("ISIC_0000404")
    assert ei.value.status == 404
    assert "CC0" in client.license_text("CC-0")
    with pytest.raises(ValueError):
        client.license_text("MIT")


def test_token_goes_to_the_api_host_only(server: IsicServer, fast: RetryPolicy, tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LF_TEST_TOKEN", "s3cr3t-token")
    client = IsicClient.from_env(server.api_url, token_env="LF_TEST_TOKEN", retry=fast)
    assert "s3cr3t" not in repr(client)
    server.add_fault("status", match="images/search/", status=503)  # a retry gets logged
    caplog.set_level(logging.DEBUG, logger="isic_client")
    images = list(client.search(page_size=5))
    client.session.headers["Authorization"] = "Bearer s3cr3t-token"  # even a leaky session must not leak
    report = download_images(images, tmp_path / "out", workers=2, session=client.session, retry=fast)
    assert report.ok
    api = [r for r in server.requests if r.role == "api"]
    files = [r for r in server.requests if r.role == "files"]
    assert api and all(r.headers.get("Authorization") == "Bearer REDACTED" for r in api)
    assert "s3cr3t" not in repr(list(server.requests))  # the server's request log keeps no secret
    assert len(files) == N and not any("Authorization" in r.headers for r in files)
    assert caplog.records and "s3cr3t" not in caplog.text
    anon = IsicClient.from_env(server.api_url, token_env="LF_NO_SUCH_VAR")
    anon.count()
    assert "Authorization" not in server.requests[-1].headers


# --------------------------------------------------------------------------- downloads
def test_resume_after_an_interrupted_download(server: IsicServer, fast: RetryPolicy, tmp_path: Path) -> None:
    images = list(IsicClient(server.api_url, retry=fast).search())
    out = tmp_path / "out"
    first = download_images(images[:8], out, workers=4, retry=fast)
    assert len(first.downloaded) == 8
    # What a killed run leaves: a temp file and no final file; plus a wrong-sized file under a final name.
    (out / "ISIC_9100003.png").unlink()
    (out / f"{PARTIAL_PREFIX}ISIC_9100003.abc123").write_bytes(b"half a png")
    (out / "ISIC_9100005.png").write_bytes(b"stale")
    n_before = len(server.requests)
    report = download_images(images, out, workers=4, retry=fast)
    assert report.downloaded == ["ISIC_9100003", "ISIC_9100005"] + [i.isic_id for i in images[8:]]
    assert len(report.skipped) == 6 and report.failed == {}
    fetched = {r.path.rsplit("/", 1)[-1] for r in server.requests[n_before:]}
    assert fetched == {f"{i}.png" for i in report.downloaded}  # skipped files cost no request at all
    assert sorted(_files(out)) == sorted(f"{i.isic_id}.png" for i in images)  # partial cleaned up
    for img in images:
        assert _files(out)[f"{img.isic_id}.png"] == img.full_size
    assert download_images(images, out, retry=fast).skipped == sorted(i.isic_id for i in images)


def test_keyboard_interrupt_leaves_no_partial_file(folder: Path, tmp_path: Path) -> None:
    with IsicServer(folder, latency_ms=150) as srv:
        images = list(IsicClient(srv.api_url).search())
        started = threading.Event()

        def feed() -> Iterator[Image]:
            for k, img in enumerate(images):
                if k == 6:
                    started.wait(5)
                    raise KeyboardInterrupt
                yield img

        out = tmp_path / "out"
        threading.Timer(0.05, started.set).start()
        with pytest.raises(KeyboardInterrupt):
            download_images(feed(), out, workers=3)
        left = _files(out)
        assert not [n for n in left if n.startswith(PARTIAL_PREFIX)]
        assert all(size == srv.catalog.by_id[n.split(".")[0]].size for n, size in left.items())
        assert len(left) < 6  # it really stopped part-way
        report = download_images(images, out, workers=4)
        assert report.ok and len(report.downloaded) + len(report.skipped) == N


def test_malicious_ids_and_bad_sizes_are_reported_not_written(server: IsicServer, fast: RetryPolicy,
                                                              tmp_path: Path) -> None:
    good = IsicClient(server.api_url, retry=fast).image("ISIC_9100000")
    url = good.full_url
    evil = [Image.model_validate({"isic_id": bad, "files": {"full": {"url": url, "size": good.full_size}}})
            for bad in ("../x", "ISIC_0000001/../../x", "ISIC_12", "/etc/passwd")]
    wrong_size = good.model_copy(update={"files": good.files.model_copy(
        update={"full": good.files.full.model_copy(update={"size": good.full_size + 1})})})
    no_url = Image.model_validate({"isic_id": "ISIC_0000002"})
    missing = Image.model_validate({"isic_id": "ISIC_0000003",
                                    "files": {"full": {"url": url.replace("ISIC_9100000", "ISIC_0000003")}}})
    out = tmp_path / "a" / "out"
    n_before = len(server.requests)
    report = download_images(evil + [wrong_size, no_url, missing], out, workers=2, retry=fast)
    assert set(report.failed) == {"../x", "ISIC_0000001/../../x", "ISIC_12", "/etc/passwd", "ISIC_9100000",
                                  "ISIC_0000002", "ISIC_0000003"}
    assert "invalid isic_id" in report.failed["../x"] and "no files.full.url" in report.failed["ISIC_0000002"]
    assert "expected" in report.failed["ISIC_9100000"] and "HTTP 404" in report.failed["ISIC_0000003"]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "out"]  # nothing written anywhere
    paths = [r.path for r in server.requests[n_before:]]
    assert len(paths) == 1 + fast.max_retries + 1  # the size mismatch was retried; evil ids cost nothing
    with pytest.raises(ValueError, match="invalid isic_id"):
        IsicClient(server.api_url).image("../x")
    assert len(server.requests) == n_before + len(paths)


def test_download_failure_after_retries_is_reported(folder: Path, tmp_path: Path, slept: list[float]) -> None:
    with IsicServer(folder, stall_paths=("/images/ISIC_9100004",), stall_seconds=5) as srv:
        images = list(IsicClient(srv.api_url).search())
        report = download_images(images, tmp_path / "out", timeout=(1.0, 0.3),
                                 retry=ISIC_RETRY.replace(max_retries=1, sleep=slept.append))
    assert list(report.failed) == ["ISIC_9100004"] and "Timeout" in report.failed["ISIC_9100004"]
    assert len(report.downloaded) == N - 1
    assert not (tmp_path / "out" / "ISIC_9100004.png").exists()
    assert not [p for p in os.listdir(tmp_path / "out") if p.startswith(PARTIAL_PREFIX)]
    with pytest.raises(requests.ConnectionError):  # the server is gone; nothing kept it alive
        requests.get(srv.api_url, timeout=1)
