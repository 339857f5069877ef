"""Nightly retrain: nightly.yaml, and the flow on a real toy DVC project (noop, retrain + promote, failure)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from flows import nightly, promotion
from flows.nightly import Nightly, load_nightly
from tests.flows.conftest import ROOT, FakeRegistry, dvc


# --------------------------------------------------------------------------- config
def test_shipped_nightly_yaml_lists_every_knob_with_its_default():
    data = yaml.safe_load((ROOT / "nightly.yaml").read_text())
    assert set(data) == set(Nightly.model_fields)
    assert Nightly.model_validate(data) == Nightly()


@pytest.mark.parametrize("text, match", [
    ("margn: 0.01\n", "margn"), ("cron: '61 2 * * *'\n", "cron"), ("timezone: Mars/Olympus\n", "timezone"),
    ("margin: -1\n", "margin"),
])
def test_nightly_config_rejects_bad_values(tmp_path, text, match):
    (tmp_path / "n.yaml").write_text(text)
    with pytest.raises(ValueError, match=match):
        load_nightly(tmp_path / "n.yaml")


# --------------------------------------------------------------------------- the flow on a toy DVC project
@pytest.fixture
def fake(toy, monkeypatch):
    """A registry whose champion is the toy's current model (v2: trained on 2 images)."""
    reg = FakeRegistry(toy, {"v2": {"auc": 0.80, "false_negatives": 3}, "v3": {"auc": 0.90, "false_negatives": 2}},
                       champion="v2")
    monkeypatch.setattr(promotion, "make_registry", lambda cfg, root, params: reg)
    return reg


def _log(root: Path) -> list[dict]:
    return promotion.read_log(root / "reports" / "promotion_log.jsonl")


def test_nightly_noop_when_nothing_changed(prefect_harness, toy, fake):
    model = toy / "data" / "train" / "model.json"
    before = model.stat().st_mtime_ns
    rec = nightly.nightly_flow(root=str(toy))
    assert rec["verdict"] == "noop" and rec["champion"] == {"version": "v2"}
    assert model.stat().st_mtime_ns == before  # no retraining
    assert "score" not in fake.calls and fake.alias == "v2"
    (line,) = _log(toy)
    assert line["verdict"] == "noop" and line["data_version"]["outs"]["data/train"].endswith(".dir")


@pytest.mark.slow  # the full retrain path (~10 s); the gate itself is covered fast above with the fake registry
def test_nightly_new_image_retrains_promotes_and_commits_lock(prefect_harness, toy, fake):
    (toy / "src" / "img2.txt").write_text("a new image\n")
    (toy / "nightly.yaml").write_text("margin: 0.05\ncommit_lock: true\n")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=toy, capture_output=True, text=True).stdout
    rec = nightly.nightly_flow(root=str(toy))
    assert json.loads((toy / "data" / "train" / "model.json").read_text())["n_images"] == 3
    assert rec["verdict"] == "promote" and fake.alias == "v3" and rec["stale"] == ["train"]
    assert rec["challenger"]["auc"] == 0.9 and rec["champion"]["version"] == "v2" and rec["margin"] == 0.05
    assert fake.tags["v3"]["promotion.verdict"] == "promote"
    assert json.loads(dvc(toy, "status", "--json")) == {}  # the workspace is what dvc.lock records
    lock_md5 = yaml.safe_load((toy / "dvc.lock").read_text())["stages"]["train"]["outs"][0]["md5"]
    assert rec["data_version"]["outs"]["data/train"] == lock_md5
    log = subprocess.run(["git", "log", "--format=%s", "--name-only", f"{head.strip()}..HEAD"], cwd=toy,
                         capture_output=True, text=True).stdout.split()
    assert "dvc.lock" in log and rec["lock_commit"]
    assert [line["verdict"] for line in _log(toy)] == ["promote"]


def test_nightly_failure_leaves_champion_and_data_consistent(prefect_harness, toy, fake):
    (toy / "src" / "img2.txt").write_text("a new image\n")
    (toy / "FAIL_train").write_text("")
    model_before = (toy / "data" / "train" / "model.json").read_text()
    with pytest.raises(Exception, match="train"):
        nightly.nightly_flow(root=str(toy))
    assert fake.alias == "v2" and fake.tags == {}
    # the half-written train output is gone; data/train is again exactly what dvc.lock records
    assert not (toy / "data" / "train" / "half-written").exists()
    assert (toy / "data" / "train" / "model.json").read_text() == model_before
    status = json.loads(dvc(toy, "status", "--json"))
    changed_outs = {p for entry in status["train"] for p in entry.get("changed outs", {})}
    # cached outputs all restored; only the uncached metrics file (never in the DVC cache) is absent until the
    # next good run, and train's deps are honestly stale (the new image is in data/ingest)
    assert changed_outs <= {"reports/train/metrics.json"} and set(status) == {"train"}
    (line,) = _log(toy)
    assert line["verdict"] == "failed" and line["restored"]["ok"] and "train" in line["error"]


