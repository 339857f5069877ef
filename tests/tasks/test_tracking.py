"""tracking: store layout, provenance, evaluate's MLflow run, registry aliases, the pyfunc and its server."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks import tracking
from tasks.core.config import Params
from tasks.core.io import Paths
from tasks.models.inputs import INPUT_STAGE


def test_tracking_uri_default_override_and_artifacts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.tracking_uri(tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    assert tracking.artifact_location(uri) == (tmp_path.resolve() / "mlruns" / "artifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking.tracking_uri(tmp_path) == "http://mlflow.example:5000"
    assert tracking.artifact_location("http://mlflow.example:5000") is None  # the server decides


def test_flatten_numeric_and_dvc_hash(tmp_path: Path) -> None:
    flat = tracking.flatten({"a": {"b": 1, "c": [1, 2]}, "d": None})
    assert flat == {"a.b": 1, "a.c": "[1, 2]", "d": None}
    assert tracking.numeric({"x": 1, "y": True, "z": float("nan"), "w": "s", "v@0.5": 0.5}) == {"x": 1.0, "v_0.5": 0.5}
    (tmp_path / "data" / "augment").mkdir(parents=True)
    (tmp_path / "data" / "augment" / "index.parquet").write_bytes(b"index bytes")
    assert tracking.dvc_hash(tmp_path, "data/augment") == (hashlib.sha256(b"index bytes").hexdigest(), "index-sha256")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n  augment:\n    cmd: x\n    outs:\n"
                                       "    - path: data/augment\n      md5: 0123456789abcdef0123456789abcdef.dir\n")
    assert tracking.dvc_hash(tmp_path, "data/augment") == ("0123456789abcdef0123456789abcdef.dir", "dvc.lock")
    assert tracking.dvc_hash(tmp_path, "data/other") == (None, "missing")


@pytest.fixture(scope="module")
def logged(lf_trained: Path, lf_tiny_params: Params) -> dict:
    """evaluate with MLflow on, once for this module: the run, the registered version and the store."""
    from tasks import evaluate

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.chdir(lf_trained)  # registry helpers called without a root use the cwd's store
        # the stage sees only its declared [evaluate] section; training params come from classifier.json
        summary = evaluate.run(lf_tiny_params.view(("evaluate",), "evaluate"), Paths(lf_trained))
        yield summary["mlflow"]


def test_evaluate_logs_a_complete_run(logged: dict, lf_trained: Path) -> None:
    import mlflow

    assert logged["tracking_uri"] == f"sqlite:///{lf_trained.resolve()}/mlruns/mlflow.db"
    assert json.loads((lf_trained / "reports" / "evaluate" / "mlflow.json").read_text()) == logged
    client = tracking.client(lf_trained)
    run = client.get_run(logged["run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "lesionflow"
    assert run.data.params["train.epochs"] == "1" and run.data.params["preprocess.size"] == "32"
    assert run.data.params["evaluate.bootstrap"] == str(Params.model_fields["evaluate"].default.bootstrap) or \
        "evaluate.bootstrap" in run.data.params
    assert all(k.split(".")[0] in ("evaluate", "train", "preprocess") for k in run.data.params)
    commit = tracking.git_state(lf_trained)["git_commit"]
    assert run.info.run_name == f"evaluate lesionflow-classifier v{logged['version']} {(commit or 'no-git')[:8]}"
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    metrics = json.loads((lf_trained / "reports" / "evaluate" / "metrics.json").read_text())
    assert run.data.metrics["test.auc"] == pytest.approx(metrics["auc"])
    assert run.data.metrics["test.at_operating_point.fn"] == metrics["at_operating_point"]["fn"]
    assert "train.val_auc" in run.data.metrics
    assert len(client.get_metric_history(run.info.run_id, "cnn.val_auc")) == 1  # per-epoch history
    index_hash = hashlib.sha256(Paths(lf_trained).index(INPUT_STAGE).read_bytes()).hexdigest()
    assert run.data.tags["data_hash"] == index_hash and run.data.tags["data_hash_source"] == "index-sha256"
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.digest == index_hash[:36]
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "reports/evaluate")}
    assert {"reports/evaluate/roc.png", "reports/evaluate/metrics.json", "reports/evaluate/gradcam.png"} <= arts
    assert any(a.path == "reports/train/history.csv" for a in client.list_artifacts(run.info.run_id, "reports/train"))
    model_dir = Path(mlflow.artifacts.download_artifacts(logged["model_uri"]))
    assert (model_dir / "artifacts" / "classifier.keras").exists() and (model_dir / "code" / "tasks").is_dir()
    reqs = (model_dir / "requirements.txt").read_text()
    assert "tensorflow==" in reqs and "opencv-python-headless==" in reqs
    assert (model_dir / "serving_input_example.json").exists()


def test_registry_versions_tags_and_aliases(logged: dict, lf_trained: Path) -> None:
    name = "lesionflow-classifier"
    v = logged["version"]
    info = tracking.version_info(name, v, lf_trained)
    metrics = json.loads((lf_trained / "reports" / "evaluate" / "metrics.json").read_text())
    assert float(info["tags"]["test_auc"]) == pytest.approx(metrics["auc"], abs=1e-5)
    assert info["tags"]["run_id"] == logged["run_id"] and "test_fn" in info["tags"]
    assert tracking.client(lf_trained).get_model_version(name, v).current_stage == "None"  # aliases, never stages
    assert tracking.current_version(name, lf_trained) == v
    assert tracking.get_alias(name, "champion") is None  # no root: the cwd's store (the project)
    v2 = tracking.register(logged["model_uri"], name, {"note": "second"}, lf_trained)
    assert int(v2) == int(v) + 1
    tracking.set_alias(name, "champion", v, lf_trained)
    tracking.set_alias(name, "challenger", v2, lf_trained)
    assert tracking.get_alias(name, "champion", lf_trained) == v
    tracking.set_version_tags(name, v2, {"promotion.verdict": "reject", "auc": 0.5}, lf_trained)
    assert tracking.version_info(name, v2, lf_trained)["tags"]["auc"] == "0.5"
    tracking.delete_alias(name, "challenger", lf_trained)
    assert tracking.get_alias(name, "challenger", lf_trained) is None
    assert tracking.get_alias("no-such-model", "champion", lf_trained) is None


def _test_image_bytes(root: Path, n: int = 3) -> tuple[list[str], list[bytes]]:
    idx = pd.read_parquet(Paths(root).index(INPUT_STAGE))
    rows = idx[idx["split"] == "test"].head(n)
    paths = [str(root / p) for p in rows["path"]]
    return paths, [Path(p).read_bytes() for p in paths]


def test_pyfunc_from_the_registry_scores_paths_and_bytes(logged: dict, lf_trained: Path) -> None:
    from tasks.models.bundle import Bundle
    from tasks.tracking import load_bundle  # paths and MLflow URIs

    name = "lesionflow-classifier"
    tracking.set_alias(name, "champion", logged["version"], lf_trained)
    uri = f"models:/{name}@champion"
    model = tracking.load_pyfunc(uri, lf_trained)
    paths, blobs = _test_image_bytes(lf_trained)
    by_path = model.predict(pd.DataFrame({"path": paths, "age_approx": [50.0, 60.0, np.nan],
                                          "sex": ["male", "female", None]}))
    by_bytes = model.predict(pd.DataFrame({"image": blobs, "age_approx": [50.0, 60.0, np.nan],
                                           "sex": ["male", "female", None]}))
    assert list(by_path.columns) == ["probability_malignant", "prediction", "error"]
    np.testing.assert_allclose(by_path["probability_malignant"], by_bytes["probability_malignant"], rtol=1e-6)
    local = Bundle.from_files(lf_trained / "models" / "classifier.keras", lf_trained / "models" / "classifier.json")
    ref = local.predict_frame(pd.DataFrame({"path": paths, "age_approx": [50.0, 60.0, np.nan],
                                            "sex": ["male", "female", None]}))
    np.testing.assert_allclose(by_path["probability_malignant"], ref["probability_malignant"], rtol=1e-6)
    assert load_bundle(uri, lf_trained).threshold == pytest.approx(local.threshold)
    bad = model.predict(pd.DataFrame({"image": [b"not an image"]}))
    assert np.isnan(bad["probability_malignant"][0]) and "cannot decode" in bad["error"][0]


def test_scoring_server_app_in_process(logged: dict, lf_trained: Path) -> None:
    """What `mlflow models serve` runs, as an in-process app: JSON with base64 images in, probabilities out."""
    import warnings

    from mlflow.pyfunc import scoring_server

    with warnings.catch_warnings():  # starlette prefers httpx2; httpx works
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    model = tracking.load_pyfunc(f"models:/lesionflow-classifier/{logged['version']}", lf_trained)
    paths, blobs = _test_image_bytes(lf_trained, 2)
    body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b).decode()] for b in blobs]}}
    with TestClient(scoring_server.init(model)) as http:
        assert http.get("/ping").status_code == 200
        res = http.post("/invocations", json=body)
    assert res.status_code == 200, res.text
    preds = pd.DataFrame(res.json()["predictions"])
    direct = model.predict(pd.DataFrame({"image": blobs}))
    np.testing.assert_allclose(preds["probability_malignant"], direct["probability_malignant"], rtol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_lesionflow_serve_runs_mlflow_models_serve(logged: dict, lf_trained: Path) -> None:
    """`lesionflow serve` = `mlflow models serve -m models:/...@champion --env-manager local` on the project store."""
    tracking.set_alias("lesionflow-classifier", "champion", logged["version"], lf_trained)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "--root", str(lf_trained), "serve", "--port",
                             str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            cwd=Path(__file__).resolve().parents[2], start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
                time.sleep(1)
        _, blobs = _test_image_bytes(lf_trained, 2)
        body = json.dumps({"dataframe_split": {"columns": ["image"],
                                               "data": [[base64.b64encode(b).decode()] for b in blobs]}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            preds = json.loads(r.read())["predictions"]
        assert len(preds) == 2 and all(0 <= p["probability_malignant"] <= 1 for p in preds)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)  # the server's own session: mlflow + its uvicorn child, nothing else
        proc.wait(timeout=30)


def test_log_keras_model_registers_a_bare_keras_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The helper the cyclegan stage uses: a plain Keras model, logged + registered, loads back and predicts."""
    import keras

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    x = np.arange(6, dtype="float32").reshape(2, 3)
    with tracking.start_run(tmp_path, run_name="unit"):
        uri = tracking.log_keras_model(model, name="gen", input_example=x)
        version = tracking.register(uri, "unit-model", {"k": 1}, tmp_path)
    assert version == "1"
    got = tracking.load_pyfunc("models:/unit-model/1", tmp_path).predict(x)
    np.testing.assert_allclose(np.asarray(got), model.predict(x, verbose=0), rtol=1e-6)
    assert (tmp_path / "mlruns" / "mlflow.db").exists() and (tmp_path / "mlruns" / "artifacts").is_dir()


def test_log_stage_run_names_params_by_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one stage logger: `<section>.<key>` params of the sections given, dotted metrics, per-step metrics,
    files under reports/, folders under reports/<name>; the experiment tagged as model development."""
    from tasks.core.config import Cyclegan, Upsample

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    report = tmp_path / "reports" / "upsample"
    report.mkdir(parents=True)
    (report / "metrics.json").write_text("{}")
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "a.txt").write_text("a")
    out = tracking.log_stage_run("upsample", {"upsample": Upsample(), "cyclegan": Cyclegan(epochs=3)}, Paths(tmp_path),
                                 metrics={"generated": 4, "quality": {"kid": 0.5, "name": "x"}, "flag": True},
                                 artifacts=[report / "metrics.json", tmp_path / "extra", tmp_path / "missing.txt"],
                                 steps=[(1, {"loss.g": 1.0}), (2, {"loss.g": 0.5})], tags={"k": "v"},
                                 extra=lambda run: {"seen": run.info.run_id})
    client = tracking.client(tmp_path)
    run = client.get_run(out["mlflow_run_id"])
    assert out["seen"] == run.info.run_id and run.info.run_name == "upsample"
    params = run.data.params
    assert params["cyclegan.epochs"] == "3" and params["upsample.target_ratio"] == str(Upsample().target_ratio)
    assert all(k.split(".")[0] in ("upsample", "cyclegan") for k in params)
    assert run.data.metrics["generated"] == 4 and run.data.metrics["quality.kid"] == 0.5
    assert "flag" not in run.data.metrics and "quality.name" not in run.data.metrics
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss.g")] == [1.0, 0.5]
    assert run.data.tags["stage"] == "upsample" and run.data.tags["k"] == "v"
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "reports")}
    assert arts == {"reports/metrics.json", "reports/extra"}
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == tracking.EXPERIMENT_KIND == "custom_model_development"
