"""The documentation holds together: links resolve, the README stays short and carries CI's test command.

Pure Python, no project imports: it reads README.md, docs/**/*.md and .ci/run.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
CI = ROOT / ".ci" / "run"
MAX_README_LINES = 250

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"`+[^`]*`+")
TABLE_HEADER = re.compile(r"^\s*\|(.+)\|\s*$")
TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")
DATE = re.compile(r"\b(19|20)\d\d-\d\d-\d\d\b")


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    out, fenced = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((n, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors on its text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        k = seen.get(base, 0)
        out.add(base if k == 0 else f"{base}-{k}")
        seen[base] = k + 1
    return out


def links(path: Path) -> list[tuple[int, str]]:
    found = []
    for n, line in prose_lines(path.read_text(encoding="utf-8")):
        for m in LINK.finditer(INLINE_CODE.sub("", line)):
            found.append((n, m.group(1)))
    return found


def ci_test_command() -> str:
    """The pytest line .ci/run runs (the README must carry it verbatim)."""
    lines = [ln.strip() for ln in CI.read_text(encoding="utf-8").splitlines()]
    cmds = [ln for ln in lines if not ln.startswith("#") and " -m pytest" in ln]
    assert len(cmds) == 1, f".ci/run: expected one pytest command, found {cmds}"
    return cmds[0]


def test_docs_exist():
    assert README.is_file()
    assert (DOCS / "README.md").is_file()
    for page in ["pipeline", "params", "orchestration", "tracking", "reliability", "determinism",
                 "ci-and-tests", "benchmarks", "measurements", "decisions", "real-data", "layout"]:
        assert (DOCS / f"{page}.md").is_file(), f"docs/{page}.md missing"


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; at most {MAX_README_LINES} (move detail into docs/)"


def test_readme_carries_ci_test_command_in_a_code_block():
    cmd = ci_test_command()
    text = README.read_text(encoding="utf-8")
    fenced, in_block = False, set()
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            in_block |= {line.strip(), line.split(" #")[0].strip()}  # with or without a trailing comment
    assert cmd in in_block, f"README.md needs a code block line exactly `{cmd}` (what .ci/run runs)"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path):
    problems = []
    for n, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT)}:{n}: {target}"
        try:
            dest.relative_to(ROOT)
        except ValueError:
            problems.append(f"{where}: points outside the repository")
            continue
        if not dest.exists():
            problems.append(f"{where}: no such file")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not problems, "broken links:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_dated_status_table(path: Path):
    """Status goes stale: no status/date tables and no dated status headings."""
    problems = []
    lines = prose_lines(path.read_text(encoding="utf-8"))
    for (n, line), (_, nxt) in zip(lines, lines[1:]):
        m = TABLE_HEADER.match(line)
        if m and TABLE_RULE.match(nxt):
            cells = [c.strip().strip("*`").lower() for c in m.group(1).split("|")]
            if {"status", "state", "date"} & set(cells):
                problems.append(f"{path.relative_to(ROOT)}:{n}: table header {line.strip()}")
    for n, line in lines:
        h = HEADING.match(line)
        if h and re.search(r"\bstatus\b", h.group(2), re.I) and DATE.search(h.group(2)):
            problems.append(f"{path.relative_to(ROOT)}:{n}: dated status heading {line.strip()}")
    assert not problems, "\n".join(problems)


def test_slug_matches_github():
    assert slug("Nightly retrain and the promotion gate") == "nightly-retrain-and-the-promotion-gate"
    assert slug("Params (`dedupe:`)") == "params-dedupe"
    assert slug("Local ISIC server (`tasks/fake/isic_server.py`, `lesionflow isic-server`)") == \
        "local-isic-server-tasksfakeisic_serverpy-lesionflow-isic-server"
