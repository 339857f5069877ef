"""The one real end-to-end run CI always does: `dvc repro` of the tiny profile in a fresh git+DVC project."""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _sh(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _digest(path: Path) -> str:
    """Hash of the weight arrays inside a .keras zip (the file itself embeds a save timestamp)."""
    import io
    import zipfile

    import h5py

    h = hashlib.sha256()
    with zipfile.ZipFile(path) as z, h5py.File(io.BytesIO(z.read("model.weights.h5")), "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                h.update(name.encode())
                h.update(obj[()].tobytes())
        f.visititems(visit)
    return h.hexdigest()


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict]:
    """A fresh clone-like copy of the tracked files with params/tiny.yaml as params.yaml."""
    proj = tmp_path_factory.mktemp("e2e") / "lesionflow"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        src = ROOT / f
        if src.is_file():
            (proj / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, proj / f)
    shutil.copy(proj / "params/tiny.yaml", proj / "params.yaml")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLFLOW_TRACKING_URI": ""}
    env.pop("MLFLOW_TRACKING_URI")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=ci@x", "-c", "user.name=ci", "commit", "-qm", "e2e"]):
        _sh(cmd, proj, env)
    return proj, env


@pytest.mark.e2e
@pytest.mark.slow
def test_dvc_repro_end_to_end_noop_and_bit_identical(project):
    proj, env = project
    _sh([str(BIN / "dvc"), "repro"], proj, env)
    metrics = json.loads((proj / "reports/evaluate/metrics.json").read_text())
    assert 0.0 <= metrics["auc"] <= 1.0 and metrics["n"] > 0
    # Every stage wrote its index/metrics, and the contract columns arrived at the end.
    idx = pd.read_parquet(proj / "data/upsample/index.parquet")
    assert {"source", "isic_id", "dup_group", "keep", "target", "split", "group_id", "processed_path",
            "synthetic"} <= set(idx.columns)
    assert not idx.loc[idx.synthetic.astype(bool), "split"].ne("train").any()  # synthetic only in train
    assert idx.groupby("group_id")["split"].nunique().max() == 1  # no group in two splits
    assert (proj / "mlruns/mlflow.db").exists()
    # The evaluate run in MLflow carries the data report of the stages that made its data.
    import mlflow

    run_id = json.loads((proj / "reports/evaluate/mlflow.json").read_text())["run_id"]  # bookkeeping, not an out
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{proj}/mlruns/mlflow.db")
    run = client.get_run(run_id)
    clean_metrics = json.loads((proj / "reports/clean/metrics.json").read_text())
    assert run.data.metrics["data.clean.rows_out"] == clean_metrics["rows_out"]
    assert {a.path for a in client.list_artifacts(run_id, "data_report/clean")} >= {
        "data_report/clean/metrics.json", "data_report/clean/class_balance.png"}

    # A second repro is a no-op, and fast.
    t0 = time.perf_counter()
    r = _sh([str(BIN / "dvc"), "repro"], proj, env)
    assert "Data and pipelines are up to date" in r.stdout, r.stdout
    assert time.perf_counter() - t0 < 10

    # Forced rerun on CPU reproduces the recorded run: byte-identical outs (the model file included), so
    # dvc.lock does not change and `dvc metrics diff` against the committed run is empty.
    weights = _digest(proj / "models/classifier.keras")
    model_sha = hashlib.sha256((proj / "models/classifier.keras").read_bytes()).hexdigest()
    lock = (proj / "dvc.lock").read_bytes()
    # Commit the run as a team would: dvc.lock, and the metrics files (cache: false, so git keeps them; they sit
    # under the git-ignored reports/, hence -f) that `dvc metrics diff` compares the workspace with.
    metric_files = [f"reports/{name}/metrics.json" for name in ("ingest", "dedupe", "clean", "split", "preprocess",
                                                               "augment", "cyclegan", "upsample", "train",
                                                               "evaluate", "ugly_duckling")]
    for cmd in (["git", "add", "-A"], ["git", "add", "-f", *metric_files],
                ["git", "-c", "user.email=ci@x", "-c", "user.name=ci", "commit", "-qm", "run"]):
        _sh(cmd, proj, env)
    _sh([str(BIN / "dvc"), "repro", "-f"], proj, env)
    assert _digest(proj / "models/classifier.keras") == weights
    assert hashlib.sha256((proj / "models/classifier.keras").read_bytes()).hexdigest() == model_sha
    changed = [ln for ln in difflib.unified_diff(lock.decode().splitlines(),
                                                  (proj / "dvc.lock").read_text().splitlines(), lineterm="")]
    assert (proj / "dvc.lock").read_bytes() == lock, "dvc.lock changed on a forced rerun:\n" + "\n".join(changed[:60])
    diff = json.loads(_sh([str(BIN / "dvc"), "metrics", "diff", "--json"], proj, env).stdout or "{}")
    assert not any(diff.values()), f"dvc metrics diff after a forced rerun: {diff}"
    # Timings live beside the metrics, in a file DVC does not track.
    assert (proj / "reports/train/run_stats.json").exists()

