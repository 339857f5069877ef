"""The nightly flow against the local ISIC server while it misbehaves: it answers an empty list (a source that
listed images lists none), 500s, or stalls. Each time the night fails with a clear reason (`lesionflow nightly`
exits 1 with one `error:` line), data/ingest (files + index) and dvc.lock are byte-identical, the champion
alias stays, and the promotion log records the failed night. Fast set: 5xx and the empty list (~20 s plus a
~15 s project build); the stall waits out a timeout and is marked slow.

The project is a real git + DVC checkout whose ingest stage is the real one (`lesionflow stage ingest`,
an `isic` source pointing at the local server) and whose train stage is a toy (counts the images)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from flows import promotion
from flows.cli import main
from flows.stages import Stage
from tasks.fake.isic_folder import write_sample_folder
from tasks.fake.isic_server import running_server
from tests.flows.conftest import ROOT, FakeRegistry, dvc

N_IMAGES = 8
TRAIN_PY = """\
import json, pathlib
n = sum(1 for p in pathlib.Path("data/ingest/images").rglob("*") if p.is_file())
out = pathlib.Path("data/train")
out.mkdir(parents=True, exist_ok=True)
(out / "model.json").write_text(json.dumps({"n_images": n}))
"""
DVC_YAML = {
    "stages": {
        "ingest": {"cmd": "lesionflow stage ingest", "params": ["ingest"],
                   "outs": [{"data/ingest": {"persist": True}}],
                   "metrics": [{"reports/ingest/metrics.json": {"cache": False}}]},
        "train": {"cmd": "python train.py", "deps": ["train.py", "data/ingest"], "outs": ["data/train"]},
    }
}
STAGES = {"ingest": Stage("ingest", tags=("network",)), "train": Stage("train", tags=("gpu",))}


def write_params(root: Path, base_url: str) -> None:
    """The project's params with one isic source at `base_url`; fail fast (no client retries, 1 s timeouts)."""
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["ingest"].update(sources=[{"kind": "isic", "name": "isic", "base_url": base_url}], workers=2,
                          timeout_connect=1.0, timeout_read=1.0, max_retries=0, backoff_cap=0.1)
    (root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def _git(root: Path, *args: str) -> None:
    res = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    return write_sample_folder(tmp_path_factory.mktemp("isic") / "archive", n=N_IMAGES)


@pytest.fixture(scope="module")
def template(tmp_path_factory, archive) -> Path:
    """The project after a good night: N_IMAGES ingested from the server, a model trained, all committed."""
    root = tmp_path_factory.mktemp("faults") / "proj"
    root.mkdir()
    (root / "train.py").write_text(TRAIN_PY)
    (root / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    (root / "nightly.yaml").write_text("network_retries: 0\nretry_delay_seconds: 0\n")
    (root / ".gitignore").write_text("/reports/\n")
    _git(root, "init", "-q")
    _git(root, "config", "user.email", "toy@example.com")
    _git(root, "config", "user.name", "toy")
    dvc(root, "init", "-q")
    dvc(root, "config", "core.analytics", "false")
    with running_server(archive) as url:
        write_params(root, url)
        dvc(root, "repro")
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "good night")
    assert json.loads((root / "data" / "train" / "model.json").read_text()) == {"n_images": N_IMAGES}
    return root


@pytest.fixture
def project(template, tmp_path, monkeypatch) -> tuple[Path, FakeRegistry]:
    root = tmp_path / "proj"
    shutil.copytree(template, root, symlinks=True)
    monkeypatch.setattr("flows.stages.STAGES", dict(STAGES))
    reg = FakeRegistry(root, {f"v{N_IMAGES}": {"auc": 0.8, "false_negatives": 2}}, champion=f"v{N_IMAGES}")
    monkeypatch.setattr(promotion, "make_registry", lambda cfg, r, params: reg)
    monkeypatch.delenv("LESIONFLOW_DEBUG", raising=False)
    return root, reg


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under data/ (images, index, manifest, the model) plus dvc.lock."""
    files = [p for p in sorted((root / "data").rglob("*")) if p.is_file()] + [root / "dvc.lock"]
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def night(root: Path, capsys, *, folder: Path, **faults) -> tuple[int, str]:
    """`lesionflow nightly` against a server on `folder` with `faults`; (exit code, the last stderr line)."""
    with running_server(folder, **faults) as url:
        write_params(root, url)  # a new port each time (ingest is forced anyway)
        code = main(["--root", str(root), "nightly"])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def assert_failed_night_changed_nothing(root: Path, reg: FakeRegistry, before: dict[str, str], code: int,
                                        line: str, reason: str) -> dict:
    assert code == 1, line
    assert line.startswith("error: ") and "stage 'ingest' failed" in line and reason in line, line
    assert snapshot(root) == before  # data/ingest files + index, the model and dvc.lock: byte-identical
    assert reg.alias == f"v{N_IMAGES}" and reg.tags == {} and "set_champion" not in reg.calls
    assert "score" not in reg.calls
    (rec,) = promotion.read_log(root / "reports" / "promotion_log.jsonl")
    assert rec["verdict"] == "failed" and rec["promote"] is False and rec["applied"] is False
    assert rec["stage"] == "ingest" and rec["trigger"] == "nightly" and rec["restored"]["ok"]
    assert any(reason in r for r in rec["reasons"]) and rec["reasons"][0].startswith("night failed, nothing promoted")
    return rec


def test_nightly_fails_cleanly_when_the_server_answers_5xx(prefect_harness, project, archive, capsys):
    root, reg = project
    before = snapshot(root)
    code, line = night(root, capsys, folder=archive, fail_rate=1.0)
    assert_failed_night_changed_nothing(root, reg, before, code, line, "HTTP 503")


@pytest.mark.slow  # ~12 s: waits out the client's read timeout; 5xx and the empty list cover the flow fast
def test_nightly_fails_cleanly_when_the_server_stalls(prefect_harness, project, archive, capsys):
    root, reg = project
    before = snapshot(root)
    code, line = night(root, capsys, folder=archive, stall_paths=("/images",), stall_seconds=20)
    assert_failed_night_changed_nothing(root, reg, before, code, line, "timed out")


def test_nightly_fails_cleanly_when_a_source_lists_nothing(prefect_harness, project, tmp_path, capsys):
    root, reg = project
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metadata.csv").write_text("isic_id\n")
    before = snapshot(root)
    code, line = night(root, capsys, folder=empty)
    assert_failed_night_changed_nothing(root, reg, before, code, line, "force-prune")
