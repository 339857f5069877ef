"""Concurrent, resumable, atomic image downloads with size verification; every failure is reported."""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterable, Sized
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

import requests
from requests.adapters import HTTPAdapter

from isic_client.models import Image, validate_isic_id
from isic_client.retry import ISIC_RETRY, IsicError, RetryPolicy, TruncatedBody, check_timeout

__all__ = ["DownloadReport", "download_images", "target_path", "PARTIAL_PREFIX"]

log = logging.getLogger(__name__)

PARTIAL_PREFIX = ".isic-partial."  # temp files: .isic-partial.<isic_id>.<random>; never a final name
FILE_MODE = 0o644  # downloaded images are shared data, like every other output (mkstemp would leave 0600)
CHUNK = 1 << 20
_EXT_RE = re.compile(r"[a-z0-9]{1,5}")


class Cancelled(Exception):
    """The run was interrupted; a worker stops at the next chunk and removes its temp file."""


@dataclass
class DownloadReport:
    downloaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already present with the expected size
    failed: dict[str, str] = field(default_factory=dict)  # isic_id (or the bad id as given) -> reason
    bytes: int = 0  # bytes fetched in this run
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> dict[str, Any]:
        """Counts for logs/manifests (the full lists stay on the object)."""
        return {"downloaded": len(self.downloaded), "skipped": len(self.skipped), "failed": len(self.failed),
                "bytes": self.bytes, "seconds": round(self.seconds, 3)}


def _extension(url: str) -> str:
    """File extension from the URL path (as isic-cli does), `jpg` when absent or odd."""
    suffix = PurePosixPath(unquote(urlsplit(url).path)).suffix.lower().lstrip(".")
    return suffix if _EXT_RE.fullmatch(suffix) else "jpg"


def target_path(image: Image, out_dir: Path) -> Path:
    """`<out_dir>/<isic_id>.<ext>`; raises ValueError for an invalid id or a missing file URL."""
    isic_id = validate_isic_id(image.isic_id)
    if not image.full_url:
        raise ValueError(f"{isic_id}: the API record has no files.full.url")
    return Path(out_dir) / f"{isic_id}.{_extension(image.full_url)}"


def _stale_partials(out_dir: Path) -> dict[str, list[Path]]:
    """Temp files of an earlier run that was killed (SIGKILL leaves them; nothing else does), by isic_id.

    One directory scan per run: a glob per image would be quadratic in the folder size."""
    found: dict[str, list[Path]] = {}
    with os.scandir(out_dir) as it:
        for entry in it:
            if entry.name.startswith(PARTIAL_PREFIX):
                isic_id = entry.name[len(PARTIAL_PREFIX):].split(".", 1)[0]
                found.setdefault(isic_id, []).append(Path(entry.path))
    return found


def _unlink_all(paths: list[Path]) -> None:
    for p in paths:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def _fetch(
    session: requests.Session,
    url: str,
    dest: Path,
    expected: int | None,
    timeout: tuple[float, float],
    retry: RetryPolicy,
    cancel: threading.Event,
    fsync: bool,
) -> int:
    """Download `url` to `dest` through a temp file in the same folder; returns the bytes written."""
    isic_id = dest.stem
    written = 0

    def attempt() -> requests.Response:
        nonlocal written
        if cancel.is_set():
            raise Cancelled()
        # No Authorization ever: file hosts are not the API (and S3 rejects unexpected auth anyway).
        resp = session.get(url, stream=True, timeout=timeout, headers={"Authorization": None},
                           allow_redirects=True)
        if resp.status_code != 200:
            return resp  # retry.execute decides: 429/5xx again, anything else is final
        with resp:
            length = resp.headers.get("Content-Length")
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f"{PARTIAL_PREFIX}{isic_id}.")
            try:
                n = 0
                with os.fdopen(fd, "wb") as fh:
                    for chunk in resp.iter_content(CHUNK):
                        if cancel.is_set():
                            raise Cancelled()
                        fh.write(chunk)
                        n += len(chunk)
                    if length is not None and n != int(length):
                        raise TruncatedBody(url, int(length), n)
                    if expected is not None and n != expected:
                        raise TruncatedBody(url, expected, n)
                    if fsync:
                        fh.flush()
                        os.fsync(fh.fileno())
                os.chmod(tmp, FILE_MODE)
                os.replace(tmp, dest)  # atomic: the final name only ever holds a complete file
                written = n
            except BaseException:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
                raise
        return resp

    resp = retry.execute(attempt, url)
    if resp.status_code != 200:
        raise IsicError(f"HTTP {resp.status_code} for {url}"
                        + (" after retries" if resp.status_code in retry.statuses else ""))
    return written


def download_images(
    images: Iterable[Image],
    out_dir: Path,
    workers: int = 8,
    timeout: tuple[float, float] = (3.05, 30.0),
    retry: RetryPolicy = ISIC_RETRY,
    session: requests.Session | None = None,
    progress: bool = False,
    fsync: bool = True,
) -> DownloadReport:
    """Fetch every image's full file to `<out_dir>/<isic_id>.<ext>`; skip files already complete.

    `images` may be a lazy iterator (e.g. `client.search(...)`): downloads start while pages still arrive.
    Interrupting (KeyboardInterrupt) stops the workers and leaves no partial file under a final name."""
    timeout = check_timeout(timeout)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    workers = max(1, int(workers))
    report = DownloadReport()
    t0 = time.perf_counter()
    own_session = session is None
    if session is None:
        session = requests.Session()
        # One pooled connection per worker; the default pool of 10 would churn connections at 16 workers.
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=max(10, workers))
        session.mount("http://", adapter)
        session.mount("https://", adapter)
    cancel = threading.Event()
    lock = threading.Lock()
    bar = _progress_bar(images, progress)
    seen: set[str] = set()
    stale = _stale_partials(out_dir)

    def job(image: Image, dest: Path) -> None:
        try:
            _unlink_all(stale.get(image.isic_id, []))
            n = _fetch(session, image.full_url or "", dest, image.full_size, timeout, retry, cancel, fsync)
        except Cancelled:
            return
        except Exception as exc:  # one bad image must not stop the others; it is reported instead
            with lock:
                report.failed[image.isic_id] = f"{type(exc).__name__}: {exc}"
            log.warning("download failed: %s: %s", image.isic_id, exc)
        else:
            with lock:
                report.downloaded.append(image.isic_id)
                report.bytes += n
        finally:
            if bar is not None:
                bar.update(1)

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="isic-dl")
    pending: set[Future[None]] = set()
    try:
        for image in images:
            key = str(image.isic_id)
            try:
                dest = target_path(image, out_dir)  # validates the id before any path is built
            except ValueError as exc:
                with lock:
                    report.failed[key] = str(exc)
                continue
            if key in seen:
                continue
            seen.add(key)
            size = image.full_size
            if dest.exists() and (size is None or dest.stat().st_size == size):
                # Finished files only ever appear via os.replace, so an existing one is complete.
                report.skipped.append(key)
                _unlink_all(stale.get(key, []))
                if bar is not None:
                    bar.update(1)
                continue
            pending.add(pool.submit(job, image, dest))
            if len(pending) >= 4 * workers:  # bounded queue: a 400k-image search must not sit in memory
                _, pending = wait(pending, return_when=FIRST_COMPLETED)
        for fut in pending:
            fut.result()
    except BaseException:
        cancel.set()  # KeyboardInterrupt/SystemExit: workers drop their temp files and stop
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)
        if bar is not None:
            bar.close()
        if own_session:
            session.close()
    report.downloaded.sort()
    report.skipped.sort()
    report.failed = dict(sorted(report.failed.items()))
    report.seconds = time.perf_counter() - t0
    return report


def _progress_bar(images: Iterable[Image], enabled: bool) -> Any:
    """A tqdm bar when asked for and installed (optional: the package needs only requests + pydantic)."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=len(images) if isinstance(images, Sized) else None, unit="img", desc="download")
