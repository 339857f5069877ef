"""What code and data a result came from: git state and dvc.lock readers (the one implementation).

`git_state(root)` -> {git_commit, git_dirty}; `code_version(root)` -> {commit, dirty} (same facts, the
promotion log's key names); `dvc_lock(root)` parses dvc.lock; `dvc_hash(root, out)` is the md5 DVC recorded
for one output (else the sha256 of its index.parquet); `data_version(root)` is dvc.lock's sha256 plus the md5
of every data/model output it records.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

LOCK_FILE = "dvc.lock"


def _git(root: Path | str, *args: str, timeout: float = 30) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=timeout,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def git_state(root: Path | str) -> dict[str, Any]:
    """git_commit and git_dirty of the project (None outside a repository); untracked files do not count."""
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def code_version(root: Path | str) -> dict[str, Any]:
    """The git commit of the code and whether the tree had uncommitted changes ({commit, dirty})."""
    state = git_state(root)
    return {"commit": state["git_commit"], "dirty": state["git_dirty"]}


def short_commit(root: Path | str, length: int = 8) -> str | None:
    """The first `length` characters of HEAD (None outside a repository)."""
    commit = git_state(root)["git_commit"]
    return commit[:length] if commit else None


def dvc_lock(root: Path | str) -> tuple[bytes | None, dict[str, Any]]:
    """(raw bytes, parsed mapping) of dvc.lock; (None, {}) when there is none."""
    import yaml

    lock = Path(root) / LOCK_FILE
    if not lock.exists():
        return None, {}
    text = lock.read_bytes()
    return text, yaml.safe_load(text) or {}


def lock_outs(doc: dict[str, Any]) -> dict[str, str | None]:
    """{out path: md5} of every stage output a parsed dvc.lock records."""
    return {o["path"]: o.get("md5") for st in (doc.get("stages") or {}).values() for o in st.get("outs") or []
            if "path" in o}


def dvc_hash(root: Path | str, out: str) -> tuple[str | None, str]:
    """The DVC hash of a stage output (`data/<stage>`) from dvc.lock, or ('sha256 of its index', 'index-sha256'),
    or (None, 'missing')."""
    _, doc = dvc_lock(root)
    md5 = lock_outs(doc).get(out)
    if md5:
        return str(md5), LOCK_FILE
    index = Path(root) / out / "index.parquet"
    if index.exists():
        return hashlib.sha256(index.read_bytes()).hexdigest(), "index-sha256"
    return None, "missing"


def data_version(root: Path | str) -> dict[str, Any]:
    """What data a decision saw: dvc.lock's sha256 (16 hex) and the md5 of every data/model output it records
    (reports/ metrics and plots left out: they describe the data, they are not it)."""
    text, doc = dvc_lock(root)
    if text is None:
        return {"dvc_lock_sha256": None, "outs": {}}
    outs = {p: md5 for p, md5 in lock_outs(doc).items() if not p.startswith("reports/")}
    return {"dvc_lock_sha256": hashlib.sha256(text).hexdigest()[:16], "outs": outs}
