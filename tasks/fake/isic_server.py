"""A local ISIC-API-v2-compatible HTTP server over an ISIC-style folder, with fault injection.

Folder layout (what `isic image download DIR` writes): `<isic_id>.jpg|png` images + `metadata.csv` with the
flattened columns; optional `collections.json`. Used offline by the demo, the tests and the benchmarks.
The catalogue is tasks.fake.isic_catalog, the search language tasks.fake.isic_query, sample folders
tasks.fake.isic_folder; this module is the HTTP side: routes, pagination, fault injection, the request log.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import random
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from tasks.fake.isic_catalog import Catalog, Record
from tasks.fake.isic_folder import IMAGE_TYPES
from tasks.fake.isic_query import QueryError, QueryTooComplex, compile_query

__all__ = ["IsicServer", "Fault", "RequestLog", "running_server", "serve_forever", "redact_headers", "redact_path"]

log = logging.getLogger(__name__)

API_PREFIX = "/api/v2/"
MAX_LIMIT = 100
MAX_LOGGED_REQUESTS = 10_000  # the request log keeps the latest this many (a long-running server stays bounded)
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
# Never kept in the request log: credentials in headers, and query parameters that look like credentials.
SECRET_HEADERS = {"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "x-auth-token"}
_SECRET_PARAM = re.compile(r"token|secret|passw|auth|key|session|signature|cookie", re.IGNORECASE)
REDACTED = "REDACTED"


def redact_headers(headers: dict[str, str]) -> dict[str, str]:
    """Headers with credential values replaced; an Authorization keeps its scheme (`Bearer REDACTED`)."""
    out = {}
    for k, v in headers.items():
        if k.lower() in SECRET_HEADERS or _SECRET_PARAM.search(k):
            scheme = v.split(" ", 1)[0] if k.lower().endswith("authorization") and " " in v else ""
            v = f"{scheme} {REDACTED}".strip()
        out[k] = v
    return out


def redact_path(path: str) -> str:
    """A request target with the values of credential-like query parameters replaced."""
    parts = urlsplit(path)
    if not parts.query:
        return path
    params = parse_qsl(parts.query, keep_blank_values=True)
    if not any(_SECRET_PARAM.search(k) for k, _ in params):
        return path
    query = urlencode([(k, REDACTED if _SECRET_PARAM.search(k) else v) for k, v in params])
    return urlunsplit(parts._replace(query=query))


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
    def isic(self) -> IsicServer:
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
        entry = RequestLog(self.server.role, self.command, redact_path(self.path),  # type: ignore[attr-defined]
                           redact_headers(dict(self.headers.items())))
        srv._record(entry)
        self._entry = entry
        self._head = head
        self._sent = False
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
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:  # a bug or an unreadable file answers 500; it never drops the connection silently
            log.exception("%s %s failed", self.command, self._entry.path)
            if not self._sent:
                self._json(500, {"detail": "Internal Server Error"})
            self.close_connection = True

    def _send(self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None,
              truncate: bool = False) -> None:
        self._entry.status = status
        self._sent = True
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
        host = self.headers.get("Host") or "{}:{}".format(*self.server.server_address[:2])
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
            return self._send(200, rec.file.read_bytes(), IMAGE_TYPES[rec.file.suffix.lower()], truncate=truncate)
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

    def _image(self, rec: Record) -> dict[str, Any]:
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
        except QueryTooComplex as exc:
            return self._json(400, {"message": f"Could not parse search query: {exc}."})
        except QueryError as exc:
            log.debug("bad query: %s", exc)
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

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up mid-request is normal under fault injection: log it, never print it."""
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


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
        max_logged_requests: int = MAX_LOGGED_REQUESTS,
    ) -> None:
        if not 0.0 <= fail_rate <= 1.0 or not 0.0 <= truncate_rate <= 1.0:
            raise ValueError("fail_rate and truncate_rate must be in [0, 1]")
        if rate_limit_every < 0 or latency_ms < 0 or max_logged_requests < 0:
            raise ValueError("rate_limit_every, latency_ms and max_logged_requests must be >= 0")
        self.catalog = Catalog(root)
        self.latency_ms = float(latency_ms)
        self.fail_rate = float(fail_rate)
        self.rate_limit_every = int(rate_limit_every)
        self.truncate_rate = float(truncate_rate)
        self.stall_paths = tuple(stall_paths)
        self.stall_seconds = float(stall_seconds)
        self.retry_after = retry_after
        self._log: deque[RequestLog] = deque(maxlen=max_logged_requests)  # the latest requests, redacted
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
            self._log.append(entry)

    @property
    def requests(self) -> list[RequestLog]:
        """A snapshot of the request log (oldest first; at most `max_logged_requests`, credentials redacted)."""
        with self._lock:
            return list(self._log)

    def requests_to(self, fragment: str) -> list[RequestLog]:
        """Logged requests whose path contains `fragment`."""
        with self._lock:
            return [r for r in self._log if fragment in r.path]

    # ------------------------------------------------------------------ lifecycle
    @property
    def api_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{API_PREFIX}"

    def start(self, host: str = "127.0.0.1", port: int = 0, files_port: int | None = None) -> IsicServer:
        """Bind both listeners and serve them from background threads."""
        self.host = host
        self._stop.clear()
        api = _HTTPServer((host, port), _Handler)
        if files_port is None:
            files_port = port + 1 if port else 0
        try:
            files = _HTTPServer((host, files_port), _Handler)
        except BaseException:
            api.server_close()  # the API socket must not stay bound when the second one fails
            raise
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

    def __enter__(self) -> IsicServer:
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
    ready: Callable[[str], None] | None = None,
) -> None:
    """`lesionflow isic-server`: serve until Ctrl-C (API on `port`, file URLs on `port + 1`).

    Once both listeners are up, `ready` gets one line naming the API URL (the CLI prints it); without it the
    line is logged at INFO."""
    srv = IsicServer(Path(root), latency_ms=latency_ms, fail_rate=fail_rate, rate_limit_every=rate_limit_every,
                     truncate_rate=truncate_rate, seed=seed).start(host, port)
    line = (f"serving {len(srv.catalog.records)} images, {len(srv.catalog.collections)} collections from "
            f"{root} at {srv.api_url} (files on port {srv.files_port}); Ctrl-C stops")
    (ready or log.info)(line)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()
