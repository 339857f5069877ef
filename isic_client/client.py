"""IsicClient: search with cursor pagination, image detail, collections, licence files (ISIC API v2)."""

from __future__ import annotations

import difflib
import ipaddress
import logging
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import quote, urlsplit

import requests

from isic_client.models import (
    LICENSES,
    RETIRED_FIELDS,
    SEARCHABLE_FIELDS,
    Collection,
    CollectionPage,
    Image,
    Page,
    validate_isic_id,
)
from isic_client.retry import (
    ISIC_RETRY,
    InsecureTokenError,
    IsicApiError,
    IsicError,
    IsicTimeoutError,
    IsicTransportError,
    RetryPolicy,
    TruncatedBody,
    check_timeout,
)

__all__ = ["IsicClient", "IsicApiError", "IsicError", "IsicTimeoutError", "IsicTransportError",
           "InsecureTokenError", "explain_query_error", "is_loopback"]

log = logging.getLogger(__name__)

USER_AGENT = "lesionflow-isic-client/0.1"
MAX_PAGE = 100  # the API clamps `limit` to 100 anyway


def _origin(url: str) -> tuple[str, str]:
    p = urlsplit(url)
    return p.scheme.lower(), p.netloc.lower()


def is_loopback(url: str) -> bool:
    """Whether `url`'s host is this machine: localhost, 127.0.0.0/8 or ::1."""
    host = (urlsplit(url).hostname or "").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def query_fields(query: str) -> list[str]:
    """Field names used in a search query (quoted values removed first: `"TBP tile: close-up"`)."""
    unquoted = re.sub(r'"(?:[^"\\]|\\.)*"', '""', query)
    return re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*:", unquoted)


def explain_query_error(query: str) -> str:
    """A human hint for a 400 on `query`: retired fields and their replacements, close matches for typos."""
    hints = []
    list_all = False
    for name in dict.fromkeys(query_fields(query)):
        if name in RETIRED_FIELDS:
            hints.append(f"`{name}` is retired in API v2; use {RETIRED_FIELDS[name]}")
        elif name not in SEARCHABLE_FIELDS:
            close = difflib.get_close_matches(name, sorted(SEARCHABLE_FIELDS), n=3, cutoff=0.6)
            hints.append(f"`{name}` is not a searchable field"
                         + (f" (did you mean {', '.join(close)}?)" if close else ""))
            list_all = list_all or not close
    if not hints:
        hints.append('check quoting (values with spaces/colons need "double quotes"), upper-case AND/OR, '
                     "balanced parentheses and value types (true/false, numbers, [a TO b])")
    text = "; ".join(hints) + "."
    if list_all:
        text += " Searchable fields: " + ", ".join(sorted(SEARCHABLE_FIELDS)) + "."
    return text


class IsicClient:
    """A thin, retrying client for the ISIC Archive API v2 (or `lesionflow isic-server`)."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        timeout: tuple[float, float] = (3.05, 30.0),
        retry: RetryPolicy = ISIC_RETRY,
        session: requests.Session | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https:// (got {base_url!r})")
        if token and base_url.startswith("http://") and not is_loopback(base_url):
            # Anyone on the path could read a bearer token sent in clear; only this machine is exempt.
            raise InsecureTokenError(
                f"refusing to send the ISIC token over plain http to {urlsplit(base_url).hostname!r}: use an "
                "https:// base_url, or unset the token variable to go anonymous (http is allowed for a token "
                "only to localhost / 127.0.0.1 / ::1)")
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.timeout = check_timeout(timeout)
        self.retry = retry
        self.session = session or requests.Session()
        self.session.headers.setdefault("Accept", "application/json")
        self.session.headers["User-Agent"] = USER_AGENT
        self._token = token or None
        self._collections: list[Collection] | None = None

    @classmethod
    def from_env(cls, base_url: str, token_env: str = "ISIC_TOKEN", **kw: Any) -> IsicClient:
        """Anonymous unless the environment variable `token_env` holds a token."""
        return cls(base_url, token=os.environ.get(token_env) or None, **kw)

    def __repr__(self) -> str:  # the token must never reach a log line or a traceback
        return f"IsicClient(base_url={self.base_url!r}, token={'<set>' if self._token else None})"

    # ------------------------------------------------------------------ transport
    def _headers_for(self, url: str) -> dict[str, str | None]:
        """Bearer token only for the API origin; explicitly none elsewhere (file hosts, other origins)."""
        if self._token and _origin(url) == _origin(self.base_url):
            return {"Authorization": f"Bearer {self._token}"}
        return {"Authorization": None}  # None removes a header a caller may have put on the session

    def _get(self, url: str, params: dict[str, Any] | None = None) -> requests.Response:
        def send() -> requests.Response:
            return self.session.get(url, params=params, headers=self._headers_for(url),
                                    timeout=self.timeout, allow_redirects=False)

        return self.retry.execute(send, url)

    def _get_json(self, url: str, params: dict[str, Any] | None = None, *, query: str | None = None) -> Any:
        def send() -> requests.Response:
            resp = self.session.get(url, params=params, headers=self._headers_for(url),
                                    timeout=self.timeout, allow_redirects=False)
            if resp.status_code == 200:
                try:
                    resp.json()
                except ValueError:
                    # A 200 whose JSON does not parse was cut short on the way: fetch it again.
                    raise TruncatedBody(resp.url, int(resp.headers.get("Content-Length") or -1),
                                        len(resp.content)) from None
            return resp

        resp = self.retry.execute(send, url)
        if resp.status_code != 200:
            raise self._api_error(resp, query)
        return resp.json()

    def _api_error(self, resp: requests.Response, query: str | None) -> IsicApiError:
        try:
            body = resp.json()
        except ValueError:
            body = None
        message = ""
        if isinstance(body, dict):
            detail = body.get("message") or body.get("detail")
            if isinstance(detail, list):  # django-ninja 422: list of pydantic errors
                detail = "; ".join(str(d.get("msg", d)) if isinstance(d, dict) else str(d) for d in detail)
            message = str(detail or "")
        if not message:
            message = (resp.text or resp.reason or "").strip()[:300]
        if resp.status_code == 400 and query is not None:
            message = f"{message} Query {query!r} was rejected: {explain_query_error(query)}"
        elif resp.status_code in self.retry.statuses:
            message = f"{message} (still failing after {self.retry.max_retries} retries)"
        elif resp.status_code in (301, 302, 303, 307, 308):
            message = f"redirected to {resp.headers.get('Location')!r}; is base_url right (trailing /api/v2/)?"
        return IsicApiError(resp.status_code, resp.url, message)

    # ------------------------------------------------------------------ images
    def search_pages(
        self, query: str = "", collections: Sequence[int] = (), page_size: int = MAX_PAGE
    ) -> Iterator[Page]:
        """Every page of `images/search/`, following `next` verbatim until it is null."""
        params: dict[str, Any] = {"limit": max(1, min(int(page_size), MAX_PAGE))}
        if query:
            params["query"] = query
        if collections:
            params["collections"] = ",".join(str(int(c)) for c in collections)
        url: str | None = self.base_url + "images/search/"
        seen: set[str] = set()
        first = True
        while url:
            page = Page.model_validate(self._get_json(url, params if first else None, query=query))
            yield page
            first = False
            if page.next in seen:  # a server bug would otherwise loop forever
                raise IsicApiError(200, page.next or "", "pagination loop: `next` repeats a visited page")
            url = page.next
            if url:
                seen.add(url)

    def search(
        self,
        query: str = "",
        collections: Sequence[int] = (),
        limit: int | None = None,
        page_size: int = MAX_PAGE,
    ) -> Iterator[Image]:
        """Images matching `query` in any of `collections`, oldest first; stops after `limit` images."""
        if limit is not None and limit <= 0:
            return
        if limit is not None:
            page_size = min(page_size, limit)  # no point fetching 100 rows to keep 3
        n = 0
        for page in self.search_pages(query, collections, page_size):
            for image in page.results:
                yield image
                n += 1
                if limit is not None and n >= limit:
                    return

    def count(self, query: str = "", collections: Sequence[int] = ()) -> int:
        """The first page's `count` (may lag the real rows briefly; never use it as a loop bound)."""
        page = next(self.search_pages(query, collections, page_size=1))
        return int(page.count or 0)

    def image(self, isic_id: str) -> Image:
        """One image by id; 404 -> IsicApiError."""
        validate_isic_id(isic_id)  # it becomes part of the URL path
        return Image.model_validate(self._get_json(f"{self.base_url}images/{isic_id}/"))

    # ------------------------------------------------------------------ collections
    def collections(self, refresh: bool = False) -> list[Collection]:
        """Every collection visible to this caller (all pages), cached per client."""
        if self._collections is None or refresh:
            out: list[Collection] = []
            url: str | None = self.base_url + "collections/"
            params: dict[str, Any] | None = {"limit": MAX_PAGE}
            while url:
                page = CollectionPage.model_validate(self._get_json(url, params))
                out.extend(page.results)
                url, params = page.next, None
            self._collections = out
        return list(self._collections)

    def collection(self, collection_id: int) -> Collection:
        return Collection.model_validate(self._get_json(f"{self.base_url}collections/{int(collection_id)}/"))

    def resolve_collections(self, items: Sequence[int | str]) -> list[int]:
        """Ids for ids-or-names; names are looked up at run time because DOI collections get renumbered."""
        out: list[int] = []
        for item in items:
            if isinstance(item, bool):
                raise ValueError(f"collection {item!r}: expected an id (int) or a name (str)")
            if isinstance(item, int):
                out.append(item)
                continue
            if isinstance(item, str) and item.strip().isdigit():
                out.append(int(item.strip()))
                continue
            out.append(self._collection_id_by_name(str(item)))
        return list(dict.fromkeys(out))

    def _collection_id_by_name(self, name: str) -> int:
        colls = self.collections()
        exact = [c for c in colls if c.name == name]
        if not exact:
            exact = [c for c in colls if c.name.casefold().strip() == name.casefold().strip()]
        if len(exact) == 1:
            return exact[0].id
        names = [c.name for c in colls]
        if len(exact) > 1:
            ids = ", ".join(str(c.id) for c in exact)
            raise ValueError(f"collection name {name!r} is ambiguous (ids {ids}); give the id instead")
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        close += [n for n in names if name.casefold() in n.casefold() and n not in close][:5]
        hint = f" Close matches: {close}." if close else f" {len(names)} collections are visible."
        raise ValueError(f"unknown ISIC collection {name!r} at {self.base_url}.{hint} "
                         "Use an exact name or the numeric id (`isic collection list`).")

    # ------------------------------------------------------------------ licences
    def license_text(self, license: str) -> str:
        """The licence text served for `CC-0`, `CC-BY` or `CC-BY-NC` (isic-cli's licenses/<L>.txt)."""
        if license not in LICENSES:
            raise ValueError(f"unknown licence {license!r}; expected one of {', '.join(LICENSES)}")
        url = f"{self.base_url}zip-download/license-file/{quote(license)}/"
        resp = self._get(url)
        if resp.status_code != 200:
            raise self._api_error(resp, None)
        return resp.text
