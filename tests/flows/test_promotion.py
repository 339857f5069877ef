"""The promotion gate: decide() (pure), its bookkeeping, judge/apply with a fake registry, the MLflow seam."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest
import yaml

from flows import promotion
from flows.nightly import Nightly
from flows.promotion import decide
from tests.flows.conftest import FakeRegistry


def s(version: str, auc: float, fn: int) -> dict:
    return {"version": version, "auc": auc, "false_negatives": fn}


# --------------------------------------------------------------------------- decide(): truth table
@pytest.mark.parametrize("challenger, champion, margin, promote, verdict", [
    (s("2", 0.70, 9), None, 0.01, True, "first"),                       # first model ever, whatever its score
    (s("2", 0.90, 3), s("1", 0.80, 5), 0.01, True, "promote"),          # better AUC, fewer FN
    (s("2", 0.90, 5), s("1", 0.80, 5), 0.01, True, "promote"),          # better AUC, same FN
    (s("2", 0.90, 6), s("1", 0.80, 5), 0.01, False, "reject"),          # better AUC but one more missed melanoma
    (s("2", 0.75, 1), s("1", 0.625, 5), 0.125, False, "reject"),        # exactly +margin is not "better by"
    (s("2", 0.7501, 1), s("1", 0.625, 5), 0.125, True, "promote"),      # just above +margin
    (s("2", 0.805, 2), s("1", 0.80, 5), 0.01, False, "reject"),         # better, but within the margin
    (s("2", 0.80, 0), s("1", 0.80, 5), 0.0, False, "reject"),           # equal AUC never promotes, even margin 0
    (s("2", 0.81, 5), s("1", 0.80, 5), 0.0, True, "promote"),           # margin 0: any strict gain
    (s("2", 0.70, 0), s("1", 0.80, 5), 0.01, False, "reject"),          # worse AUC, fewer FN
    (s("2", 0.70, 9), s("1", 0.80, 5), 0.01, False, "reject"),          # worse on both
    (s("1", 0.99, 0), s("1", 0.80, 5), 0.01, False, "same"),            # the champion itself (same version)
])
def test_decide_truth_table(challenger, champion, margin, promote, verdict):
    d = decide(challenger, champion, margin)
    assert (d.promote, d.verdict) == (promote, verdict)
    assert d.reasons and all(isinstance(r, str) for r in d.reasons)
    if verdict in ("promote", "reject"):
        assert d.auc_delta == pytest.approx(challenger["auc"] - champion["auc"])
        assert d.fn_delta == challenger["false_negatives"] - champion["false_negatives"]


def test_decide_reasons_say_which_condition_failed():
    d = decide(s("2", 0.95, 7), s("1", 0.80, 5), 0.01)
    assert "better by more than the margin" in d.reasons[0] and "misses more malignant lesions" in d.reasons[1]


@pytest.mark.parametrize("bad, match", [
    ({"auc": math.nan}, "finite"), ({"auc": 1.2}, r"\[0, 1\]"), ({"auc": True}, "finite number"),
    ({"auc": "0.9"}, "finite number"), ({"auc": None}, "lacks"), ({"false_negatives": -1}, ">= 0"),
    ({"false_negatives": 2.5}, "integer"), ({"false_negatives": False}, "integer"), ({"version": None}, "lacks"),
])
def test_decide_refuses_malformed_scores(bad, match):
    with pytest.raises(ValueError, match=match):
        decide({**s("2", 0.9, 1), **bad}, s("1", 0.8, 2), 0.01)
    with pytest.raises(ValueError, match=match):  # a broken champion score must not let anything through
        decide(s("2", 0.9, 1), {**s("1", 0.8, 2), **bad}, 0.01)


@pytest.mark.parametrize("margin", [-0.01, math.nan, math.inf, True, "0.01"])
def test_decide_refuses_bad_margin(margin):
    with pytest.raises(ValueError, match="margin"):
        decide(s("2", 0.9, 1), s("1", 0.8, 2), margin)


def test_decide_refuses_scores_from_different_test_sets():
    with pytest.raises(ValueError, match="different test sets"):
        decide({**s("2", 0.9, 1), "n": 45, "n_malignant": 12}, {**s("1", 0.8, 2), "n": 45, "n_malignant": 13}, 0.01)
    assert decide({**s("2", 0.9, 1), "n": 45}, {**s("1", 0.8, 2), "n": 45}, 0.01).promote


def test_decide_accepts_numpy_scalars():
    d = decide({"version": 3, "auc": np.float64(0.9), "false_negatives": np.int64(1)},
               {"version": "2", "auc": np.float32(0.8), "false_negatives": np.int32(2)}, 0.01)
    assert d.promote


# --------------------------------------------------------------------------- bookkeeping
def _append_many(path: str, worker: int) -> None:
    for i in range(100):
        promotion.append_jsonl(Path(path), {"worker": worker, "i": i, "pad": "x" * 3000})


def test_promotion_log_lines_stay_whole_under_concurrent_appends(tmp_path):
    log = tmp_path / "reports" / "promotion_log.jsonl"
    procs = [mp.get_context("fork").Process(target=_append_many, args=(str(log), w)) for w in range(4)]
    [p.start() for p in procs]
    [p.join() for p in procs]
    recs = promotion.read_log(log)  # json.loads on every line: a torn or interleaved line would raise
    assert len(recs) == 400 and {(r["worker"], r["i"]) for r in recs} == {(w, i) for w in range(4) for i in range(100)}


def test_data_version_reads_dvc_lock_md5s(tmp_path):
    assert promotion.data_version(tmp_path) == {"dvc_lock_sha256": None, "outs": {}}
    lock = {"schema": "2.0", "stages": {
        "split": {"cmd": "x", "outs": [{"path": "data/split", "md5": "abc.dir", "size": 1}]},
        "train": {"cmd": "y", "outs": [{"path": "models/train", "md5": "def.dir"},
                                       {"path": "reports/train/metrics.json", "md5": "123"}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    v = promotion.data_version(tmp_path)
    assert v["outs"] == {"data/split": "abc.dir", "models/train": "def.dir"}  # metrics describe data, aren't data
    assert len(v["dvc_lock_sha256"]) == 16


# --------------------------------------------------------------------------- judge + apply (fake registry)
def test_first_model_becomes_champion_and_everything_is_recorded(tmp_path):
    reg = FakeRegistry(tmp_path, {"v1": {"auc": 0.7, "false_negatives": 4}})
    rec = promotion.apply(reg, Nightly(), promotion.judge(reg, Nightly(), tmp_path, "v1"), tmp_path)
    assert reg.alias == "v1" and rec["verdict"] == "first" and rec["applied"] is True
    tags = reg.tags["v1"]
    assert tags["promotion.verdict"] == "first" and tags["promotion.challenger_auc"] == "0.7"
    assert tags["promotion.margin"] == "0.005" and "commit" in json.loads(tags["promotion.code_version"])
    (line,) = promotion.read_log(tmp_path / "reports" / "promotion_log.jsonl")
    assert line["challenger"]["version"] == "v1" and line["champion"] is None and line["margin"] == 0.005


def test_worse_challenger_is_tagged_and_logged_but_champion_stays(tmp_path):
    reg = FakeRegistry(tmp_path, {"v1": {"auc": 0.80, "false_negatives": 3}, "v2": {"auc": 0.95, "false_negatives": 4}},
                       champion="v1")
    rec = promotion.apply(reg, Nightly(), promotion.judge(reg, Nightly(), tmp_path, "v2"), tmp_path)
    assert reg.alias == "v1" and rec["verdict"] == "reject" and rec["applied"] is False
    assert reg.tags["v2"]["promotion.champion_version"] == "v1" and reg.tags["v2"]["promotion.champion_auc"] == "0.8"
    assert [r["verdict"] for r in promotion.read_log(tmp_path / "reports" / "promotion_log.jsonl")] == ["reject"]
    assert reg.calls.count("score") == 2  # both scored (on the same split, by the same scorer)


def test_rechecking_the_champion_keeps_its_promotion_tags(tmp_path):
    reg = FakeRegistry(tmp_path, {"v1": {"auc": 0.8, "false_negatives": 3}}, champion="v1")
    reg.tags["v1"] = {"promotion.verdict": "first"}
    rec = promotion.apply(reg, Nightly(), promotion.judge(reg, Nightly(), tmp_path, "v1"), tmp_path)
    assert rec["verdict"] == "same" and reg.alias == "v1" and reg.tags["v1"] == {"promotion.verdict": "first"}
    assert reg.calls.count("score") == 1 and "set_champion" not in reg.calls


def test_alias_failure_is_logged_and_champion_untouched(tmp_path):
    reg = FakeRegistry(tmp_path, {"v1": {"auc": 0.8, "false_negatives": 3}, "v2": {"auc": 0.9, "false_negatives": 1}},
                       champion="v1", fail_on="set_champion")
    with pytest.raises(RuntimeError, match="injected set_champion"):
        promotion.apply(reg, Nightly(), promotion.judge(reg, Nightly(), tmp_path, "v2"), tmp_path)
    assert reg.alias == "v1"
    (line,) = promotion.read_log(tmp_path / "reports" / "promotion_log.jsonl")
    assert line["verdict"] == "failed" and line["applied"] is False and "set_champion" in line["error"]


def test_scoring_failure_changes_nothing(tmp_path):
    reg = FakeRegistry(tmp_path, {"v1": {"auc": 0.8, "false_negatives": 3}}, champion="v1", fail_on="score")
    with pytest.raises(RuntimeError, match="injected score"):
        promotion.judge(reg, Nightly(), tmp_path, "v2")
    assert reg.alias == "v1" and reg.tags == {}


def test_forced_promotion_is_a_logged_rollback(tmp_path, monkeypatch):
    reg = FakeRegistry(tmp_path, {}, champion="v5")
    monkeypatch.setattr(promotion, "make_registry", lambda cfg, root, params: reg)
    with pytest.raises(ValueError, match="--version"):
        promotion.promote_now(tmp_path, Nightly(), tmp_path / "params.yaml", force=True)
    rec = promotion.promote_now(tmp_path, Nightly(), tmp_path / "params.yaml", version="3", force=True)
    assert reg.alias == "3" and rec["verdict"] == "forced" and "previous champion v5" in rec["reasons"][0]
    assert reg.tags["3"]["promotion.verdict"] == "forced"


@pytest.mark.slow  # ~10 s: a fresh MLflow sqlite store runs its schema migrations
def test_mlflow_registry_adapter_round_trip(tmp_path, monkeypatch):
    """The production registry seam against a real (temporary) MLflow sqlite store, via tasks.tracking."""
    tracking = pytest.importorskip("tasks.tracking")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    client = tracking.client(tmp_path)
    client.create_registered_model("toy-clf")
    v1 = str(client.create_model_version("toy-clf", source=(tmp_path / "model").as_uri()).version)
    reg = promotion.MlflowRegistry(tmp_path, tmp_path / "params.yaml", "toy-clf", "champion")
    assert reg.champion() is None and reg.challenger() is None
    (tmp_path / "reports" / "evaluate").mkdir(parents=True)
    (tmp_path / "reports" / "evaluate" / "mlflow.json").write_text(json.dumps({"registered_model": "toy-clf",
                                                                                "version": v1}))
    assert reg.challenger() == v1
    reg.tag(v1, {"promotion.verdict": "first"})
    reg.set_champion(v1)
    assert reg.champion() == v1
    assert tracking.version_info("toy-clf", v1, root=tmp_path)["tags"]["promotion.verdict"] == "first"
    assert (tmp_path / "mlruns" / "mlflow.db").exists()
