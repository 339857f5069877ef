"""The nightly drift step (flows/drift.py) and its gate (flows.promotion.drift_gate): on a tiny project with
real images, the report says `ok` for more of the same and `drift` for darker images from a male-only clinic;
a drifted night is held unless nightly.yaml allows it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from flows import drift as F
from flows import nightly, promotion
from flows.drift import DriftConfig
from tests.flows.conftest import ROOT, FakeRegistry
from tests.tasks.conftest import TINY, build_tiny_project, make_lesion


# --------------------------------------------------------------------------- config
def test_shipped_nightly_yaml_lists_every_drift_knob_with_its_default() -> None:
    data = yaml.safe_load((ROOT / "nightly.yaml").read_text())["drift"]
    assert set(data) == set(DriftConfig.model_fields)
    assert DriftConfig.model_validate(data) == DriftConfig()


def test_bad_drift_knob_is_named(tmp_path: Path) -> None:
    (tmp_path / "n.yaml").write_text("drift:\n  embeding_auc: 0.8\n")
    with pytest.raises(ValueError, match="drift.embeding_auc"):
        nightly.load_nightly(tmp_path / "n.yaml")


# --------------------------------------------------------------------------- the gate (pure)
DRIFTED = {"status": "drift", "drifted": True, "reasons": ["sex: chi-square p=1e-9, Cramér's V 0.40"],
           "report": "reports/drift/drift.md"}
PROMOTE = {"verdict": "promote", "promote": True, "reasons": ["AUC better"], "challenger": {"version": "3"}}


def test_drift_gate_holds_a_drifted_promotion_unless_allowed() -> None:
    held = promotion.drift_gate(PROMOTE, DRIFTED, allow_drifted=False)
    assert held["verdict"] == "drift-hold" and not held["promote"] and held["would_be"] == "promote"
    assert "held by data drift: sex" in held["reasons"][-1] and "--version 3 --force" in held["reasons"][-1]
    assert held["drift"]["allowed"] is False and held["drift"]["status"] == "drift"
    allowed = promotion.drift_gate(PROMOTE, DRIFTED, allow_drifted=True)
    assert allowed["verdict"] == "promote" and allowed["promote"] and "promoted anyway" in allowed["reasons"][-1]
    rejected = promotion.drift_gate({**PROMOTE, "verdict": "reject", "promote": False}, DRIFTED, False)
    assert rejected["verdict"] == "reject" and rejected["reasons"][-1].startswith("data drift")
    quiet = promotion.drift_gate(PROMOTE, {"status": "ok", "drifted": False, "reasons": []}, False)
    assert quiet["verdict"] == "promote" and quiet["drift"]["status"] == "ok" and quiet["reasons"] == ["AUC better"]
    assert promotion.drift_gate(PROMOTE, None, False) == PROMOTE


# --------------------------------------------------------------------------- drift_check on real images
def _add_rows(root: Path, n: int, seed: int, *, darken: float = 1.0, sex: str | None = None) -> pd.DataFrame:
    """n new raw lesion images under data/ingest and their rows appended to the data/upsample index."""
    import cv2

    from tasks.core.io import Paths, read_index, write_index
    from tasks.models.inputs import INPUT_STAGE

    paths = Paths(root)
    rng = np.random.default_rng(seed)
    index = read_index(paths, INPUT_STAGE)
    new = []
    for i in range(n):
        isic_id = f"ISIC_9{seed:02d}{i:04d}"
        img = np.clip(make_lesion(rng, bool(i % 3 == 0)).astype(float) * darken, 0, 255).astype(np.uint8)
        rel = f"data/ingest/images/{isic_id}.png"
        cv2.imwrite(str(root / rel), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        new.append({**index.iloc[i % len(index)].to_dict(), "isic_id": isic_id, "path": rel,
                    "target": int(i % 3 == 0), "split": "train",
                    "sex": sex or ["male", "female", None][i % 3]})
    write_index(pd.concat([index, pd.DataFrame(new)], ignore_index=True), paths, INPUT_STAGE)
    return index


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, pd.DataFrame]:
    """A tiny project whose current index is the champion's data (its reference rows, as logged with its card)."""
    from tasks.core.config import load_params
    from tasks.core.io import Paths, read_index
    from tasks.models.inputs import INPUT_STAGE

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = build_tiny_project(tmp_path / "proj", load_params(TINY))
    reference = read_index(Paths(root), INPUT_STAGE)
    monkeypatch.setattr(F, "load_reference", lambda root, name, version: reference)
    return root, reference


CFG = DriftConfig(embedding=False, min_new=10)


def test_more_of_the_same_is_not_drift(project: tuple[Path, pd.DataFrame]) -> None:
    root, _ = project
    _add_rows(root, 36, seed=7)
    s = F.drift_check(root, CFG, "lesionflow-classifier", "1", log_mlflow=False)
    assert s["status"] == "ok" and not s["drifted"] and s["n_new"] == 36 and s["n_reference"] == 48
    report = json.loads((root / F.REPORT_DIR / "drift.json").read_text())
    assert report["images"]["brightness"]["drift"] is False


def test_darker_male_only_clinic_is_drift_logged_to_mlflow(project: tuple[Path, pd.DataFrame]) -> None:
    import mlflow

    from tasks import tracking

    root, _ = project
    _add_rows(root, 36, seed=8, darken=0.55, sex="male")
    s = F.drift_check(root, CFG, "lesionflow-classifier", "1")
    assert s["status"] == "drift" and s["drifted"] and s["champion"] == "1"
    assert any(r.startswith("sex") for r in s["reasons"]) and any("brightness" in r for r in s["reasons"])
    out = root / F.REPORT_DIR
    assert {p.name for p in out.iterdir()} >= {"drift.json", "drift.md", "metadata.png", "images.png"}
    assert "**drift**" in (out / "drift.md").read_text()
    tracking.configure(root)
    run = mlflow.get_run(s["run_id"])
    assert run.data.tags["drift.status"] == "drift" and run.data.metrics["drift.drifted"] == 1.0
    assert run.data.params["drift.allow_drifted_promotion"] == "False"
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(s["run_id"], "drift")}
    assert {"drift/drift.md", "drift/metadata.png", "drift/images.png"} <= names


def test_drift_check_skips_without_champion_index_or_reference(project: tuple[Path, pd.DataFrame],
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    root, _ = project
    assert F.drift_check(root, CFG, "m", None)["status"] == "skipped"
    assert "disabled" in F.drift_check(root, DriftConfig(enabled=False), "m", "1")["note"]
    assert "nothing reproduced" in F.drift_check(tmp_path, CFG, "m", "1")["note"]
    monkeypatch.setattr(F, "load_reference", lambda root, name, version: None)
    assert "no data rows" in F.drift_check(root, CFG, "m", "1")["note"]
    monkeypatch.setattr(F, "load_reference", lambda *a: 1 / 0)
    err = F.safe_drift_check(root, CFG, "m", "1")
    assert err["status"] == "error" and not err["drifted"] and "ZeroDivisionError" in err["error"]


def test_split_new_keeps_real_unseen_rows() -> None:
    ref = pd.DataFrame({"source": ["a"] * 4, "isic_id": ["1", "2", "3", "4"], "split": ["train", "train", "val",
                                                                                     "test"]})
    cur = pd.DataFrame({"source": ["a"] * 6, "isic_id": ["1", "3", "5", "6", "7", "8"],
                        "augmented_from": [None, None, None, "5", None, None],
                        "synthetic": [False, False, False, False, True, False]})
    r, n = F.split_new(cur, ref)
    assert r["isic_id"].tolist() == ["1", "2"] and n["isic_id"].tolist() == ["5", "8"]


# --------------------------------------------------------------------------- the nightly flow holds a drifted night
@pytest.mark.slow  # the toy retrain path (~10 s + the Prefect harness)
def test_nightly_holds_a_drifted_night(prefect_harness, toy, monkeypatch) -> None:
    reg = FakeRegistry(toy, {"v2": {"auc": 0.80, "false_negatives": 3}, "v3": {"auc": 0.90, "false_negatives": 2}},
                       champion="v2")
    monkeypatch.setattr(promotion, "make_registry", lambda cfg, root, params: reg)
    seen = {}

    def fake_drift(root, cfg, model_name, champion):
        seen.update(champion=champion, cfg=cfg)
        return {**DRIFTED, "n_new": 1, "n_reference": 2, "champion": champion}

    monkeypatch.setattr(F, "safe_drift_check", fake_drift)
    (toy / "src" / "img2.txt").write_text("a new image from a new clinic\n")
    rec = nightly.nightly_flow(root=str(toy))
    assert seen["champion"] == "v2" and isinstance(seen["cfg"], DriftConfig)
    assert rec["verdict"] == "drift-hold" and not rec["promote"] and reg.alias == "v2"
    assert reg.tags["v3"]["promotion.verdict"] == "drift-hold"
    (line,) = promotion.read_log(toy / "reports" / "promotion_log.jsonl")
    assert line["verdict"] == "drift-hold" and line["drift"]["drifted"] and line["would_be"] == "promote"
    assert any("held by data drift" in r for r in line["reasons"])
