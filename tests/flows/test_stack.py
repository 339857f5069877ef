"""`lesionflow stack`: real PostgreSQL, a real S3-compatible server (moto), `mlflow server` and a Prefect server
on PostgreSQL, a process work pool with its worker, and a DVC remote on the object store. Nothing is mocked;
everything listens on 127.0.0.1 on free ports and lives in a temp folder.

The slow tests share one stack per module (bringing it up costs 40-70 s on 2 cores). The fixture runs
`down --purge` even when a test fails, then checks that no process of the stack is left. They skip with the
reason when PostgreSQL's binaries or a needed package (moto, boto3, psycopg2, dvc-s3) are missing.
The fast tests at the top start nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from flows import stack
from tasks.core.errors import InputError
from tests.flows.conftest import ROOT, worker_checkout

BIN = Path(sys.executable).parent
def free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any Prefect API / MLflow / AWS setting (the stack sets its own)."""
    drop = ("PREFECT_API_", "MLFLOW_TRACKING_", "MLFLOW_S3_", "AWS_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", DVC_NO_ANALYTICS="1", **extra)
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 120) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)} exited {res.returncode}:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return res.stdout + res.stderr


# --------------------------------------------------------------------------- fast: nothing started
def test_status_of_a_folder_without_a_stack(tmp_path):
    st = stack.status(tmp_path, stack_dir=tmp_path / "nothing-here")
    assert set(st["services"]) == set(stack.SERVICES)
    assert not any(v["running"] or v["healthy"] for v in st["services"].values())
    assert not stack.all_healthy(st)


def test_cli_wiring_status_exit_code_and_env_without_stack(tmp_path, capsys):
    """`add_parser` plugs `stack` into a parent parser that owns --root; status says `down`, exit 3."""
    parent = argparse.ArgumentParser(prog="lesionflow")
    parent.add_argument("--root", default=".")
    stack.add_parser(parent.add_subparsers(dest="cmd"))
    args = parent.parse_args(["--root", str(tmp_path), "stack", "status"])
    assert args.func is stack.cmd_stack
    assert args.func(args) == stack.NOT_RUNNING_EXIT
    assert "down" in capsys.readouterr().out
    args = parent.parse_args(["--root", str(tmp_path), "stack", "env"])
    with pytest.raises(InputError, match="stack up"):
        args.func(args)
    assert stack.main(["--root", str(tmp_path), "status", "--json"]) == stack.NOT_RUNNING_EXIT
    assert json.loads(capsys.readouterr().out)["services"]["mlflow"]["running"] is False


def test_up_fails_fast_and_clearly_on_a_taken_port(tmp_path):
    """A port held by another process: an InputError naming the service, the port and the flag, before
    anything starts (no cluster is created)."""
    if stack.missing_requirements(dvc=False):
        pytest.skip("; ".join(stack.missing_requirements(dvc=False)))
    pg, s3, ml, pf = free_ports(4)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", s3))
        busy.listen()
        with pytest.raises(InputError, match=rf"s3: port {s3} .*--s3-port"):
            stack.up(tmp_path, stack_dir=tmp_path / "st", dvc=False, worker=False,
                     ports={"postgres": pg, "s3": s3, "mlflow": ml, "prefect": pf})
    assert not (tmp_path / "st" / "postgres").exists()


def test_missing_postgres_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(stack, "pg_bindir", lambda: None)
    with pytest.raises(stack.MissingRequirement, match="PostgreSQL server binaries"):
        stack.up(tmp_path, stack_dir=tmp_path / "st")


def test_snapshot_key_paths_stay_inside_the_snapshot(tmp_path):
    assert stack._safe_key_path(tmp_path, "dvc/files/md5/ab/cdef") == tmp_path / "dvc/files/md5/ab/cdef"
    for bad in ("", "a/../../etc/passwd", "dir/", "/abs", "a//b", "./x"):
        assert stack._safe_key_path(tmp_path, bad) is None, bad


def test_client_env_names_every_service_and_no_database_password():
    cfg = stack.StackConfig(ports={"postgres": 1, "s3": 2, "mlflow": 3, "prefect": 4})
    env = cfg.client_env()
    assert env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:3"
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:4/api"
    assert env["MLFLOW_S3_ENDPOINT_URL"] == env["AWS_ENDPOINT_URL_S3"] == "http://127.0.0.1:2"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"} <= set(env)
    assert cfg.db_password not in " ".join(env.values())
    assert cfg.db_url("prefect", "postgresql+asyncpg").startswith("postgresql+asyncpg://lesionflow:")


# --------------------------------------------------------------------------- slow: the real stack
@dataclass
class Stack:
    project: Path
    dir: Path
    env: dict[str, str]  # the exports `up` printed
    ports: list[int]
    up_seconds: float

    def cfg(self) -> stack.StackConfig:
        return stack.load_config(stack.Layout.of(self.project, self.dir))

    def cli(self, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flows.stack", "--root", str(self.project), "--dir",
                               str(self.dir), *args], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                              timeout=timeout)

    def up(self) -> float:
        pg, s3, ml, pf = self.ports
        t0 = time.monotonic()
        res = self.cli("up", "--postgres-port", str(pg), "--s3-port", str(s3), "--mlflow-port", str(ml),
                       "--prefect-port", str(pf))
        took = time.monotonic() - t0
        assert res.returncode == 0, f"stack up exited {res.returncode}:\n{res.stderr[-6000:]}"
        self.env = dict(re.findall(r"^export (\w+)=(\S*)$", res.stdout, re.M))
        return took

    def sql(self, db: str, query: str, *params: object) -> list[tuple]:
        import psycopg2

        cfg = self.cfg()
        with psycopg2.connect(host="127.0.0.1", port=cfg.ports["postgres"], user=stack.DB_USER,
                              password=cfg.db_password, dbname=db, connect_timeout=10) as conn:
            with conn.cursor() as cur:
                cur.execute(query, params)
                return cur.fetchall()

    def s3_keys(self, prefix: str) -> list[str]:
        import boto3

        e = self.env
        s3 = boto3.client("s3", endpoint_url=e["MLFLOW_S3_ENDPOINT_URL"], aws_access_key_id=e["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=e["AWS_SECRET_ACCESS_KEY"], region_name=e["AWS_DEFAULT_REGION"])
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=stack.BUCKET, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _stack_processes(stack_dir: Path) -> list[str]:
    """Live processes of this stack: PostgreSQL names the folder in its command line; every other service (and
    the worker's flow runs) has PREFECT_HOME=<stack>/prefect-home in its environment."""
    home = f"PREFECT_HOME={stack_dir / 'prefect-home'}".encode()
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid() or not stack.alive(int(p.name)):
            continue
        cmd = stack._cmdline(int(p.name))
        try:
            environ = (p / "environ").read_bytes().split(b"\0")
        except OSError:
            environ = []
        if str(stack_dir) in cmd or home in environ:
            out.append(cmd)
    return out


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[Stack]:
    problems = stack.missing_requirements(dvc=True)
    if problems:
        pytest.skip("stack requirements missing: " + "; ".join(problems))
    # ingest only, on a tiny synthetic source (a second or two)
    project = worker_checkout(tmp_path_factory.mktemp("stackproj") / "proj", trouble=False)
    env = clean_env()
    run(["git", "init", "-q"], project, env)
    run([sys.executable, "-m", "dvc", "init", "-q"], project, env)
    run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], project, env)
    # Outside pytest's private tmp (mode 0700): as root, PostgreSQL runs as the `postgres` user, which must reach it.
    stack_dir = Path(tempfile.mkdtemp(prefix="lf-stack-")) / "stack"
    os.chmod(stack_dir.parent, 0o711)
    s = Stack(project, stack_dir, {}, free_ports(4), 0.0)
    try:
        s.up_seconds = s.up()
        print(f"\nstack up (fresh: initdb, migrations, pool): {s.up_seconds:.1f} s")
        yield s
    finally:
        res = s.cli("down", "--purge", timeout=180)
        left = _stack_processes(stack_dir)
        for pidfile in (stack_dir / "pids").glob("*.pid") if stack_dir.exists() else []:
            try:  # last resort, so a failed `down` can't leave servers behind
                stack.stop_group(int(pidfile.read_text()), grace=5)
            except (OSError, ValueError):
                pass
        shutil.rmtree(stack_dir.parent, ignore_errors=True)
        assert res.returncode == 0, f"stack down exited {res.returncode}:\n{res.stderr[-4000:]}"
        assert not left, f"processes left after `stack down`: {left}"


class _Half:
    """A tiny pyfunc model (real MLflow model files, no TensorFlow)."""

    @staticmethod
    def make():
        import mlflow.pyfunc

        class Half(mlflow.pyfunc.PythonModel):
            def predict(self, context, model_input, params=None):
                return [float(x) / 2 for x in model_input]

        return Half()


@pytest.mark.slow
def test_stack_up_answers_and_is_idempotent(live):
    st = stack.status(live.project, stack_dir=live.dir)
    assert stack.all_healthy(st), json.dumps(st, indent=2)
    assert live.env["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{live.ports[2]}"
    assert (live.dir / ".gitignore").read_text().strip().endswith("*")
    assert oct((live.dir / "stack.json").stat().st_mode & 0o777) == "0o600"
    procs = _stack_processes(live.dir)
    assert len(procs) >= 5 and not [c for c in procs if live.cfg().db_password in c]  # no password in `ps`
    t0 = time.monotonic()
    res = live.cli("up", "--s3-port", str(live.ports[1]))  # the same port again: nothing to change
    assert res.returncode == 0, res.stderr
    assert time.monotonic() - t0 < 60
    for s in ("s3", "mlflow", "prefect", "worker"):
        assert re.search(rf"{s}: already running", res.stderr), res.stderr
    res = live.cli("up", "--s3-port", str(free_ports(1)[0]))  # a running service's port can't change under it
    assert res.returncode == 2 and "stack down" in res.stderr, res.stderr
    res = live.cli("status")
    assert res.returncode == 0 and res.stdout.count(" up ") == 5, res.stdout


@pytest.mark.slow
def test_mlflow_run_artifact_and_registry_through_the_stack(live, monkeypatch):
    """A run with an artifact and a model, a registered version and the champion alias, through `mlflow server`:
    metadata in PostgreSQL, files in the S3 bucket (the client needs no S3 credentials: the server proxies)."""
    import mlflow

    for k in [k for k in os.environ if k.startswith("AWS_") or k.startswith("MLFLOW_S3")]:
        monkeypatch.delenv(k)
    uri = live.env["MLFLOW_TRACKING_URI"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.set_experiment("stack-test")
        with mlflow.start_run(run_name="stack-check") as run:
            mlflow.log_metric("auc", 0.91)
            mlflow.log_text("hello stack", "notes/hello.txt")
            info = mlflow.pyfunc.log_model(name="model", python_model=_Half.make(), pip_requirements=["mlflow"])
        run_id = run.info.run_id
        version = mlflow.register_model(info.model_uri, "stack-check").version
        client = mlflow.MlflowClient()
        client.set_registered_model_alias("stack-check", "champion", version)
        assert client.get_model_version_by_alias("stack-check", "champion").version == version
        assert mlflow.artifacts.load_text(f"runs:/{run_id}/notes/hello.txt") == "hello stack"
        loaded = mlflow.pyfunc.load_model("models:/stack-check@champion")
        assert list(loaded.predict([1.0, 3.0])) == [0.5, 1.5]
    finally:
        mlflow.set_tracking_uri(None)

    keys = live.s3_keys("mlflow/")
    assert any(k.endswith(f"{run_id}/artifacts/notes/hello.txt") for k in keys), keys
    assert any(k.endswith("/MLmodel") for k in keys), keys  # the logged model's files are in the bucket too
    assert live.sql("mlflow", "SELECT status FROM runs WHERE run_uuid = %s", run_id) == [("FINISHED",)]
    assert live.sql("mlflow", "SELECT alias, version FROM registered_model_aliases WHERE name = %s",
                    "stack-check") == [("champion", int(version))]


@pytest.mark.slow
def test_dvc_push_and_pull_through_the_s3_remote(live):
    """`up` made `stack` the default remote of this checkout (.dvc/config.local, credentials included): push a
    tracked file, lose it and the cache, pull it back byte-identical."""
    project, env = live.project, clean_env()  # no AWS_* in the environment: the remote config is enough
    assert 'remote "stack"' in (project / ".dvc" / "config.local").read_text()
    data = os.urandom(20_000)
    (project / "sample").mkdir()
    (project / "sample" / "small.bin").write_bytes(data)
    dvc = [sys.executable, "-m", "dvc"]
    run([*dvc, "add", "sample/small.bin"], project, env)
    out = run([*dvc, "push", "sample/small.bin.dvc"], project, env)
    assert "1 file pushed" in out, out
    md5 = re.search(r"md5: ([0-9a-f]{32})", (project / "sample" / "small.bin.dvc").read_text()).group(1)
    assert f"dvc/files/md5/{md5[:2]}/{md5[2:]}" in live.s3_keys("dvc/")
    shutil.rmtree(project / ".dvc" / "cache")
    (project / "sample" / "small.bin").unlink()
    run([*dvc, "pull", "sample/small.bin.dvc"], project, env)
    assert (project / "sample" / "small.bin").read_bytes() == data


@pytest.mark.slow
def test_pipeline_flow_runs_on_the_stack_work_pool(live):
    """`lesionflow deploy --pool` against the PostgreSQL-backed Prefect server; the stack's own worker runs the
    triggered pipeline (ingest only, tiny synthetic source); the run is COMPLETED and recorded in PostgreSQL."""
    import httpx

    env = clean_env(**live.env)
    api, pool, project = live.env["PREFECT_API_URL"], stack.POOL, live.project
    out = run([str(BIN / "lesionflow"), "--root", str(project), "deploy", "--pool", pool], project, env, timeout=180)
    assert f"deployed to pool {pool!r}" in out
    params = {"executor": "inprocess", "params": "tiny.yaml", "stages": ["ingest"], "network_retries": 0}
    out = run([str(BIN / "prefect"), "deployment", "run", "pipeline/pipeline", "--params", json.dumps(params)],
              project, env)
    run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", out).group(1)

    deadline, state = time.monotonic() + 240, None
    while time.monotonic() < deadline:
        state = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10).json()["state"]
        if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            break
        time.sleep(2)
    worker_log = (live.dir / "logs" / "worker.log").read_text(errors="replace")[-5000:]
    assert state and state["type"] == "COMPLETED", f"flow run {run_id} ended {state}:\n{worker_log}"
    assert live.sql("prefect", "SELECT state_type FROM flow_run WHERE id = %s", run_id) == [("COMPLETED",)]
    import pandas as pd

    df = pd.read_parquet(project / "data" / "ingest" / "index.parquet")
    assert len(df) == 12 and set(df["source"]) == {"synthetic"}


@pytest.mark.slow
def test_down_then_up_keeps_runs_and_objects(live):
    """Runs last in this module: a restart keeps PostgreSQL's data and the bucket (saved by `down`, loaded by
    `up`); after `down` no process of the stack is left and the DVC remote is gone from config.local."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=live.env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("stack-restart") or client.get_experiment(
        client.create_experiment("stack-restart"))
    run_id = client.create_run(exp.experiment_id).info.run_id
    client.log_text(run_id, "kept across a restart", "notes/kept.txt")
    client.set_terminated(run_id)
    before = sorted(live.s3_keys(""))
    assert any(k.endswith(f"{run_id}/artifacts/notes/kept.txt") for k in before), before

    res = live.cli("down")
    assert res.returncode == 0, res.stderr
    assert not _stack_processes(live.dir)
    assert not any(stack.port_open(p) for p in live.ports)
    assert 'remote "stack"' not in (live.project / ".dvc" / "config.local").read_text()
    took = live.up()
    print(f"\nstack up (restart): {took:.1f} s")
    assert sorted(live.s3_keys("")) == before
    client = mlflow.MlflowClient(tracking_uri=live.env["MLFLOW_TRACKING_URI"])
    assert client.get_run(run_id).info.status == "FINISHED"
    local = client.download_artifacts(run_id, "notes/kept.txt", str(live.project))
    assert Path(local).read_text() == "kept across a restart"
