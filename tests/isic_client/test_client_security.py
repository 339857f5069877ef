"""Client guards: the token never crosses plain http to another host, downloads are 0644, timeouts are finite."""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

import pytest

from isic_client import InsecureTokenError, IsicClient, download_images
from isic_client.client import is_loopback
from isic_client.retry import ISIC_RETRY, check_timeout
from tasks.fake.isic_folder import write_sample_folder
from tasks.fake.isic_server import IsicServer


@pytest.mark.parametrize("url, loopback", [
    ("http://127.0.0.1:8765/api/v2/", True), ("http://127.3.4.5/api/v2/", True), ("http://localhost/", True),
    ("http://[::1]:9000/", True), ("http://LOCALHOST./", True), ("http://api.localhost/", True),
    ("http://10.0.0.1/", False), ("http://example.org/", False), ("http://127.0.0.1.example.org/", False),
    ("http://[::2]/", False), ("http://0.0.0.0/", False),
])
def test_is_loopback(url: str, loopback: bool) -> None:
    assert is_loopback(url) is loopback


def test_token_is_refused_over_plain_http_to_another_host(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InsecureTokenError, match="https") as ei:
        IsicClient("http://isic.example.org/api/v2/", token="s3cr3t")
    assert "s3cr3t" not in str(ei.value) and isinstance(ei.value, ValueError)
    monkeypatch.setenv("LF_TEST_ISIC_TOKEN", "s3cr3t")
    with pytest.raises(InsecureTokenError):
        IsicClient.from_env("http://10.1.2.3:8000/api/v2/", token_env="LF_TEST_ISIC_TOKEN")
    # https anywhere, loopback over http, and anonymous http are all fine.
    IsicClient("https://api.isic-archive.com/api/v2/", token="s3cr3t")
    IsicClient("http://127.0.0.1:8765/api/v2/", token="s3cr3t")
    IsicClient("http://[::1]:8765/api/v2/", token="s3cr3t")
    IsicClient("http://isic.example.org/api/v2/")


@pytest.mark.parametrize("timeout", [None, math.inf, (3.0, None), (3.0, math.nan), (0, 5), (-1, 5), (1, 2, 3),
                                     "30", (True, 5), 10_000])
def test_timeouts_must_be_finite(timeout: object) -> None:
    with pytest.raises(ValueError, match="timeout"):
        check_timeout(timeout)
    with pytest.raises(ValueError, match="timeout"):
        IsicClient("https://api.isic-archive.com/api/v2/", timeout=timeout)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        download_images([], Path("/nonexistent-never-created"), timeout=timeout)  # type: ignore[arg-type]


def test_timeout_forms() -> None:
    assert check_timeout(5) == (5.0, 5.0) and check_timeout((1, 2.5)) == (1.0, 2.5)
    with pytest.raises(ValueError, match="finite"):
        ISIC_RETRY.replace(backoff_cap=math.inf)


def test_downloads_are_written_0644(tmp_path: Path) -> None:
    folder = write_sample_folder(tmp_path / "src", n=3)
    old = os.umask(0o022)
    try:
        with IsicServer(folder) as srv:
            images = list(IsicClient(srv.api_url).search())
            report = download_images(images, tmp_path / "out", workers=2, fsync=False)
    finally:
        os.umask(old)
    assert report.ok
    modes = {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert modes == {0o644}
