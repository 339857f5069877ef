"""The pipeline under a real Prefect server, a `process` work pool and a process worker on this machine.

This is the README's "Local Prefect server, worker, schedule" path, end to end: `prefect server start`,
`prefect work-pool create --type process`, `lesionflow deploy --pool`, `prefect deployment run`,
`prefect worker start --run-once`. Every step is a real subprocess in its own process group, so nothing
survives the test (SIGTERM, then SIGKILL), even when an assertion fails halfway.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.flows.conftest import worker_checkout

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
POOL = "lf-test-pool"
def free_port() -> int:
    """A free loopback port (tiny race with other processes; the server start fails loudly if lost)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """End `proc`'s whole process group (uvicorn and flow-run children included): SIGTERM, then SIGKILL."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(grace)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group, even when the leader already exited
    except ProcessLookupError:
        pass
    proc.wait()


class Procs:
    """Starts commands in their own process groups, logging to files, and ends them all on close."""

    def __init__(self, logdir: Path, env: dict[str, str], cwd: Path) -> None:
        self.logdir, self.env, self.cwd = logdir, env, cwd
        self.started: list[subprocess.Popen] = []

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.logdir / f"{name}.log", "w")
        proc = subprocess.Popen(cmd, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        log.close()  # the child holds its own copy of the descriptor
        self.started.append(proc)
        return proc

    def run(self, name: str, cmd: list[str], timeout: float = 60.0) -> str:
        """Run to completion (killed at `timeout`); return its output, failing with it on a non-zero exit."""
        proc = self.start(name, cmd)
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop(proc)
            pytest.fail(f"{' '.join(cmd)} still running after {timeout} s:\n{self.log(name)}")
        out = self.log(name)
        assert rc == 0, f"{' '.join(cmd)} exited {rc}:\n{out}"
        return out

    def log(self, name: str) -> str:
        return (self.logdir / f"{name}.log").read_text(errors="replace")[-6000:]

    def close(self) -> None:
        for proc in reversed(self.started):
            stop(proc)


def wait_healthy(api: str, server: subprocess.Popen, procs: Procs, timeout: float = 90.0) -> None:
    """Poll `<api>/health` until the server answers true (about 14 s here)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"prefect server exited {server.returncode}:\n{procs.log('server')}")
        try:
            if httpx.get(f"{api}/health", timeout=2).json() is True:
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    pytest.fail(f"prefect server not healthy after {timeout} s:\n{procs.log('server')}")


@pytest.fixture
def project(tmp_path) -> Path:
    """A copy of the project's code and pipeline definition (what a worker machine's checkout holds)."""
    return worker_checkout(tmp_path / "proj")


@pytest.fixture
def procs(tmp_path, project) -> Iterator[Procs]:
    """Env pointing every Prefect command at one fresh server in a temp PREFECT_HOME; ends all processes."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_API_URL=f"http://127.0.0.1:{port}/api", PREFECT_SERVER_API_PORT=str(port),
               PREFECT_SERVER_API_HOST="127.0.0.1", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONUNBUFFERED="1")
    logdir = tmp_path / "logs"
    logdir.mkdir()
    p = Procs(logdir, env, project)
    try:
        yield p
    finally:
        p.close()


def test_pipeline_runs_on_a_process_work_pool_with_a_local_worker(project, procs):
    """Deploy with `lesionflow deploy --pool`, trigger a cheap run (ingest only, in-process executor, tiny
    synthetic params), and let a `process` worker execute it: the run completes and ingest's index exists."""
    import httpx

    api = procs.env["PREFECT_API_URL"]
    prefect = str(BIN / "prefect")
    server = procs.start("server", [prefect, "server", "start", "--host", "127.0.0.1",
                                    "--port", api.split(":")[-1].split("/")[0]])
    wait_healthy(api, server, procs)

    procs.run("pool", [prefect, "work-pool", "create", POOL, "--type", "process"])
    out = procs.run("deploy", [str(BIN / "lesionflow"), "--root", str(project), "deploy", "--pool", POOL])
    assert f"deployed to pool {POOL!r}" in out

    params = {"executor": "inprocess", "params": "tiny.yaml", "stages": ["ingest"], "network_retries": 0}
    out = procs.run("trigger", [prefect, "deployment", "run", "pipeline/pipeline", "--params", json.dumps(params)])
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
    assert match, f"no flow run id in `prefect deployment run` output:\n{out}"
    run_id = match.group(1)
    index = project / "data" / "ingest" / "index.parquet"
    assert not index.exists()  # only the worker can create it

    # --run-once: one poll, submit what is due, wait for those runs to finish, exit.
    procs.run("worker", [prefect, "worker", "start", "--pool", POOL, "--type", "process", "--run-once"],
              timeout=120)

    run = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10).json()
    assert run["state"]["type"] == "COMPLETED", (
        f"flow run {run_id} ended {run['state']}:\nworker log:\n{procs.log('worker')}")
    deployment = httpx.get(f"{api}/deployments/{run['deployment_id']}", timeout=10).json()
    assert (deployment["name"], deployment["work_pool_name"]) == ("pipeline", POOL)
    assert run["parameters"]["root"] == str(project.resolve())  # the deployment's root, from deploy --pool

    import pandas as pd

    df = pd.read_parquet(index)
    assert len(df) == 12 and set(df["source"]) == {"synthetic"}
    assert all((project / p).is_file() for p in df["path"])  # images the worker's flow run downloaded
    assert not (project / "data" / "dedupe").exists()  # `stages` was honoured: ingest only
