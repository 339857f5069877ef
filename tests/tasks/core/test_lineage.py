"""tasks.core.lineage: git state and the dvc.lock readers (the one implementation)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tasks.core import lineage

LOCK = """schema: '2.0'
stages:
  augment:
    cmd: x
    outs:
    - path: data/augment
      md5: 0123456789abcdef0123456789abcdef.dir
  evaluate:
    cmd: y
    outs:
    - path: reports/evaluate/metrics.json
      md5: ffff
"""


def test_dvc_hash_prefers_the_lock_then_the_index(tmp_path: Path) -> None:
    (tmp_path / "data" / "augment").mkdir(parents=True)
    (tmp_path / "data" / "augment" / "index.parquet").write_bytes(b"index bytes")
    assert lineage.dvc_hash(tmp_path, "data/augment") == (hashlib.sha256(b"index bytes").hexdigest(), "index-sha256")
    (tmp_path / "dvc.lock").write_text(LOCK)
    assert lineage.dvc_hash(tmp_path, "data/augment") == ("0123456789abcdef0123456789abcdef.dir", "dvc.lock")
    assert lineage.dvc_hash(tmp_path, "data/other") == (None, "missing")


def test_data_version_leaves_reports_out(tmp_path: Path) -> None:
    assert lineage.data_version(tmp_path) == {"dvc_lock_sha256": None, "outs": {}}
    (tmp_path / "dvc.lock").write_text(LOCK)
    got = lineage.data_version(tmp_path)
    assert got["outs"] == {"data/augment": "0123456789abcdef0123456789abcdef.dir"}
    assert got["dvc_lock_sha256"] == hashlib.sha256(LOCK.encode()).hexdigest()[:16]


def test_git_state_and_code_version_agree(tmp_path: Path) -> None:
    assert lineage.git_state(tmp_path / "nowhere") == {"git_commit": None, "git_dirty": None}
    repo = Path(__file__).resolve().parents[3]
    state, code = lineage.git_state(repo), lineage.code_version(repo)
    assert code == {"commit": state["git_commit"], "dirty": state["git_dirty"]}
    assert state["git_commit"] is None or len(state["git_commit"]) == 40
    assert lineage.short_commit(repo) == (state["git_commit"][:8] if state["git_commit"] else None)
