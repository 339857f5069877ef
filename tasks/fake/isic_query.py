"""The ISIC search language (as `images/search/?query=` accepts it), compiled to a predicate over a flat record.

Hardened for a server: queries are length-capped, parentheses/negation nesting is capped (a QueryError, never a
RecursionError), and `*` wildcards are matched by a linear scan (no regular expression, no backtracking).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from isic_client.models import SEARCHABLE_FIELDS

__all__ = ["QueryError", "QueryTooComplex", "compile_query", "glob_match", "MAX_QUERY_LENGTH", "MAX_DEPTH",
           "NUMERIC_FIELDS", "BOOL_FIELDS"]

MAX_QUERY_LENGTH = 4096  # characters; the real API's URLs stay far below this
MAX_DEPTH = 32  # nested parentheses / negations
NUMERIC_FIELDS = {"age_approx", "mel_thick_mm", "clin_size_long_diam_mm"}
BOOL_FIELDS = {"public", "concomitant_biopsy", "melanocytic", "personal_hx_mm", "family_hx_mm",
               "mel_ulcer", "blurry", "hairy", "marker_pen"}
VALUE_ALIASES = {("image_type", "clinical"): "clinical: close-up", ("image_type", "overview"): "clinical: overview"}

Predicate = Callable[[dict[str, Any]], bool]


class QueryError(ValueError):
    """A query the ISIC DSL would not parse (the server answers 400)."""


class QueryTooComplex(QueryError):
    """A query over MAX_QUERY_LENGTH characters or nested deeper than MAX_DEPTH (the server answers 400)."""


def glob_match(pattern: str, text: str) -> bool:
    """Whether `text` matches `pattern`, where `*` stands for any run of characters (nothing else is special).

    The pieces between stars are found left to right with str.find: the leftmost match of each piece is
    always a safe choice, so there is no backtracking and the cost stays linear in len(text) per piece."""
    pieces = pattern.split("*")
    if len(pieces) == 1:
        return text == pattern
    head, *middle, tail = pieces
    if len(head) + len(tail) > len(text) or not text.startswith(head) or not text.endswith(tail):
        return False
    pos, end = len(head), len(text) - len(tail)
    for piece in middle:
        if not piece:
            continue
        found = text.find(piece, pos, end)
        if found < 0:
            return False
        pos = found + len(piece)
    return True


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
            return glob_match(self.value, str(v))
        if self.field in NUMERIC_FIELDS:
            try:
                return float(v) == float(self.value)
            except (TypeError, ValueError):
                return False
        return str(v) == self.value  # keyword fields: exact and case-sensitive


_TOKEN_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BARE_VALUE = re.compile(r"[A-Za-z0-9*_.\-]+")
_RANGE_CLOSE = re.compile(r"[\]}]")


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
        close = _RANGE_CLOSE.search(q, i)
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
        return _Term(fld, "wild", v)
    return _Term(fld, "exact", v)


def compile_query(query: str) -> Predicate:
    """Compile the ISIC search DSL into a predicate over a flat record; raises QueryError if unparseable.

    Supports field:value, "quoted values", AND / OR / implicit AND, parentheses, -negation (also matches
    records lacking the field), field:* presence, prefix*/*suffix wildcards, [a TO b] / {a TO b} ranges.
    Queries longer than MAX_QUERY_LENGTH or nested deeper than MAX_DEPTH are QueryErrors."""
    if len(query) > MAX_QUERY_LENGTH:
        raise QueryTooComplex(f"query longer than {MAX_QUERY_LENGTH} characters")
    toks = _tokenize(query)
    if not toks:
        return lambda rec: True
    pos = 0

    def peek() -> str | None:
        return toks[pos][0] if pos < len(toks) else None

    def parse_or(depth: int) -> Predicate:
        nonlocal pos
        parts = [parse_and(depth)]
        while peek() == "OR":
            pos += 1
            parts.append(parse_and(depth))
        return parts[0] if len(parts) == 1 else (lambda r, ps=tuple(parts): any(p(r) for p in ps))

    def parse_and(depth: int) -> Predicate:
        nonlocal pos
        parts = [parse_unary(depth)]
        while peek() not in (None, "OR", ")"):
            if peek() == "AND":
                pos += 1
            parts.append(parse_unary(depth))
        return parts[0] if len(parts) == 1 else (lambda r, ps=tuple(parts): all(p(r) for p in ps))

    def parse_unary(depth: int) -> Predicate:
        nonlocal pos
        kind = peek()
        if kind in ("NOT", "(") and depth >= MAX_DEPTH:
            raise QueryTooComplex(f"parentheses and negations nested deeper than {MAX_DEPTH}")
        if kind == "NOT":
            pos += 1
            inner = parse_unary(depth + 1)
            return lambda r: not inner(r)
        if kind == "(":
            pos += 1
            inner = parse_or(depth + 1)
            if peek() != ")":
                raise QueryError("unbalanced parentheses")
            pos += 1
            return inner
        if kind == "TERM":
            term = toks[pos][1]
            pos += 1
            return term
        raise QueryError(f"unexpected {toks[pos][1] if kind else 'end of query'!r}")

    pred = parse_or(0)
    if pos != len(toks):
        raise QueryError(f"unexpected {toks[pos][1]!r}")
    return pred
