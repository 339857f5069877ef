"""`lesionflow stack up|down|status|env`: the team's shared services, for a trial on this machine.

Everything listens on 127.0.0.1 and lives under one folder (default `<root>/.stack/`, ignored by git):

    postgres  a private PostgreSQL cluster (initdb + pg_ctl), databases `mlflow` and `prefect`
    s3        an S3-compatible object store (moto's server mode), bucket `lesionflow`
    mlflow    `mlflow server`: runs and registry in PostgreSQL, artifacts in s3://lesionflow/mlflow (proxied)
    prefect   `prefect server start` on PostgreSQL, a `process` work pool, the `gpu` tag limit and queue
    worker    `prefect worker start --pool lesionflow` in the project root
    dvc       a DVC remote `stack` -> s3://lesionflow/dvc in .dvc/config.local (when the root is a DVC repo)

`up` starts what is not running (idempotent), waits until each service answers, and prints the `export`
lines for MLFLOW_TRACKING_URI, PREFECT_API_URL, MLFLOW_S3_ENDPOINT_URL and AWS_* on stdout (progress goes
to stderr), so `eval "$(lesionflow stack up)"` works. `down` stops everything (worker first, PostgreSQL
last); `status` reports each service (exit 0 when all run, 3 otherwise). Pids, logs and data are in the
stack folder: `pids/`, `logs/`, `postgres/`, `prefect-home/`.

The trial object store (moto) keeps objects in memory: `down` saves the bucket to `s3-snapshot/` and
`up` loads it back, so MLflow artifacts and DVC objects survive a restart like the PostgreSQL data does.
`down --purge` deletes the whole folder. A team replaces each service by its own server: see docs/scaling.md.

PostgreSQL refuses to run as root; as root the cluster runs as the `postgres` OS user (`--pg-user`) via
`runuser`. No secrets leave the folder: `stack.json` (mode 0600) holds the generated passwords.

This module imports no heavy library at import time (the CLI stays quick); boto3 is used lazily for the
bucket and its snapshot. CLI wiring: `add_parser(subparsers)` adds the `stack` command, or run
`python -m flows.stack --root . up`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from tasks.core.errors import InputError, RunError

log = logging.getLogger(__name__)

STACK_DIR = ".stack"
HOST = "127.0.0.1"
SERVICES = ("postgres", "s3", "mlflow", "prefect", "worker")
DEFAULT_PORTS = {"postgres": 55432, "s3": 59000, "mlflow": 55000, "prefect": 54200}
BUCKET = "lesionflow"
POOL = "lesionflow"
DB_USER = "lesionflow"
DVC_REMOTE = "stack"
REGION = "us-east-1"
# What each service's own command line contains (checked before a pid from a pid file is signalled).
MARKERS = {"s3": "-m moto.server", "mlflow": "-m mlflow server", "prefect": "-m prefect server start",
           "worker": "-m prefect worker start"}
NOT_RUNNING_EXIT = 3


class StackError(RunError):
    """A service failed to start, stop or answer (exit 1); the message names its log file."""


class MissingRequirement(RunError):
    """A binary or Python package the stack needs is absent; the message says what to install."""


# --------------------------------------------------------------------------- configuration
@dataclass
class StackConfig:
    """What `up` decided once and every later command reuses (stored in `<stack>/stack.json`, mode 0600)."""

    ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    db_password: str = field(default_factory=lambda: secrets.token_hex(16))
    aws_access_key_id: str = "lesionflow"
    aws_secret_access_key: str = field(default_factory=lambda: secrets.token_hex(20))
    bucket: str = BUCKET
    pool: str = POOL
    pg_user: str | None = None  # OS user that runs PostgreSQL (None: the current user)
    worker: bool = True
    dvc: bool = True
    dvc_remote_added: bool = False

    # ---- derived
    def url(self, service: str) -> str:
        return f"http://{HOST}:{self.ports[service]}"

    def db_url(self, db: str, driver: str = "postgresql") -> str:
        return f"{driver}://{DB_USER}:{self.db_password}@{HOST}:{self.ports['postgres']}/{db}"

    def client_env(self) -> dict[str, str]:
        """What every client process (and the worker's flow runs) needs: the exports `up` prints."""
        s3 = self.url("s3")
        return {
            "MLFLOW_TRACKING_URI": self.url("mlflow"),
            "PREFECT_API_URL": f"{self.url('prefect')}/api",
            "MLFLOW_S3_ENDPOINT_URL": s3,
            "AWS_ENDPOINT_URL_S3": s3,
            "AWS_ACCESS_KEY_ID": self.aws_access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.aws_secret_access_key,
            "AWS_DEFAULT_REGION": REGION,
        }


@dataclass(frozen=True)
class Layout:
    """Where a stack keeps its files."""

    root: Path
    dir: Path

    @classmethod
    def of(cls, root: str | Path, stack_dir: str | Path | None = None) -> Layout:
        root = Path(root).resolve()
        d = Path(stack_dir) if stack_dir else root / STACK_DIR
        return cls(root, d if d.is_absolute() else (root / d).resolve())

    @property
    def config(self) -> Path:
        return self.dir / "stack.json"

    @property
    def pgdata(self) -> Path:
        return self.dir / "postgres"

    @property
    def snapshot(self) -> Path:
        return self.dir / "s3-snapshot"

    @property
    def prefect_home(self) -> Path:
        return self.dir / "prefect-home"

    @property
    def env_file(self) -> Path:
        return self.dir / "env.sh"

    def log(self, service: str) -> Path:
        return self.dir / "logs" / f"{service}.log"

    def pidfile(self, service: str) -> Path:
        return self.dir / "pids" / f"{service}.pid"


def load_config(lay: Layout) -> StackConfig | None:
    if not lay.config.exists():
        return None
    try:
        raw = json.loads(lay.config.read_text())
        known = {k: v for k, v in raw.items() if k in StackConfig.__dataclass_fields__}
        cfg = StackConfig(**known)
        cfg.ports = {**DEFAULT_PORTS, **{k: int(v) for k, v in cfg.ports.items()}}
        return cfg
    except (ValueError, TypeError) as exc:
        raise InputError(f"{lay.config}: unreadable stack config ({exc}); `lesionflow stack down --purge` "
                         "starts over") from exc


def save_config(lay: Layout, cfg: StackConfig) -> None:
    tmp = lay.config.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(cfg), f, indent=2, sort_keys=True)
    os.replace(tmp, lay.config)


def _prepare_dir(lay: Layout) -> None:
    for d in (lay.dir, lay.dir / "logs", lay.dir / "pids", lay.prefect_home):
        d.mkdir(parents=True, exist_ok=True)
    os.chmod(lay.dir, 0o711)  # others (the postgres user) may traverse to postgres/, not list or read
    gi = lay.dir / ".gitignore"
    if not gi.exists():
        gi.write_text("# lesionflow stack: pids, logs, databases and secrets; never committed\n*\n")


# --------------------------------------------------------------------------- requirements
def pg_bindir() -> Path | None:
    """The PostgreSQL server binaries: $LESIONFLOW_PG_BIN, Debian's newest /usr/lib/postgresql/N/bin, or PATH."""
    env = os.environ.get("LESIONFLOW_PG_BIN")
    candidates = [Path(env)] if env else []
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                      key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    candidates += versions
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    for c in candidates:
        if all((c / b).exists() for b in ("initdb", "pg_ctl", "postgres", "psql")):
            return c
    return None


def missing_requirements(dvc: bool = True) -> list[str]:
    """What is missing for `up`, each with what to install; empty when the stack can start."""
    problems = []
    if pg_bindir() is None:
        problems.append("PostgreSQL server binaries (initdb, pg_ctl, postgres, psql): `apt-get install postgresql` "
                        "or set LESIONFLOW_PG_BIN to their folder")
    for mod, pkg in (("moto", "moto[s3]"), ("flask", "flask"), ("flask_cors", "flask-cors"), ("boto3", "boto3"),
                     ("psycopg2", "psycopg2-binary"), ("asyncpg", "asyncpg"), ("mlflow", "mlflow"),
                     ("prefect", "prefect")):
        if find_spec(mod) is None:
            problems.append(f"Python package {pkg!r}: pip install {pkg!r}")
    if dvc and find_spec("dvc_s3") is None:
        problems.append("Python package 'dvc-s3' (DVC's S3 remote): pip install dvc-s3 (or pass --no-dvc)")
    return problems


def _pg_user_prefix(cfg: StackConfig) -> list[str]:
    """`runuser -u USER --` when PostgreSQL must run as another user (we are root), else nothing."""
    if cfg.pg_user is None:
        return []
    return ["runuser", "-u", cfg.pg_user, "--"]


def _resolve_pg_user(requested: str | None) -> str | None:
    """Root can't run PostgreSQL: pick the OS user that will (the `postgres` user by default)."""
    import pwd

    if os.geteuid() != 0:
        if requested and requested != pwd.getpwuid(os.geteuid()).pw_name:
            raise InputError(f"--pg-user {requested}: only root can run PostgreSQL as another user")
        return None
    name = requested or "postgres"
    try:
        pwd.getpwnam(name)
    except KeyError:
        raise InputError(f"running as root and OS user {name!r} does not exist: PostgreSQL refuses to run as root; "
                         "create one (`useradd --system lesionflow`) and pass --pg-user lesionflow") from None
    if shutil.which("runuser") is None:
        raise MissingRequirement("running as root needs `runuser` (util-linux) to start PostgreSQL as "
                                 f"{name!r}; install util-linux or run lesionflow as a normal user")
    return name


# --------------------------------------------------------------------------- processes
def _proc_stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()  # fields after "pid (comm) "; [0] is the state, [2] the pgid


def alive(pid: int) -> bool:
    """A live (not zombie) process; reaps it first when it is our own exited child."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def read_pid(lay: Layout, service: str) -> int | None:
    """The pid of `service` when its pid file names a live process that is that service, else None."""
    f = lay.pidfile(service)
    try:
        pid = int(f.read_text().strip())
    except (OSError, ValueError):
        return None
    if alive(pid) and MARKERS[service] in _cmdline(pid):
        return pid
    return None


def _spawned_alive(lay: Layout, service: str) -> bool:
    """The process `_spawn` just started is alive (its command line may not be exec'ed yet)."""
    try:
        return alive(int(lay.pidfile(service).read_text().strip()))
    except (OSError, ValueError):
        return False


def _group_members(pgid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            stat = _proc_stat(int(p.name))
            if stat and stat[2] == str(pgid) and stat[0] not in ("Z", "X"):
                out.append(int(p.name))
    return out


def stop_group(pgid: int, grace: float = 20.0) -> None:
    """SIGTERM every process of the group `pgid` (a service and its children), SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        members = _group_members(pgid)
        if not members:
            return
        for pid in members:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(alive(p) for p in members):
            time.sleep(0.2)


def _spawn(lay: Layout, service: str, cmd: list[str], env: dict[str, str], cwd: Path) -> int:
    """Start `cmd` detached in its own session (pid = process group), output appended to its log."""
    with open(lay.log(service), "ab") as logf:
        logf.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        logf.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True)
    lay.pidfile(service).write_text(f"{proc.pid}\n")
    return proc.pid


def _tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return "(no log)"
    return "\n".join(lines)


def port_open(port: int, host: str = HOST, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _check_port_free(service: str, port: int) -> None:
    if port_open(port):
        raise InputError(f"{service}: port {port} on {HOST} is already in use by another process; pick another "
                         f"with --{service}-port (or stop that process)")


def _http(method: str, url: str, body: Any = None, timeout: float = 5.0) -> tuple[int, Any]:
    """A small JSON-over-HTTP call (no client library): (status, parsed body or text); (0, error) when down."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    except (OSError, ValueError) as e:
        return 0, str(e)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


# --------------------------------------------------------------------------- health
def healthy(service: str, cfg: StackConfig, lay: Layout | None = None) -> bool:
    """Does `service` answer on its port (not only: is a process alive)."""
    if service == "postgres":
        return port_open(cfg.ports["postgres"])
    if service == "s3":
        return _http("GET", f"{cfg.url('s3')}/")[0] == 200
    if service == "mlflow":
        status, body = _http("GET", f"{cfg.url('mlflow')}/health")
        return status == 200 and str(body).strip() == "OK"
    if service == "prefect":
        return _http("GET", f"{cfg.url('prefect')}/api/health") == (200, True)
    if service == "worker":
        return lay is not None and _worker_heartbeat(lay, cfg)
    raise ValueError(service)


def _worker_heartbeat(lay: Layout, cfg: StackConfig) -> bool:
    """The stack's worker has sent a heartbeat since it started, and within the last 90 s (it beats every 30 s)."""
    from datetime import datetime

    try:
        since = max(lay.pidfile("worker").stat().st_mtime, time.time() - 90)
    except OSError:
        return False
    status, body = _http("POST", f"{cfg.url('prefect')}/api/work_pools/{cfg.pool}/workers/filter", {})
    if status != 200 or not isinstance(body, list):
        return False
    for w in body:
        if w.get("name") == f"{cfg.pool}-worker" and w.get("last_heartbeat_time"):
            try:
                if datetime.fromisoformat(w["last_heartbeat_time"]).timestamp() >= since:
                    return True
            except ValueError:
                continue
    return False


def _wait(lay: Layout, cfg: StackConfig, services: Sequence[str], timeout: float,
          say: Callable[[str], None]) -> None:
    """Poll until each service in `services` is healthy; fail naming the log when one exits or times out."""
    t0 = time.monotonic()
    pending = list(services)
    while pending:
        for s in list(pending):
            if healthy(s, cfg, lay):
                pending.remove(s)
                say(f"  {s}: up ({time.monotonic() - t0:.1f} s)")
            elif s != "postgres" and not _spawned_alive(lay, s):
                raise StackError(f"{s} exited during start-up; see {lay.log(s)} (`lesionflow stack down` stops what "
                                 f"did start):\n{_tail(lay.log(s))}")
        if pending and time.monotonic() - t0 > timeout:
            s = pending[0]
            raise StackError(f"{s} not answering after {timeout:.0f} s; see {lay.log(s)} (raise --timeout, or "
                             f"`lesionflow stack down` to stop what did start):\n{_tail(lay.log(s))}")
        if pending:
            time.sleep(0.5)


# --------------------------------------------------------------------------- PostgreSQL
def _pg_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def _pg_run(cfg: StackConfig, args: list[str], lay: Layout, what: str, timeout: float = 120) -> str:
    res = subprocess.run([*_pg_user_prefix(cfg), *args], cwd=lay.dir, env=_pg_env(), capture_output=True,
                         text=True, timeout=timeout)
    if res.returncode != 0:
        raise StackError(f"postgres: {what} failed (exit {res.returncode}): {res.stderr.strip() or res.stdout.strip()}"
                         f"; log: {lay.log('postgres')}")
    return res.stdout


def _pg_running(lay: Layout, cfg: StackConfig, bindir: Path | None) -> bool:
    if bindir is None or not (lay.pgdata / "PG_VERSION").exists():
        return False
    res = subprocess.run([*_pg_user_prefix(cfg), str(bindir / "pg_ctl"), "-D", str(lay.pgdata), "status"],
                         cwd=lay.dir, env=_pg_env(), capture_output=True, text=True)
    return res.returncode == 0


def _chown(path: Path, user: str | None) -> None:
    if user is not None:
        shutil.chown(path, user, user if _group_exists(user) else None)


def _group_exists(name: str) -> bool:
    import grp

    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def start_postgres(lay: Layout, cfg: StackConfig, say: Callable[[str], None]) -> None:
    bindir = pg_bindir()
    assert bindir is not None  # checked by missing_requirements
    if _pg_running(lay, cfg, bindir):
        say(f"  postgres: already running on {HOST}:{cfg.ports['postgres']}")
        return
    _check_port_free("postgres", cfg.ports["postgres"])
    logf = lay.log("postgres")
    logf.touch()
    _chown(logf, cfg.pg_user)
    if cfg.pg_user is not None:
        res = subprocess.run(["runuser", "-u", cfg.pg_user, "--", "test", "-x", str(lay.dir)], capture_output=True)
        if res.returncode != 0:
            raise InputError(f"OS user {cfg.pg_user!r} cannot reach {lay.dir} (a parent folder is not searchable "
                             "by others): pass --dir with a folder it can reach (e.g. /tmp/lesionflow-stack)")
    if not (lay.pgdata / "PG_VERSION").exists():
        if lay.pgdata.exists():
            shutil.rmtree(lay.pgdata)  # a half-made cluster from an interrupted initdb
        lay.pgdata.mkdir(mode=0o700)
        _chown(lay.pgdata, cfg.pg_user)
        pwfile = lay.dir / "pids" / "pgpass.tmp"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(cfg.db_password + "\n")
        _chown(pwfile, cfg.pg_user)
        try:
            t0 = time.monotonic()
            _pg_run(cfg, [str(bindir / "initdb"), "-D", str(lay.pgdata), "-U", DB_USER, f"--pwfile={pwfile}",
                          "--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "-E", "UTF8", "--no-locale"],
                    lay, "initdb")
            say(f"  postgres: cluster created in {lay.pgdata} ({time.monotonic() - t0:.1f} s)")
        finally:
            pwfile.unlink(missing_ok=True)
    opts = f"-c listen_addresses={HOST} -p {cfg.ports['postgres']} -c unix_socket_directories=''"
    _pg_run(cfg, [str(bindir / "pg_ctl"), "-D", str(lay.pgdata), "-l", str(logf), "-w", "-t", "60", "-o", opts,
                  "start"], lay, "pg_ctl start")
    env = {**_pg_env(), "PGPASSWORD": cfg.db_password}
    psql = [str(bindir / "psql"), "-h", HOST, "-p", str(cfg.ports["postgres"]), "-U", DB_USER, "-d", "postgres",
            "-v", "ON_ERROR_STOP=1", "-tAc"]
    for db in ("mlflow", "prefect"):
        res = subprocess.run([*psql, f"SELECT 1 FROM pg_database WHERE datname = '{db}'"], env=env,
                             capture_output=True, text=True)
        if res.returncode == 0 and res.stdout.strip() != "1":
            res = subprocess.run([*psql, f"CREATE DATABASE {db}"], env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise StackError(f"postgres: creating database {db!r} failed: {res.stderr.strip()}")
    say(f"  postgres: up on {HOST}:{cfg.ports['postgres']} (databases mlflow, prefect)")


def stop_postgres(lay: Layout, cfg: StackConfig, say: Callable[[str], None]) -> None:
    bindir = pg_bindir()
    if not _pg_running(lay, cfg, bindir):
        return
    _pg_run(cfg, [str(bindir / "pg_ctl"), "-D", str(lay.pgdata), "-m", "fast", "-w", "-t", "60", "stop"],
            lay, "pg_ctl stop")
    say("  postgres: stopped")


# --------------------------------------------------------------------------- the object store
def _s3_client(cfg: StackConfig) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=cfg.url("s3"), aws_access_key_id=cfg.aws_access_key_id,
                        aws_secret_access_key=cfg.aws_secret_access_key, region_name=REGION,
                        config=Config(retries={"max_attempts": 3}, connect_timeout=5, read_timeout=60))


def _ensure_bucket(cfg: StackConfig) -> None:
    s3 = _s3_client(cfg)
    names = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    if cfg.bucket not in names:
        s3.create_bucket(Bucket=cfg.bucket)


def _safe_key_path(base: Path, key: str) -> Path | None:
    """Where object `key` is saved in a snapshot; None for keys that can't be a relative file path."""
    parts = key.split("/")
    if not key or key.endswith("/") or any(p in ("", ".", "..") for p in parts):
        return None
    return base.joinpath(*parts)


def save_snapshot(lay: Layout, cfg: StackConfig) -> int:
    """Copy every object of the bucket to `s3-snapshot/<bucket>/` (replacing the last snapshot)."""
    s3 = _s3_client(cfg)
    tmp = lay.snapshot.with_name("s3-snapshot.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    n = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=cfg.bucket):
        for obj in page.get("Contents", []):
            dest = _safe_key_path(tmp / cfg.bucket, obj["Key"])
            if dest is None:
                log.warning("s3 snapshot: skipped object with key %r", obj["Key"])
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(cfg.bucket, obj["Key"], str(dest))
            n += 1
    shutil.rmtree(lay.snapshot, ignore_errors=True)
    tmp.mkdir(exist_ok=True)
    os.replace(tmp, lay.snapshot)
    return n


def load_snapshot(lay: Layout, cfg: StackConfig) -> int:
    base = lay.snapshot / cfg.bucket
    if not base.is_dir():
        return 0
    s3 = _s3_client(cfg)
    n = 0
    for f in sorted(base.rglob("*")):
        if f.is_file():
            s3.upload_file(str(f), cfg.bucket, f.relative_to(base).as_posix())
            n += 1
    return n


# --------------------------------------------------------------------------- the services
def _base_env(lay: Layout, cfg: StackConfig) -> dict[str, str]:
    """The environment of every service and client: the caller's, minus any other Prefect/MLflow/AWS setup."""
    drop = ("PREFECT_API_", "PREFECT_HOME", "PREFECT_PROFILE", "PREFECT_SERVER_", "PREFECT_UI_", "MLFLOW_TRACKING_",
            "MLFLOW_REGISTRY_", "MLFLOW_S3_", "MLFLOW_ARTIFACT", "AWS_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(cfg.client_env())
    bindir = str(Path(sys.executable).parent)
    env.update(PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1",
               PREFECT_HOME=str(lay.prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               MLFLOW_DISABLE_TELEMETRY="true", DVC_NO_ANALYTICS="1", DO_NOT_TRACK="1")
    return env


def _commands(lay: Layout, cfg: StackConfig) -> dict[str, list[str]]:
    py, p = sys.executable, {k: str(v) for k, v in cfg.ports.items()}
    return {
        "s3": [py, "-m", "moto.server", "-H", HOST, "-p", p["s3"]],
        # The backend store URI (it holds the database password) goes in the environment, not the command line.
        "mlflow": [py, "-m", "mlflow", "server", "--host", HOST, "--port", p["mlflow"],
                   "--artifacts-destination", f"s3://{cfg.bucket}/mlflow", "--workers", "1"],
        "prefect": [py, "-m", "prefect", "server", "start", "--host", HOST, "--port", p["prefect"]],
        "worker": [py, "-m", "prefect", "worker", "start", "--pool", cfg.pool, "--type", "process",
                   "--name", f"{cfg.pool}-worker"],
    }


def _service_env(lay: Layout, cfg: StackConfig, service: str) -> dict[str, str]:
    env = _base_env(lay, cfg)
    if service == "mlflow":
        env["MLFLOW_BACKEND_STORE_URI"] = cfg.db_url("mlflow")
    if service == "prefect":
        env.update(PREFECT_API_DATABASE_CONNECTION_URL=cfg.db_url("prefect", "postgresql+asyncpg"),
                   PREFECT_SERVER_API_HOST=HOST, PREFECT_SERVER_API_PORT=str(cfg.ports["prefect"]))
    return env


def _start(lay: Layout, cfg: StackConfig, service: str, say: Callable[[str], None]) -> bool:
    """Start `service` unless it runs; True when it was started now."""
    if read_pid(lay, service) is not None:
        say(f"  {service}: already running (pid {read_pid(lay, service)})")
        return False
    if service in cfg.ports:
        _check_port_free(service, cfg.ports[service])
    cwd = lay.root if service == "worker" else lay.dir
    pid = _spawn(lay, service, _commands(lay, cfg)[service], _service_env(lay, cfg, service), cwd)
    say(f"  {service}: starting (pid {pid}, log {lay.log(service)})")
    return True


def _setup_prefect(cfg: StackConfig, lay: Layout, gpu_limit: int, say: Callable[[str], None]) -> None:
    """The work pool (process), the `gpu` tag concurrency limit and a `gpu` queue with the same limit."""
    api = f"{cfg.url('prefect')}/api"
    status, _ = _http("GET", f"{api}/work_pools/{cfg.pool}")
    if status == 404:
        # The CLI fills in the process worker's default job template (the REST call alone would not).
        res = subprocess.run([sys.executable, "-m", "prefect", "work-pool", "create", cfg.pool, "--type", "process"],
                             env=_base_env(lay, cfg), capture_output=True, text=True, timeout=180)
        if res.returncode != 0:
            out = (res.stdout + res.stderr)[-3000:]
            raise StackError(f"prefect: creating work pool {cfg.pool!r} failed: {out}")
        say(f"  prefect: work pool {cfg.pool!r} (process) created")
    elif status != 200:
        raise StackError(f"prefect: GET work pool {cfg.pool!r} answered {status}")
    status, body = _http("POST", f"{api}/concurrency_limits/", {"tag": "gpu", "concurrency_limit": gpu_limit})
    if status not in (200, 201):
        raise StackError(f"prefect: setting the gpu tag limit failed ({status}): {body}")
    status, _ = _http("GET", f"{api}/work_pools/{cfg.pool}/queues/gpu")
    if status == 404:
        status, body = _http("POST", f"{api}/work_pools/{cfg.pool}/queues",
                             {"name": "gpu", "concurrency_limit": gpu_limit,
                              "description": "GPU stages; GPU nodes run: prefect worker start --pool "
                                             f"{cfg.pool} --work-queue gpu"})
        if status not in (200, 201):
            raise StackError(f"prefect: creating the gpu work queue failed ({status}): {body}")
    say(f"  prefect: tag limit gpu={gpu_limit}, queue {cfg.pool}/gpu (limit {gpu_limit})")


def _dvc(lay: Layout, cfg: StackConfig, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=lay.root, env=_base_env(lay, cfg),
                          capture_output=True, text=True, timeout=120)


def setup_dvc_remote(lay: Layout, cfg: StackConfig, say: Callable[[str], None]) -> None:
    """Remote `stack` -> s3://<bucket>/dvc on the stack's endpoint, the default for this checkout only
    (.dvc/config.local, never committed)."""
    if not cfg.dvc or cfg.dvc_remote_added:
        return
    if not (lay.root / ".dvc").is_dir():
        say(f"  dvc: skipped ({lay.root} is not a DVC repository)")
        return
    steps = [("remote", "add", "--local", "--force", "--default", DVC_REMOTE, f"s3://{cfg.bucket}/dvc"),
             ("remote", "modify", "--local", DVC_REMOTE, "endpointurl", cfg.url("s3")),
             ("remote", "modify", "--local", DVC_REMOTE, "access_key_id", cfg.aws_access_key_id),
             ("remote", "modify", "--local", DVC_REMOTE, "secret_access_key", cfg.aws_secret_access_key),
             ("remote", "modify", "--local", DVC_REMOTE, "region", REGION)]
    for step in steps:
        res = _dvc(lay, cfg, *step)
        if res.returncode != 0:
            raise StackError(f"dvc {' '.join(step[:3])} failed: {res.stderr.strip() or res.stdout.strip()}")
    cfg.dvc_remote_added = True
    save_config(lay, cfg)
    say(f"  dvc: remote {DVC_REMOTE!r} -> s3://{cfg.bucket}/dvc (default for this checkout, .dvc/config.local)")


def remove_dvc_remote(lay: Layout, cfg: StackConfig, say: Callable[[str], None]) -> None:
    if not cfg.dvc_remote_added:
        return
    res = _dvc(lay, cfg, "remote", "remove", "--local", DVC_REMOTE)
    if res.returncode != 0 and "does not exist" not in (res.stderr + res.stdout):
        log.warning("dvc remote remove failed: %s", res.stderr.strip())
    _dvc(lay, cfg, "config", "--local", "--unset", "core.remote")  # only if it still names the stack remote
    cfg.dvc_remote_added = False
    save_config(lay, cfg)
    say(f"  dvc: remote {DVC_REMOTE!r} removed from .dvc/config.local")


# --------------------------------------------------------------------------- up / down / status
def _preflight_ports(lay: Layout, cfg: StackConfig) -> None:
    """Fail before starting anything when a port of a service that is not ours is taken."""
    bindir = pg_bindir()
    for service, port in cfg.ports.items():
        ours = _pg_running(lay, cfg, bindir) if service == "postgres" else read_pid(lay, service) is not None
        if not ours:
            _check_port_free(service, port)


def export_lines(cfg: StackConfig) -> list[str]:
    return [f"export {k}={v}" for k, v in cfg.client_env().items()]


def up(root: str | Path = ".", *, stack_dir: str | Path | None = None, ports: dict[str, int] | None = None,
       pg_user: str | None = None, worker: bool = True, dvc: bool = True, gpu_limit: int = 1,
       timeout: float = 240.0, say: Callable[[str], None] = log.info) -> StackConfig:
    """Bring the stack up (what is already running stays), wait until it answers; returns its config."""
    t0 = time.monotonic()
    lay = Layout.of(root, stack_dir)
    cfg = load_config(lay)
    fresh = cfg is None
    cfg = cfg or StackConfig()
    cfg.worker, cfg.dvc = worker, dvc
    problems = missing_requirements(cfg.dvc)
    if problems:
        raise MissingRequirement("the stack needs: " + "; ".join(problems))
    changed = {k: v for k, v in (ports or {}).items() if v is not None and cfg.ports.get(k) != v}
    for k, v in changed.items():
        if not 1 <= v <= 65535:
            raise InputError(f"--{k}-port {v}: not a TCP port")
        running = _pg_running(lay, cfg, pg_bindir()) if k == "postgres" else read_pid(lay, k) is not None
        if not fresh and running:
            raise InputError(f"{k} runs on port {cfg.ports[k]}; `lesionflow stack down` before changing its port")
    if gpu_limit < 1:
        raise InputError(f"--gpu-limit {gpu_limit}: must be at least 1")
    cfg.ports.update(changed)
    if len(set(cfg.ports.values())) != len(cfg.ports):
        raise InputError(f"two services on one port: {cfg.ports}")
    cfg.pg_user = _resolve_pg_user(pg_user or cfg.pg_user)
    _preflight_ports(lay, cfg)
    _prepare_dir(lay)
    save_config(lay, cfg)
    say(f"stack in {lay.dir}")

    start_postgres(lay, cfg, say)
    if _start(lay, cfg, "s3", say):
        _wait(lay, cfg, ["s3"], timeout, say)
        _ensure_bucket(cfg)
        n = load_snapshot(lay, cfg)
        say(f"  s3: bucket {cfg.bucket!r}" + (f", {n} object(s) restored from {lay.snapshot}" if n else ""))
    else:
        _ensure_bucket(cfg)
    started = [s for s in ("mlflow", "prefect") if _start(lay, cfg, s, say)]
    setup_dvc_remote(lay, cfg, say)  # while the servers boot
    _wait(lay, cfg, ["mlflow", "prefect"], timeout, say)
    if "prefect" in started or not healthy("worker", cfg, lay):
        _setup_prefect(cfg, lay, gpu_limit, say)
    if cfg.worker:
        _start(lay, cfg, "worker", say)
        _wait(lay, cfg, ["worker"], timeout, say)
    lay.env_file.write_text("\n".join(export_lines(cfg)) + "\n")
    say(f"stack up in {time.monotonic() - t0:.1f} s; MLflow UI {cfg.url('mlflow')}, Prefect UI {cfg.url('prefect')}; "
        f"exports also in {lay.env_file}")
    return cfg


def down(root: str | Path = ".", *, stack_dir: str | Path | None = None, purge: bool = False,
         say: Callable[[str], None] = log.info) -> None:
    """Stop every service (worker first, PostgreSQL last); snapshot the bucket first; `purge` deletes the folder."""
    lay = Layout.of(root, stack_dir)
    cfg = load_config(lay)
    if cfg is None:
        say(f"no stack in {lay.dir}")
        return
    for service in ("worker", "prefect", "mlflow"):
        pid = read_pid(lay, service)
        if pid is not None:
            t0 = time.monotonic()
            stop_group(pid)
            say(f"  {service}: stopped ({time.monotonic() - t0:.1f} s)")
        lay.pidfile(service).unlink(missing_ok=True)
    pid = read_pid(lay, "s3")
    if pid is not None:
        if not purge and healthy("s3", cfg):
            try:
                n = save_snapshot(lay, cfg)
                say(f"  s3: {n} object(s) saved to {lay.snapshot}")
            except Exception as exc:  # the store is going away anyway: say so, keep stopping
                say(f"  s3: snapshot failed ({type(exc).__name__}: {exc}); objects are lost")
        stop_group(pid)
        say("  s3: stopped")
    lay.pidfile("s3").unlink(missing_ok=True)
    stop_postgres(lay, cfg, say)
    remove_dvc_remote(lay, cfg, say)
    lay.env_file.unlink(missing_ok=True)
    if purge:
        shutil.rmtree(lay.dir)
        say(f"  removed {lay.dir}")


def status(root: str | Path = ".", *, stack_dir: str | Path | None = None) -> dict[str, Any]:
    """Each service: running (a process), healthy (it answers), where, pid. No secrets."""
    lay = Layout.of(root, stack_dir)
    cfg = load_config(lay)
    out: dict[str, Any] = {"dir": str(lay.dir), "services": {}}
    if cfg is None:
        out["services"] = {s: {"running": False, "healthy": False} for s in SERVICES}
        return out
    bindir = pg_bindir()
    for s in SERVICES:
        if s == "postgres":
            pid_s = (lay.pgdata / "postmaster.pid").read_text().split("\n", 1)[0] \
                if (lay.pgdata / "postmaster.pid").exists() else ""
            running = _pg_running(lay, cfg, bindir)
            pid = int(pid_s) if running and pid_s.isdigit() else None
        else:
            pid = read_pid(lay, s)
            running = pid is not None
        where = f"{HOST}:{cfg.ports[s]}" if s in cfg.ports else f"pool {cfg.pool}"
        if s == "worker" and not cfg.worker:
            where = "disabled (--no-worker)"
        out["services"][s] = {"running": running, "healthy": running and healthy(s, cfg, lay), "where": where,
                              "pid": pid, "log": str(lay.log(s))}
    out["dvc_remote"] = f"{DVC_REMOTE} -> s3://{cfg.bucket}/dvc" if cfg.dvc_remote_added else None
    out["env"] = {k: v for k, v in cfg.client_env().items() if "SECRET" not in k}
    return out


def all_healthy(st: dict[str, Any], worker: bool = True) -> bool:
    return all(v["healthy"] for k, v in st["services"].items() if worker or k != "worker")


# --------------------------------------------------------------------------- command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `stack` command's own arguments (the project root comes from the caller's --root)."""
    p.add_argument("--dir", default=None, help=f"stack folder (default: <root>/{STACK_DIR})")
    sub = p.add_subparsers(dest="stack_cmd", required=True, metavar="ACTION")
    s = sub.add_parser("up", help="start PostgreSQL, S3, MLflow, Prefect, a worker; print the exports")
    for svc, port in DEFAULT_PORTS.items():
        s.add_argument(f"--{svc}-port", type=int, default=None, help=f"default {port} (or the last one used)")
    s.add_argument("--pg-user", default=None, help="OS user that runs PostgreSQL when lesionflow runs as root "
                                                   "(default: postgres)")
    s.add_argument("--no-worker", action="store_true", help="no process worker (e.g. workers run elsewhere)")
    s.add_argument("--no-dvc", action="store_true", help="leave the DVC remotes of this checkout alone")
    s.add_argument("--gpu-limit", type=int, default=1, help="concurrent `gpu`-tagged tasks (default 1)")
    s.add_argument("--timeout", type=float, default=240.0, help="seconds to wait for each service (default 240)")
    s = sub.add_parser("down", help="stop everything (the bucket is saved to the stack folder first)")
    s.add_argument("--purge", action="store_true", help="also delete the stack folder: databases, objects, logs")
    s = sub.add_parser("status", help="which services run and answer (exit 0 when all do, 3 otherwise)")
    s.add_argument("--json", action="store_true")
    sub.add_parser("env", help="print the export lines of the running stack")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Wire `stack` into a parent CLI: `add_parser(sub)` on its subparsers; the command reads `args.root`."""
    p = subparsers.add_parser("stack", help="shared services for a trial: PostgreSQL, S3, MLflow, Prefect, worker",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=cmd_stack)
    return p


def _err(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def cmd_stack(args: argparse.Namespace) -> int:
    """Run one stack action; output: exports on stdout, progress on stderr."""
    root = getattr(args, "root", ".")
    if args.stack_cmd == "up":
        ports = {s: getattr(args, f"{s}_port") for s in DEFAULT_PORTS}
        cfg = up(root, stack_dir=args.dir, ports=ports, pg_user=args.pg_user, worker=not args.no_worker,
                 dvc=not args.no_dvc, gpu_limit=args.gpu_limit, timeout=args.timeout, say=_err)
        for line in export_lines(cfg):
            _out(line)
        return 0
    if args.stack_cmd == "down":
        down(root, stack_dir=args.dir, purge=args.purge, say=_err)
        return 0
    if args.stack_cmd == "env":
        lay = Layout.of(root, args.dir)
        cfg = load_config(lay)
        if cfg is None:
            raise InputError(f"no stack in {lay.dir}: run `lesionflow stack up` first")
        for line in export_lines(cfg):
            _out(line)
        return 0
    st = status(root, stack_dir=args.dir)
    lay = Layout.of(root, args.dir)
    cfg = load_config(lay)
    ok = all_healthy(st, worker=cfg.worker if cfg else True)
    if args.json:
        _out(json.dumps(st, indent=2, sort_keys=True))
    else:
        _out(f"stack {st['dir']}")
        for s, v in st["services"].items():
            state = "up" if v["healthy"] else ("starting/not answering" if v["running"] else "down")
            _out(f"  {s:<9} {state:<22} {v.get('where', '')}" + (f"  pid {v['pid']}" if v.get("pid") else ""))
        if st.get("dvc_remote"):
            _out(f"  dvc       remote {st['dvc_remote']}")
    return 0 if ok else NOT_RUNNING_EXIT


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m flows.stack [--root R] ACTION ...` (the same as `lesionflow --root R stack ACTION ...`)."""
    p = argparse.ArgumentParser(prog="lesionflow stack", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=".", help="project root (default: .)")
    add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return cmd_stack(args)
    except KeyboardInterrupt:
        _err("error: interrupted")
        return 130
    except (InputError, RunError) as exc:
        _err(f"error: {exc}")
        return exc.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
