"""MLflow against a real local `mlflow server` on 127.0.0.1 (not only the sqlite store): runs, registry, aliases."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
           "--default-artifact-root", (tmp_path / "artifacts").as_uri(), "--workers", "1"]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=1).read().strip() == b"OK":
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not become healthy in 120 s")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def _half_model():
    """A tiny pyfunc model (real MLflow model artifacts, no TensorFlow); mlflow imported only when the test runs."""
    import mlflow.pyfunc

    class Half(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return [float(x) / 2 for x in model_input]

    return Half()


def test_tracking_against_mlflow_server(mlflow_server, tmp_path, monkeypatch):
    import mlflow

    from tasks import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("LESIONFLOW_PIPELINE_RUN", "nightly-test-1")
    assert tracking.tracking_uri(tmp_path) == mlflow_server
    with tracking.start_run(tmp_path, run_name="server-check") as run:
        mlflow.log_metric("auc", 0.9)
        mlflow.log_text("hello", "notes/hello.txt")
        info = mlflow.pyfunc.log_model(name="model", python_model=_half_model(), pip_requirements=["mlflow"])
    got = mlflow.get_run(run.info.run_id)
    assert got.data.metrics["auc"] == 0.9
    assert got.data.tags["lesionflow.pipeline_run"] == "nightly-test-1"
    assert mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/notes/hello.txt") == "hello"
    # The registry through the server: a version, the champion alias, read back by alias.
    version = tracking.register(info.model_uri, "lesionflow-server-check", tags={"auc": 0.9})
    tracking.set_alias("lesionflow-server-check", "champion", version)
    assert tracking.get_alias("lesionflow-server-check", "champion") == version
    assert mlflow.get_tracking_uri() == mlflow_server
    loaded = mlflow.pyfunc.load_model("models:/lesionflow-server-check@champion")
    assert list(loaded.predict([1.0, 3.0])) == [0.5, 1.5]
