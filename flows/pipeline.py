"""The Prefect pipeline: every dvc.yaml stage, in dvc.yaml order, as one Prefect task.

DVC stays the pipeline of record: the default executor runs `dvc repro --single-item <stage>` in a
subprocess, so DVC alone decides what is stale, dvc.lock records what ran, and every stage (training
included) gets a fresh process that frees its memory (GPU too) when it exits. The in-process executor
calls the stage's `run(params, paths)` directly; it serves tests and debugging, and does not touch dvc.lock.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import yaml
from prefect import flow, get_run_logger, task

from flows import stages as registry
from tasks.core.config import FORCE_PRUNE_ENV, load_params, with_force_prune
from tasks.core.errors import InputError, RunError
from tasks.core.io import Paths

DVC_FILE = "dvc.yaml"
# Tag of the GPU stages; a Prefect tag concurrency limit on it (`prefect concurrency-limit create gpu 1`, or
# `lesionflow deploy`) lets one GPU stage run at a time across all flow runs. The server enforces it when the
# task run starts; when no limit exists nothing is checked (a global `concurrency()` block instead cost ~2 s
# per stage here just to learn that no limit exists).
GPU_LIMIT = "gpu"
Executor = Literal["dvc", "inprocess"]
# Loggers of stage code forwarded into Prefect's run logs by the in-process executor.
STAGE_LOGGERS = ("tasks", "isic_client")
# Set to 1 for the stage subprocesses of one run: `lesionflow stage ingest` then runs with
# ingest.force_prune=true (the CLI's --force-prune), without editing params.yaml.
# A stage's own exit code as DVC reports it ("... failed to run: lesionflow stage x, exited with 2").
_DVC_EXIT = re.compile(r"exited with (-?\d+)")


class PipelineError(RunError):
    """dvc.yaml and the stage registry disagree, or a stage failed; the message says which and why.

    `summary` is the one-line message (what the CLI prints); `output` holds the stage's last output lines,
    which str() appends so a Prefect UI or a traceback shows them too.
    """

    def __init__(self, summary: str, *, stage: str | None = None, output: Sequence[str] = ()) -> None:
        super().__init__(summary)
        self.stage = stage
        self.output = list(output)

    @property
    def summary(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __str__(self) -> str:
        if not self.output:
            return self.summary
        return self.summary + "\nlast output:\n" + "\n".join(self.output)


class PipelineInputError(PipelineError, InputError):
    """The run was asked for something that cannot work (unknown stage, wrong params file, no dvc.yaml), or a
    stage rejected its input (it exited 2); fixing the input fixes the run (exit 2, never retried)."""

    exit_code = 2


# --------------------------------------------------------------------------- plan (pure, no Prefect)
def read_dvc_stages(root: Path | str) -> dict[str, dict[str, Any]]:
    """The `stages:` mapping of `<root>/dvc.yaml`, in file order."""
    path = Path(root) / DVC_FILE
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise PipelineInputError(f"{path}: not found (run from the project root or pass --root)") from None
    except yaml.YAMLError as exc:
        raise PipelineInputError(f"{path}: not valid YAML ({exc}); fix the file") from None
    stages = (doc or {}).get("stages") if isinstance(doc, dict) else None
    if not isinstance(stages, dict) or not stages:
        raise PipelineInputError(f"{path}: has no `stages:` mapping")
    return stages


def registry_mismatch(dvc_order: Sequence[str], names: Sequence[str]) -> list[str]:
    """Human-readable differences between the dvc.yaml stage order and the registry's; [] when they agree."""
    problems = []
    missing = [n for n in names if n not in dvc_order]
    extra = [n for n in dvc_order if n not in names]
    if missing:
        problems.append(f"in flows/stages.py STAGES but not in dvc.yaml: {missing}")
    if extra:
        problems.append(f"in dvc.yaml but not in flows/stages.py STAGES: {extra}")
    common_dvc = [n for n in dvc_order if n in names]
    common_reg = [n for n in names if n in dvc_order]
    if not problems and common_dvc != common_reg:
        problems.append(f"order differs: dvc.yaml {common_dvc} vs STAGES {common_reg}")
    return problems


def plan(root: Path | str, only: Sequence[str] | None = None,
         stages: Mapping[str, registry.Stage] | None = None) -> list[str]:
    """The stages to run, in dvc.yaml order, after checking dvc.yaml agrees with the registry."""
    reg = registry.STAGES if stages is None else stages
    order = list(read_dvc_stages(root))
    problems = registry_mismatch(order, list(reg))
    if problems:
        raise PipelineError(f"{Path(root) / DVC_FILE} and flows/stages.py disagree: " + "; ".join(problems))
    if not only:
        return order
    unknown = [n for n in only if n not in order]
    if unknown:
        raise PipelineInputError(f"unknown stage(s) {unknown}; stages: {', '.join(order)}")
    return [n for n in order if n in only]


def dvc_command(stage: str, force: bool = False) -> list[str]:
    """`dvc repro --single-item <stage>` through this interpreter, so the venv's dvc runs even off PATH."""
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    return cmd + ["--force"] if force else cmd


# Env var naming the pipeline execution a stage runs in (the root Prefect flow run), so tracking code can tag
# every MLflow run of one execution alike and the UI can group them (tasks.tracking reads it, if it wants).
RUN_ENV = "LESIONFLOW_PIPELINE_RUN"


def pipeline_run_id() -> str | None:
    """The root Prefect flow run id (a nightly's subflows share it), or None outside a flow run."""
    try:
        from prefect.runtime import flow_run

        run = flow_run.root_flow_run_id or flow_run.id
    except Exception:
        return None
    return str(run) if run else None


def subprocess_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Env for stage subprocesses: the venv's bin first (dvc.yaml calls `lesionflow`), unbuffered output."""
    env = dict(os.environ)
    env.update(extra or {})
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"  # child prints reach the Prefect log as they happen, not at exit
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def stream(cmd: Sequence[str], cwd: Path, emit: Callable[[str], None], tail: int = 40,
           env: Mapping[str, str] | None = None) -> tuple[int, list[str]]:
    """Run `cmd`, passing each output line (stdout+stderr) to `emit`; return (exit code, last `tail` lines)."""
    last: deque[str] = deque(maxlen=tail)
    with subprocess.Popen(list(cmd), cwd=cwd, env=subprocess_env(env), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            last.append(line)
            emit(line)
        rc = proc.wait()
    return rc, list(last)


def read_metrics(root: Path, stage: str) -> dict[str, Any]:
    """`reports/<stage>/metrics.json` (the dvc.yaml metrics convention), or {} when the stage wrote none."""
    path = root / "reports" / stage / "metrics.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def stage_failure(stage: str, rc: int, last: Sequence[str]) -> PipelineError:
    """The error for a failed `dvc repro` of `stage`: one summary line carrying the stage's own `error:` line
    (what the CLI prints), the output tail attached. A stage that exited 2 rejected its input."""
    own = next((ln.strip() for ln in reversed(last) if ln.strip().startswith("error: ")), None)
    codes = _DVC_EXIT.findall("\n".join(last))
    child = int(codes[-1]) if codes else None
    summary = f"stage {stage!r} failed (`dvc repro --single-item {stage}` exited {rc})"
    summary += f": {own[len('error: '):]}" if own else "; its output is in the log above"
    cls = PipelineInputError if child == 2 else PipelineError
    return cls(summary, stage=stage, output=list(last)[-15:])


# --------------------------------------------------------------------------- executors
def execute_dvc(stage: str, root: Path, force: bool, emit: Callable[[str], None],
                force_prune: bool = False) -> dict[str, Any]:
    """Reproduce one stage with DVC; `ran` is False when DVC found it up to date and skipped it."""
    skipped = False

    def watch(line: str) -> None:
        nonlocal skipped  # DVC's own words are the only signal of a skip; a long stage log can't hide them
        skipped = skipped or line.startswith(f"Stage '{stage}' didn't change, skipping")
        emit(line)

    t0 = time.perf_counter()
    env = {}
    run_id = pipeline_run_id()
    if run_id:
        env[RUN_ENV] = run_id
    if force_prune:
        env[FORCE_PRUNE_ENV] = "1"
    rc, last = stream(dvc_command(stage, force), root, watch, env=env or None)
    seconds = round(time.perf_counter() - t0, 2)
    if rc != 0:
        raise stage_failure(stage, rc, last)
    ran = not skipped
    return {"stage": stage, "executor": "dvc", "ran": ran, "seconds": seconds,
            "metrics": read_metrics(root, stage)}


class _ForwardHandler(logging.Handler):
    """Copies stage-code log records into the Prefect run logger (so they show in the UI)."""

    def __init__(self, target: logging.Logger | logging.LoggerAdapter) -> None:
        super().__init__(logging.INFO)
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        self.target.log(record.levelno, "%s: %s", record.name, record.getMessage())


@contextmanager
def forward_logs(target: logging.Logger | logging.LoggerAdapter) -> Iterator[None]:
    handler = _ForwardHandler(target)
    loggers = [logging.getLogger(n) for n in STAGE_LOGGERS]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


def execute_inprocess(stage: str, root: Path, params_file: Path, logger: Any,
                      force_prune: bool = False) -> dict[str, Any]:
    """Call the stage's `run(params, paths)` in this process (tests, debugging); dvc.lock is not updated."""
    params = load_params(params_file)  # validated per stage: a bad edit fails before that stage's work
    if force_prune and stage == "ingest":
        params = with_force_prune(params, str(params_file))
    t0 = time.perf_counter()
    with forward_logs(logger):
        summary = registry.STAGES[stage].run(params, Paths(root))
    seconds = round(time.perf_counter() - t0, 2)
    summary = json.loads(json.dumps(summary or {}, default=str))  # JSON-able for the Prefect result
    return {"stage": stage, "executor": "inprocess", "ran": True, "seconds": seconds, "summary": summary,
            "metrics": read_metrics(root, stage)}


# --------------------------------------------------------------------------- Prefect
@task(log_prints=True)
def run_stage(name: str, root: str, executor: Executor = "dvc", params: str = "params.yaml",
              force: bool = False, force_prune: bool = False) -> dict[str, Any]:
    """One pipeline stage as a Prefect task (named like the stage by `stage_task`)."""
    logger = get_run_logger()
    stage = registry.STAGES[name]
    root_p = Path(root).resolve()
    logger.info("stage %s (executor=%s, tags=%s)", name, executor, list(stage.tags))
    if executor == "dvc":
        result = execute_dvc(name, root_p, force, lambda line: logger.info("%s", line), force_prune)
    elif executor == "inprocess":
        result = execute_inprocess(name, root_p, root_p / params, logger, force_prune)
    else:
        raise PipelineInputError(f"unknown executor {executor!r}; use dvc or inprocess")
    logger.info("stage %s %s in %.1f s", name, "ran" if result["ran"] else "was up to date", result["seconds"])
    return result


def retryable(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: bad input (params, an unknown stage, a stage that exited 2) fails the same way
    every time, so only other failures are retried."""
    return not isinstance(getattr(state, "data", None), InputError)


def stage_task(stage: registry.Stage, network_retries: int = 2, retry_delay_seconds: float = 30.0):
    """The Prefect task for one stage: its name, its registry tags (`gpu` -> the tag concurrency limit),
    retries when it touches the network (never for bad input)."""
    retries = network_retries if "network" in stage.tags else 0
    return run_stage.with_options(name=stage.name, task_run_name=stage.name, tags=list(stage.tags),
                                  retries=retries, retry_delay_seconds=retry_delay_seconds,
                                  retry_condition_fn=retryable)


@flow(name="pipeline", log_prints=True)
def pipeline_flow(root: str = ".", params: str = "params.yaml", executor: Executor = "dvc",
                  stages: list[str] | None = None, force: bool = False, network_retries: int = 2,
                  retry_delay_seconds: float = 30.0, force_prune: bool = False) -> list[dict[str, Any]]:
    """Run the dvc.yaml stages in order (all, or `stages`), each a Prefect task; stop at the first failure.
    `force_prune` runs ingest with ingest.force_prune=true (lets it prune images its sources stopped listing)."""
    root_p = Path(root).resolve()
    if executor == "dvc" and Path(params).name != "params.yaml":
        # dvc.yaml's `params: [<stage>]` always reads params.yaml: another file would run unrecorded params.
        raise PipelineInputError(f"--params {params}: the dvc executor reads params.yaml only; copy your file "
                                 "there or use --executor inprocess")
    order = plan(root_p, stages)
    logger = get_run_logger()
    logger.info("plan: %s (executor=%s, root=%s)", " -> ".join(order), executor, root_p)
    results = []
    for name in order:
        t = stage_task(registry.STAGES[name], network_retries, retry_delay_seconds)
        results.append(t(name, str(root_p), executor, params, force, force_prune))
    return results


# --------------------------------------------------------------------------- reporting
def format_results(results: Sequence[Mapping[str, Any]]) -> str:
    """A small table of what each stage did, for the CLI."""
    lines = [f"{'stage':<16}{'status':<14}{'seconds':>9}  metrics"]
    for r in results:
        status = "ran" if r["ran"] else "up to date"
        metrics = ", ".join(f"{k}={v}" for k, v in list(_scalars(r.get("metrics", {})).items())[:5])
        lines.append(f"{r['stage']:<16}{status:<14}{r['seconds']:>9.1f}  {metrics}")
    return "\n".join(lines)


def _scalars(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()
            if isinstance(v, (int, float, str, bool))}


def mlflow_ui_command(host: str = "127.0.0.1", port: int | None = None) -> list[str]:
    """The `mlflow ui` command over the project's tracking store (run from the project root)."""
    cmd = ["mlflow", "ui", "--backend-store-uri", "sqlite:///mlruns/mlflow.db",
           "--default-artifact-root", "mlruns/artifacts", "--host", host]
    return cmd + ["--port", str(port)] if port else cmd
