"""`lesionflow tune` (flows/tune.py): the search space, writing the best trial back, the Optuna study with
MLflow parent/child runs, pruning, resuming, and the test split never reaching a trial.

The fast tests run the whole search machinery with a scripted stand-in for the train stage; the slow one
trains for real on the tiny project and checks the applied best trial reproduces its val AUC.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from flows import tune as tune_mod
from tasks.core.config import ParamsError, load_params, parse_params
from tasks.core.io import Paths
from tasks.models.inputs import INPUT_STAGE
from tests.tasks.conftest import ROOT, TINY, build_tiny_project

REAL = ROOT / "params" / "isic-real.yaml"


def _tiny_data() -> dict:
    return yaml.safe_load(TINY.read_text())


# --------------------------------------------------------------------------- space
@pytest.mark.parametrize("space, message", [
    ({"train.nope": {"type": "float", "low": 0.0, "high": 1.0}}, "not a key of train or augment"),
    ({"preprocess.size": {"type": "int", "low": 16, "high": 64}}, "not a key of train or augment"),
    ({"augment.offline_copies": {"type": "int", "low": 0, "high": 2}}, "not tunable"),
    ({"train.members": {"type": "categorical", "choices": [1]}}, "not tunable"),
    ({"train.lr": {"type": "float", "low": 0.1, "high": 0.01}}, "must be < high"),
    ({"train.lr": {"type": "float", "low": 0.0, "high": 0.01, "log": True}}, "log scale needs low > 0"),
    ({"train.lr": {"type": "categorical"}}, "categorical needs `choices`"),
    ({"train.lr": {"type": "float", "low": 0.1, "high": 0.2, "choices": [1]}}, "no `choices`"),
    ({"train.dropout": {"type": "float", "low": 0.0, "high": 1.5}}, "1.5 is not a valid value"),
    ({"train.loss": {"type": "categorical", "choices": ["bce", "hinge"]}}, "'hinge' is not a valid value"),
    ({"train.epochs": {"type": "int", "low": 1.5, "high": 3}}, "whole numbers"),
    ({"train.lr": {"type": "float", "low": 0.1, "high": 0.2, "scale": "log"}}, "Extra inputs"),
])
def test_bad_space_is_a_params_error_naming_the_key(space, message):
    data = _tiny_data()
    data["tune"]["space"] = space
    with pytest.raises(ParamsError, match="tune.space") as err:
        parse_params(data, "tiny.yaml")
    assert message in str(err.value)


def test_every_params_file_has_a_valid_space():
    for f in (ROOT / "params.yaml", TINY, REAL):
        params = load_params(f)
        dims = tune_mod.parse_space(params)
        assert dims and all(d.section in ("train", "augment") for d in dims)
        base = tune_mod.current_values(params, dims)
        assert all(d.contains(base[d.key]) for d in dims), f"{f}: the file's own values lie outside its space"


def test_tuning_augment_with_offline_copies_is_refused():
    data = _tiny_data()
    data["augment"]["offline_copies"] = 2
    with pytest.raises(tune_mod.InputError, match="offline_copies"):
        tune_mod.parse_space(parse_params(data))


def test_round_sig_and_yaml_scalars():
    assert tune_mod.round_sig(0.0031622776) == 0.00316
    assert tune_mod.round_sig(0.0) == 0.0
    assert [tune_mod.yaml_scalar(v) for v in (True, 3, 0.00316, 1e-05, "focal")] == \
        ["true", "3", "0.00316", "1.0e-05", "focal"]
    assert tune_mod.dvc_exp_command({"train.lr": 0.00316, "augment.rotate_limit": 30}) == \
        "dvc exp run -S 'train.lr=0.00316' -S 'augment.rotate_limit=30'"


# --------------------------------------------------------------------------- apply
def test_apply_edits_only_the_tuned_lines(tmp_path):
    """isic-real has `lr: null` lines of its members deeper in the train block: only train.lr itself changes."""
    f = tmp_path / "params.yaml"
    shutil.copy(REAL, f)
    before = f.read_text().splitlines()
    values = {"train.lr": 0.00316, "train.dropout": 0.25, "augment.color_jitter_p": 0.1,
              "train.label_smoothing": 0.05}
    changed = tune_mod.apply_values(f, values)
    assert changed["train.lr"] == [0.005, 0.00316]
    after = f.read_text().splitlines()
    diff = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(before) == len(after) and len(diff) == 4, diff
    assert ("  lr: 0.005", "  lr: 0.00316") in diff
    assert any(a.startswith("  fine_tune_epochs: 12    # then") for a in after)  # comments kept
    p = load_params(f)
    assert (p.train.lr, p.train.dropout, p.augment.color_jitter_p, p.train.label_smoothing) == (0.00316, 0.25, 0.1,
                                                                                              0.05)
    assert all(m.lr is None for m in p.train.members)
    old = load_params(REAL).model_dump(mode="json")
    new = p.model_dump(mode="json")
    old["train"].update(lr=0.00316, dropout=0.25, label_smoothing=0.05)
    old["augment"]["color_jitter_p"] = 0.1
    assert new == old


def test_apply_keeps_comments_and_refuses_what_it_cannot_edit(tmp_path):
    f = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", f)
    tune_mod.apply_values(f, {"train.weight_decay": 0.0001})
    line = next(ln for ln in f.read_text().splitlines() if ln.startswith("  weight_decay:"))
    assert line.split("#")[0].strip() == "weight_decay: 0.0001" and "#" in line
    assert load_params(f).train.weight_decay == 0.0001
    # a flow-style section cannot be edited line by line: error, file untouched
    data = yaml.safe_load(f.read_text())
    g = tmp_path / "flow.yaml"
    g.write_text(yaml.safe_dump({k: v for k, v in data.items() if k != "train"}, sort_keys=False)
                 + "train: " + yaml.safe_dump(data["train"], default_flow_style=True, width=10**6))
    text = g.read_text()
    with pytest.raises(ParamsError, match="dvc exp run -S 'train.lr=0.002'"):
        tune_mod.apply_values(g, {"train.lr": 0.002})
    assert g.read_text() == text


# --------------------------------------------------------------------------- the epoch hook into the train stage
class FakeTrial:
    def __init__(self, prune_below: float) -> None:
        self.reports, self.prune_below = [], prune_below

    def report(self, value, step):
        self.reports.append((step, value))

    def should_prune(self):
        return self.reports[-1][1] < self.prune_below


def test_epoch_hook_reports_train_stage_epochs_and_prunes():
    """The train stage's per-epoch Keras callback forwards val AUC to the running trial inside the hook (and only
    there); a trial below the bar raises TrialPruned out of the callback, i.e. out of model.fit."""
    import optuna

    from tasks import train

    original = train._EpochLog.make
    trial = FakeTrial(prune_below=0.5)
    reporter = tune_mod.Reporter(trial)
    with tune_mod.epoch_hook():
        callback = train._EpochLog.make("cnn", 1)
        tune_mod._ACTIVE.append(reporter)
        try:
            callback.on_epoch_end(0, {"val_auc": 0.7, "loss": 0.4})
            callback.on_epoch_end(1, {"loss": 0.3})  # no val AUC: recorded, not reported
            with pytest.raises(optuna.TrialPruned, match="val AUC 0.4000 at step 2"):
                callback.on_epoch_end(2, {"val_auc": 0.4})
        finally:
            tune_mod._ACTIVE.remove(reporter)
    assert trial.reports == [(0, 0.7), (2, 0.4)] and [r["step"] for r in reporter.records] == [0, 1, 2]
    assert train._EpochLog.make is original
    train._EpochLog.make("cnn", 1).on_epoch_end(0, {"val_auc": 0.1})  # outside the hook: nothing reported
    assert len(trial.reports) == 2


# --------------------------------------------------------------------------- the search, with a scripted trainer
class ScriptedTrain:
    """Stands in for the train stage: per call, a scripted val AUC reached over three epochs (reported through
    tune's epoch hook, as the Keras callback does); records what it was given."""

    def __init__(self, finals: list[float]) -> None:
        self.finals, self.calls = list(finals), []

    def __call__(self, params, paths):
        index = pd.read_parquet(paths.index(INPUT_STAGE))
        self.calls.append({"lr": params.train.lr, "rotate": params.augment.rotate_limit,
                           "splits": sorted(index["split"].unique()), "index": str(paths.index(INPUT_STAGE))})
        with pytest.raises(Exception, match="declares only"):
            _ = params.evaluate  # the train stage's params view
        final = self.finals[(len(self.calls) - 1) % len(self.finals)]
        for epoch in range(3):
            tune_mod.epoch_end({"val_auc": final - 0.1 * (2 - epoch), "auc": 0.9, "loss": 0.5})
        out = paths.reports / "train"
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps({"val_auc": final, "threshold": 0.4, "n_train": 48, "n_val": 24,
                                                      "members": {"cnn": {"val_auc": final, "epochs": 3}}}))
        return {"val_auc": final}


@pytest.fixture
def tiny_project(tmp_path, monkeypatch, lf_tiny_params_file):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = build_tiny_project(tmp_path / "proj", load_params(TINY))
    shutil.copy(lf_tiny_params_file, root / "params.yaml")
    return root


@pytest.fixture
def lf_tiny_params_file(tmp_path) -> Path:
    f = tmp_path / "tiny.yaml"
    shutil.copy(TINY, f)
    return f


def _runs(root: Path, parent_id: str):
    from tasks import tracking

    parent = tracking.client(root).get_run(parent_id)
    return parent, tracking.child_runs(parent_id, root)


def test_search_logs_parent_and_children_prunes_resumes_and_applies(tiny_project):
    root = tiny_project
    params_file = root / "params.yaml"
    base = load_params(params_file)
    trainer = ScriptedTrain([0.80, 0.40, 0.90])  # trial 1 falls behind at its first epoch: pruned
    out = tune_mod.tune(root, params_file, n_trials=3, train_fn=trainer)

    assert out["trials"] == {"complete": 2, "pruned": 1}
    assert out["baseline_values"] == {"train.lr": base.train.lr, "train.dropout": base.train.dropout,
                                      "augment.rotate_limit": base.augment.rotate_limit}
    assert out["baseline_val_auc"] == 0.80 and out["best"]["trial"] == 2 and out["best"]["val_auc"] == 0.90
    # trial 0 is the file's own values; the test split never reaches a trial
    assert trainer.calls[0]["lr"] == base.train.lr and trainer.calls[0]["rotate"] == base.augment.rotate_limit
    assert all(c["splits"] == ["train", "val"] for c in trainer.calls)
    assert all(".cache/lesionflow/tune/" in c["index"] for c in trainer.calls)
    assert (root / "mlruns" / "optuna.db").exists()

    parent, children = _runs(root, out["mlflow_parent_run_id"])
    assert parent.data.tags["stage"] == "tune" and parent.data.metrics["best_val_auc"] == 0.90
    assert parent.data.params["tune.n_trials"] == "3"
    assert [c.data.tags["tune.state"] for c in children] == ["COMPLETE", "PRUNED", "COMPLETE"]
    assert [c.info.run_name for c in children] == ["trial 0", "trial 1", "trial 2"]
    for c in children:  # the compare view: every trial carries the same <section>.<key> params
        assert {"train.lr", "train.dropout", "augment.rotate_limit", "preprocess.size"} <= set(c.data.params)
        assert c.info.status == "FINISHED"
    assert children[2].data.metrics["val_auc"] == 0.90 and "val_auc" not in children[1].data.metrics
    assert children[1].data.metrics["pruned_at_step"] == 0
    assert children[0].data.params["train.lr"] == str(base.train.lr)
    from tasks import tracking

    c = tracking.client(root)
    history = c.get_metric_history(children[0].info.run_id, "epoch_val_auc")
    assert [m.step for m in history] == [0, 1, 2]
    arts = {a.path for a in c.list_artifacts(children[0].info.run_id, "reports")}
    assert {"reports/trial_val_auc.png", "reports/metrics.json"} <= arts
    assert {a.path for a in c.list_artifacts(parent.info.run_id, "tune")} >= {"tune/trials.csv", "tune/best.yaml",
                                                                             "tune/study_val_auc.png"}

    # rerun with a larger budget: the same study and parent run continue; --apply writes the best values back
    again = tune_mod.tune(root, params_file, n_trials=4, train_fn=trainer, apply=True)
    assert again["study"] == out["study"] and again["mlflow_parent_run_id"] == out["mlflow_parent_run_id"]
    assert sum(again["trials"].values()) == 4 and len(trainer.calls) == 4
    assert len(_runs(root, out["mlflow_parent_run_id"])[1]) == 4
    applied = load_params(params_file)
    best = again["best"]["values"]
    assert (applied.train.lr, applied.train.dropout, applied.augment.rotate_limit) == \
        (best["train.lr"], best["train.dropout"], best["augment.rotate_limit"])
    assert again["applied"]["file"] == str(params_file)

    # nothing left to run: no trial trains, the summary is still there
    third = tune_mod.tune(root, params_file, n_trials=4, train_fn=trainer)
    assert len(trainer.calls) == 4
    # applying changed the baseline values only: the fingerprint (space, other values, data) is unchanged
    assert third["study"] == out["study"]


def test_a_changed_config_starts_a_new_study(tiny_project):
    root = tiny_project
    data = yaml.safe_load((root / "params.yaml").read_text())
    data["tune"]["mlflow"] = False
    (root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    trainer = ScriptedTrain([0.7])
    first = tune_mod.tune(root, root / "params.yaml", n_trials=1, train_fn=trainer)
    text = (root / "params.yaml").read_text().replace("  batch_size: 16\n", "  batch_size: 8\n")
    assert "batch_size: 8" in text
    (root / "params.yaml").write_text(text)
    second = tune_mod.tune(root, root / "params.yaml", n_trials=1, train_fn=trainer)
    assert first["study"] != second["study"] and len(trainer.calls) == 2


def test_sampled_values_are_rounded_and_stay_in_the_space(tiny_project):
    root = tiny_project
    data = yaml.safe_load((root / "params.yaml").read_text())
    data["tune"].update(baseline_first=False, pruner="none", mlflow=False)
    (root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    trainer = ScriptedTrain([0.6, 0.7, 0.8])
    out = tune_mod.tune(root, root / "params.yaml", n_trials=3, train_fn=trainer)
    assert out["trials"] == {"complete": 3} and out["mlflow_parent_run_id"] is None
    assert not (root / "mlruns" / "mlflow.db").exists()
    for call in trainer.calls:
        assert 1e-4 <= call["lr"] <= 1e-2 and call["lr"] == tune_mod.round_sig(call["lr"])
        assert 0 <= call["rotate"] <= 90 and isinstance(call["rotate"], int)


def test_a_missing_index_says_what_to_run(tmp_path):
    f = tmp_path / "tiny.yaml"
    shutil.copy(TINY, f)
    with pytest.raises(tune_mod.RunError, match=r"dvc repro upsample"):
        tune_mod.tune(tmp_path, f, n_trials=1, train_fn=ScriptedTrain([0.5]))


# --------------------------------------------------------------------------- a real search (slow)
@pytest.mark.slow
def test_tiny_search_trains_for_real_and_the_applied_best_reproduces(tmp_path, monkeypatch):
    """Two real trials on the tiny project (one member), test images deleted first: tune never needs them. The
    best trial's values applied to params.yaml and trained by the stage give the same val AUC (CPU determinism)."""
    from tasks import train

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = _tiny_data()
    data["train"]["members"] = data["train"]["members"][:1]
    data["train"]["tta"] = 0
    root = build_tiny_project(tmp_path / "proj", parse_params(data))
    params_text = TINY.read_text().replace("    - name: meta\n      arch: small_cnn\n      weights: none\n"
                                           "      metadata: true\n      seed: 1\n", "").replace("  tta: 2\n",
                                                                                             "  tta: 0\n")
    (root / "params.yaml").write_text(params_text)
    assert len(load_params(root / "params.yaml").train.members) == 1

    index = pd.read_parquet(Paths(root).index(INPUT_STAGE))
    test_files = [root / p for p in index.loc[index["split"] == "test", "processed_path"]]
    for f in test_files:
        f.unlink()  # a trial that opened a test image would fail
    seen: list[str] = []
    real_make = train.make_dataset

    def spy(files, *a, **k):
        seen.extend(files)
        return real_make(files, *a, **k)

    monkeypatch.setattr(train, "make_dataset", spy)
    out = tune_mod.tune(root, root / "params.yaml", n_trials=2, apply=True)
    assert sum(out["trials"].values()) == 2 and out["best"]["val_auc"] > 0.5
    assert seen and not {str(f) for f in test_files} & set(seen)
    assert len(_runs(root, out["mlflow_parent_run_id"])[1]) == 2

    applied = load_params(root / "params.yaml")
    for key, value in out["best"]["values"].items():
        section, name = key.split(".")
        assert getattr(getattr(applied, section), name) == value
    result = train.run(applied.view(("train", "augment", "preprocess")), Paths(root))
    assert result["val_auc"] == pytest.approx(out["best"]["val_auc"], abs=1e-9)
