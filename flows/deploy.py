"""Deployments: `nightly` (cron + timezone from nightly.yaml) and `pipeline` (on demand), served or sent to a pool.

Two ways to run them, both need a real Prefect server (`prefect server start`, PREFECT_API_URL set):
- `lesionflow deploy`: this process serves both deployments (polls the server, runs each flow run in a
  subprocess); simplest, nothing else to start.
- `lesionflow deploy --pool local`: registers them on a process work pool; `prefect worker start --pool local`
  (on any machine holding this checkout) picks the runs up. Docker/Kubernetes pools work the same way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flows.nightly import NIGHTLY_FILE, Nightly, load_nightly, nightly_flow
from flows.pipeline import GPU_LIMIT, pipeline_flow
from tasks.core.errors import RunError

log = logging.getLogger(__name__)


class NoServerError(RunError):
    """No Prefect server is configured (the temporary one cannot hold schedules or work pools)."""


def schedules(cfg: Nightly) -> list[Any]:
    """The nightly schedule object (a Prefect Cron with the configured timezone)."""
    from prefect.schedules import Cron

    return [Cron(cfg.cron, timezone=cfg.timezone)]


def build_deployments(root: Path, cfg: Nightly, config: str = NIGHTLY_FILE) -> list[Any]:
    """RunnerDeployments for `serve` (no server needed to build them, so tests can check the schedule)."""
    from prefect.deployments.runner import EntrypointType

    # Module entrypoints (flows.nightly.nightly_flow): the installed package is found from any working directory,
    # where a file entrypoint is relative to wherever `lesionflow deploy` was started.
    module = EntrypointType.MODULE_PATH
    root_s = str(root.resolve())
    nightly = nightly_flow.to_deployment(
        name="nightly", schedules=schedules(cfg), parameters={"root": root_s, "config": config},
        tags=["lesionflow", "nightly"], concurrency_limit=1,  # two nightlies would fight over the DVC lock
        description=f"Retrain and gate the champion; cron {cfg.cron!r} in {cfg.timezone}.", entrypoint_type=module)
    pipeline = pipeline_flow.to_deployment(
        name="pipeline", parameters={"root": root_s, "executor": "dvc"}, tags=["lesionflow"],
        description="Reproduce the dvc.yaml stages (DVC skips what is up to date). Trigger on demand.",
        entrypoint_type=module)
    return [nightly, pipeline]


def require_server() -> str:
    """The configured Prefect API URL; a clear error when there is none (the temporary server cannot schedule)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise NoServerError("no Prefect server configured: start one with `prefect server start` and set "
                            "PREFECT_API_URL=http://127.0.0.1:4200/api (or `prefect config set PREFECT_API_URL=...`)")
    return url


def ensure_gpu_limit(limit: int = 1) -> str:
    """Create/update the `gpu` tag concurrency limit (limits live in the server database, so a fresh server
    needs this again; same as `prefect concurrency-limit create gpu 1`)."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=GPU_LIMIT, concurrency_limit=limit)  # upsert by tag
    return f"tag concurrency limit {GPU_LIMIT!r}: {limit} task run(s) at a time"


def serve(root: Path, config: str = NIGHTLY_FILE, gpu_limit: int = 1, say: Callable[[str], None] = log.info) -> None:
    """Serve both deployments from this process until interrupted (Ctrl-C pauses their schedules); `say`
    receives the progress lines (the CLI prints them)."""
    from prefect import serve as prefect_serve

    cfg = load_nightly(root / config)
    say(f"Prefect API: {require_server()}")
    say(ensure_gpu_limit(gpu_limit))
    prefect_serve(*build_deployments(root, cfg, config))


def deploy_to_pool(root: Path, pool: str, config: str = NIGHTLY_FILE, gpu_limit: int = 1,
                   say: Callable[[str], None] = log.info) -> list[str]:
    """Register both deployments on work pool `pool`, code pulled from this checkout (a process pool needs no
    image); returns the deployment ids."""
    from prefect import flow as prefect_flow

    cfg = load_nightly(root / config)
    say(f"Prefect API: {require_server()}")
    say(ensure_gpu_limit(gpu_limit))
    root_s = str(root.resolve())
    ids = []
    for entry, name, kw in (
        ("flows/nightly.py:nightly_flow", "nightly",
         {"schedules": schedules(cfg), "parameters": {"root": root_s, "config": config}, "concurrency_limit": 1}),
        ("flows/pipeline.py:pipeline_flow", "pipeline", {"parameters": {"root": root_s, "executor": "dvc"}}),
    ):
        f = prefect_flow.from_source(source=root_s, entrypoint=entry)
        ids.append(str(f.deploy(name=name, work_pool_name=pool, tags=["lesionflow"], print_next_steps=False,
                                build=False, push=False, **kw)))
    say(f"deployed to pool {pool!r}; start a worker with: prefect worker start --pool {pool}")
    return ids


def describe(root: Path, config: str = NIGHTLY_FILE) -> str:
    """What `lesionflow deploy --dry-run` prints: the deployments and their schedules, no server needed."""
    cfg = load_nightly(root / config)
    lines = []
    for d in build_deployments(root, cfg, config):
        sched = ", ".join(f"cron {s.schedule.cron!r} {s.schedule.timezone}" for s in d.schedules) or "on demand"
        lines.append(f"{d.flow_name}/{d.name}: {sched}; parameters {d.parameters}")
    lines.append(f"PREFECT_API_URL={os.environ.get('PREFECT_API_URL', '(unset: run `prefect server start`)')}")
    return "\n".join(lines)
